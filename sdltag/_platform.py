"""Process-level tuning done once, before numpy is imported, by the CLI entry point."""

from __future__ import annotations

import os
import platform
import sys


def cpu_has_avx512() -> bool:
    """True when the CPU reports AVX-512F (read from /proc/cpuinfo; False elsewhere)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        return False
    return False


def tune_openblas() -> bool:
    """Let numpy's bundled OpenBLAS use its AVX-512 kernels where that is safe.

    Some OpenBLAS builds pick a slower kernel on CPUs they do not recognise; SkylakeX
    kernels need AVX-512, so the variable is set only when the CPU has it, only when the
    user has not set it, and only before numpy is loaded (later it has no effect).
    Returns True when it set the variable.
    """
    if "OPENBLAS_CORETYPE" in os.environ or "numpy" in sys.modules:
        return False
    if not cpu_has_avx512():
        return False
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    return True


def single_thread_blas() -> bool:
    """Keep numpy's OpenBLAS to one thread in this process (unless the user chose otherwise).

    sdltag runs its own threads (decoding, inference, scoring halves of big batches);
    OpenBLAS's extra threads only spin between the small products of a tag run, and a
    profile of one (300 photos) found 12% of its CPU time in ``blas_thread_server``,
    taken from the decode threads. Like ``tune_openblas`` it acts only before numpy is
    loaded and never over a value the user set. Returns True when it set the variable.
    """
    if "OPENBLAS_NUM_THREADS" in os.environ or "numpy" in sys.modules:
        return False
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    return True
