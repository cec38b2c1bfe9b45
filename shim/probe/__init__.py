"""Tracing and failpoints: what an experiment on shim behaviour records and perturbs (off by default, free when off)."""
