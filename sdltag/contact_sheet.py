"""The HTML contact sheet of a ``tag`` or ``search`` run: thumbnails with their tags, to review before keeping them.

One self-contained HTML file: no network, no external script, style or font (a
Content-Security-Policy in the page allows only its own inline script and style, by
hash, and images from ``data:`` or beside the file). The results travel as one JSON
block; a few dozen lines of plain JavaScript render the grid a page at a time as the
reader scrolls (a 20,000-photo sheet shows its first photos at once) and filter it by
label (with or without). Every name is escaped for the context it lands in: JSON inside
the script block has ``<``, ``>`` and ``&`` escaped, the script writes text with
``textContent`` only, and the server-rendered parts (title, failed files) go through
``html.escape``. Links to the originals are ``file://`` URLs built from the path's
bytes, so a name that is not valid UTF-8 still links to its file.

Thumbnails (JPEG, at most ``THUMB_SIZE`` px on the long side) come from the decode the
tagger already did for the model (``TagResult.thumbnail``), so they are as large as that
decode: at least the model's input size (JPEGs are decoded at a reduced DCT scale and
other images reduced by whole factors to just cover it; about 130-190 px for a 96 px
model). Files the run did not decode (reused from the index, or found by ``search``)
get one from a reduced-scale decode of their own on a thread pool.
They are embedded as ``data:`` URIs while they total at most ``EMBED_MAX_BYTES`` (one
file to move or mail); past that they go to a ``NAME_files/`` folder beside the sheet,
so the browser parses a small page and loads only the thumbnails in view.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sdltag.errors import SdltagError

logger = logging.getLogger(__name__)

THUMB_SIZE = 240  # px, long side: a 200 px card, sharp enough to judge a tag
THUMB_QUALITY = 72
# Up to this many bytes of JPEG thumbnails (about 1,000 photos) are embedded in the page as data URIs:
# one file, and the browser still parses it in well under a second. Past it, a folder beside the page.
EMBED_MAX_BYTES = 8 << 20
MARKER = ".sdltag-contact-sheet"  # in a thumbnail folder sdltag wrote (only such a folder is ever replaced)
_THUMB_NAME = re.compile(r"^\d{6,}\.jpg$")
SCORE_DIGITS = 3
MAX_PENDING = 256  # thumbnails being made on the pool at once (each result waits beyond that)


def thumbnail_jpeg(image, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of a decoded RGB Pillow image, at most ``size`` px on the long side (the image is not changed)."""
    from PIL import Image

    width, height = image.size
    scale = min(1.0, size / max(width, height, 1))
    small = image
    if scale < 1.0:
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    if small.mode != "RGB":
        small = small.convert("RGB")
    out = io.BytesIO()
    small.save(out, "JPEG", quality=THUMB_QUALITY)
    return out.getvalue()


def file_thumbnail(path: Path, size: int = THUMB_SIZE, max_megapixels: float = 100.0) -> bytes | None:
    """A thumbnail of a file the run did not decode (JPEGs decode at a reduced scale); None if it cannot be read."""
    from sdltag.images import ImageError, open_image

    try:
        image = open_image(Path(path), max_megapixels=max_megapixels, target=(size, size))
    except ImageError:
        return None
    return thumbnail_jpeg(image, size)


def file_url(path: Path | str) -> str:
    """``file://`` URL of ``path`` (made absolute), percent-encoding its bytes (non-UTF-8 names included)."""
    text = os.path.abspath(os.fsdecode(os.fspath(path)))
    if os.name == "nt":  # pragma: no cover - drive letters and backslashes: pathlib knows the rules
        return Path(text).as_uri()
    from urllib.parse import quote_from_bytes

    return "file://" + quote_from_bytes(os.fsencode(text), safe="/")


def clean_label(text: str) -> str:
    """A label as text any UTF-8 page can hold (a lone surrogate becomes U+FFFD)."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def display_path(path: Path | str) -> str:
    """A path as readable text: bytes that are not UTF-8 are shown as ``\\xNN``."""
    text = os.fsdecode(os.fspath(path))
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _json_for_script(data: object) -> str:
    """JSON that cannot end its ``<script>`` block or open a comment: ``<``, ``>``, ``&`` as escapes."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def thumbs_folder_for(output: Path) -> Path:
    """Where the thumbnails of ``output`` go when they are not embedded: ``review.html`` -> ``review_files``."""
    output = Path(output)
    return output.with_name(output.stem + "_files")


def is_sdltag_folder(folder: Path) -> bool:
    """True for a thumbnail folder sdltag wrote and nobody added to: its marker and thumbnails, nothing else."""
    folder = Path(folder)
    if not (folder / MARKER).is_file() or folder.is_symlink():
        return False
    with os.scandir(folder) as entries:
        return all(
            e.is_file(follow_symlinks=False) and (e.name == MARKER or _THUMB_NAME.match(e.name)) for e in entries
        )


@dataclass
class _Item:
    display: str
    href: str
    tags: list  # [label index, score, label index, score, ...]
    rank: int | None = None


class ContactSheetWriter:
    """A ``ResultWriter`` that writes the contact sheet when closed.

    ``stream`` receives the page (with ``output``, the path it will be renamed to, which
    names the thumbnail folder; without it every thumbnail is embedded). ``problem``
    records a file that could not be tagged, listed with its reason.
    """

    def __init__(
        self,
        stream: IO[str],
        output: Path | None = None,
        *,
        title: str = "",
        kind: str = "tag",
        embed_max_bytes: int = EMBED_MAX_BYTES,
        thumb_size: int = THUMB_SIZE,
        max_megapixels: float = 100.0,
        threads: int | None = None,
    ) -> None:
        self.stream = stream
        self.output = Path(output) if output is not None else None
        self.title = clean_label(title or ("sdltag search" if kind == "search" else "sdltag contact sheet"))
        self.kind = kind
        self.embed_max_bytes = embed_max_bytes
        self.thumb_size = thumb_size
        self.max_megapixels = max_megapixels
        self.items: list[_Item] = []
        # a thumbnail: JPEG bytes, being made, its file name in the staging folder, or None (none could be made)
        self.thumbs: list[bytes | Future[bytes | None] | str | None] = []
        self.problems: list[tuple[str, str, str]] = []  # (display, href, reason)
        self.labels: dict[tuple[str, str], int] = {}  # (label as shown, kind) -> index
        self.label_index: dict[tuple[str, str], int] = {}  # (label as given, kind) -> index
        self.thumb_bytes = 0
        self.folder: Path | None = None  # the final thumbnail folder, once the thumbnails spill to disk
        self.staging: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self.writes: list[Future] = []  # thumbnails being written to the staging folder
        self.front = 0  # thumbnails before this index are resolved (bytes, a file name or None)
        self.written_to_disk = 0  # thumbnails already in the staging folder (items [0, written_to_disk))
        self.pool = ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1), thread_name_prefix="thumb")
        # A NAME_files that sdltag did not write (or that holds other files) is never touched: the
        # thumbnails are then all embedded, however many.
        self.folder_blocked = False
        if self.output is not None:
            folder = thumbs_folder_for(self.output)
            self.folder_blocked = (folder.exists() or folder.is_symlink()) and not is_sdltag_folder(folder)

    # -- results -------------------------------------------------------------------------------
    def _label(self, name: str, kind: str) -> int:
        index = self.label_index.get((name, kind))
        if index is None:
            key = (clean_label(name), kind)
            index = self.labels.get(key)
            if index is None:
                index = self.labels[key] = len(self.labels)
            self.label_index[(name, kind)] = index
        return index

    def _add(self, path: Path, tags: list, thumbnail: bytes | None, rank: int | None = None) -> None:
        self.items.append(_Item(display_path(path), file_url(path), tags, rank))
        if thumbnail is None:
            self.thumbs.append(self.pool.submit(file_thumbnail, Path(path), self.thumb_size, self.max_megapixels))
        else:
            self.thumbs.append(thumbnail)
            self._count(thumbnail)
        # Collect finished thumbnails in order (so they can spill to disk), waiting when too many are pending.
        while self.front < len(self.thumbs):
            thumb = self.thumbs[self.front]
            if isinstance(thumb, Future) and not thumb.done() and len(self.thumbs) - self.front < MAX_PENDING:
                break
            self._resolve(self.front)
            self.front += 1

    def _count(self, thumbnail: bytes) -> None:
        before = self.thumb_bytes
        self.thumb_bytes += len(thumbnail)
        if self.output is None or self.thumb_bytes <= self.embed_max_bytes:
            return
        if not self.folder_blocked:
            self._spill()
        elif before <= self.embed_max_bytes:
            logger.warning(
                f"{thumbs_folder_for(self.output)} is not a thumbnail folder sdltag wrote: every thumbnail is "
                "embedded in the page instead (a larger file); move that folder to have them beside it"
            )

    def write(self, result) -> None:
        """One ``TagResult``."""
        tags = []
        for tag in result.tags:
            tags += [self._label(tag.label, tag.kind), round(float(tag.score), SCORE_DIGITS)]
        self._add(result.path, tags, getattr(result, "thumbnail", None))

    def write_hit(self, hit) -> None:
        """One ``SearchHit``."""
        self._add(hit.path, [self._label(hit.label, hit.kind), round(float(hit.score), SCORE_DIGITS)], None, hit.rank)

    def problem(self, path: Path | str, reason: str) -> None:
        self.problems.append((display_path(path), file_url(path), clean_label(reason)))

    # -- thumbnails ------------------------------------------------------------------------------
    def _resolve(self, i: int) -> bytes | str | None:
        thumb = self.thumbs[i]
        if isinstance(thumb, Future):
            thumb = thumb.result()
            self.thumbs[i] = thumb
            if thumb is not None:
                self._count(thumb)
        return thumb

    def _spill(self) -> None:
        """Past the embedding limit: move the thumbnails so far to a staging folder, and the next ones as they come."""
        if self.staging is None:
            assert self.output is not None
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.output.stem}_files.", dir=self.output.parent))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.staging), True)
            (self.staging / MARKER).write_text("thumbnails of an sdltag contact sheet\n", encoding="utf-8")
        for i in range(self.written_to_disk, len(self.thumbs)):
            thumb = self.thumbs[i]
            if isinstance(thumb, bytes):
                self._store(i, thumb)
            elif isinstance(thumb, Future):
                break  # still being made: written when resolved
        else:
            self.written_to_disk = len(self.thumbs)
            return
        self.written_to_disk = i

    def _store(self, i: int, thumb: bytes) -> None:
        """Write thumbnail ``i`` into the staging folder, on the pool (creating files is slow on a busy disk)."""
        assert self.staging is not None
        name = f"{i:06d}.jpg"
        self.writes.append(self.pool.submit((self.staging / name).write_bytes, thumb))
        self.thumbs[i] = name
        if len(self.writes) >= MAX_PENDING:
            self._check_writes(wait=False)

    def _check_writes(self, wait: bool) -> None:
        """Raise the first failed thumbnail write (a full disk) as one clear error; keep the pending ones."""
        pending = []
        for future in self.writes:
            if wait or future.done():
                try:
                    future.result()
                except OSError as exc:
                    assert self.output is not None  # thumbnails are written to disk only beside an output file
                    raise SdltagError(
                        f"{thumbs_folder_for(self.output)}: cannot write the contact sheet's thumbnails "
                        f"({exc.strerror or exc}); free some space or choose another --output folder."
                    ) from None
            else:
                pending.append(future)
        self.writes = pending

    def _src(self, i: int, folder_url: str) -> str:
        thumb = self._resolve(i)
        if thumb is None:
            return ""
        if isinstance(thumb, str):
            return folder_url + thumb
        if self.staging is not None:
            self._store(i, thumb)
            return folder_url + f"{i:06d}.jpg"
        return "data:image/jpeg;base64," + base64.b64encode(thumb).decode("ascii")

    def _place_folder(self) -> None:
        """Put the staging folder in place of ``NAME_files`` (an earlier one of sdltag's is replaced)."""
        assert self.output is not None and self.staging is not None
        folder = thumbs_folder_for(self.output)
        old = None
        if folder.exists() or folder.is_symlink():
            if not is_sdltag_folder(folder):
                raise SdltagError(
                    f"{folder} appeared during the run and was not written by sdltag; the contact sheet is not written."
                )
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / "x")
        os.replace(self.staging, folder)
        if self._finalizer is not None:
            self._finalizer.detach()
        self.folder = folder
        if old is not None:
            _remove_sdltag_folder(old / "x")
            try:
                old.rmdir()
            except OSError:
                pass

    # -- the page --------------------------------------------------------------------------------
    def close(self) -> None:
        from urllib.parse import quote

        folder_url = ""
        if self.output is not None:
            # Resolve every pending thumbnail first: their sizes decide embedding.
            for i in range(len(self.thumbs)):
                self._resolve(i)
            folder_url = quote(thumbs_folder_for(self.output).name) + "/"
        srcs = [self._src(i, folder_url) for i in range(len(self.items))]
        self._check_writes(wait=True)
        self.pool.shutdown(wait=True)
        data = {
            "kind": self.kind,
            "labels": [[name, kind] for (name, kind) in self.labels],
            "items": [
                [item.display, item.href, src, item.tags] + ([item.rank] if item.rank is not None else [])
                for item, src in zip(self.items, srcs, strict=True)
            ],
        }
        if self.staging is not None:
            self._place_folder()
        elif self.output is not None:
            stale = thumbs_folder_for(self.output)
            # an earlier, larger sheet's thumbnails: this one embeds its own
            if stale.is_dir() and is_sdltag_folder(stale):
                _remove_sdltag_folder(stale)
        self.stream.write(render_page(self.title, data, self.problems, self._summary()))
        self.stream.flush()

    def _summary(self) -> str:
        seen = sum(1 for (_, kind) in self.labels if kind != "unseen")
        unseen = len(self.labels) - seen
        parts = [f"{len(self.items)} photo{'s' if len(self.items) != 1 else ''}"]
        if self.problems:
            parts.append(f"{len(self.problems)} could not be tagged")
        parts.append(f"{seen} seen and {unseen} zero-shot label{'s' if unseen != 1 else ''} among the tags")
        return ", ".join(parts) + f"; made by sdltag on {time.strftime('%Y-%m-%d %H:%M', time.localtime())}"


def _remove_sdltag_folder(folder: Path) -> None:
    """Remove a thumbnail folder sdltag wrote: only its own files (anything else found meanwhile keeps it)."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and (_THUMB_NAME.match(entry.name) or entry.name == MARKER):
            os.unlink(entry.path)
    try:
        folder.rmdir()
    except OSError:
        logger.warning(f"{folder}: kept (it holds files sdltag did not write)")


STYLE = """
:root{--bg:#f4f4f2;--card:#fff;--ink:#1d1d1b;--dim:#6b6b66;--seen:#2f6f9f;--zs:#b0561b}
*{box-sizing:border-box}
body{margin:0;font:14px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--ink)}
header{position:sticky;top:0;z-index:1;background:var(--bg);padding:10px 16px;border-bottom:1px solid #ddd}
h1{font-size:18px;margin:0 0 4px}
.meta{color:var(--dim);font-size:12px}
.controls{display:flex;gap:12px;align-items:center;flex-wrap:wrap;margin-top:6px}
#filter{width:min(480px,100%);padding:5px 8px;font:inherit}
.legend .seen,.legend .zs{display:inline-block;width:10px;height:10px;margin:0 3px 0 8px}
.legend .seen{background:var(--seen)}.legend .zs{background:var(--zs)}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px;padding:14px 16px}
figure{margin:0;background:var(--card);border-radius:6px;box-shadow:0 1px 2px #0002;overflow:hidden}
figure .ph{display:block;height:150px;background:#e6e6e2;text-align:center}
figure img{width:100%;height:150px;object-fit:contain;display:block}
figcaption{padding:6px 8px 8px}
.name{font-weight:600;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;display:block;color:inherit;text-decoration:none}
.rank{color:var(--dim);font-weight:400;margin-right:4px}
ul.tags{list-style:none;margin:4px 0 0;padding:0}
ul.tags li{display:grid;grid-template-columns:1fr 64px 38px;gap:6px;align-items:center;font-size:12px}
.label{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.label.zs::before{content:"\\2726 ";color:var(--zs)}
.bar{height:7px;background:#eee;border-radius:4px;overflow:hidden}
.bar i{display:block;height:100%;background:var(--seen)}
li.zs .bar i{background:var(--zs)}
.score{text-align:right;font-variant-numeric:tabular-nums;color:var(--dim)}
#more{display:block;margin:4px auto 24px;padding:6px 14px;font:inherit}
#more[hidden]{display:none}
#failed{margin:0 16px 24px;padding:8px 12px;background:#fff4f0;border:1px solid #f0c8b8;border-radius:6px}
#failed li{margin:2px 0;word-break:break-all}
.empty{padding:20px 16px;color:var(--dim)}
"""

SCRIPT = """
(function(){
"use strict";
var D=JSON.parse(document.getElementById("sheet-data").textContent);
var grid=document.getElementById("grid"),box=document.getElementById("filter"),
    count=document.getElementById("count"),more=document.getElementById("more");
var PAGE=120,shown=D.items,next=0;
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;
  if(text!==undefined)e.textContent=text;return e;}
function card(it){
  var f=el("figure"),a=el("a","ph");a.href=it[1];a.title=it[0];
  if(it[2]){var img=el("img");img.loading="lazy";img.decoding="async";img.alt=it[0];img.src=it[2];a.appendChild(img);}
  f.appendChild(a);var c=el("figcaption"),n=el("a","name");n.href=it[1];n.title=it[0];
  if(it.length>4)n.appendChild(el("span","rank","#"+it[4]));
  n.appendChild(document.createTextNode(it[0].split("/").pop()));c.appendChild(n);
  var ul=el("ul","tags");
  for(var k=0;k<it[3].length;k+=2){var lab=D.labels[it[3][k]],s=it[3][k+1],zs=lab[1]==="unseen";
    var li=el("li",zs?"zs":"seen"),l=el("span","label"+(zs?" zs":""),lab[0]);
    l.title=lab[0]+(zs?" (zero-shot label)":" (seen label)");
    var b=el("span","bar"),i=el("i");i.style.width=Math.max(0,Math.min(1,s))*100+"%";b.appendChild(i);
    li.appendChild(l);li.appendChild(b);li.appendChild(el("span","score",s.toFixed(2)));ul.appendChild(li);}
  c.appendChild(ul);f.appendChild(c);return f;}
function render(){var end=Math.min(next+PAGE,shown.length),frag=document.createDocumentFragment();
  for(;next<end;next++)frag.appendChild(card(shown[next]));grid.appendChild(frag);
  count.textContent=(shown.length===D.items.length?shown.length+" photos":
    shown.length+" of "+D.items.length+" photos")+(next<shown.length?" ("+next+" shown so far)":"");
  more.hidden=next>=shown.length;}
function apply(text){var want=[],avoid=[],index={};
  D.labels.forEach(function(l,i){var k=l[0].toLowerCase();(index[k]=index[k]||[]).push(i);});
  function term(t){t=t.trim();var neg=t.charAt(0)==="-";if(neg)t=t.slice(1).trim();
    if(t)(neg?avoid:want).push(index[t.toLowerCase()]||[]);return t;}
  var whole=text.trim().replace(/^-/,"").trim().toLowerCase();  /* one label with a comma in it */
  if(whole&&index[whole])term(text);else text.split(",").forEach(term);
  function has(it,ids){for(var k=0;k<it[3].length;k+=2)if(ids.indexOf(it[3][k])>=0)return true;return false;}
  shown=D.items.filter(function(it){return want.every(function(ids){return has(it,ids);})&&
    !avoid.some(function(ids){return has(it,ids);});});
  grid.textContent="";next=0;render();document.body.setAttribute("data-filter",text);}
var list=document.getElementById("labels");
D.labels.forEach(function(l){var o=el("option");o.value=l[0];list.appendChild(o);});
box.addEventListener("input",function(){apply(box.value);
  history.replaceState(null,"","#filter="+encodeURIComponent(box.value));});
more.addEventListener("click",render);
if("IntersectionObserver" in window)new IntersectionObserver(function(e){
  if(e[0].isIntersecting&&next<shown.length)render();},{rootMargin:"800px"}).observe(more);
var h=/^#filter=(.*)$/.exec(location.hash);
if(h){try{box.value=decodeURIComponent(h[1]);}catch(err){box.value="";}}
apply(box.value);document.body.setAttribute("data-ready","1");
if(window.performance&&performance.mark)performance.mark("sdltag-grid");
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def render_page(title: str, data: dict, problems: list[tuple[str, str, str]], summary: str) -> str:
    """The whole page: escaped header and failed-file list, the JSON data block, the style and script."""
    esc = html.escape
    csp = (
        f"default-src 'none'; img-src 'self' data: file:; style-src {_csp_hash(STYLE)}; "
        f"script-src {_csp_hash(SCRIPT)}; base-uri 'none'; form-action 'none'"
    )
    failed = ""
    if problems:
        rows = "\n".join(
            f'<li><a href="{esc(href)}">{esc(shown)}</a>: {esc(reason)}</li>' for shown, href, reason in problems
        )
        failed = (
            f'<details id="failed" open><summary>{len(problems)} file{"s" if len(problems) != 1 else ""} '
            f"could not be tagged</summary>\n<ul>\n{rows}\n</ul></details>\n"
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="sdltag">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<header><h1>{esc(title)}</h1>\n"
        f'<div class="meta">{esc(summary)}</div>\n'
        '<div class="controls"><input id="filter" type="search" list="labels" autocomplete="off" '
        'placeholder="label, or -label for photos without it; commas for several" '
        'aria-label="filter by label"><datalist id="labels"></datalist>'
        '<span id="count" class="meta"></span>'
        '<span class="legend meta"><span class="seen"></span>seen label<span class="zs"></span>'
        "zero-shot label \u2726</span></div></header>\n"
        '<noscript><p class="empty">This contact sheet lists its photos with JavaScript; '
        "allow it for this local file.</p></noscript>\n"
        f"{failed}"
        '<main id="grid"></main>\n<button id="more" type="button" hidden>show more</button>\n'
        f'<script id="sheet-data" type="application/json">{_json_for_script(data)}</script>\n'
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_search_sheet(hits: list, stream: IO[str], output: Path | None = None, title: str = "") -> None:
    """``sdltag search --format html``: the hits (``SearchHit``), best first, as a contact sheet."""
    sheet = ContactSheetWriter(stream, output, title=title, kind="search")
    for hit in hits:
        sheet.write_hit(hit)
    sheet.close()
