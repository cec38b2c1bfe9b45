"""The tracing proxy: a runtime that sits between containerd and any shim, recording and perturbing their traffic."""
