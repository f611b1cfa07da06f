"""A cgroup-v2 test platform: a cached Debian guest booted under QEMU that runs the v2 suite and matrix."""
