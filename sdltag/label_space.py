"""The labels a tagging run scores: the model's own labels plus the user's, as unit vectors.

``LabelSet`` is the one label type of the tag and search paths: names, (L, d) vectors and which
labels are zero-shot. ``resolve_labels`` merges a model's labels (seen, then the manifest's
unseen ones) with the user's vocabulary. A user label equal (case-insensitively) to a model
label reuses that label and its trained vector, so "Cat" never appears twice and a seen label
stays seen. Every other user label is embedded with the embedder the model was trained with
(from the label cache when it can); a different embedder is refused, since its vectors would
live in another space. Imports numpy only (plus the embedder when a label is new).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdltag.errors import SdltagError
from sdltag.labels import LabelEntry, label_key
from sdltag.modelfolder import ModelFolder

if TYPE_CHECKING:
    from sdltag.embedding import TextEmbedder

WORD_VECTORS = "word-vectors"
logger = logging.getLogger(__name__)


@dataclass
class LabelSet:
    """Labels to score: ``vectors`` rows follow ``names``; ``unseen_mask`` marks labels the model
    was not trained on (the zero-shot ones, calibrated separately)."""

    names: list[str]
    vectors: np.ndarray  # (L, d) float32 unit rows
    unseen_mask: np.ndarray  # (L,) bool

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.vectors = np.ascontiguousarray(self.vectors, dtype=np.float32)
        self.unseen_mask = np.asarray(self.unseen_mask, dtype=bool)
        if (
            self.vectors.ndim != 2
            or len(self.names) != self.vectors.shape[0]
            or self.unseen_mask.shape != (len(self.names),)
        ):
            raise ValueError(
                f"label set mismatch: {len(self.names)} names, vectors {self.vectors.shape}, "
                f"mask {self.unseen_mask.shape}"
            )

    @classmethod
    def from_model(cls, model: ModelFolder) -> LabelSet:
        """The model's own labels: seen, then the manifest's unseen ones."""
        manifest = model.manifest
        mask = np.array([False] * len(manifest.seen_labels) + [True] * len(manifest.unseen_labels), dtype=bool)
        return cls(list(model.all_labels), model.label_vectors, mask)

    def rows(self, start: int, stop: int) -> LabelSet:
        """The labels ``start:stop`` as a set of their own (a one-label query: ``rows(i, i + 1)``)."""
        return LabelSet(self.names[start:stop], self.vectors[start:stop], self.unseen_mask[start:stop])

    def kinds(self) -> list[str]:
        """ "seen" or "unseen" per label, for output columns."""
        return ["unseen" if unseen else "seen" for unseen in self.unseen_mask.tolist()]

    def __len__(self) -> int:
        return len(self.names)


def labels_for(
    model: ModelFolder,
    label_files: Sequence[Path] = (),
    inline: Sequence[str] = (),
    *,
    include_seen: bool = True,
    embedder: str | None = None,
    cache_dir: Path | None = None,
    background: bool = False,
    thresholds: dict[str, float] | None = None,
) -> LabelSet | Future[LabelSet]:
    """The labels to score: the model's own (``include_seen``), plus the user's (``--labels``/``--label``).

    ``thresholds``, when given, receives the labels files' per-label thresholds (``label_key`` -> value).
    With ``background``, the labels files are read and checked here and the embedding
    runs on a thread: the result is then a ``Future`` of the ``LabelSet``.
    """
    if not label_files and not inline:
        if not include_seen:
            raise SdltagError("--no-seen leaves no labels to rank. Add --labels FILE or --label TEXT.")
        return LabelSet.from_model(model)
    from sdltag.labels import build_vocabulary

    entries = build_vocabulary(label_files, inline)
    if thresholds is not None:
        thresholds.update((e.key, e.threshold) for e in entries if e.threshold is not None)

    def embed() -> LabelSet:
        return resolve_labels(model, entries, include_seen=include_seen, embedder=embedder or None, cache_dir=cache_dir)

    if not background:
        return embed()
    # The label file was read and checked above; embedding (an onnxruntime session, which
    # releases the GIL) overlaps finding the files and reading the index.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdltag-labels")
    future = pool.submit(embed)
    pool.shutdown(wait=False)
    return future


def query_labels(
    model: ModelFolder, query: str, embedder: str | None = None, cache_dir: Path | None = None
) -> LabelSet:
    """A search query as a one-label set: the model's own vector when it is one of its labels, else embedded."""
    from sdltag.labels import check_utf8_argument

    check_utf8_argument(query, "the search query")
    key = label_key(query)
    if not key:
        raise SdltagError("the search query is empty. Give a label, e.g. `sdltag search beach`.")
    own = LabelSet.from_model(model)
    for i, name in enumerate(own.names):
        if label_key(name) == key:
            return own.rows(i, i + 1)
    found = labels_for(model, (), [query], include_seen=False, embedder=embedder, cache_dir=cache_dir)
    assert isinstance(found, LabelSet)  # not in the background
    if len(found) != 1:
        raise SdltagError(f"the query {query!r} did not resolve to one label.")
    return found


def read_blocked(files: Sequence[Path]) -> frozenset[str]:
    """The ``label_key`` of every label in the ``--block`` files (thresholds and descriptions ignored)."""
    from sdltag.labels import read_labels_file

    keys: set[str] = set()
    for path in files:
        try:
            keys.update(entry.key for entry in read_labels_file(Path(path)))
        except SdltagError as exc:
            raise SdltagError(str(exc).replace("the --labels path", "the --block path")) from None
    return frozenset(keys)


def warn_unknown_blocked(blocked: frozenset[str], labels: LabelSet) -> None:
    """One warning naming the blocked labels that are not among ``labels`` (a typo?)."""
    unknown = sorted(blocked - {label_key(name) for name in labels.names})
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        logger.warning(f"--block: {shown} {'is' if len(unknown) == 1 else 'are'} not among the labels scored (a typo?)")


def _model_label_index(model: ModelFolder) -> dict[str, int]:
    index: dict[str, int] = {}
    for row, name in enumerate(model.all_labels):
        index.setdefault(label_key(name), row)
    return index


def resolve_labels(
    model: ModelFolder,
    entries: Sequence[LabelEntry],
    *,
    include_seen: bool = True,
    embedder: str | TextEmbedder | None = None,
    cache_dir: Path | None = None,
) -> LabelSet:
    """The model's labels (``include_seen``) followed by the user's ``entries``.

    New user labels are embedded (their description when they have one) with the model's
    embedder; ``embedder`` (``--embedder``, a name/path or an embedder object) must be that
    same embedder. Raises
    ``SdltagError`` when the embedders differ, when the model's embedder cannot be loaded
    offline, or when a word-vectors model is asked to score a label it has no vector for.
    """
    manifest = model.manifest
    seen_count = len(manifest.seen_labels)
    model_index = _model_label_index(model)
    rows: list[int] = []  # model rows to take, in output order
    if include_seen:
        rows = list(range(len(model.all_labels)))
    taken = set(rows)
    plan: list[tuple[str, int | LabelEntry]] = [(model.all_labels[r], r) for r in rows]
    ignored_descriptions: list[str] = []
    seen_user: set[str] = set()
    for entry in entries:
        key = label_key(entry.label)
        if key in seen_user:
            continue
        seen_user.add(key)
        row = model_index.get(key)
        if row is not None:
            if entry.text != entry.label:
                ignored_descriptions.append(entry.label)
            if row not in taken:
                taken.add(row)
                plan.append((model.all_labels[row], row))
            continue
        plan.append((entry.label, entry))
    if ignored_descriptions:
        logger.warning(
            f"the model already knows {', '.join(repr(n) for n in ignored_descriptions[:10])}; "
            "its trained vector is used and the description is ignored"
        )

    new_entries = [item for _, item in plan if isinstance(item, LabelEntry)]
    new_vectors = np.zeros((0, manifest.dim), dtype=np.float32)
    if new_entries:
        new_vectors = _embed_new(model, new_entries, embedder=embedder, cache_dir=cache_dir)
    elif embedder is not None:
        _check_embedder(model, embedder, cache_dir)

    names: list[str] = []
    vectors = np.zeros((len(plan), manifest.dim), dtype=np.float32)  # (L, d)
    unseen = np.zeros(len(plan), dtype=bool)
    table = model.label_vectors if any(not isinstance(item, LabelEntry) for _, item in plan) else None
    new_row = 0
    for out_row, (name, item) in enumerate(plan):
        names.append(name)
        if isinstance(item, LabelEntry):
            vectors[out_row] = new_vectors[new_row]
            new_row += 1
            unseen[out_row] = True
        else:
            assert table is not None
            vectors[out_row] = table[item]
            unseen[out_row] = item >= seen_count
    return LabelSet(names=names, vectors=vectors, unseen_mask=unseen)


def _refuse_word_vectors(model: ModelFolder, labels: list[str]) -> SdltagError:
    examples = ", ".join(repr(n) for n in model.all_labels[:5])
    shown = ", ".join(repr(n) for n in labels[:5]) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")
    return SdltagError(
        f"{model.path}: this model scores only the {len(model.all_labels)} labels in its fixed word-vector table "
        f"(e.g. {examples}; see `sdltag labels list --model {model.path}`), so it cannot score {shown}. "
        "Other labels need a model trained with a text encoder (`sdltag train`)."
    )


def _check_embedder(
    model: ModelFolder, embedder: str | TextEmbedder | None, cache_dir: Path | None
) -> TextEmbedder | None:
    """The model's text embedder, refusing one that is not the model's."""
    from sdltag.embedding import get_text_embedder

    expected = model.manifest.embedder
    if expected.kind == WORD_VECTORS:
        if embedder is not None:
            raise SdltagError(
                f"{model.path}: this model uses a fixed word-vector table ({expected.id}), not a text encoder; "
                "leave out --embedder."
            )
        return None
    if embedder is not None:
        if isinstance(embedder, (str, Path)):
            text_embedder = get_text_embedder(str(embedder), cache_dir)
        else:
            text_embedder = embedder  # an embedder object built by the caller
        if text_embedder.spec.id != expected.id:
            raise SdltagError(
                f"the embedder {text_embedder.spec.id} is not the one model {model.path} was trained with "
                f"({expected.id}); label vectors from another embedder live in another space. "
                f"Use `--embedder {expected.name}` (or leave --embedder out), or retrain the model with this embedder."
            )
        return text_embedder
    try:
        text_embedder = get_text_embedder(expected.name, cache_dir)
    except SdltagError as exc:
        raise SdltagError(
            f"{model.path}: the model's text embedder {expected.name!r} ({expected.id}) cannot be loaded offline "
            f"({exc}). Pass --embedder PATH to that sentence-transformers model folder."
        ) from None
    if text_embedder.spec.id != expected.id:
        raise SdltagError(
            f"{model.path}: the model was trained with {expected.id}, but the embedder found under that name is "
            f"{text_embedder.spec.id} (different weights). Pass `--embedder PATH` to the model's original "
            "embedder, or retrain the model."
        )
    return text_embedder


def _embed_new(
    model: ModelFolder,
    entries: list[LabelEntry],
    *,
    embedder: str | TextEmbedder | None,
    cache_dir: Path | None,
) -> np.ndarray:
    if model.manifest.embedder.kind == WORD_VECTORS:
        raise _refuse_word_vectors(model, [e.label for e in entries])
    text_embedder = _check_embedder(model, embedder, cache_dir)
    assert text_embedder is not None  # word-vector models were refused above
    if text_embedder.spec.dim != model.manifest.dim:
        raise SdltagError(
            f"{model.path}: the embedder gives {text_embedder.spec.dim}-d vectors but the model expects "
            f"{model.manifest.dim}-d; the model folder is inconsistent. Re-export it."
        )
    return text_embedder.embed([e.text for e in entries])  # (N, d)
