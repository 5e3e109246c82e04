"""Caption sidecars (``sdltag tag --txt``): ``IMG.txt`` with comma-separated keywords, merged like XMP.

The convention the caption-training tools read (kohya-style datasets, the WD14 taggers'
own output): a text file beside each image with the same stem, ``tag1, tag2, tag3``. When
``IMG.jpg.txt`` exists it is the caption file instead (the other naming ``sdltag train``
reads); otherwise ``IMG.txt`` is written.

What a re-run may remove is only what sdltag provably added. Each write records the
words it added in a small hidden companion file beside the caption, ``.IMG.txt.sdltag``
(JSON), the way an XMP sidecar records them in ``sdltag:addedSubject``. The record lives
beside the caption, not in the index, so it holds with ``--no-index`` and on another
machine's index, and moves, copies and renames with the folder; training tools read only
``IMG.txt`` and sdltag's walk skips hidden names. A word already in the caption when
sdltag first proposes it is never recorded, so never removed; a recorded word no longer in
the caption (the user deleted it) is forgotten; a lost record only means sdltag's earlier
words stay for good. The caption is written before the record, so a run killed between the
two leaves words that the next run keeps rather than removes.

The caption's own formatting is kept: the user's words, separators (commas or line breaks)
and final line break stay as they were; sdltag's words are appended as ``, word`` and
removed with their separator. A caption sdltag cannot read safely (not a regular file, not
UTF-8, larger than ``MAX_BYTES``) raises ``CaptionError`` and is left untouched. Both files
are replaced atomically (``sdltag.paths.atomic_write``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from sdltag.errors import SdltagError
from sdltag.paths import UnreadableFile, atomic_write, read_regular_file
from sdltag.sidecars import caption_path as caption_path  # the sidecar naming lives in sdltag.sidecars

MAX_BYTES = 1 << 20  # a caption is a line of words; more is not a caption file
RECORD_SUFFIX = ".sdltag"
_SEPARATOR = re.compile(r"(,|\r\n|\n|\r)")


class CaptionError(SdltagError):
    """A caption file that exists but cannot be read or written safely; it is never overwritten."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}", exit_code=1)
        self.path = path
        self.reason = reason


def record_path(caption: Path) -> Path:
    """The hidden record of the words sdltag added: ``.IMG.txt.sdltag`` beside the caption."""
    return caption.with_name(f".{caption.name}{RECORD_SUFFIX}")


def _read_text(path: Path, what: str) -> str | None:
    """The UTF-8 text of ``path``; None when missing. Only regular files are opened (a FIFO would block)."""
    try:
        data = read_regular_file(path, MAX_BYTES)
    except UnreadableFile as exc:
        if exc.kind == "special":
            raise CaptionError(
                path, f"the {what} is not a regular file (a folder, FIFO or device); left untouched"
            ) from None
        if exc.kind == "large":
            raise CaptionError(path, f"the {what} is larger than {MAX_BYTES // 1024} KB; left untouched") from None
        raise CaptionError(path, f"cannot read the {what} ({exc.reason}); left untouched") from None
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaptionError(
            path, f"the {what} is not UTF-8 (byte 0x{data[exc.start]:02x}); left untouched, save it as UTF-8"
        ) from None


def _read_record(path: Path) -> list[str]:
    """The words a record lists; a damaged record counts as none (then nothing is removed)."""
    try:
        text = _read_text(path, "caption record")
    except CaptionError:
        return []
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    added = data.get("added") if isinstance(data, dict) else None
    return [str(word) for word in added if isinstance(word, str)] if isinstance(added, list) else []


def caption_word(label: str) -> str:
    """A label as one caption word: a comma (the separator) becomes a space, whitespace collapses."""
    return " ".join(label.replace(",", " ").split())


def merge_caption(text: str, recorded: Iterable[str], keywords: Iterable[str]) -> tuple[str, list[str]]:
    """``text`` with sdltag's old words replaced by ``keywords``; returns (new text, the words sdltag now owns).

    Case-insensitive like XMP: a word present is never added twice, and only a word in
    ``recorded`` (what sdltag added before) that is not among ``keywords`` is removed.
    """
    wanted: list[str] = []
    for word in map(caption_word, keywords):
        if word and word.casefold() not in {w.casefold() for w in wanted}:
            wanted.append(word)
    wanted_keys = {w.casefold() for w in wanted}
    parts = _SEPARATOR.split(text)  # word, separator, word, separator, ..., word
    words, separators = parts[0::2], [*parts[1::2], ""]
    present = {w.strip().casefold() for w in words if w.strip()}
    ours = {w.casefold() for w in recorded} & present
    removed = {key for key in ours if key not in wanted_keys}
    kept_words: list[str] = []
    kept_separators: list[str] = []
    for i, (word, separator) in enumerate(zip(words, separators, strict=True)):
        if word.strip().casefold() in removed:
            # The word goes with one comma; a line break or the end of the text after it stays.
            if kept_separators and separator != "," and kept_separators[-1] == ",":
                kept_separators[-1] = separator
            continue
        if not kept_words and i > 0:
            word = word.lstrip(" \t")  # the first words went: no space left at the start
        kept_words.append(word)
        kept_separators.append(separator)
    body = "".join(w + s for w, s in zip(kept_words, kept_separators, strict=True))
    new = [w for w in wanted if w.casefold() not in present]
    if new:
        ending = body[len(body.rstrip("\r\n")) :]  # the file's final line break stays last
        core = body[: len(body) - len(ending)]
        if core.strip():
            core = core.rstrip(" \t")
            core += ("" if core.endswith(",") else ",") + " " + ", ".join(new)
        else:
            core = ", ".join(new)
        body = core + ending
    still_ours = [w for w in wanted if w.casefold() in (ours - removed) or w.casefold() not in present]
    return body, still_ours


def write_caption(caption: Path, keywords: list[str], *, dry_run: bool = False) -> bool:
    """Merge ``keywords`` into the caption file (created if missing), atomically, and update its record.

    Returns True when the caption was (or, with ``dry_run``, would be) changed; an identical
    re-run changes nothing. A caption that cannot be read safely raises ``CaptionError``.
    """
    caption = Path(caption)
    text = _read_text(caption, "caption file")
    record = record_path(caption)
    recorded = _read_record(record) if text is not None else []
    new_text, ours = merge_caption(text or "", recorded, keywords)
    changed = text is None or new_text != text
    if dry_run:
        return changed
    if changed:
        try:
            with atomic_write(caption, "w", encoding="utf-8") as handle:
                handle.write(new_text)
        except OSError as exc:
            raise CaptionError(caption, f"cannot write the caption file ({exc.strerror or exc})") from None
    if {w.casefold() for w in ours} != {w.casefold() for w in recorded} or (ours and not record.exists()):
        try:
            if ours:
                with atomic_write(record, "w", encoding="utf-8") as handle:
                    json.dump({"sdltag_caption_record": 1, "added": ours}, handle, ensure_ascii=False)
                    handle.write("\n")
            else:
                record.unlink(missing_ok=True)
        except OSError as exc:
            raise CaptionError(
                record, f"cannot record sdltag's words ({exc.strerror or exc}); they will be kept as the user's"
            ) from None
    return changed
