"""Import the official SDL release (Alibaba-MIIL/ZS_SDL): TResNet-M on NUS-WIDE, M=7, d=300.

The official checkpoint ``NUS_mtresnet_224.pth`` is a torch pickle of
``{"model": state_dict, "num_classes": 1006, "idx_to_class": {...}}``; its state dict is
the TResNet-M body (``conv1.*``, ``layer1.*`` .. ``layer4.*``) plus the SDL head's
``embedding.weight`` (2100, 2048) whose output is read interleaved (``out[m::7]``).
The label side is a fixed table of 300-d word vectors (``nus_wide_wordvec_array.pickle``,
(300, 1006), one column per class of ``nus_wide_classes.pickle``).

``import_official`` verifies every key and shape, rebuilds the model in sdltag's own
``SDLModel`` (backbone ``tresnet_m``, head layout ``interleaved``) and writes a model
folder with the official preprocessing: 224x224 squash resize, [0, 1] scaling, no
mean/std. Checkpoints are read with ``torch.load(weights_only=True)`` and the pickles
with ``sdltag.safepickle`` only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdltag.errors import SdltagError
from sdltag.hashing import file_sha256
from sdltag.labels import build_vocabulary, label_key
from sdltag.modelfolder import EmbedderSpec, InputSpec, ModelFolder, check_output_folder
from sdltag.nn.model import ModelConfig, SDLModel
from sdltag.safepickle import safe_load

ROWS = 7
DIM = 300
INPUT_SIZE = 224
HEAD_KEY = "embedding.weight"
WORDVEC_NAME = "nus-wide-wordvec-300"
REPOSITORY = "https://github.com/Alibaba-MIIL/ZS_SDL"
PAPER = (
    "Ben-Cohen, Zamir, Ben Baruch, Friedman, Zelnik-Manor: Semantic Diversity Learning for "
    "Zero-Shot Multi-label Classification, ICCV 2021 (arXiv 2105.05926)"
)
LICENSE = "MIT (Alibaba-MIIL/ZS_SDL)"
FIX = f"Pass the official NUS_mtresnet_224.pth checkpoint (linked from the README of {REPOSITORY})."


def official_config() -> ModelConfig:
    """The architecture of the official checkpoint in sdltag's terms."""
    return ModelConfig(backbone="tresnet_m", backbone_config={}, rows=ROWS, dim=DIM, head_layout="interleaved")


def to_sdltag_key(key: str) -> str:
    """Official state-dict key -> ``SDLModel`` key (``embedding.weight`` -> ``head.embedding.weight``)."""
    return "head." + key if key == HEAD_KEY else "backbone." + key


def to_official_key(key: str) -> str:
    """``SDLModel`` state-dict key -> official key (inverse of ``to_sdltag_key``)."""
    if key.startswith("head."):
        return key[len("head.") :]
    if key.startswith("backbone."):
        return key[len("backbone.") :]
    raise ValueError(f"not an SDLModel key: {key!r}")


def expected_layout(model: SDLModel | None = None) -> dict[str, tuple[int, ...]]:
    """Official key -> shape, in state-dict order (373 tensors for TResNet-M)."""
    model = model if model is not None else SDLModel(official_config())
    return {to_official_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint (``{"model": sd, ...}``) or a bare state dict.

    A ``module.`` prefix (saved from DataParallel) is removed when every key has it.
    """
    state = checkpoint
    if isinstance(checkpoint, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(checkpoint.get(wrapper), dict):
                state = checkpoint[wrapper]
                break
    if not isinstance(state, dict) or not state:
        raise SdltagError(
            f"{source}: holds no state dict (expected {{'model': state_dict, ...}} or a state dict). " + FIX
        )
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SdltagError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor. {FIX}")
    return {str(k): v for k, v in state.items()}


def verify_state_dict(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str = "checkpoint"
) -> None:
    """Refuse a state dict whose keys or shapes differ from ``expected``, naming the first bad key of each kind."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    nonfloat = [k for k in expected if k in state and not state[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        problems.append(
            f"unexpected key {unexpected[0]!r}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
        )
    if misshaped:
        key = misshaped[0]
        problems.append(
            f"key {key!r} has shape {tuple(state[key].shape)}, expected {expected[key]}"
            + (f" ({len(misshaped) - 1} more mis-shaped)" if len(misshaped) > 1 else "")
        )
    if nonfloat:
        problems.append(f"key {nonfloat[0]!r} has dtype {state[nonfloat[0]].dtype}, expected a float tensor")
    if problems:
        raise SdltagError(
            f"{source}: not the official TResNet-M SDL (NUS-WIDE, M={ROWS}, d={DIM}) checkpoint: "
            + "; ".join(problems)
            + f". {FIX}"
        )


def build_official_model(state: dict[str, torch.Tensor], source: str = "checkpoint") -> SDLModel:
    """Verify an official state dict and load it strictly into sdltag's ``SDLModel`` (eval mode)."""
    model = SDLModel(official_config())
    verify_state_dict(state, expected_layout(model), source)
    model.load_state_dict({to_sdltag_key(k): v.detach().to(torch.float32) for k, v in state.items()}, strict=True)
    return model.eval()


def load_official_checkpoint(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` -> (state dict, other top-level entries)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SdltagError(f"{path}: checkpoint not found. {FIX}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdltagError(f"{path}: cannot read the checkpoint safely ({first}). {FIX}") from None
    state = extract_state_dict(checkpoint, str(path))
    # The scalar entries beside the weights (the official file's "num_classes"); none in a bare state dict.
    extra = (
        {str(k): v for k, v in checkpoint.items() if isinstance(v, (int, float, str))}
        if isinstance(checkpoint, dict)
        else {}
    )
    return state, extra


@dataclass
class LabelTable:
    """The official word-vector label table split into seen and unseen labels.

    ``vectors`` rows follow ``seen + unseen``; unit length, float32 (L, d).
    ``table_id`` hashes the whole source array, so the same pickle always gives the same id.
    """

    seen: list[str]
    unseen: list[str]
    vectors: np.ndarray
    table_id: str


def _class_names(classes: Any, source: str) -> list[str]:
    if isinstance(classes, dict):
        odd = next((k for k in classes if not isinstance(k, (int, np.integer))), None)
        keys = sorted(classes) if odd is None else []
        if odd is not None or not keys or keys != list(range(len(keys))):
            found = f" (found the key {odd!r:.40})" if odd is not None else ""
            raise SdltagError(
                f"{source}: class dict keys must be 0..N-1, integers (the word-vector columns){found}. "
                "Pass nus_wide_classes.pickle from the official repository."
            )
        names = [classes[i] for i in keys]
    elif isinstance(classes, (list, tuple)):
        names = list(classes)
    else:
        raise SdltagError(
            f"{source}: expected a dict index -> class name or a list of names, "
            f"got {type(classes).__name__}. Pass nus_wide_classes.pickle from the official repository."
        )
    if not names:
        raise SdltagError(f"{source}: lists no classes. Pass nus_wide_classes.pickle from the official repository.")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise SdltagError(f"{source}: every class name must be a non-empty string.")
    names = [n.strip() for n in names]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SdltagError(f"{source}: class {name!r} is listed twice.")
        seen.add(name)
    return names


def label_table(
    classes: Any,
    wordvecs: Any,
    unseen: Any = None,
    *,
    classes_source: str = "classes",
    wordvecs_source: str = "wordvecs",
    unseen_source: str = "unseen",
) -> LabelTable:
    """Build the label table from the official pickles' contents.

    ``wordvecs`` is (d, N) with one column per class (as the official array), or (N, d);
    ``unseen`` is a list of class names (or None: every class is seen).
    """
    names = _class_names(classes, classes_source)
    if not isinstance(wordvecs, np.ndarray) or wordvecs.ndim != 2 or not np.issubdtype(wordvecs.dtype, np.floating):
        raise SdltagError(
            f"{wordvecs_source}: expected a 2-D float array of word vectors. "
            "Pass nus_wide_wordvec_array.pickle from the official repository."
        )
    source_bytes = np.ascontiguousarray(wordvecs, dtype=np.float32).tobytes()
    table_id = hashlib.sha256(source_bytes).hexdigest()[:16]
    if wordvecs.shape[1] == len(names) and wordvecs.shape[0] != len(names):
        by_label = np.asarray(wordvecs, dtype=np.float32).T  # (d, N) -> (N, d)
    elif wordvecs.shape[0] == len(names):
        by_label = np.asarray(wordvecs, dtype=np.float32)  # (N, d)
    else:
        raise SdltagError(
            f"{wordvecs_source}: word vectors have shape {wordvecs.shape} but {classes_source} lists "
            f"{len(names)} classes. Pass the classes and word-vector pickles of the same release."
        )
    if by_label.shape[1] != DIM:
        raise SdltagError(
            f"{wordvecs_source}: word vectors are {by_label.shape[1]}-d; the official model needs {DIM}-d."
        )
    if not np.all(np.isfinite(by_label)):
        raise SdltagError(f"{wordvecs_source}: word vectors contain NaN or infinity.")
    norms = np.linalg.norm(by_label, axis=1)
    if np.any(norms == 0):
        raise SdltagError(f"{wordvecs_source}: the vector of class {names[int(np.argmin(norms))]!r} is all zeros.")
    by_label = by_label / norms[:, None]
    unseen_set: set[str] = set()
    if unseen is not None:
        if not isinstance(unseen, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in unseen):
            raise SdltagError(
                f"{unseen_source}: expected a list of class names. "
                "Pass nus_wide_unseen_classes.pickle from the official repository."
            )
        index = {n: i for i, n in enumerate(names)}
        for name in unseen:
            if name.strip() not in index:
                raise SdltagError(
                    f"{unseen_source}: unseen label {name!r} is not in {classes_source}. "
                    "Pass the classes and unseen pickles of the same release."
                )
        unseen_set = {n.strip() for n in unseen}
    seen_idx = [i for i, n in enumerate(names) if n not in unseen_set]
    unseen_idx = [i for i, n in enumerate(names) if n in unseen_set]
    vectors = np.ascontiguousarray(by_label[seen_idx + unseen_idx], dtype=np.float32)  # (L, d)
    return LabelTable([names[i] for i in seen_idx], [names[i] for i in unseen_idx], vectors, table_id)


# --- extending the table from a word-vector text file (.vec / GloVe) ---------------------------

# A text file extends the table only if it holds the same vectors: of the table's labels
# found in it, at least this fraction must agree to this cosine (and at least MIN_SHARED).
SAME_SPACE_COSINE = 0.99
SAME_SPACE_FRACTION = 0.95
MIN_SHARED = 20
_TOKEN = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


_VEC_FIX = "Pass a word2vec/fastText .vec or GloVe .txt file: one word and its numbers per line."


def read_word_vectors(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """Stream a word2vec/fastText ``.vec`` (``N D`` header) or GloVe (no header) text file.

    Keeps only the words in ``wanted`` (each found word also under its lower-case form
    when that is wanted), so a multi-gigabyte file costs a single pass and little memory.
    Refuses a file whose vectors are not ``DIM``-d or which has a malformed line.
    """
    found: dict[str, np.ndarray] = {}
    dim: int | None = None
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if number == 1 and (header := _header_dim(line)) is not None:  # word2vec/fastText: "count dim"
                    dim = _official_dim(path, header)
                    continue
                word = line.split(" ", 1)[0]
                if dim is not None and word not in wanted and word.lower() not in wanted:
                    continue
                parts = line.rsplit(None, dim if dim is not None else -1)
                if dim is None:  # GloVe: the first line sets the dimension
                    dim = _official_dim(path, len(parts) - 1)
                _keep_vector(found, wanted, parts, dim, f"{path}:{number}")
    except OSError as exc:
        raise SdltagError(f"{path}: cannot read the word-vector file ({exc.strerror or exc}).") from None
    if dim is None:
        raise SdltagError(f"{path}: no word vectors in this file. {_VEC_FIX}")
    return found


def _header_dim(line: str) -> int | None:
    """The dimension of a ``.vec`` header line (``N D``); None for any other line."""
    head = line.split()
    return int(head[1]) if len(head) == 2 and all(part.isdigit() for part in head) else None


def _official_dim(path: Path, dim: int) -> int:
    """``dim`` when it is the official table's; else the file is refused."""
    if dim != DIM:
        raise SdltagError(f"{path}: holds {dim}-d vectors; the official table is {DIM}-d. {_VEC_FIX}")
    return dim


def _keep_vector(found: dict[str, np.ndarray], wanted: set[str], parts: list[str], dim: int, where: str) -> None:
    """Store the vector of one split line (``word n1 ... nD``) under its wanted forms not found yet."""
    if len(parts) != dim + 1:
        raise SdltagError(f"{where}: expected a word and {dim} numbers. {_VEC_FIX}")
    word = parts[0]
    keys = [k for k in dict.fromkeys((word, word.lower())) if k in wanted and k not in found]
    if not keys:
        return
    try:
        vector = np.asarray(parts[1:], dtype=np.float32)
    except ValueError:
        raise SdltagError(f"{where}: the vector of {word!r} has a non-number. {_VEC_FIX}") from None
    for key in keys:
        found[key] = vector


def _lookup(vectors: dict[str, np.ndarray], text: str) -> tuple[np.ndarray | None, str | None]:
    """Unit vector of ``text`` (mean of its words' vectors) or (None, the first missing word)."""
    words = _tokens(text)
    if not words:
        return None, text
    rows = []
    for word in words:
        vector = vectors.get(word, vectors.get(word.lower()))
        if vector is None:
            return None, word
        rows.append(vector)
    mean = np.mean(rows, axis=0)  # (d,)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else None), (None if norm > 0 else words[0])


@dataclass
class Extension:
    """Labels added to the table from a word-vector text file, and the evidence it is the same space."""

    table: LabelTable
    added: list[str]
    already_known: list[str]
    shared: int
    agreeing: int


def extend_table(table: LabelTable, vec_path: Path | str, labels: list[tuple[str, str]]) -> Extension:
    """Add ``labels`` ((name, text) pairs) to ``table`` as unseen labels, with vectors from ``vec_path``.

    The file must be the official table's own space: its vectors for the table's labels
    must match the table's (cosine >= SAME_SPACE_COSINE for SAME_SPACE_FRACTION of them),
    else vectors from it would not be comparable with the model's and it is refused.
    A multi-word label gets the normalised mean of its words' vectors.
    """
    vec_path = Path(vec_path).expanduser()
    if not vec_path.is_file():
        raise SdltagError(f"{vec_path}: word-vector file not found. Pass the path of an existing .vec or .txt file.")
    known = {label_key(n) for n in table.seen + table.unseen}
    new = [(name, text) for name, text in labels if label_key(name) not in known]
    already = [name for name, _ in labels if label_key(name) in known]
    wanted: set[str] = set()
    for name in table.seen + table.unseen:
        wanted.update(_tokens(name))
    for _, text in new:
        for word in _tokens(text):
            wanted.update((word, word.lower()))
    vectors = read_word_vectors(vec_path, wanted)
    shared = agreeing = 0
    for name, official in zip(table.seen + table.unseen, table.vectors, strict=True):
        vector, _missing = _lookup(vectors, name)
        if vector is not None:
            shared += 1
            agreeing += int(float(vector @ official) >= SAME_SPACE_COSINE)
    needed = min(MIN_SHARED, len(table.vectors))
    if shared < needed or agreeing < SAME_SPACE_FRACTION * shared:
        raise SdltagError(
            f"{vec_path}: not the space of the official word vectors: {agreeing} of the {shared} table labels found "
            f"in it agree (cosine >= {SAME_SPACE_COSINE}; needed {SAME_SPACE_FRACTION:.0%} of at least {needed}). "
            "Only a file of the same word vectors can extend this model's labels."
        )
    rows = []
    for name, text in new:
        vector, missing = _lookup(vectors, text)
        if vector is None:
            raise SdltagError(
                f"{vec_path}: has no vector for {missing!r} (needed by label {name!r}). "
                "Remove the label or pass a file that has the word."
            )
        rows.append(vector)
    added_vectors = np.asarray(rows, dtype=np.float32).reshape(len(rows), DIM)  # (N, d)
    extended = LabelTable(
        seen=table.seen,
        unseen=table.unseen + [name for name, _ in new],
        vectors=np.ascontiguousarray(np.concatenate([table.vectors, added_vectors]), dtype=np.float32),
        table_id=table.table_id,
    )
    return Extension(extended, [name for name, _ in new], already, shared, agreeing)


def wordvec_embedder(table: LabelTable) -> EmbedderSpec:
    """The manifest's embedder record for the official word-vector table."""
    return EmbedderSpec(kind="word-vectors", name=WORDVEC_NAME, id=f"{WORDVEC_NAME}@sha256:{table.table_id}", dim=DIM)


def official_input_spec() -> InputSpec:
    """The official preprocessing: squash to 224x224, scale to [0, 1], no mean/std."""
    return InputSpec(INPUT_SIZE, INPUT_SIZE, resize="squash", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _file_record(path: Path) -> dict[str, str]:
    return {"file": path.name, "sha256": file_sha256(path)}


def _model_card(table: LabelTable, checkpoint: Path, extension: Extension | None = None) -> str:
    added = len(extension.added) if extension is not None else 0
    text = (
        "# Official SDL model: TResNet-M, NUS-WIDE\n\n"
        f"Imported by `sdltag import-official` from `{checkpoint.name}`, the checkpoint released with the paper\n"
        f"{PAPER}\n({REPOSITORY}, licence {LICENSE}).\n\n"
        f"- Backbone: TResNet-M at {INPUT_SIZE}x{INPUT_SIZE}, M={ROWS} principal vectors of d={DIM}.\n"
        f"- Labels: {len(table.seen)} seen and {len(table.unseen) - added} unseen NUS-WIDE labels, each a fixed\n"
        "  300-d word vector from the official release. Only labels in this table can be scored: other words need\n"
        "  a model trained with a text encoder (`sdltag train`).\n"
        "- Trained on NUS-WIDE (Flickr photos); scores are raw SDL scores (no calibration).\n"
    )
    if extension is not None:
        text += (
            f"- {added} more unseen labels were added from a word-vector file whose vectors match the official\n"
            f"  table ({extension.agreeing} of {extension.shared} shared labels at cosine >= {SAME_SPACE_COSINE}).\n"
        )
    return text


def import_official(
    checkpoint: Path | str,
    wordvecs: Path | str,
    classes: Path | str,
    out: Path | str,
    unseen: Path | str | None = None,
    name: str = "",
    word_vectors: Path | str | None = None,
    add_labels: Path | str | None = None,
) -> ModelFolder:
    """``sdltag import-official``: the official checkpoint and pickles -> a verified model folder.

    ``word_vectors`` + ``add_labels`` (a labels file) add unseen labels from a word-vector
    text file of the same space (see ``extend_table``).
    """
    from sdltag.nn.export import export_model

    check_output_folder(out)
    checkpoint, wordvecs, classes = (Path(p).expanduser() for p in (checkpoint, wordvecs, classes))
    unseen_path = Path(unseen).expanduser() if unseen is not None else None
    # Cheap checks first, so a wrong pickle is reported before the slow checkpoint load.
    class_data = safe_load(classes, "--classes pickle")
    vector_data = safe_load(wordvecs, "--wordvecs pickle")
    unseen_data = safe_load(unseen_path, "--unseen pickle") if unseen_path is not None else None
    table = label_table(
        class_data,
        vector_data,
        unseen_data,
        classes_source=str(classes),
        wordvecs_source=str(wordvecs),
        unseen_source=str(unseen_path),
    )
    if (word_vectors is None) != (add_labels is None):
        raise SdltagError(
            "--word-vectors and --add-labels go together: pass both (the labels to add and the file "
            "with their vectors) or neither."
        )
    extension = None
    if word_vectors is not None and add_labels is not None:
        vec_path, labels_path = Path(word_vectors).expanduser(), Path(add_labels).expanduser()
        entries = build_vocabulary([labels_path])
        extension = extend_table(table, vec_path, [(e.label, e.text) for e in entries])
        table = extension.table
    state, extra = load_official_checkpoint(checkpoint)
    model = build_official_model(state, str(checkpoint))
    provenance: dict[str, Any] = {
        "source": "official SDL release",
        "repository": REPOSITORY,
        "paper": PAPER,
        "license": LICENSE,
        "checkpoint": _file_record(checkpoint),
        "wordvecs": _file_record(wordvecs),
        "classes": _file_record(classes),
    }
    if unseen_path is not None:
        provenance["unseen"] = _file_record(unseen_path)
    if extension is not None:
        provenance["extension"] = _extension_record(extension, vec_path, labels_path)
    if isinstance(extra.get("num_classes"), int):
        provenance["checkpoint_num_classes"] = extra["num_classes"]
    return export_model(
        model,
        Path(out),
        input_spec=official_input_spec(),
        embedder=wordvec_embedder(table),
        seen_labels=table.seen,
        unseen_labels=table.unseen,
        label_vectors=table.vectors,
        name=name or "zs-sdl-nus-wide-tresnet-m",
        provenance=provenance,
        model_card=dict(MODEL_CARD_FIELDS),
        model_card_md=_model_card(table, checkpoint, extension),
    )


MODEL_CARD_FIELDS = {
    "paper": PAPER,
    "repository": REPOSITORY,
    "license": LICENSE,
    "dataset": "NUS-WIDE",
    "labels": "fixed 300-d word-vector table; other labels cannot be scored",
}


def _extension_record(extension: Extension, vec_path: Path, labels_path: Path) -> dict[str, Any]:
    """The provenance of labels added from a word-vector file."""
    return {
        "word_vectors": _file_record(vec_path),
        "labels_file": _file_record(labels_path),
        "added_labels": len(extension.added),
        "already_in_table": extension.already_known,
        "same_space_check": {
            "shared": extension.shared,
            "agreeing": extension.agreeing,
            "cosine": SAME_SPACE_COSINE,
        },
    }
