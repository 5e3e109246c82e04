"""The torch-free text path: an exported text encoder (a sentence-transformers pipeline as an ONNX
graph, with its tokenizer) run by onnxruntime and the ``tokenizers`` package.

An exported encoder is a folder named for its embedder id (``meta.json``, ``text_model.onnx``,
``tokenizer.json``), written once by ``sdltag labels export-embedder``
(``sdltag.embedding.st.export_encoder``); the graph already includes pooling and normalisation,
so its output is the sentence embedding. sdltag looks for it in ``encoder_roots()``.
Imports: numpy, onnxruntime, tokenizers only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdltag.scoring import l2_normalize

META_FILE = "meta.json"
ONNX_FILE = "text_model.onnx"
TOKENIZER_FILE = "tokenizer.json"
ENCODER_FORMAT = 1
ENCODERS_DIR = "text-models"
TOKEN_BUDGET = 4096  # padded tokens per onnxruntime call
CPU = "CPUExecutionProvider"
OPTIMIZED_PREFIX = "text_model.optimized-ort"
# Files sdltag writes into an encoder folder, and so the only ones a staging folder it removes may hold.
_ENCODER_FILES = re.compile(
    r"(?:meta\.json|tokenizer\.json|text_model\.onnx|text_model\.optimized-ort[0-9A-Za-z.+-]*\.onnx(?:\.data)?)"
)


class EncoderError(Exception):
    """An exported text encoder folder is incomplete, unreadable or not for this embedder."""


def encoder_folder_name(embedder_id: str) -> str:
    """The folder name of ``embedder_id``'s exported encoder (the id, made safe for a file name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", embedder_id)


def environment_encoders_dir() -> Path:
    """This Python environment's encoders: ``<sys.prefix>/share/sdltag/text-models`` (``make venv`` fills it)."""
    return Path(sys.prefix) / "share" / "sdltag" / ENCODERS_DIR


def user_encoders_dir() -> Path:
    """The user's encoders, ``<data folder>/text-models``: where ``sdltag labels export-embedder`` writes."""
    from sdltag.paths import data_dir

    return data_dir() / ENCODERS_DIR


def encoder_roots() -> list[Path]:
    """Where exported encoders are looked for, in this order."""
    return [user_encoders_dir(), environment_encoders_dir()]


def find_encoder(embedder_id: str) -> Path | None:
    """The first folder for ``embedder_id`` under ``encoder_roots()``, or None (checked when loaded)."""
    name = encoder_folder_name(embedder_id)
    for root in encoder_roots():
        if (root / name).is_dir():
            return root / name
    return None


def read_meta(folder: Path, embedder_id: str | None = None) -> dict[str, Any]:
    """The encoder's meta.json, checked for completeness and, given ``embedder_id``, for that
    embedder (raises ``EncoderError``)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EncoderError(f"{folder}: no {META_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderError(f"{folder / META_FILE}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ENCODER_FORMAT:
        raise EncoderError(f"{folder / META_FILE}: unknown format")
    if embedder_id is not None and meta.get("embedder_id") != embedder_id:
        raise EncoderError(f"{folder}: exported for {meta.get('embedder_id')}, not {embedder_id}")
    for name in (ONNX_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise EncoderError(f"{folder / name}: missing")
    size = (folder / ONNX_FILE).stat().st_size
    if size != meta.get("onnx_bytes"):
        raise EncoderError(f"{folder / ONNX_FILE}: {size} bytes, expected {meta.get('onnx_bytes')} (truncated)")
    return meta


def remove_dead_staging(folder: Path, prefix: str) -> list[Path]:
    """Remove the ``<prefix>.<pid>.<suffix>`` folders in ``folder`` that a killed export or optimisation
    left: only real folders holding nothing but encoder files, whose process has ended."""
    from sdltag.paths import pid_alive

    pattern = re.compile(re.escape(prefix) + r"\.(?P<pid>[0-9]{1,10})\.[A-Za-z0-9_]{1,24}")
    removed: list[Path] = []
    try:
        with os.scandir(folder) as scan:
            entries = list(scan)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        pid = int(match.group("pid")) if match else os.getpid()
        if pid == os.getpid() or pid_alive(pid) or not _only_encoder_files(entry):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _only_encoder_files(entry: os.DirEntry) -> bool:
    try:
        if not entry.is_dir(follow_symlinks=False):
            return False
        with os.scandir(entry.path) as inside:
            return all(i.is_file(follow_symlinks=False) and _ENCODER_FILES.fullmatch(i.name) for i in inside)
    except OSError:
        return False


class OnnxTextEncoder:
    """Sentence embeddings from an exported encoder folder; the session is created on first use."""

    def __init__(self, folder: Path, batch_size: int = 64, embedder_id: str | None = None) -> None:
        self.folder = Path(folder)
        self.meta = read_meta(self.folder, embedder_id)
        self.batch_size = batch_size
        self._tokenizer: Any = None
        self._pad_id = 0
        self._session: Any = None

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER_FILE))
            except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
                raise EncoderError(f"{self.folder / TOKENIZER_FILE}: unreadable ({exc})") from None
            # sentence-transformers pads to the longest text and truncates at max_seq_length,
            # whatever padding/truncation the tokenizer.json itself carries; padding is done here.
            saved = tokenizer.padding or {}
            pad_id = self.meta.get("pad_id")
            pad_id = saved.get("pad_id") if pad_id is None else pad_id
            self._pad_id = int(pad_id) if pad_id is not None else 0
            tokenizer.no_padding()
            tokenizer.no_truncation()
            tokenizer.enable_truncation(max_length=int(self.meta["max_seq_length"]), strategy="longest_first")
            self._tokenizer = tokenizer
        return self._tokenizer

    def _get_session(self) -> Any:
        if self._session is None:
            self._session = self._load_optimized() or self._load_and_optimize()
        return self._session

    def _options(self, optimized: bool) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Label batches are small and come one at a time: threads that spin between runs only
        # steal the cores from image decoding and from other processes.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if optimized:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return options

    def _optimized_path(self) -> Path:
        """onnxruntime's optimised graph, kept per onnxruntime version (its fused operators are that version's).

        Its weights sit beside it in ``<name>.data``, which onnxruntime maps into memory
        instead of parsing and copying 90 MB of protobuf: the session starts about 4x faster.
        """
        import onnxruntime as ort

        return self.folder / f"{OPTIMIZED_PREFIX}{ort.__version__}.onnx"

    def _load_optimized(self) -> Any:
        """The session from the graph optimised on an earlier run, if there is a usable one."""
        import onnxruntime as ort

        path = self._optimized_path()
        if not path.is_file():
            return None
        try:
            return ort.InferenceSession(str(path), sess_options=self._options(True), providers=[CPU])
        except Exception:  # noqa: BLE001 - a damaged copy is only a slower start: drop it, use the original
            path.unlink(missing_ok=True)
            return None

    def _load_and_optimize(self) -> Any:
        """The session from the exported graph; onnxruntime also saves its optimised graph for later runs."""
        import onnxruntime as ort

        options = self._options(False)
        # "extended", not "all": the saved graph then holds no layout tied to this CPU's instruction set.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        target = self._optimized_path()
        data_name = f"{target.name}.data"
        # Written into a private folder under the final names (the graph records its data file's
        # name), then moved into place: the data first, the graph last, each rename atomic, so a
        # graph is never seen without its data.
        remove_dead_staging(self.folder, ".optimise")  # what a killed optimisation left
        private = self.folder / f".optimise.{os.getpid()}.{threading.get_ident()}"
        staging: Path | None = private
        try:
            private.mkdir(exist_ok=True)
        except OSError:
            staging = None  # a read-only folder: every run optimises again
        if staging is not None:
            options.optimized_model_filepath = str(staging / target.name)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = ort.InferenceSession(str(self.folder / ONNX_FILE), sess_options=options, providers=[CPU])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise EncoderError(f"{self.folder / ONNX_FILE}: cannot be loaded ({exc})") from None
        if staging is not None:
            try:
                os.replace(staging / data_name, self.folder / data_name)
                os.replace(staging / target.name, target)
            except OSError:
                pass  # not saved: the next run optimises again
            shutil.rmtree(staging, ignore_errors=True)
            for stale in self.folder.glob(f"{OPTIMIZED_PREFIX}*"):  # those of other onnxruntime versions
                if stale.name not in (target.name, data_name):
                    stale.unlink(missing_ok=True)
        return session

    def _prepare(self, texts: Sequence[str]) -> list[str]:
        prepared = [str(t).strip() for t in texts]
        return [t.lower() for t in prepared] if self.meta.get("do_lower_case") else prepared

    def _arrays(self, encodings: Sequence[Any]) -> dict[str, np.ndarray]:
        """Model inputs from encodings, right-padded to the longest: name -> (B, T) int64."""
        width = max(len(e.ids) for e in encodings)
        pad_id = self._pad_id
        arrays = {
            "input_ids": np.full((len(encodings), width), pad_id, dtype=np.int64),
            "attention_mask": np.zeros((len(encodings), width), dtype=np.int64),
            "token_type_ids": np.zeros((len(encodings), width), dtype=np.int64),
        }
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            arrays["input_ids"][row, :n] = encoding.ids
            arrays["attention_mask"][row, :n] = 1
            arrays["token_type_ids"][row, :n] = encoding.type_ids
        return {name: arrays[name] for name in self.meta["inputs"]}

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Model inputs for ``texts``, padded to the longest (as sentence-transformers does)."""
        return self._arrays(self._encode_unpadded(texts))

    def _encode_unpadded(self, texts: Sequence[str]) -> list[Any]:
        return self._get_tokenizer().encode_batch(self._prepare(texts))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 unit vectors. Texts are batched by token count under a token budget,
        so one long description does not pad a whole batch of short labels to its length."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        session = self._get_session()
        encodings = self._encode_unpadded(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        start = 0
        while start < len(order):
            stop = start + 1
            # Sorted ascending, so the last text of a batch is its longest.
            while (
                stop < len(order)
                and stop - start < self.batch_size
                and (stop - start + 1) * len(encodings[order[stop]].ids) <= TOKEN_BUDGET
            ):
                stop += 1
            batch = order[start:stop]
            inputs = self._arrays([encodings[i] for i in batch])
            (vectors,) = session.run([self.meta["output"]], inputs)  # (B, d)
            out[batch] = vectors
            start = stop
        return l2_normalize(out)
