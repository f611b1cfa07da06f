"""The docker backend: the engine client, cell images (registry or offline base), probes and the backend."""
