"""The error a user can fix: `UsageError`, printed by the CLI as one line (``miles: error: ...``).

Kept free of heavy imports, so that the `miles` command can report mistakes, and print its usage,
without loading torch.
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake the user can fix (bad flag, bad data, missing file). Its message is one sentence that
    names the problem and the fix; the CLI prints it without a traceback and exits with status 2."""
