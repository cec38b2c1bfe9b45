"""What containerd runs: the binary contract (start, delete), the daemon and the zygote."""
