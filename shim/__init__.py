"""pyshim: a containerd shim v2 in Python (runtime io.containerd.pyshim.v1).

The package is layered; a module imports only from its own layer and the ones below it
(tests/unit/test_layers.py checks this):

    binary/   what containerd runs: start, delete, the daemon, the zygote
    task/     the Task service: processes, their lifecycle, events
    runtime/  runc command lines, runtime options, container stdio
    linux/    Linux plumbing: libc, mounts, the reaper, cgroups, OOM
    ttrpc/    the ttrpc protocol, usable on its own
    api/      generated protobuf modules
"""

VERSION = "0.1.0"
RUNTIME = "io.containerd.pyshim.v1"
