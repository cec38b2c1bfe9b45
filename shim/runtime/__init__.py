"""The runtime layer: runc (or crun) command lines, runtime options, container stdio."""
