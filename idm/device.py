"""Device selection: `auto` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from idm.config import DEVICES


def resolve_device(name: str = "auto") -> torch.device:
    """Map a device setting to a torch.device; 'cuda' without a GPU is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; expected one of {list(DEVICES)} or 'cuda:N'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


# The SIMD features whose kernels matter here: fp32 (avx2/fma, avx512f), int8 (vnni, amx_int8), bf16.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(CPU model name, the CPU_FLAGS it has) read from /proc/cpuinfo; ("unknown", {}) where
    there is none (not Linux)."""
    try:
        lines = open(cpuinfo, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return "unknown", frozenset()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
    return model, frozenset(f for f in CPU_FLAGS if f in flags)


def has_fast_bf16() -> bool:
    """True if the CPU has bfloat16 matrix instructions (AMX or AVX512-BF16); without them
    bf16 autocast emulates and is slower than float32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_info()[1])


def use_threads(threads: int = 0) -> int:
    """Run torch's CPU kernels on `threads` threads (0: keep torch's default, one per physical
    core unless OMP_NUM_THREADS says otherwise); returns the number in use. ValueError if < 0."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0: one per physical core), got {threads!r}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_summary() -> str:
    """One line for logs and benchmarks: model, SIMD flags, torch's kernel capability, threads."""
    model, flags = cpu_info()
    return (f"{model}; flags: {' '.join(f for f in CPU_FLAGS if f in flags) or 'none of ' + ', '.join(CPU_FLAGS)}; "
            f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")
