"""The one exception hierarchy of gguf-sandbox: every error we raise derives from GGUFSandboxError."""

from __future__ import annotations


class GGUFSandboxError(Exception):
    """Root of every error gguf-sandbox raises on purpose."""


class GGUFError(GGUFSandboxError):
    """A GGUF file is malformed, truncated, hostile or uses something we do not support."""


class UnsupportedTensorType(GGUFError):
    """A tensor uses a GGML type we cannot dequantize."""


class KernelRefused(GGUFSandboxError):
    """onnxruntime's float32 kernel cannot hold resident-f32's matrices here (no pages or threads for it,
    a process-wide pool it cannot use, or rows it would read again after packing them); the engine
    catches it and multiplies with numpy instead."""


class BudgetExceeded(GGUFSandboxError):
    """A memory reservation would break the single-allocation cap or the detected limit."""

    def __init__(self, what: str, needed: int, available: int, hint: str = "") -> None:
        self.what = what
        self.needed = needed
        self.available = available
        self.hint = hint
        message = f"{what}: needs {needed:,} bytes, only {available:,} available" + (
            f"; {hint}" if hint else ""
        )
        super().__init__(message)


class MatrixError(GGUFSandboxError):
    """matrix.yaml is malformed or asks for something that does not exist."""


class SandboxError(GGUFSandboxError):
    """A sandbox backend (cgroup, docker, image build) could not do its job."""
