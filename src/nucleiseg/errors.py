"""Exceptions that mark a user mistake (bad path, unreadable file, wrong layout).

The command line catches :class:`NucleisegError` and prints its message as one
line without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class NucleisegError(Exception):
    """A problem with the user's input, reported as one line naming the path.

    Parameters
    ----------
    message : str
        What is wrong, phrased for the user.
    path : str or Path, optional
        The file or folder concerned; put in front of the message.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.message = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class ImageReadError(NucleisegError):
    """An image file that does not exist, is empty, truncated or not an image."""


class OptionError(NucleisegError, ValueError):
    """An option value out of range, naming the option as the library calls it (``tile``, ``min_size``).

    The message reads ``"<option> <detail>"`` ("scale must be a number > 0, got 0");
    a front end puts its own spelling of the option in front of ``detail``
    (the command line: ``--scale``); see :meth:`reworded`.
    """

    def __init__(self, option: str, detail: str):
        self.option = option
        self.detail = detail
        super().__init__(f"{option} {detail}")

    def reworded(self, name: str) -> str:
        """The message with the option called ``name``."""
        return f"{name} {self.detail}"
