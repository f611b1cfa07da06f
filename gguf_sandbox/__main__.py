"""`python -m gguf_sandbox` runs the command line."""

from __future__ import annotations

from gguf_sandbox.cli import main

raise SystemExit(main())
