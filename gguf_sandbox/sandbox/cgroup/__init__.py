"""The local cgroup backend: placement of a cell in a memory cgroup, the limited process, the backend."""
