"""Linux plumbing: the C library, rootfs mounts, the reaper, cgroups and OOM, the shim's placement."""
