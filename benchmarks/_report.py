"""The one way a benchmark hands over its Markdown: printed, and appended to ``--out`` when given."""

from __future__ import annotations


def emit(text: str, out: str | None) -> int:
    """Print ``text``; append it (and a blank line) to the file ``out`` when set. Returns 0."""
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0
