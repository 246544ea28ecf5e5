"""Exceptions that carry a message meant for the user (no traceback)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or configuration: the CLI prints it as one line and exits with code 2."""
