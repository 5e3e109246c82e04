"""Text cells safe for a UTF-8 stream and a spreadsheet: shared by the output writers (``writers``) and the
matrix file's whole-index re-tag (``matrixfile.retag``), so the pipeline need not import the output layer."""

from __future__ import annotations

import re

# Cells a spreadsheet would read as a formula (or, for "'", whose quote it would swallow).
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` without lone surrogates (U+FFFD instead), so a UTF-8 stream can always hold it."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def csv_escape(cell: str) -> str:
    """A text cell a spreadsheet shows as text: a formula-like start gets one ``'`` in front."""
    return "'" + cell if cell.startswith(CSV_FORMULA_START) else cell


def csv_unescape(cell: str) -> str:
    """The original text of a cell ``csv_escape`` wrote."""
    return cell[1:] if cell.startswith("'") else cell
