"""Writing a measured table into RESULTS.md: each bench script owns one marked block."""
from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, begin: str, end: str, block: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in place of the
    file's block between those markers, or append it when the file has none; the rest of
    the file (the prose beside the tables) is kept as it is."""
    text = path.read_text() if path.is_file() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
