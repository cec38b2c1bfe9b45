"""Commands for people: reading traces, installing the shim on a node."""
