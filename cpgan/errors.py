"""User-facing errors.

``CpganError`` is a fatal problem with the user's input (a missing annotation file, a weights
file of the wrong size, a memory bank built for another vocabulary). Its message is one line
that names the file and the problem; the CLIs print it as ``error: ...`` and exit non-zero
instead of showing a traceback. Per-item problems (one corrupt image) are not raised as
``CpganError``: they are recorded by the stage and the item is skipped.
"""


class CpganError(Exception):
    """A fatal, user-facing error whose message is a single line naming file and problem."""


class ItemError(Exception):
    """A problem with one item (image, caption) that the calling stage records and skips."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space: a library's
    message quoted inside a ``CpganError`` must not break its single line."""
    return " ".join(str(text).split())
