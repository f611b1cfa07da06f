"""gguf-sandbox: bounded GGUF reading and embedding, and a resource-limit test matrix for them."""

from __future__ import annotations

__version__ = "0.1.0"
