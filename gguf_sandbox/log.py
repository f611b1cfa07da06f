"""Diagnostics: the package's loggers, shown on stderr as plain lines (progress and results stay prints)."""

from __future__ import annotations

import logging
import sys

ROOT = "gguf_sandbox"


class _Stderr(logging.Handler):
    """Writes each record's message to whatever sys.stderr is when it is emitted (pytest swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stderr must not turn a diagnostic into a crash
            self.handleError(record)


def get(name: str) -> logging.Logger:
    """The logger of module `name` (pass __name__). The package's loggers print their message alone on
    stderr, as the command line always did; an application embedding gguf_sandbox can replace the handler
    of logging.getLogger("gguf_sandbox")."""
    package = logging.getLogger(ROOT)
    if not any(isinstance(handler, _Stderr) for handler in package.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
    return logging.getLogger(name)
