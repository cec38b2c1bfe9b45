"""pyshim: a containerd shim v2 in Python (runtime io.containerd.pyshim.v1)."""
