"""Image discovery (walking folders, filters, RAW pairing) and decoding to the model's input.

Decoding is the single definition of "image file -> model input" for tagging and
training alike: EXIF orientation applied, JPEGs decoded with ``draft()`` at the
smallest scale still at least the model's input size, other formats decoded whole and
at once reduced (block averages, band by band) to that scale, every mode converted to
RGB (alpha flattened onto white), then resized (``resize_pixels``: uint8 pixels) and
normalised (``normalise``: float32) exactly as the model folder's ``InputSpec`` says;
``load_image`` is both steps, ``load_pixels`` the first alone. Imports Pillow (and
numpy); pillow-heif and rawpy only when a HEIC or RAW file is met.

Memory: the decoded pixels of all images being decoded at once (by any number of
threads) stay within one budget (``decode_budget()``, 1 GiB unless
``SDLTAG_DECODE_MEMORY_MB`` says otherwise); an image needing more than the whole budget
decodes alone. Damaged files are reported, never tagged from garbage: every PNG chunk's
CRC is checked and a JPEG whose entropy-coded data is too short for the size its header
claims (or that misses restart markers) counts as truncated.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import stat
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from sdltag.errors import SdltagError
from sdltag.modelfolder import InputSpec

JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
RAW_EXTENSIONS = frozenset({".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2"})
IMAGE_EXTENSIONS = (
    JPEG_EXTENSIONS | HEIF_EXTENSIONS | RAW_EXTENSIONS | frozenset({".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
)
# Folder and file names photo libraries are full of and nobody wants tagged.
SKIPPED_NAMES = frozenset({"@eaDir", ".git", "System Volume Information", "$RECYCLE.BIN", "__MACOSX"})

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Big downscales first average whole blocks (Image.reduce), then resample the rest: 2.5x
# cheaper than one antialiased pass from a draft-decoded photo (0.28 vs 0.72 ms, 500x375 to
# 96x96), pixels within 0.4/255 of it on average.
REDUCING_GAP = 1.0
# EXIF orientations that swap width and height.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_heif_lock = threading.Lock()
_heif_registered = False


class ImageError(SdltagError):
    """A file that cannot be decoded; ``reason`` is one line, for one stderr line per file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}", exit_code=1)
        self.path = path
        self.reason = reason


def is_image_path(path: Path | str) -> bool:
    """True when the file name has an extension sdltag decodes (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _register_heif() -> None:
    global _heif_registered
    with _heif_lock:
        if not _heif_registered:
            try:
                import pillow_heif
            except ImportError as exc:  # pragma: no cover - it is a dependency
                raise SdltagError("HEIC/HEIF support needs pillow-heif: pip install pillow-heif") from exc
            pillow_heif.register_heif_opener()
            _heif_registered = True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _open_raw_preview(path: Path) -> Image.Image:
    """The embedded JPEG (or bitmap) preview of a camera RAW file, oriented as the camera recorded."""
    import rawpy

    with rawpy.imread(str(path)) as raw:
        flip = int(getattr(raw.sizes, "flip", 0) or 0)
        try:
            thumb = raw.extract_thumb()
        except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError) as exc:
            raise ImageError(path, f"RAW file has no usable embedded preview ({_one_line(exc)})") from None
        image: Image.Image
        if thumb.format == rawpy.ThumbFormat.JPEG:
            image = Image.open(io.BytesIO(bytes(thumb.data)))
            image.load()
        else:
            image = Image.fromarray(np.asarray(thumb.data))
    if image.getexif().get(0x0112, 1) == 1 and flip:
        # LibRaw's flip: 3 = 180 degrees, 5 = 90 counter-clockwise, 6 = 90 clockwise.
        transpose = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}
        if flip in transpose:
            image = image.transpose(transpose[flip])
    return image


def _allow_pixels(max_megapixels: float) -> None:
    """Let Pillow open headers up to our cap: the cap (checked before decoding) is the guard, not Pillow's."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_megapixels * 1e6 > limit:
        Image.MAX_IMAGE_PIXELS = int(max_megapixels * 1e6)


def _to_rgb(image: Image.Image, levels: float | None = None) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels are flattened onto white.

    ``levels`` is the full-scale value of a 16/32-bit or float image (``_levels``); given
    when ``image`` is one band of a bigger picture, so every band is scaled alike.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        peak = _levels(image) if levels is None else levels
        values = np.multiply(np.asarray(image, dtype=np.float64), 255.0 / peak)
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _levels(image: Image.Image) -> float:
    """The value shown as white: 65535 for 16-bit data (also in a 32-bit "I" image), 1.0 or 255 for float."""
    mode = image.mode
    if mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return 255.0
    top = float(np.max(image.getextrema()))
    if mode == "F":
        return 1.0 if top <= 1.0 else 255.0
    return 65535.0 if mode.startswith("I;16") or top > 255 else 255.0


# Rows converted at a time when a big image is reduced: a few MB per band, whatever the image.
_BAND_ROWS = 256


def _reduced_rgb(image: Image.Image, factor: int) -> Image.Image:
    """``image`` as RGB, its size divided by ``factor`` (block averages), converted band by band.

    The same pixels as converting the whole image then ``reduce(factor)`` (bands are whole
    blocks high), without a second full-size copy: a 90 MP RGBA PNG needs its decoded
    pixels plus a few MB, not four full-size copies.
    """
    if image.mode == "RGB":
        return image.reduce(factor) if factor > 1 else image
    width, height = image.size
    levels = _levels(image)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    step = max(1, _BAND_ROWS // factor) * factor
    for top in range(0, height, step):
        band = _to_rgb(image.crop((0, top, width, min(height, top + step))), levels)
        out.paste(band.reduce(factor) if factor > 1 else band, (0, top // factor))
    return out


_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# ---------------------------------------------------------------------------------------------
# Decode memory


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow keeps in memory per pixel of ``mode`` (multi-band modes take 4 bytes)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


class DecodeBudget:
    """Bytes of decoded pixels that all decode threads together may hold at once.

    ``reserve(n)`` waits until ``n`` more bytes fit, first come first served (a big image
    is not starved by a stream of small ones); a request bigger than the whole budget
    waits until nothing else is decoding and then runs alone. ``peak`` is the most ever
    reserved at once (for tests and measurements).
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = min(max(0, int(nbytes)), self.total)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self.used + nbytes > self.total:
                self._cond.wait()
            self._queue.popleft()
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


DEFAULT_DECODE_MEMORY_MB = 1024


def _default_budget_bytes() -> int:
    text = os.environ.get("SDLTAG_DECODE_MEMORY_MB", "").strip()
    try:
        megabytes = float(text) if text else DEFAULT_DECODE_MEMORY_MB
    except ValueError:
        megabytes = DEFAULT_DECODE_MEMORY_MB
    return int(max(megabytes, 16) * 2**20)


_budget: DecodeBudget | None = None
_budget_lock = threading.Lock()
# After a decode this big, freed pixels go back to the system at once: glibc keeps them in
# the decoding thread's heap otherwise, so each thread would hold its biggest image for good
# and the process would grow with the thread count, whatever the budget.
_TRIM_BYTES = 64 * 2**20
_malloc_trim: list[Callable[[int], int]] = []  # glibc's malloc_trim, once looked up
_malloc_trim_looked_up = False


def _release_memory() -> None:
    global _malloc_trim_looked_up
    if not _malloc_trim_looked_up:
        _malloc_trim_looked_up = True
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _malloc_trim.append(ctypes.CDLL("libc.so.6").malloc_trim)
            except (OSError, AttributeError):  # not glibc (musl): nothing to do
                pass
    for trim in _malloc_trim:
        trim(0)


def decode_budget() -> DecodeBudget:
    """The process-wide decode budget (created on first use from ``SDLTAG_DECODE_MEMORY_MB``)."""
    global _budget
    with _budget_lock:
        if _budget is None:
            _budget = DecodeBudget(_default_budget_bytes())
        return _budget


def set_decode_budget(nbytes: int) -> DecodeBudget:
    """Replace the process-wide decode budget (call before decoding starts); returns the new one."""
    global _budget
    with _budget_lock:
        _budget = DecodeBudget(nbytes)
        return _budget


# ---------------------------------------------------------------------------------------------
# Damaged files Pillow would decode anyway


def _check_png(stream: io.BufferedIOBase) -> str | None:
    """Why a PNG stream is damaged (a chunk failing its CRC, a cut-off file), or None.

    Pillow checks the CRCs of the chunks before the image data only; a flipped byte in
    the image data itself decodes to garbage without a word.
    """
    stream.seek(8)
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return "truncated or incomplete file (it ends before the PNG's IEND chunk)"
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if length > 0x7FFFFFFF:
            return f"corrupt PNG (a chunk length of {length} bytes is impossible)"
        crc = zlib.crc32(kind)
        left = length
        while left:
            piece = stream.read(min(left, 1 << 20))
            if not piece:
                return "truncated or incomplete file (it ends inside a PNG chunk)"
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
        stored = stream.read(4)
        if len(stored) < 4:
            return "truncated or incomplete file (it ends inside a PNG chunk)"
        if int.from_bytes(stored, "big") != crc:
            name = kind.decode("latin-1") if kind.isalpha() else repr(kind)[2:-1]
            return f"corrupt PNG (the {name} chunk fails its CRC check: damaged bytes)"
        if kind == b"IEND":
            return None


# Start-of-frame markers of Huffman-coded JPEGs (baseline, extended, progressive) Pillow decodes.
_HUFFMAN_SOF = (0xC0, 0xC1, 0xC2)


def _check_jpeg(data: bytes) -> str | None:
    """Why a JPEG is truncated although it decodes, or None.

    libjpeg fills whatever is missing with grey when a file ends early with an
    end-of-image marker. Two checks catch that without decoding: every 8x8 block of the
    full-resolution component costs at least one bit of Huffman-coded data, so a file
    holding fewer bits than blocks is short; and a file with restart markers (most
    cameras write them) must hold one per restart interval.
    """
    n, pos = len(data), 2
    frame: tuple[int, int, int, list[tuple[int, int]]] | None = None
    restart = 0
    scan_start = -1
    scan_components = 0
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None  # an odd layout: left to the decoder
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length] if marker in (0xDA, 0xDD) or 0xC0 <= marker <= 0xCF else b""
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(segment) >= 6:
            height, width, count = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
            sampling = [
                (segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(count) if 8 + 3 * i <= len(segment)
            ]
            frame = (marker, width, height, sampling)
        elif marker == 0xDD and len(segment) >= 2:
            restart = int.from_bytes(segment[:2], "big")
        elif marker == 0xDA:
            scan_start = pos + 2 + length
            scan_components = segment[0] if segment else 0
            break
        pos += 2 + length
    if frame is None or not 0 <= scan_start < n or frame[0] not in _HUFFMAN_SOF:
        return None
    marker, width, height, sampling = frame
    if not width or not height or not sampling or not all(h and v for h, v in sampling):
        return None
    blocks = -(-width // 8) * -(-height // 8)

    def short(entropy: int) -> str:
        return (
            f"truncated or incomplete file (its header says {width}x{height}, which needs at least "
            f"{blocks // 8 // 1024 + 1} KB of image data; it holds {entropy // 1024} KB)"
        )

    if (n - scan_start) * 8 < blocks:
        return short(n - scan_start)
    if not restart or marker not in (0xC0, 0xC1) or scan_components != len(sampling):
        return None
    # One pass over the data (a few ms for a 24 MP photo): where the image ends and its restart markers.
    raw = np.frombuffer(data, dtype=np.uint8, offset=scan_start)
    ff = np.flatnonzero(raw[:-1] == 0xFF)
    following = raw[ff + 1]
    ends = ff[following == 0xD9]
    entropy = int(ends[0]) if len(ends) else len(raw)
    if entropy * 8 < blocks:
        return short(entropy)
    h_max, v_max = (max(h for h, _ in sampling), max(v for _, v in sampling)) if len(sampling) > 1 else (1, 1)
    mcus = -(-width // (8 * h_max)) * -(-height // (8 * v_max))
    expected = -(-mcus // restart) - 1
    inside = ff < entropy  # restart markers of this image, not of a preview appended after it
    found = int(np.count_nonzero((following[inside] & 0xF8) == 0xD0))
    if found < expected:
        return (
            f"truncated or incomplete file (it holds {found} of the {expected} restart markers its "
            "header announces; the rest of the picture is missing)"
        )
    return None


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _damage(image: Image.Image, path: Path, data: bytes | None) -> str | None:
    """Structural damage Pillow does not report, for PNG and JPEG; None when the file looks whole."""
    if image.format == "PNG":
        if data is not None:
            return _check_png(io.BytesIO(data))
        with open(path, "rb") as handle:
            return _check_png(handle)
    if image.format == "JPEG":
        return _check_jpeg(data if data is not None else _read_bytes(path))
    return None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable). Loads a PNG: call it on a loaded one."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the picture
        return 1


def _reduction(size: tuple[int, int], target: tuple[int, int] | None, orientation: int) -> int:
    """The integer factor a stored image of ``size`` can shrink by and still cover ``target`` (H, W)."""
    if target is None:
        return 1
    want_h, want_w = target
    if orientation in _TRANSPOSED_ORIENTATIONS:
        want_h, want_w = want_w, want_h
    width, height = size
    return max(1, int(min(width / max(1, want_w), height / max(1, want_h))))


def open_image(
    path: Path, max_megapixels: float = 100.0, target: tuple[int, int] | None = None, data: bytes | None = None
) -> Image.Image:
    """Open ``path`` as an EXIF-oriented 8-bit RGB image.

    JPEGs are decoded with ``draft()`` at the smallest DCT scale that still covers
    ``target`` (H, W), so a 24 MP file never decodes at full size; other formats are
    decoded whole, then reduced by the largest whole factor that still covers ``target``
    (converted and reduced band by band, so no second full-size copy is made).
    Transparency is flattened onto white; palette, CMYK, greyscale and 16-bit images are
    converted; GIFs give their first frame; HEIC/HEIF go through pillow-heif and camera
    RAW files through their embedded JPEG preview (rawpy). An image whose declared size
    exceeds ``max_megapixels`` is refused before decoding, a damaged PNG or a truncated
    JPEG is refused too (see ``_check_png``, ``_check_jpeg``), and decoding waits for
    room in the shared ``decode_budget()``. Every failure raises ``ImageError`` with a
    one-line reason. ``data``, when given, is the file's bytes already read (by the
    content hash): decoded from memory instead of reading the file again (not for RAW
    files, which rawpy reads itself).
    """
    path = Path(path)
    raw = path.suffix.lower() in RAW_EXTENSIONS
    try:
        image = _open_raw_preview(path) if raw else _open_header(path, max_megapixels, data)
        width, height = image.size
        megapixels = width * height / 1e6
        if megapixels > max_megapixels:
            raise ImageError(
                path,
                f"image is {width}x{height} ({megapixels:.0f} MP), over the {max_megapixels:g} MP cap "
                "(raise it with --max-megapixels if the file is genuine)",
            )
        if target is not None and image.format == "JPEG":
            want_h, want_w = target
            if _orientation(image) in _TRANSPOSED_ORIENTATIONS:  # a JPEG's EXIF is read with its header
                want_h, want_w = want_w, want_h
            image.draft("RGB", (want_w, want_h))
        damage = None if raw else _damage(image, path, data)
        if damage:
            raise ImageError(path, damage)
        return _decode_reduced(image, target)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow and codecs raise anything on corrupt data
        raise _decode_error(path, exc, max_megapixels) from None


def _open_header(path: Path, max_megapixels: float, data: bytes | None) -> Image.Image:
    """Pillow's lazy open of a (non-RAW) file or its bytes: the header is read, the pixels are not."""
    if path.suffix.lower() in HEIF_EXTENSIONS:
        _register_heif()
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise ImageError(path, "empty file (0 bytes)")
    _allow_pixels(max_megapixels)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # turned on by another library: never tag half a picture
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data) if data is not None else path)


def _decode_reduced(image: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    """Decode an opened image within the decode budget: RGB, reduced to cover ``target``, EXIF-oriented."""
    width, height = image.size  # after draft
    # Decoded pixels, plus the RGB copy (4 bytes a pixel) at the reduced size (the orientation,
    # which may only be known once a PNG is loaded, does not matter: the smaller factor of the two).
    least = min(_reduction(image.size, target, 1), _reduction(image.size, target, 6))
    cost = width * height * _bytes_per_pixel(image.mode) + 4 * (-(-width // least)) * (-(-height // least))
    with decode_budget().reserve(cost):
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        orientation = _orientation(image)  # a PNG's eXIf chunk may follow its pixels: only now
        image = _reduced_rgb(image, _reduction(image.size, target, orientation))  # frees the full size
        if cost >= _TRIM_BYTES:
            _release_memory()
    if orientation in _ORIENT:
        image = image.transpose(_ORIENT[orientation])
    return image


def _decode_error(path: Path, exc: Exception, max_megapixels: float) -> ImageError:
    """The one-line ``ImageError`` for whatever opening or decoding ``path`` raised."""
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(
            path,
            f"image is far over the {max_megapixels:g} MP cap (a decompression bomb?); "
            "raise --max-megapixels if the file is genuine",
        )
    if isinstance(exc, Image.UnidentifiedImageError):
        return ImageError(path, "not an image Pillow can read (wrong extension, or corrupt)")
    if isinstance(exc, PermissionError):
        return ImageError(path, "permission denied (cannot read the file)")
    if isinstance(exc, FileNotFoundError):
        return ImageError(path, "no such file")
    if isinstance(exc, MemoryError):
        return ImageError(path, "out of memory while decoding (lower --max-megapixels or --batch-size)")
    reason = _one_line(exc)
    if "truncated" in reason.lower():
        reason = f"truncated or incomplete file ({reason})"
    return ImageError(path, f"cannot decode: {reason}")


def resize_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """An RGB image -> the model's input size as (H, W, 3) uint8 pixels, resized per ``spec.resize``.

    ``squash`` resizes to H x W ignoring aspect; ``shorter_center_crop`` scales the
    shorter side to fit, then takes the centre H x W. The array is Pillow's buffer, read-only
    (copy it to change it in place).
    """
    resample = _RESAMPLE.get(spec.interpolation, Image.Resampling.BILINEAR)
    if image.mode != "RGB":
        image = _to_rgb(image)
    if spec.resize == "shorter_center_crop":
        width, height = image.size
        scale = max(spec.width / width, spec.height / height)
        new_w, new_h = max(spec.width, round(width * scale)), max(spec.height, round(height * scale))
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample, reducing_gap=REDUCING_GAP)
        left, top = (new_w - spec.width) // 2, (new_h - spec.height) // 2
        image = image.crop((left, top, left + spec.width, top + spec.height))
    elif image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), resample, reducing_gap=REDUCING_GAP)
    return np.asarray(image)  # (H, W, 3) uint8


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W, 3) uint8 pixels -> the model's (3, H, W) float32 input: [0, 1], then (x - mean) / std."""
    scale = np.divide(1.0, 255.0 * np.asarray(spec.std, dtype=np.float32))
    offset = np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32)
    # ((x / 255) - mean) / std, one channel plane at a time straight into the (3, H, W) array:
    # no float (H, W, 3) temporaries and no transposing copy (3x cheaper than the array expression).
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.multiply(pixels[:, :, c], scale[c], out=out[c], casting="unsafe")
        out[c] -= offset[c]
    return out


def preprocess(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """An RGB image -> the model's (3, H, W) float32 input: ``normalise(resize_pixels(image, spec), spec)``."""
    return normalise(resize_pixels(image, spec), spec)


def load_pixels(path: Path, spec: InputSpec, max_megapixels: float = 100.0, data: bytes | None = None) -> np.ndarray:
    """Decode ``path`` (or its bytes ``data``) to the model's input size: (H, W, 3) uint8; raises ``ImageError``.

    The first half of ``load_image``, for whoever keeps pixels before normalising them (training
    caches and augments uint8 pixels, a quarter of the memory of the float input).
    """
    image = open_image(path, max_megapixels=max_megapixels, target=(spec.height, spec.width), data=data)
    return resize_pixels(image, spec)


def load_image(path: Path, spec: InputSpec, max_megapixels: float = 100.0, data: bytes | None = None) -> np.ndarray:
    """Decode ``path`` (or its bytes ``data``) and return the model input (3, H, W) float32; raises ``ImageError``.

    ``normalise(load_pixels(...), spec)``: the same decode, resize and normalisation as training.
    """
    return normalise(load_pixels(path, spec, max_megapixels, data), spec)


# ---------------------------------------------------------------------------------------------
# Discovery


@dataclass
class Discovery:
    """What a walk over the inputs found: image files in order, and problems (path, reason)."""

    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    skipped_raw: list[Path] = field(default_factory=list)
    excluded: int = 0  # files an --exclude pattern matched


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_NAMES


def _is_appledouble(name: str) -> bool:
    """``._IMG.jpg``: the resource fork macOS leaves on non-Apple disks, never an image."""
    return name.startswith("._")


def walk(
    folder: str,
    *,
    recursive: bool = True,
    include_hidden: bool = False,
    seen_dirs: set[tuple[int, int]] | None = None,
    problems: list[tuple[str, str]] | None = None,
) -> list[str]:
    """The image files under ``folder``, depth-first in name order: a folder's files, then its sub-folders.

    Iterative (an explicit stack: any depth of nesting), following links to folders but
    entering each real folder once, keyed by (device, inode), so a link to an ancestor,
    a link loop or a second link to the same place is walked once. Hidden names and
    ``SKIPPED_NAMES`` are left out unless ``include_hidden``; ``._*`` AppleDouble files
    always are. Folders that cannot be read are added to ``problems`` (path, reason).
    Works on path strings (a library's worth of ``Path`` objects costs more than the walk);
    names that are not valid UTF-8 come back as ``os.fsdecode`` gives them.
    """
    seen_dirs = set() if seen_dirs is None else seen_dirs
    problems = [] if problems is None else problems
    out: list[str] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            info = os.stat(current)
        except OSError as exc:
            problems.append((current, f"cannot read folder ({exc.strerror or exc})"))
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen_dirs:
            continue
        seen_dirs.add(key)
        try:
            with os.scandir(current) as entries:
                items = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            problems.append((current, f"cannot list folder ({exc.strerror or exc})"))
            continue
        subfolders = []
        for entry in items:
            name = entry.name
            if _is_appledouble(name) or (not include_hidden and _is_hidden(name)):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                if recursive:
                    subfolders.append(entry.path)
            elif is_file and is_image_path(name):
                out.append(entry.path)
        stack.extend(reversed(subfolders))
    return out


def discover(
    paths: Iterable[Path], *, recursive: bool = True, include_hidden: bool = False, exclude: Iterable[str] = ()
) -> Discovery:
    """Expand files and folders into the image files to tag (absolute, de-duplicated, in input order).

    Folders are walked (``walk``: recursively unless ``recursive`` is False) skipping
    hidden names, ``@eaDir``, ``.git`` and ``System Volume Information`` unless
    ``include_hidden``, and ``._*`` AppleDouble files always; files given by name are
    taken whatever their name (a missing one is a problem). A RAW file whose same-stem
    JPEG (or other non-RAW image) in the same folder is also being tagged is dropped: the
    JPEG is the better rendering.
    ``exclude`` globs leave out the files they match (``sdltag.excludes``; counted in
    ``Discovery.excluded``) before that pairing.
    """
    from sdltag.excludes import Excluder

    excluder = Excluder(exclude)
    result = Discovery()
    found: list[str] = []
    roots: list[tuple[int, str | None]] = []  # (where in found an input's files start, the folder walked)
    seen_dirs: set[tuple[int, int]] = set()
    for raw in paths:
        path = Path(raw)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            result.problems.append((str(path), "no such file or folder"))
            continue
        except OSError as exc:
            result.problems.append((str(path), f"cannot access ({exc.strerror or exc})"))
            continue
        roots.append((len(found), os.fspath(path) if stat.S_ISDIR(mode) else None))
        if stat.S_ISDIR(mode):
            found.extend(
                walk(
                    os.fspath(path),
                    recursive=recursive,
                    include_hidden=include_hidden,
                    seen_dirs=seen_dirs,
                    problems=result.problems,
                )
            )
        elif stat.S_ISREG(mode):
            if is_image_path(path):
                found.append(os.fspath(path))
            else:
                result.problems.append((str(path), f"not a supported image type ({path.suffix or 'no extension'})"))
        else:
            result.problems.append((str(path), "not a regular file or folder"))
    if excluder:
        kept: list[str] = []
        for (start, root), (end, _) in zip(roots, [*roots[1:], (len(found), None)], strict=True):
            kept.extend(p for p in found[start:end] if not excluder.excluded(p, root))
        result.excluded = len(found) - len(kept)
        found = kept
    files = list(dict.fromkeys(os.path.abspath(found_path) for found_path in found))
    split = []  # (path, (folder, lower-case name without extension), lower-case extension)
    for file in files:
        folder, name = os.path.split(file)
        stem, ext = os.path.splitext(name)
        split.append((file, (folder, stem.lower()), ext.lower()))
    rendered = {key for _, key, ext in split if ext not in RAW_EXTENSIONS}
    for file, key, ext in split:
        if ext in RAW_EXTENSIONS and key in rendered:
            result.skipped_raw.append(Path(file))
        else:
            result.files.append(Path(file))
    return result


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is reported, never tagged from half its pixels
