"""`python -m gguf_sandbox.controls CONTROL …`: the controls' entry point, kept at this path because cell
fingerprints hold this argv; the controls themselves live in workloads/controls.py."""

from __future__ import annotations

import sys

from gguf_sandbox.workloads.controls import main

if __name__ == "__main__":
    sys.exit(main())
