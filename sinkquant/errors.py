"""Error types that the CLI turns into one line on stderr.

Two kinds, as users need to tell them apart: `InputError` means what was *given* is wrong (a path,
a recipe, an option) and is fixed by changing the command; `SinkQuantError` means a step failed on
valid input. Both carry a message that says what is wrong and what to do about it.
"""

from __future__ import annotations


class SinkQuantError(Exception):
    """A failure on valid input. The CLI prints `error: <message>` and exits with 1."""

    exit_code = 1


class InputError(SinkQuantError, ValueError):
    """Bad input from the user (path, recipe, option). The CLI prints it and exits with 2."""

    exit_code = 2
