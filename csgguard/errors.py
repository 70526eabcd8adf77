"""The one exception type users see.

Anything a user can cause (a bad path, a wrong hash, an unknown name) raises
:class:`CsgguardError` with a one-line message that names the file or value and
the problem. The CLI prints that line and exits with status 2; it never shows a
traceback for these.
"""

from __future__ import annotations


class CsgguardError(Exception):
    """A problem with the user's input, files or settings (not a bug)."""

    exit_code = 2


class ArtifactError(CsgguardError):
    """A model, detector or adversarial-set file is missing, tampered with or foreign."""


class DataError(CsgguardError):
    """A dataset or image could not be found, read or verified."""
