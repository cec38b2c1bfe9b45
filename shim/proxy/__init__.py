"""The tracing proxy: a runtime that sits between containerd and any shim, recording and perturbing their traffic.

containerd knows it as PROXY_RUNTIME and runs its executable PROXY_BINARY like any shim;
it starts a real target shim (io.containerd.runc.v2 by default) and forwards ttrpc both
ways, on the task socket and on the events path, writing every call and event to a trace.
"""

PROXY_RUNTIME = "io.containerd.pyshimproxy.v1"
PROXY_BINARY = "containerd-shim-pyshimproxy-v1"
