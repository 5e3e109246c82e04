"""The tag pipeline and `sdltag tag`, with the real onnxruntime and SQLite on a tiny model."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.index import ImageIndex
from sdltag.runtime import ImageModel
from sdltag.tagger import LabelSpace, Scorer, TagOptions, tag_files

COLORS = [(220, 20, 20), (20, 220, 20), (20, 20, 220), (230, 230, 30), (30, 200, 200)]


def _photos(folder: Path, count: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        pixels = (np.array(COLORS[i % len(COLORS)]) * rng.uniform(0.5, 1.0, size=(48, 64, 1))).astype(np.uint8)
        path = folder / f"photo_{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def _extra_labels(model, names: list[str], seed: int = 7) -> LabelSpace:
    """The model's labels plus made-up unseen ones (random unit vectors: no text model needed)."""
    own = LabelSpace.from_model(model)
    rng = np.random.default_rng(seed)
    extra = rng.normal(size=(len(names), own.vectors.shape[1])).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    return LabelSpace(
        own.names + names, np.vstack([own.vectors, extra]), np.concatenate([own.unseen_mask, np.ones(len(names), bool)])
    )


class Counting:
    """An image-model factory counting how many images the real ImageModel ran on."""

    def __init__(self, model, forbid: bool = False) -> None:
        self.model, self.forbid, self.images, self.instance = model, forbid, 0, None

    def __call__(self):
        if self.forbid:
            raise AssertionError("the image model must not run")
        if self.instance is None:
            self.instance = ImageModel(self.model, device="cpu", threads=1)
        outer = self

        class Wrapped:
            def run(self, images):
                outer.images += images.shape[0]
                return outer.instance.run(images)

        return Wrapped()


def _run(files, model, labels, index=None, factory=None, **options):
    results, problems = [], []
    factory = factory or Counting(model)
    summary = tag_files(
        files,
        model=model,
        labels=labels,
        image_model=factory,
        on_result=results.append,
        on_problem=problems.append,
        options=TagOptions(**options),
        index=index,
    )
    return results, problems, summary, factory


# -- the pipeline -----------------------------------------------------------------------------


def test_results_in_input_order_and_scores_match_numpy(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "p", 7)
    labels = LabelSpace.from_model(tiny_model)
    results, problems, summary, factory = _run(files, tiny_model, labels, batch_size=3, top_k=4)
    assert [r.path for r in results] == files and not problems
    assert summary.tagged == 7 and factory.images == 7
    # the same scores computed by hand: one image through the model, max over rows of <A_m, w>
    from sdltag.images import load_image

    vectors = ImageModel(tiny_model, device="cpu").run(load_image(files[2], tiny_model.manifest.input)[None])
    raw = (vectors[0] @ labels.vectors.T).max(axis=0)  # (L,)
    best = np.argsort(-raw, kind="stable")[:4]
    assert [t.label for t in results[2].tags] == [labels.names[i] for i in best]
    np.testing.assert_allclose([t.score for t in results[2].tags], raw[best], rtol=1e-4, atol=1e-5)
    assert all(t.kind == "seen" for t in results[2].tags)


def test_retag_with_new_labels_never_runs_the_model(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "p", 5)
    with ImageIndex.open(tmp_path / "i.db") as index:
        first, _, summary, _ = _run(files, tiny_model, LabelSpace.from_model(tiny_model), index=index)
        assert summary.tagged == 5
        labels = _extra_labels(tiny_model, ["zebra", "kite", "lamp"])
        again, problems, summary, _ = _run(
            files, tiny_model, labels, index=index, factory=Counting(tiny_model, forbid=True), top_k=9
        )
    assert summary.tagged == 0 and summary.unchanged == 5 and not problems
    assert 0 < summary.seconds < 60 and "images/s in" in summary.line()  # the run's own wall time
    assert [r.path for r in again] == files
    assert {t.kind for r in again for t in r.tags} == {"seen", "unseen"}
    # seen labels score exactly as before
    before = {t.label: t.score for t in first[0].tags}
    after = {t.label: t.score for t in again[0].tags if t.kind == "seen"}
    for name, score in after.items():
        assert before[name] == pytest.approx(score, abs=1e-6)


def test_renamed_and_copied_files_reuse_vectors_by_hash(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "p", 3)
    labels = LabelSpace.from_model(tiny_model)
    with ImageIndex.open(tmp_path / "i.db") as index:
        first, *_ = _run(files, tiny_model, labels, index=index)
        moved = files[0].with_name("renamed.jpg")
        os.rename(files[0], moved)
        copy = tmp_path / "p" / "copy.jpg"
        copy.write_bytes(files[1].read_bytes())
        results, _, summary, factory = _run([moved, copy, files[2]], tiny_model, labels, index=index)
    assert factory.images == 0 and summary.by_hash == 2 and summary.unchanged == 1
    assert results[0].tags == first[0].tags and results[1].tags == first[1].tags


def test_changed_file_and_changed_model_re_embed(tmp_path: Path, tiny_model) -> None:
    from conftest import build_tiny_model

    files = _photos(tmp_path / "p", 2)
    with ImageIndex.open(tmp_path / "i.db") as index:
        _run(files, tiny_model, LabelSpace.from_model(tiny_model), index=index)
        Image.new("RGB", (64, 48), (1, 2, 3)).save(files[0])
        os.utime(files[0], ns=(1, 1))
        _, _, summary, factory = _run(files, tiny_model, LabelSpace.from_model(tiny_model), index=index)
        assert factory.images == 1 and summary.unchanged == 1
        other = build_tiny_model(
            tmp_path / "other", tiny_model.manifest.seen_labels, tiny_model.label_vectors, seed=3, width=4
        )
        assert other.model_id != tiny_model.model_id
        _, _, summary, factory = _run(files, other, LabelSpace.from_model(other), index=index)
        assert factory.images == 2 and summary.tagged == 2
        assert index.count(other.model_id) == 2 and index.count(tiny_model.model_id) == 2


def test_bad_files_are_reported_and_the_rest_tagged_and_indexed(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "p", 3)
    empty = tmp_path / "p" / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "p" / "text.jpg"
    text.write_text("not an image")
    gone = tmp_path / "p" / "gone.jpg"
    order = [files[0], empty, files[1], text, gone, files[2]]
    with ImageIndex.open(tmp_path / "i.db") as index:
        results, problems, summary, _ = _run(
            order, tiny_model, LabelSpace.from_model(tiny_model), index=index, batch_size=2
        )
        assert index.count() == 3
    assert [r.path for r in results] == files
    assert sorted(Path(p.path).name for p in problems) == ["empty.jpg", "gone.jpg", "text.jpg"]
    assert len(summary.failed) == 3 and "3 failed" in summary.line()


def test_threshold_top_k_calibration_and_raw(tmp_path: Path, tiny_model) -> None:
    labels = LabelSpace.from_model(tiny_model)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2, tiny_model.manifest.rows, tiny_model.manifest.dim)).astype(np.float32)
    calibration = {"method": "platt", "seen": {"a": 3.0, "b": -1.0}}
    raw = Scorer(labels, calibration, TagOptions(raw_scores=True, top_k=6)).scores(vectors)
    calibrated = Scorer(labels, calibration, TagOptions(top_k=6)).scores(vectors)
    np.testing.assert_allclose(calibrated, 1 / (1 + np.exp(-(3.0 * raw - 1.0))), rtol=1e-5)
    assert ((calibrated >= 0) & (calibrated <= 1)).all()
    tags = Scorer(labels, calibration, TagOptions(top_k=3, threshold=0.5)).tags(vectors)
    for row, scores in zip(tags, calibrated, strict=True):
        assert len(row) <= 3 and all(t.score >= 0.5 for t in row)
        assert len(row) == min(3, int((scores >= 0.5).sum()))


def test_big_batches_are_scored_in_parts_with_the_same_result(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-tag's big batches are split over threads; the scores are those of one product."""
    import sdltag.tagger as tagger
    from sdltag.scoring import calibrate, sdl_scores

    labels = LabelSpace.from_model(tiny_model)
    calibration = {"method": "platt", "seen": {"a": 2.0, "b": -0.5}}
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(301, tiny_model.manifest.rows, tiny_model.manifest.dim)).astype(np.float32)
    monkeypatch.setattr(tagger.os, "cpu_count", lambda: 4)
    threads: list[str] = []
    original = sdl_scores

    def spy(pv, lv):
        threads.append(__import__("threading").current_thread().name)
        return original(pv, lv)

    monkeypatch.setattr(tagger, "sdl_scores", spy)
    scores = Scorer(labels, calibration, TagOptions()).scores(vectors)
    expected = calibrate(original(vectors, labels.vectors), labels.unseen_mask, calibration)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-7)
    assert len(threads) == 4 and all(name.startswith("sdltag-score") for name in threads)  # 4 parts
    threads.clear()
    Scorer(labels, calibration, TagOptions()).scores(vectors[:40])  # a pipeline-sized batch: this thread
    assert threads == [__import__("threading").current_thread().name]


# -- the command ------------------------------------------------------------------------------


def _cli(args: list[str], **kwargs):
    return CliRunner().invoke(app, ["tag", *args], catch_exceptions=False, **kwargs)


def test_cli_formats_and_index(tmp_path: Path, tiny_model) -> None:
    folder = tmp_path / "lib"
    files = _photos(folder, 3)
    base = ["--model", str(tiny_model.path), "--index", str(tmp_path / "i.db")]
    result = _cli([str(folder), *base, "-k", "2"])
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in lines] == [str(f) for f in files] and all(len(r["tags"]) == 2 for r in lines)
    assert "CPUExecutionProvider" in result.stderr and "3 tagged" in result.stderr
    result = _cli([str(folder), *base, "-k", "2", "--format", "csv"])
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "rank", "label", "score", "kind", "path_bytes"] and len(rows) == 7
    assert "0 tagged, 3 reused" in result.stderr and "CPUExecutionProvider" not in result.stderr
    result = _cli([str(folder), *base, "--format", "json", "--output", str(tmp_path / "out" / "r.json")])
    assert result.exit_code == 0 and result.stdout == ""
    assert len(json.loads((tmp_path / "out" / "r.json").read_text())) == 3
    result = _cli([str(folder), *base, "-o", str(tmp_path / "r.csv")])  # format from the extension
    assert (tmp_path / "r.csv").read_text().startswith("path,rank,label,score,kind")


def test_cli_stdin_paths_and_null(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", 2)
    base = ["--model", str(tiny_model.path), "--no-index"]
    missing = tmp_path / "lib" / "nope.jpg"
    result = _cli(["-", *base], input=f"{files[0]}\n{missing}\n{files[1]}\n")
    assert result.exit_code == 1
    assert [json.loads(x)["path"] for x in result.stdout.splitlines()] == [str(f) for f in files]
    assert f"{missing}: no such file" in result.stderr
    result = _cli(["-", "-0", *base], input=f"{files[1]}\0{files[0]}\0")
    assert result.exit_code == 0
    assert [json.loads(x)["path"] for x in result.stdout.splitlines()] == [str(files[1]), str(files[0])]


def _bomb(path: Path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_cli_every_kind_of_bad_input(tmp_path: Path, tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "lib"
    good = _photos(folder, 2)
    (folder / "zero.jpg").write_bytes(b"")
    full = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "text.jpg").write_text("hello")
    _bomb(folder / "bomb.png")
    Image.new("RGB", (20, 20)).save(folder / "corrupt.png")
    data = bytearray((folder / "corrupt.png").read_bytes())
    data[35:55] = b"\x00" * 20
    (folder / "corrupt.png").write_bytes(bytes(data))
    odd = os.fsencode(folder) + b"/na\xefve.jpg"
    with open(odd, "wb") as handle:
        handle.write(full)
    locked = folder / "locked.jpg"
    locked.write_bytes(full)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make this one file unreadable the way a user would see it
        import builtins

        real_open = builtins.open

        def deny(file, *args, **kwargs):
            if isinstance(file, (str, Path)) and Path(file) == locked:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", deny)
    index_path = tmp_path / "i.db"
    result = _cli(
        [
            str(folder),
            str(tmp_path / "missing-folder"),
            "--model",
            str(tiny_model.path),
            "--index",
            str(index_path),
            "--xmp",
        ]
    )
    locked.chmod(0o644)
    assert result.exit_code == 1
    stdout = result.stdout_bytes.decode("utf-8", "surrogateescape")
    # A name that is not UTF-8 comes back exactly through path_bytes (path carries U+FFFD).
    records = [json.loads(x) for x in stdout.splitlines()]
    tagged = [os.fsdecode(base64.b64decode(r["path_bytes"])) if "path_bytes" in r else r["path"] for r in records]
    assert any("\ufffd" in r["path"] for r in records if "path_bytes" in r)
    assert sorted(Path(p).name for p in tagged) == sorted([good[0].name, good[1].name, os.fsdecode(b"na\xefve.jpg")])
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    for name in ["zero.jpg", "truncated.jpg", "text.jpg", "bomb.png", "corrupt.png", "locked.jpg", "missing-folder"]:
        assert sum(name in line for line in errors) == 1, (name, result.stderr)
    assert len(errors) == 7
    with ImageIndex.open(index_path) as index:
        assert index.count() == 3
    assert (folder / (good[0].name + ".xmp")).exists()


def test_cli_non_utf8_name_survives_stdout(tmp_path: Path, tiny_model) -> None:
    folder = tmp_path / "lib"
    folder.mkdir()
    odd = os.fsencode(folder) + b"/caf\xe9.jpg"
    Image.new("RGB", (40, 30), (200, 0, 0)).save(os.fsdecode(odd), format="JPEG")
    result = _cli([str(folder), "--model", str(tiny_model.path), "--no-index", "--format", "paths"])
    assert result.exit_code == 0
    assert result.stdout_bytes.strip() == odd


def test_cli_index_that_is_not_an_index_is_refused(tmp_path: Path, tiny_model) -> None:
    """--index naming some other file (here not even SQLite): refused, exit 2, the file untouched."""
    _photos(tmp_path / "lib", 2)
    index_path = tmp_path / "i.db"
    index_path.write_bytes(b"garbage" * 1000)
    result = _cli([str(tmp_path / "lib"), "--model", str(tiny_model.path), "--index", str(index_path)])
    assert result.exit_code == 2 and "not an sdltag index" in result.stderr and result.stdout == ""
    assert index_path.read_bytes() == b"garbage" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.db", "lib"]


def test_cli_read_only_output_location(tmp_path: Path, tiny_model) -> None:
    _photos(tmp_path / "lib", 2)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    index_path = tmp_path / "i.db"
    result = _cli(
        [
            str(tmp_path / "lib"),
            "--model",
            str(tiny_model.path),
            "--index",
            str(index_path),
            "--output",
            str(blocker / "out.jsonl"),
            "--xmp",
        ]
    )
    assert result.exit_code == 1 and "cannot write the output" in result.stderr
    assert len(result.stdout.splitlines()) == 2  # the results still come out, on stdout
    with ImageIndex.open(index_path) as index:
        assert index.count() == 2
    assert len(list((tmp_path / "lib").glob("*.xmp"))) == 2
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        result = _cli(
            [str(tmp_path / "lib"), "--model", str(tiny_model.path), "--no-index", "--output", str(ro / "out.jsonl")]
        )
        assert result.exit_code == 1 and len(result.stdout.splitlines()) == 2


def test_cli_dry_run_changes_no_file(tmp_path: Path, tiny_model) -> None:
    _photos(tmp_path / "lib", 2)
    index_path = tmp_path / "i.db"
    before = sorted(p.name for p in (tmp_path / "lib").iterdir())
    result = _cli(
        [
            str(tmp_path / "lib"),
            "--model",
            str(tiny_model.path),
            "--index",
            str(index_path),
            "--xmp",
            "--dry-run",
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
    )
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2
    assert "would update" in result.stderr
    assert not index_path.exists() and not (tmp_path / "o.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == before


def test_cli_xmp_adobe_naming_warns_on_collision(tmp_path: Path, tiny_model) -> None:
    folder = tmp_path / "lib"
    folder.mkdir()
    Image.new("RGB", (30, 30), (9, 9, 9)).save(folder / "IMG_1.jpg")
    Image.new("RGB", (30, 30), (9, 9, 9)).save(folder / "IMG_1.png")
    result = _cli([str(folder), "--model", str(tiny_model.path), "--no-index", "--xmp", "--xmp-naming", "adobe"])
    assert result.exit_code == 0 and "would share the sidecar IMG_1.xmp" in result.stderr
    assert [p.name for p in folder.glob("*.xmp")] == ["IMG_1.xmp"]


def test_cli_usage_errors_exit_2(tmp_path: Path, tiny_model) -> None:
    _photos(tmp_path / "lib", 1)
    base = [str(tmp_path / "lib"), "--model", str(tiny_model.path), "--no-index"]
    assert _cli([*base, "--format", "xml"]).exit_code == 2
    assert _cli([*base, "--no-seen"]).exit_code == 2
    assert _cli([*base, "--xmp-naming", "weird"]).exit_code == 2
    assert _cli([*base, "--device", "tpu"]).exit_code == 2
    result = _cli([str(tmp_path / "lib"), "--model", str(tmp_path / "no-model"), "--no-index"])
    assert result.exit_code == 2 and "model folder does not exist" in result.stderr


def test_cli_rename_reuses_and_drops_the_old_row(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "lib", 3)
    index_path = tmp_path / "i.db"
    base = [str(tmp_path / "lib"), "--model", str(tiny_model.path), "--index", str(index_path)]
    assert _cli(base).exit_code == 0
    files[0].rename(tmp_path / "lib" / "renamed.jpg")
    result = _cli(base)
    assert result.exit_code == 0 and "0 tagged, 3 reused" in result.stderr and "1 by content hash" in result.stderr
    with ImageIndex.open(index_path) as index:
        names = sorted(r.path.name for r in index.under([tmp_path / "lib"], tiny_model.model_id))
    assert names == sorted(["renamed.jpg", files[1].name, files[2].name])


def test_interrupted_run_keeps_finished_work_and_resumes(tmp_path: Path, tiny_model) -> None:
    files = _photos(tmp_path / "p", 10)
    labels = LabelSpace.from_model(tiny_model)
    seen: list = []

    def stop_after_four(result) -> None:
        seen.append(result)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with ImageIndex.open(tmp_path / "i.db", commit_every=1000) as index:
        with pytest.raises(KeyboardInterrupt):
            tag_files(
                files,
                model=tiny_model,
                labels=labels,
                image_model=Counting(tiny_model),
                on_result=stop_after_four,
                on_problem=lambda p: None,
                options=TagOptions(batch_size=2),
                index=index,
            )
    with ImageIndex.open(tmp_path / "i.db") as index:
        done = index.count()
        assert done >= 4  # committed on the way out although no batch of 1000 was reached
        _, _, summary, factory = _run(files, tiny_model, labels, index=index)
    assert summary.unchanged == done and factory.images == 10 - done


# -- label vectors computed on another thread ----------------------------------------------------


def test_labels_as_a_future_overlap_and_match(tmp_path: Path, tiny_model) -> None:
    """Scoring waits for label vectors still being computed; the results equal those of ready labels."""
    import threading
    from concurrent.futures import Future

    files = _photos(tmp_path / "p", 9)
    labels = _extra_labels(tiny_model, ["zebra", "kite"])
    expected, _, _, _ = _run(files, tiny_model, labels, batch_size=2, top_k=5)
    future: Future = Future()
    decoded = threading.Event()

    class Signalling(Counting):
        def __call__(self):
            decoded.set()  # the model is asked for: decoding began before the labels were there
            return super().__call__()

    threading.Thread(target=lambda: (decoded.wait(30), future.set_result(labels)), daemon=True).start()
    got, problems, summary, factory = _run(
        files, tiny_model, future, factory=Signalling(tiny_model), batch_size=2, top_k=5
    )
    assert not problems and summary.tagged == 9 and factory.images == 9
    assert [(r.path, [(t.label, t.kind) for t in r.tags]) for r in got] == [
        (r.path, [(t.label, t.kind) for t in r.tags]) for r in expected
    ]
    # scored in other groups (the matrices that waited for the labels together): equal up to float rounding
    np.testing.assert_allclose(
        [[t.score for t in r.tags] for r in got], [[t.score for t in r.tags] for r in expected], rtol=1e-5, atol=1e-7
    )


def test_label_error_from_the_thread_is_raised_and_indexed_work_kept(tmp_path: Path, tiny_model) -> None:
    from concurrent.futures import Future

    from sdltag.errors import SdltagError

    files = _photos(tmp_path / "p", 4)
    future: Future = Future()
    future.set_exception(SdltagError("the labels cannot be embedded"))
    with ImageIndex.open(tmp_path / "i.db") as index:
        with pytest.raises(SdltagError, match="cannot be embedded"):
            _run(files, tiny_model, future, index=index)
        assert index.count(tiny_model.model_id) == 4  # the model's work is kept for the next run


def test_cli_label_problem_reported_even_with_nothing_to_tag(tmp_path: Path, tiny_model) -> None:
    """A user label this model's embedder cannot embed: exit 2 with the reason, with or without images."""
    empty = tmp_path / "empty"
    empty.mkdir()
    files = _photos(tmp_path / "lib", 2)
    for target in (empty, files[0].parent):
        result = CliRunner().invoke(
            app,
            ["tag", str(target), "--model", str(tiny_model.path), "--no-index", "--label", "zebra",
             "--cache-dir", str(tmp_path / "cache")],
        )  # fmt: skip
        assert result.exit_code == 2, (result.stdout, result.stderr)
        assert "test-embedder" in result.stderr
        assert result.stdout == ""
