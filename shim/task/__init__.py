"""The Task service: containers and their processes, the lifecycle rules, events."""
