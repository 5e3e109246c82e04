"""Decoding (orientation, modes, draft, caps, bad files) and discovery (walk, filters, RAW pairing)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdltag.images import (
    REDUCING_GAP,
    ImageError,
    discover,
    load_image,
    load_pixels,
    normalise,
    open_image,
    preprocess,
    resize_pixels,
)
from sdltag.modelfolder import InputSpec


def _jpeg(path: Path, size=(64, 48), color=(200, 30, 30), **kw) -> Path:
    Image.new("RGB", size, color).save(path, quality=95, **kw)
    return path


# -- decoding --------------------------------------------------------------------------------


def test_jpeg_draft_decodes_at_reduced_size(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "big.jpg", size=(4000, 3000))
    image = open_image(path, target=(224, 224))
    # draft picks the smallest DCT scale (1/8 here) still covering 224x224
    assert image.size == (500, 375) and image.mode == "RGB"
    assert open_image(path).size == (4000, 3000)


def test_exif_orientation_applied_and_draft_target_swapped(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    Image.new("RGB", (1600, 400), (10, 200, 10)).save(path, exif=exif)
    image = open_image(path)
    assert image.size == (400, 1600)
    drafted = open_image(path, target=(100, 50))  # displayed 50 wide, 100 high -> stored 100 wide, 50 high
    assert drafted.size[0] >= 50 and drafted.size[1] >= 100 and drafted.size[1] > drafted.size[0]


def test_alpha_flattened_onto_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    image = open_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (4, 4), (0, 0))
    la.save(tmp_path / "la.png")
    assert open_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_palette_cmyk_grey_and_16bit_converted(tmp_path: Path) -> None:
    Image.new("RGB", (6, 6), (0, 0, 255)).convert("P").save(tmp_path / "p.gif")
    assert open_image(tmp_path / "p.gif").getpixel((0, 0)) == (0, 0, 255)
    Image.new("CMYK", (6, 6), (0, 255, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = open_image(tmp_path / "c.jpg").getpixel((0, 0))
    assert r > 240 and g < 15 and b > 240  # magenta
    Image.new("L", (6, 6), 128).save(tmp_path / "g.png")
    assert open_image(tmp_path / "g.png").getpixel((0, 0)) == (128, 128, 128)
    Image.new("I;16", (6, 6), 65535).save(tmp_path / "w16.png")
    assert open_image(tmp_path / "w16.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("I;16", (6, 6), 32896).save(tmp_path / "m16.png")
    assert open_image(tmp_path / "m16.png").getpixel((0, 0)) == (128, 128, 128)


def test_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    r, g, _ = open_image(tmp_path / "anim.gif").getpixel((2, 2))
    assert r > 200 and g < 50


def test_heic_through_pillow_heif(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    path = tmp_path / "IMG_1.HEIC"
    try:
        Image.new("RGB", (64, 32), (0, 0, 250)).save(path, format="HEIF", quality=90)
    except Exception as exc:  # noqa: BLE001 - an encoder-less libheif build
        pytest.skip(f"no HEIF encoder here: {exc}")
    image = open_image(path)
    assert image.size == (64, 32) and image.getpixel((10, 10))[2] > 200


def test_preprocess_matches_the_manifest_rule() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    spec = InputSpec(40, 60, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    out = preprocess(image, spec)
    expected = ((pixels / 255.0 - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)
    assert out.shape == (3, 40, 60) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    crop = preprocess(image, InputSpec(20, 20, resize="shorter_center_crop"))
    # scale 0.5 -> 30x20, then the centre 20 columns (5..25)
    two_step = image.resize((30, 20), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    centre = np.asarray(two_step, dtype=np.float32)[:, 5:25] / 255.0
    np.testing.assert_allclose(crop, centre.transpose(2, 0, 1), atol=1e-6)
    squash = preprocess(image, InputSpec(10, 10))
    assert squash.shape == (3, 10, 10)


PHOTOS = Path(__file__).parent / "data" / "photos"


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(224, 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        InputSpec(96, 128, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="shorter_center_crop"),
        InputSpec(300, 200, interpolation="bicubic"),
    ],
)
def test_load_image_is_load_pixels_then_normalise_bit_for_bit(spec: InputSpec) -> None:
    """Training keeps the uint8 pixels and normalises later: the same float input to the last bit as tagging's."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert len(photos) >= 4
    for path in photos:
        pixels = load_pixels(path, spec)
        assert pixels.shape == (spec.height, spec.width, 3) and pixels.dtype == np.uint8
        tagged = load_image(path, spec)
        assert tagged.dtype == np.float32 and tagged.tobytes() == normalise(pixels, spec).tobytes()
        data = path.read_bytes()
        assert load_pixels(path, spec, data=data).tobytes() == pixels.tobytes()
        image = open_image(path, target=(spec.height, spec.width))
        assert resize_pixels(image, spec).tobytes() == pixels.tobytes()
        assert preprocess(image, spec).tobytes() == tagged.tobytes()
        expected = (pixels / 255.0 - np.array(spec.mean)) / np.array(spec.std)  # float64, (H, W, 3)
        np.testing.assert_allclose(tagged, expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_big_downscale_stays_close_to_one_antialiased_pass() -> None:
    """The block-average-then-resample shortcut (REDUCING_GAP) changes a photo's pixels by well under a level."""
    y, x = np.mgrid[0:375, 0:500]
    rng = np.random.default_rng(1)
    smooth = np.stack([128 + 100 * np.sin(x / 37.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], axis=-1)
    pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)  # a photo-like texture
    image = Image.fromarray(pixels)
    fast = preprocess(image, InputSpec(96, 96))
    fair = np.asarray(image.resize((96, 96), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    diff = np.abs(fast - fair.transpose(2, 0, 1))
    assert diff.mean() < 1.0 / 255 and diff.max() < 6.0 / 255  # nearest-neighbour: 4.7 and 24


def test_load_image_shape(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "x.JPG", size=(300, 200))
    array = load_image(path, InputSpec(32, 32))
    assert array.shape == (3, 32, 32) and np.isfinite(array).all()


def test_decoding_from_the_bytes_read_for_the_hash_is_the_same(tmp_path: Path) -> None:
    """tag reads a file once (hash, then decode from memory): same pixels as decoding from disk, EXIF included."""
    image = Image.new("RGB", (400, 200), (200, 30, 30))
    image.paste((20, 20, 220), (0, 0, 100, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "o.jpg"
    image.save(path, exif=exif)
    spec = InputSpec(40, 32)
    from_disk = load_image(path, spec)
    from_bytes = load_image(path, spec, data=path.read_bytes())
    assert from_bytes.shape == (3, 40, 32)
    np.testing.assert_array_equal(from_bytes, from_disk)


# -- bad input --------------------------------------------------------------------------------


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height (the pixels are never there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("from_bytes", [False, True], ids=["from-disk", "from-bytes"])
@pytest.mark.parametrize("case", ["empty", "truncated", "text", "bomb", "corrupt_png", "over_cap"])
def test_bad_files_raise_image_error_with_one_line(tmp_path: Path, case: str, from_bytes: bool) -> None:
    if case == "empty":
        path = tmp_path / "empty.jpg"
        path.write_bytes(b"")
        expect = "empty"
    elif case == "truncated":
        full = _jpeg(tmp_path / "full.jpg", size=(400, 300)).read_bytes()
        path = tmp_path / "trunc.jpg"
        path.write_bytes(full[: len(full) // 2])
        expect = "truncated"
    elif case == "text":
        path = tmp_path / "notes.jpg"
        path.write_text("this is not a picture\n")
        expect = "not an image"
    elif case == "bomb":
        path = _bomb_png(tmp_path / "bomb.png", 50_000, 50_000)  # 2500 MP
        expect = "MP cap"
    elif case == "corrupt_png":
        path = tmp_path / "bad.png"
        Image.new("RGB", (50, 50), (1, 2, 3)).save(path)
        data = bytearray(path.read_bytes())
        data[40:60] = b"\xff" * 20
        path.write_bytes(bytes(data))
        expect = ""
    else:
        path = _jpeg(tmp_path / "big.jpg", size=(2000, 1000))
        with pytest.raises(ImageError, match="over the 1 MP cap"):
            open_image(path, max_megapixels=1.0, data=path.read_bytes() if from_bytes else None)
        return
    with pytest.raises(ImageError) as info:
        load_image(path, InputSpec(32, 32), data=path.read_bytes() if from_bytes else None)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expect in message
    assert info.value.exit_code == 1


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _jpeg(tmp_path / "locked.jpg")
    if os.geteuid() != 0:
        path.chmod(0)
        try:
            with pytest.raises(ImageError, match="permission denied"):
                open_image(path)
        finally:
            path.chmod(0o644)
    # as root chmod does not stop reading: make opening fail the way it would for a user
    real_open = Image.open

    def deny(fp, *args, **kwargs):
        if Path(fp) == path:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", deny)
    with pytest.raises(ImageError, match="permission denied"):
        open_image(path)


# -- discovery --------------------------------------------------------------------------------


def test_discover_walks_filters_and_pairs_raw(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "@eaDir").mkdir()
    (root / ".git").mkdir()
    (root / "System Volume Information").mkdir()
    for rel in [
        "a.JPG",
        "b.png",
        "sub/c.WebP",
        "sub/deeper/d.tiff",
        "e.heic",
        "IMG_1.jpg",
        "IMG_1.CR2",
        "IMG_2.NEF",
        ".hidden.jpg",
        "._a.jpg",
        "@eaDir/thumb.jpg",
        ".git/x.png",
        "System Volume Information/y.jpg",
        "notes.txt",
        "f.Bmp",
        "g.gif",
        "h.dng",
        "sub/h.jpg",  # a same-name JPEG in another folder does not pair with h.dng
        "Sub2/k.jpg",
        "sub2/K.ARW",  # nor does one in a folder whose name differs only in case
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    found = discover([root])
    names = sorted(p.relative_to(root).as_posix() for p in found.files)
    assert names == sorted(
        [
            "a.JPG",
            "b.png",
            "sub/c.WebP",
            "sub/deeper/d.tiff",
            "e.heic",
            "IMG_1.jpg",
            "IMG_2.NEF",
            "f.Bmp",
            "g.gif",
            "h.dng",
            "sub/h.jpg",
            "Sub2/k.jpg",
            "sub2/K.ARW",
        ]
    )
    assert [p.name for p in found.skipped_raw] == ["IMG_1.CR2"]
    assert all(p.is_absolute() for p in found.files)
    flat = discover([root], recursive=False)
    assert not any("sub" in p.parts for p in flat.files)
    everything = discover([root], include_hidden=True)
    hidden = {p.name for p in everything.files}
    assert {".hidden.jpg", "thumb.jpg", "x.png", "y.jpg"} <= hidden
    assert "._a.jpg" not in hidden  # an AppleDouble resource fork is never an image


def test_discover_missing_paths_and_explicit_files(tmp_path: Path) -> None:
    _jpeg(tmp_path / "one.jpg")
    (tmp_path / "readme.txt").write_text("hi")
    found = discover([tmp_path / "one.jpg", tmp_path / "gone.jpg", tmp_path / "readme.txt", tmp_path / "one.jpg"])
    assert [p.name for p in found.files] == ["one.jpg"]  # de-duplicated
    reasons = dict(found.problems)
    assert "no such file" in reasons[str(tmp_path / "gone.jpg")]
    assert "not a supported image type" in reasons[str(tmp_path / "readme.txt")]


def test_discover_survives_symlink_loops(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _jpeg(tmp_path / "a" / "p.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    os.symlink(tmp_path / "a", tmp_path / "a" / "self")
    found = discover([tmp_path])
    assert [p.name for p in found.files] == ["p.jpg"]


def test_discover_non_utf8_name(tmp_path: Path) -> None:
    raw_name = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw_name, "wb") as handle:
        handle.write(_jpeg(tmp_path / "src.jpg").read_bytes())
    found = discover([tmp_path])
    odd = [p for p in found.files if p.name != "src.jpg"]
    assert len(odd) == 1 and os.fsencode(odd[0]) == raw_name
    assert load_image(odd[0], InputSpec(16, 16)).shape == (3, 16, 16)


def test_not_really_raw_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "IMG_9.NEF"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(ImageError) as info:
        open_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_discover_walks_any_depth(tmp_path: Path) -> None:
    deep = tmp_path / "lib"
    bottom = os.fspath(deep)
    os.mkdir(bottom)
    for _ in range(1100):  # deeper than Python's recursion limit (os.makedirs itself would recurse)
        bottom += "/d"
        os.mkdir(bottom)
    _jpeg(Path(bottom) / "deep.jpg")
    _jpeg(deep / "top.jpg")
    try:
        found = discover([deep])
        assert not found.problems
        assert [p.name for p in found.files] == ["top.jpg", "deep.jpg"]
        assert len(found.files[1].relative_to(deep).parts) == 1101
    finally:
        remove_deep_tree(deep)


def remove_deep_tree(top: Path) -> None:
    """Remove a tree deeper than ``shutil.rmtree`` (recursive before Python 3.12) can."""
    for dirpath, _dirs, files in reversed(list(_walk_down(os.fspath(top)))):
        for name in files:
            os.unlink(os.path.join(dirpath, name))
        os.rmdir(dirpath)


def _walk_down(top: str):
    stack = [top]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            items = list(entries)
        dirs = [e.path for e in items if e.is_dir(follow_symlinks=False)]
        yield current, dirs, [e.name for e in items if not e.is_dir(follow_symlinks=False)]
        stack.extend(dirs)


def test_discover_links_to_ancestors_and_link_loops(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    (root / "a" / "b").mkdir(parents=True)
    _jpeg(root / "a" / "b" / "p.jpg")
    _jpeg(root / "q.jpg")
    os.symlink(root, root / "a" / "b" / "up")  # to an ancestor: already being walked
    os.symlink(tmp_path, root / "a" / "outside")  # to a folder above the input: its other content is walked once
    os.symlink("loop2", root / "loop1")  # a link loop that resolves to nothing (ELOOP)
    os.symlink("loop1", root / "loop2")
    _jpeg(tmp_path / "beside.jpg")
    found = discover([root])
    names = [p.name for p in found.files]
    assert sorted(names) == ["beside.jpg", "p.jpg", "q.jpg"]
    assert len(names) == len(set(names))  # nothing twice
    # the same folder given twice, and through a link, is walked once
    again = discover([root, root / "a" / "b" / "up"])
    assert sorted(p.name for p in again.files) == sorted(names)


def test_discover_skips_appledouble_even_with_hidden_files(tmp_path: Path) -> None:
    _jpeg(tmp_path / "IMG_1.jpg")
    (tmp_path / "._IMG_1.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # the AppleDouble header
    assert [p.name for p in discover([tmp_path]).files] == ["IMG_1.jpg"]
    assert [p.name for p in discover([tmp_path], include_hidden=True).files] == ["IMG_1.jpg"]


# -- damaged files Pillow decodes without a word ----------------------------------------------


def _noise_png(path: Path, size=(160, 120), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


@pytest.mark.parametrize("from_bytes", [False, True], ids=["from-disk", "from-bytes"])
def test_png_with_bytes_flipped_throughout_is_reported(tmp_path: Path, from_bytes: bool) -> None:
    import random

    data = bytearray(_noise_png(tmp_path / "src.png").read_bytes())
    assert Image.open(tmp_path / "src.png").format == "PNG"
    flips = random.Random(0).sample(range(64, len(data) - 16), 40)  # spread over the image data
    for offset in flips:
        data[offset] ^= 0xFF
    path = tmp_path / "flipped.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as info:
        load_image(path, InputSpec(32, 32), data=bytes(data) if from_bytes else None)
    assert "CRC" in info.value.reason and str(path) in str(info.value) and "\n" not in str(info.value)
    # one flipped byte in the pixel data alone is enough
    single = bytearray(_noise_png(tmp_path / "src.png").read_bytes())
    single[len(single) // 2] ^= 0x01
    path.write_bytes(bytes(single))
    with pytest.raises(ImageError, match="IDAT chunk fails its CRC"):
        open_image(path)


def test_truncated_files_stay_errors_when_another_library_allows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    whole = _jpeg(tmp_path / "whole.jpg", size=(400, 300)).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path, InputSpec(32, 32))


def test_png_cut_short_is_reported(tmp_path: Path) -> None:
    data = _noise_png(tmp_path / "src.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[:-12])  # whole pixels, no IEND: a copy that stopped
    with pytest.raises(ImageError, match="truncated"):
        open_image(path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        open_image(path)


def _with_frame_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose start-of-frame header is rewritten to claim ``width`` x ``height``."""
    out, pos = bytearray(data), 2
    while pos < len(out):
        marker, length = out[pos + 1], struct.unpack(">H", out[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(out)
        pos += 2 + length
    raise AssertionError("no frame header")


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_claiming_more_pixels_than_its_data_is_truncated(tmp_path: Path, progressive: bool) -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 255, (150, 110, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, progressive=progressive)
    data = _with_frame_size(buffer.getvalue(), 9000, 11000)
    assert 10_000 < len(data) < 40_000 and data.endswith(b"\xff\xd9")
    path = tmp_path / "claims-99mp.jpg"
    path.write_bytes(data)
    # Pillow itself decodes it (grey where the data is missing)
    with Image.open(path) as image:
        image.draft("RGB", (224, 224))
        image.load()
    for from_bytes in (False, True):
        with pytest.raises(ImageError) as info:
            load_image(path, InputSpec(224, 224), data=data if from_bytes else None)
        assert "truncated" in info.value.reason and "9000x11000" in info.value.reason
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_jpeg_cut_and_closed_is_truncated_when_it_has_restart_markers(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    path = tmp_path / "whole.jpg"
    Image.fromarray(pixels).save(path, quality=90, restart_marker_rows=1)  # as most cameras write them
    whole = path.read_bytes()
    assert load_image(path, InputSpec(32, 32)).shape == (3, 32, 32)  # the whole file is fine
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[: len(whole) * 2 // 3] + b"\xff\xd9")  # a copy that stopped, closed by a repair tool
    with pytest.raises(ImageError, match="restart markers"):
        load_image(cut, InputSpec(32, 32))
    # the same with a second picture appended (a motion photo): still the first picture that counts
    cut.write_bytes(whole[: len(whole) * 2 // 3] + b"\xff\xd9" + whole)
    with pytest.raises(ImageError, match="restart markers"):
        load_image(cut, InputSpec(32, 32))
    cut.write_bytes(whole + whole)
    assert load_image(cut, InputSpec(32, 32)).shape == (3, 32, 32)


def test_valid_jpegs_of_every_kind_pass_the_checks(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    flat = np.full((2000, 3000, 3), 255, np.uint8)  # a blank frame: the least data a JPEG can hold
    cases = {
        "baseline": (pixels, {}),
        "progressive": (pixels, {"progressive": True}),
        "restarts": (pixels, {"restart_marker_blocks": 3}),
        "no-subsampling": (pixels, {"subsampling": 0, "restart_marker_rows": 1}),
        "grey": (pixels[:, :, 0], {"restart_marker_rows": 2}),
        "blank-progressive": (flat, {"progressive": True, "optimize": True, "quality": 10}),
        "blank": (flat, {"optimize": True, "quality": 10}),
    }
    for name, (array, options) in cases.items():
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(array).save(path, **options)
        assert open_image(path, target=(32, 32)).mode == "RGB", name


# -- decode memory ------------------------------------------------------------------------------


def test_decode_budget_bounds_what_threads_hold_at_once() -> None:
    import threading
    import time

    from sdltag.images import DecodeBudget

    budget = DecodeBudget(100)
    holding: list[int] = []
    alone: list[bool] = []
    lock = threading.Lock()
    most = [0]

    def work(cost: int) -> None:
        with budget.reserve(cost):
            with lock:
                holding.append(cost)
                alone.append(cost <= 100 or holding == [cost])
                most[0] = max(most[0], sum(min(c, 100) for c in holding))
            time.sleep(0.01)
            with lock:
                holding.remove(cost)

    threads = [threading.Thread(target=work, args=(cost,)) for cost in [40, 30, 50, 60, 10, 250, 20, 90] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert most[0] <= 100 and budget.peak <= 100 and budget.used == 0
    assert len(alone) == 24 and all(alone)  # 250 (over the whole budget) ran alone


def test_huge_images_decode_within_the_shared_budget(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sdltag import images

    paths = []
    for i, mode in enumerate(["RGB", "RGBA", "L", "P"]):
        path = tmp_path / f"big{i}.png"
        Image.new(mode, (1500, 1000), 120 if mode != "RGBA" else (10, 20, 30, 128)).save(path)
        paths.append(path)
    expected = [load_image(path, InputSpec(48, 48)) for path in paths]
    old = images.decode_budget()
    try:
        budget = images.set_decode_budget(8 * 2**20)  # room for about one 1.5 MP image at 4 bytes a pixel
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda p: load_image(p, InputSpec(48, 48)), paths * 3))
        assert 0 < budget.peak <= budget.total and budget.used == 0
        for got, want in zip(results, expected * 3, strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        images._budget = old


def test_big_non_jpeg_is_reduced_once_decoded(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 255, (1003, 2011, 4), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = open_image(path, target=(224, 224))
    assert image.size == (503, 251)  # 4x smaller (still covering 224x224), rounded up as Image.reduce does
    # the same pixels as flattening the whole image onto white, then reducing
    whole = Image.alpha_composite(Image.new("RGBA", (2011, 1003), (255,) * 4), Image.open(path).convert("RGBA"))
    reference = np.asarray(whole.convert("RGB").reduce(4), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - reference).max() <= 1
    assert open_image(path).size == (2011, 1003)  # no target: full size


def test_sixteen_bit_scaling_is_the_same_in_every_band(tmp_path: Path) -> None:
    values = np.full((1200, 300), 1000, dtype=np.int32)
    values[-10:, :] = 60000  # only the last rows show it is 16-bit data
    path = tmp_path / "i.tif"
    Image.fromarray(values, "I").save(path)
    image = open_image(path, target=(32, 32))
    assert image.getpixel((0, 0)) == (3, 3, 3)  # 1000 / 65535 of white, not 1000 / 255 (clipped to 255)
    assert open_image(path).getpixel((0, 0)) == (3, 3, 3)


@pytest.mark.slow
def test_peak_memory_of_big_pngs_on_four_threads(tmp_path: Path) -> None:
    """24 MP RGBA PNGs on 4 threads within a 200 MB budget: the process grows by about one image, not four."""
    import subprocess
    import sys

    rng = np.random.default_rng(6)
    tile = rng.integers(0, 255, (250, 300, 4), dtype=np.uint8)
    Image.fromarray(np.tile(tile, (16, 20, 1)), "RGBA").save(tmp_path / "big.png", compress_level=1)  # 6000x4000
    script = f"""
import os, resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from sdltag.images import load_image
from sdltag.modelfolder import InputSpec
path = Path({str(tmp_path / "big.png")!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda i: load_image(path, InputSpec(224, 224)).shape, range(8)))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    env = dict(os.environ, SDLTAG_DECODE_MEMORY_MB="200")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    grown_mb = int(out.stdout.split()[-1])
    # one decoded image is 96 MB (4 bytes a pixel); four threads of the old pipeline took over 1.4 GB
    assert grown_mb < 400, out.stdout


def test_tag_reports_damaged_files_and_goes_on(tmp_path: Path, tiny_model) -> None:
    """`sdltag tag`: one stderr line per damaged file, naming it; the whole files are tagged."""
    import json
    import random

    from typer.testing import CliRunner

    from sdltag.cli import app

    folder = tmp_path / "lib"
    folder.mkdir()
    _jpeg(folder / "good.jpg", size=(120, 90))
    data = bytearray(_noise_png(folder / "good.png").read_bytes())
    for offset in random.Random(1).sample(range(64, len(data) - 16), 30):
        data[offset] ^= 0xFF
    (folder / "flipped.png").write_bytes(bytes(data))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (150, 110, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "claims-99mp.jpg").write_bytes(_with_frame_size(buffer.getvalue(), 9000, 11000))
    result = CliRunner().invoke(
        app, ["tag", str(folder), "--model", str(tiny_model.path), "--no-index"], catch_exceptions=False
    )
    assert result.exit_code == 1  # some inputs failed
    tagged = sorted(Path(json.loads(line)["path"]).name for line in result.stdout.splitlines())
    assert tagged == ["good.jpg", "good.png"]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 2
    assert any("flipped.png" in line and "CRC" in line for line in errors)
    assert any("claims-99mp.jpg" in line and "truncated" in line for line in errors)
