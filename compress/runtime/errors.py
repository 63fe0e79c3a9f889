"""The runtime's one user-facing error: the CLI prints it in one line and exits 2."""

from __future__ import annotations


class RuntimeInputError(ValueError):
    """Bad input to the runtime: an unsupported checkpoint, a prompt too long for the context, ..."""
