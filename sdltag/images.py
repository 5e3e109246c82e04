"""Image discovery (walking folders, filters, RAW pairing) and decoding to the model's input.

Decoding is the single definition of "image file -> model input" for tagging and
training alike: EXIF orientation applied, JPEGs decoded with ``draft()`` at the
smallest scale still at least the model's input size, every mode converted to RGB
(alpha flattened onto white), then resized and normalised exactly as the model
folder's ``InputSpec`` says. Imports Pillow (and numpy); pillow-heif and rawpy only
when a HEIC or RAW file is met.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

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
        if thumb.format == rawpy.ThumbFormat.JPEG:
            image = Image.open(io.BytesIO(thumb.data))
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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels are flattened onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (or 32-bit int holding 16-bit data, as Pillow opens 16-bit PNGs): scale to 8 bits.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8), "L")
        mode = "L"
    elif mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(
    path: Path, max_megapixels: float = 100.0, target: tuple[int, int] | None = None, data: bytes | None = None
) -> Image.Image:
    """Open ``path`` as an EXIF-oriented 8-bit RGB image.

    JPEGs are decoded with ``draft()`` at the smallest DCT scale that still covers
    ``target`` (H, W), so a 24 MP file never decodes at full size. Transparency is
    flattened onto white; palette, CMYK, greyscale and 16-bit images are converted;
    GIFs give their first frame; HEIC/HEIF go through pillow-heif and camera RAW
    files through their embedded JPEG preview (rawpy). An image whose declared size
    exceeds ``max_megapixels`` is refused before decoding. Every failure raises
    ``ImageError`` with a one-line reason. ``data``, when given, is the file's bytes
    already read (by the content hash): decoded from memory instead of reading the file
    again (not for RAW files, which rawpy reads itself).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in RAW_EXTENSIONS:
            image = _open_raw_preview(path)
        else:
            if suffix in HEIF_EXTENSIONS:
                _register_heif()
            if (len(data) if data is not None else path.stat().st_size) == 0:
                raise ImageError(path, "empty file (0 bytes)")
            _allow_pixels(max_megapixels)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data) if data is not None else path)
        width, height = image.size
        megapixels = width * height / 1e6
        if megapixels > max_megapixels:
            raise ImageError(
                path,
                f"image is {width}x{height} ({megapixels:.0f} MP), over the {max_megapixels:g} MP cap "
                "(raise it with --max-megapixels if the file is genuine)",
            )
        orientation = 1
        try:
            orientation = int(image.getexif().get(0x0112, 1))
        except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the picture
            orientation = 1
        if target is not None and image.format == "JPEG":
            want_h, want_w = target
            if orientation in _TRANSPOSED_ORIENTATIONS:
                want_h, want_w = want_w, want_h
            image.draft("RGB", (want_w, want_h))
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        if orientation != 1:
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # noqa: BLE001
                pass
        return _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            path,
            f"image is far over the {max_megapixels:g} MP cap (a decompression bomb?); "
            "raise --max-megapixels if the file is genuine",
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can read (wrong extension, or corrupt)") from None
    except PermissionError:
        raise ImageError(path, "permission denied (cannot read the file)") from None
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except MemoryError:
        raise ImageError(path, "out of memory while decoding (lower --max-megapixels or --batch-size)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow and codecs raise anything on corrupt data
        reason = _one_line(exc)
        if "truncated" in reason.lower():
            reason = f"truncated or incomplete file ({reason})"
        raise ImageError(path, f"cannot decode: {reason}") from None


def preprocess(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """An RGB image -> the model's (3, H, W) float32 input: resize per ``spec.resize``, [0, 1], (x - mean) / std.

    ``squash`` resizes to H x W ignoring aspect; ``shorter_center_crop`` scales the
    shorter side to fit, then takes the centre H x W.
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
    pixels = np.asarray(image)  # (H, W, 3) uint8
    scale = 1.0 / (255.0 * np.asarray(spec.std, dtype=np.float32))
    offset = np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32)
    # ((x / 255) - mean) / std, one channel plane at a time straight into the (3, H, W) array:
    # no float (H, W, 3) temporaries and no transposing copy (3x cheaper than the array expression).
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.multiply(pixels[:, :, c], scale[c], out=out[c], casting="unsafe")
        out[c] -= offset[c]
    return out


def load_image(path: Path, spec: InputSpec, max_megapixels: float = 100.0, data: bytes | None = None) -> np.ndarray:
    """Decode ``path`` (or its bytes ``data``) and return the model input (3, H, W) float32; raises ``ImageError``."""
    image = open_image(path, max_megapixels=max_megapixels, target=(spec.height, spec.width), data=data)
    return preprocess(image, spec)


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


def _walk(
    folder: str,
    recursive: bool,
    include_hidden: bool,
    seen_dirs: set[tuple[int, int]],
    out: list[str],
    problems: list[tuple[str, str]],
) -> None:
    """Depth-first, name-sorted walk with ``os.scandir``; each real folder is entered once (symlink loops).

    Works on path strings (a library's worth of ``Path`` objects costs more than the walk).
    """
    try:
        info = os.stat(folder)
    except OSError as exc:
        problems.append((folder, f"cannot read folder ({exc.strerror or exc})"))
        return
    key = (info.st_dev, info.st_ino)
    if key in seen_dirs:
        return
    seen_dirs.add(key)
    try:
        with os.scandir(folder) as entries:
            items = sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        problems.append((folder, f"cannot list folder ({exc.strerror or exc})"))
        return
    subfolders = []
    for entry in items:
        if not include_hidden and _is_hidden(entry.name):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
            is_file = not is_dir and entry.is_file(follow_symlinks=True)
        except OSError:
            continue
        if is_dir:
            if recursive:
                subfolders.append(entry.path)
        elif is_file and is_image_path(entry.name):
            out.append(entry.path)
    for sub in subfolders:
        _walk(sub, recursive, include_hidden, seen_dirs, out, problems)


def discover(
    paths: Iterable[Path], *, recursive: bool = True, include_hidden: bool = False, exclude: Iterable[str] = ()
) -> Discovery:
    """Expand files and folders into the image files to tag (absolute, de-duplicated, in input order).

    Folders are walked (recursively unless ``recursive`` is False) skipping hidden
    names, ``._*``, ``@eaDir``, ``.git`` and ``System Volume Information`` unless
    ``include_hidden``; files given by name are taken whatever their name (a missing
    one is a problem). A RAW file whose same-stem JPEG (or other non-RAW image) in the
    same folder is also being tagged is dropped: the JPEG is the better rendering.
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
            _walk(os.fspath(path), recursive, include_hidden, seen_dirs, found, result.problems)
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
    files = list(dict.fromkeys(os.path.abspath(path) for path in found))
    split = []  # (path, (folder, lower-case name without extension), lower-case extension)
    for path in files:
        folder, name = os.path.split(path)
        stem, ext = os.path.splitext(name)
        split.append((path, (folder, stem.lower()), ext.lower()))
    rendered = {key for _, key, ext in split if ext not in RAW_EXTENSIONS}
    for path, key, ext in split:
        if ext in RAW_EXTENSIONS and key in rendered:
            result.skipped_raw.append(Path(path))
        else:
            result.files.append(Path(path))
    return result


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is reported, never tagged from half its pixels
