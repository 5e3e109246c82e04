"""The image model at tagging time: an onnxruntime session with an explicitly chosen provider.

``--device cuda`` without a working CUDA provider is an error, never a silent fall back
to the CPU; ``auto`` takes CUDA when onnxruntime offers it and says which provider is
active (``ImageModel.provider``) so the CLI can print it. The graph's sha256 is checked
against the manifest before a session starts (``ModelFolder.verify_onnx``, cached per file).
"""

from __future__ import annotations

import importlib

import numpy as np

from sdltag.errors import SdltagError
from sdltag.modelfolder import ModelFolder

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float", "int8")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# numpy's names for the CPU instructions that multiply 8-bit values into 32-bit sums without
# an intermediate 16-bit step: with them onnxruntime's integer kernels cannot saturate.
_INT8_DOT_FEATURES = (("AVX512VNNI", "AVX-512 VNNI"), ("AVXVNNI", "AVX-VNNI"), ("ASIMDDP", "Arm dot product"))


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str, available: list[str]) -> list[str]:
    """The provider list to ask onnxruntime for; raises ``SdltagError`` for an impossible choice."""
    if device not in DEVICES:
        raise SdltagError(f"--device {device!r} is not one of {', '.join(DEVICES)}.")
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise SdltagError(
                "--device cuda: this onnxruntime has no CUDA execution provider "
                f"(available: {', '.join(available) or 'none'}). Install onnxruntime-gpu or use --device cpu."
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


def int8_dot_product() -> str | None:
    """The name of this CPU's 8-bit dot-product instructions (VNNI, Arm dot product), or None.

    Without them (x86 with AVX2 only) onnxruntime's u8 x s8 kernels add pairs of products
    in 16 bits, which can saturate, so ``--precision auto`` keeps the float graph there.
    """
    features: dict[str, bool] | None = None
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # numpy 2, numpy 1.x
        try:
            features = importlib.import_module(module).__cpu_features__
            break
        except (ImportError, AttributeError):
            continue
    if features is None:
        return None
    for key, name in _INT8_DOT_FEATURES:
        if features.get(key):
            return name
    return None


def resolve_precision(model: ModelFolder, precision: str, device: str) -> tuple[ModelFolder, str]:
    """The model folder running the graph ``precision`` picks, and a few words on why.

    ``float`` and ``int8`` are taken as asked (``int8`` needs an attached 8-bit graph and
    the CPU); ``auto`` takes the 8-bit graph when the folder has one, the model runs on the
    CPU and the CPU has 8-bit dot-product instructions, else the float graph.
    """
    if precision not in PRECISIONS:
        raise SdltagError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    if precision == "float":
        return model.with_precision("float"), "float graph (--precision float)"
    on_cuda = device != "cpu" and choose_providers(device, available_providers())[0] == CUDA
    if precision == "int8":
        if on_cuda:
            raise SdltagError("--precision int8 runs on the CPU. Add --device cpu, or use --precision float.")
        return model.with_precision("int8"), "8-bit graph (--precision int8)"
    if not model.has_int8:
        return model.with_precision("float"), "float graph"
    if on_cuda:
        return model.with_precision("float"), "float graph (the 8-bit one is for CPUs)"
    feature = int8_dot_product()
    if feature is None:
        return model.with_precision("float"), "float graph (this CPU has no VNNI or dot-product instructions)"
    return model.with_precision("int8"), f"8-bit graph ({feature}; --precision float for the float one)"


class ImageModel:
    """Runs a model folder's ONNX graph: (B, 3, H, W) normalised images -> (B, M, d) principal vectors."""

    def __init__(self, model: ModelFolder, device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        if threads is not None and threads < 1:
            raise SdltagError(f"--threads {threads}: must be at least 1.")
        self.model = model
        self.spec = model.manifest.input
        self.rows = model.manifest.rows
        self.dim = model.manifest.dim
        providers = choose_providers(device, available_providers())
        model.verify_onnx()  # a replaced or damaged graph must not put its vectors under this model's identity
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's own warnings would break the one-line-per-problem rule
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Idle onnxruntime threads would otherwise spin and steal the cores the decode threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model.onnx_path), sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise SdltagError(
                f"{model.onnx_path}: onnxruntime cannot load the model ({' '.join(str(exc).split())[:300]}). "
                "Re-export the model folder with `sdltag export`."
            ) from None
        active = self.session.get_providers()
        self.provider: str = active[0] if active else CPU
        if device == "cuda" and self.provider != CUDA:
            raise SdltagError(
                "--device cuda: onnxruntime could not start the CUDA execution provider (check the CUDA and cuDNN "
                "libraries onnxruntime-gpu needs), or use --device cpu."
            )
        inputs = self.session.get_inputs()
        self.input_name = str(model.manifest.onnx.get("input") or inputs[0].name)
        self.output_name = str(model.manifest.onnx.get("output") or self.session.get_outputs()[0].name)

    @property
    def device(self) -> str:
        """``cuda`` or ``cpu``: where the graph runs."""
        return "cuda" if self.provider == CUDA else "cpu"

    def run(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 -> (B, M, d) float32 principal vectors."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        expected = (3, self.spec.height, self.spec.width)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images have shape {images.shape}, the model expects (B, *{expected})")
        if images.shape[0] == 0:
            return np.zeros((0, self.rows, self.dim), dtype=np.float32)
        (vectors,) = self.session.run([self.output_name], {self.input_name: images})
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (images.shape[0], self.rows, self.dim):
            raise SdltagError(
                f"{self.model.onnx_path}: the graph returned shape {vectors.shape}, the manifest says "
                f"(B, {self.rows}, {self.dim}). Re-export the model folder."
            )
        return vectors
