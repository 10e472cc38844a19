"""The C++ kernels (kernels.cpp over simd.h), compiled once per path at first use through torch.utils.cpp_extension.

One source, three builds: the path decides the compiler flags and so the vector width (simd.h).

    avx512    x86-64 with AVX-512 F/BW/VL/DQ and FMA (+VNNI when the CPU has it): 16 floats a vector
    avx2      x86-64 with AVX2, FMA and F16C (AMD Zen 1-3, Intel Haswell .. Alder Lake): 8 floats
    portable  any CPU with a C++ compiler: the compiler's own vectorisation (SSE2 on x86-64, NEON on arm64)

The CPU's features are read at run time and the best path it has is built and used. QWEN3LAB_KERNELS forces
one: `torch` (no kernels: the pure-PyTorch leaves), `portable`, `avx2` or `avx512`; a path this CPU lacks or
an unknown name is refused with one line (InputError). `kernels()` returns the loaded module, or None when
there is none to be had (turned off, no C++ compiler or ninja, a failed build); every caller has a pure-PyTorch
path for None, and the reason is kept in `status()` and warned about once.

A build lands in torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) under a
name carrying the path and a hash of the sources and flags, so an edited kernels.cpp is rebuilt and a stale
build is never loaded; torch's file lock there makes concurrent first uses safe. It takes about 20-40 s once.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from pathlib import Path

from ..runspec import KERNEL_ENV, KERNEL_PATHS, KERNEL_SETS, available_paths, cpu_flags, kernel_choice, stream_prefetch

SOURCE = Path(__file__).with_name("kernels.cpp")
HEADER = Path(__file__).with_name("simd.h")
ENV, PATHS, CHOICES = KERNEL_ENV, KERNEL_PATHS, KERNEL_SETS  # the names QWEN3LAB_KERNELS takes (runspec.py)
STALE_LOCK_S = 600  # a build lock older than this was left by a killed build (clear_stale_lock)

# -fopenmp: at::parallel_for is a header template that only runs in parallel when compiled with OpenMP; the
# libgomp it links is the one torch already loaded (same soname), so there is one thread pool, torch's.
# -ffp-contract=off: a multiply-add is fused only where the source says fmadd() (simd.h); otherwise GCC fuses
# e.g. RoPE's x*cos + rot*sin, one rounding fewer than the eager ops it must match bit for bit.
BASE_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]
PATH_CFLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    # no -m flags: the target's baseline (SSE2 on x86-64, NEON on arm64)
    "portable": [],
}

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": None}
_built: dict[str, object] = {}  # path -> loaded module (a module is loaded once per process)


def _cflags(path: str) -> list[str]:
    flags = cpu_flags() if path == "avx512" else set()
    extra = [f for f, have in (("-mavx512vnni", "avx512_vnni"), ("-mavx512bf16", "avx512_bf16")) if have in flags]
    return BASE_CFLAGS + PATH_CFLAGS[path] + extra


def _ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the pip-installed ninja (a dependency) lives in the
    environment's bin directory, which is not on PATH when the venv is not activated (`.venv/bin/qwen3lab`)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    path = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def _build_dir(name: str) -> Path | None:
    try:
        from torch.utils.cpp_extension import _get_build_directory  # where load() builds `name`
    except ImportError:
        return None
    return Path(_get_build_directory(name, False))


def clear_stale_lock(build_dir: Path | None, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove a build lock older than max_age_s; returns whether one was removed.

    torch's extension builder holds a lock file in the build directory while it compiles (or checks that
    the cached build is current) and waits, forever, while that file exists. A build that was killed
    (Ctrl-C, a timeout) leaves it behind, and every later process would then hang at its first forward. A
    build here takes about a minute, so a lock older than STALE_LOCK_S belongs to no live build."""
    if build_dir is None:
        return False
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age <= max_age_s:
        return False
    try:
        lock.unlink()
    except OSError:
        return False
    warnings.warn(f"removed a stale kernel build lock {lock} ({age:.0f} s old, left by an interrupted build)",
                  stacklevel=2)
    return True


def build(path: str):
    """Compile (or load from the cache) the kernels for `path` and return the module; raises on failure.
    Tests use it to run every path the CPU has; the model uses kernels()."""
    assert path in PATHS, path
    if path not in _built:
        module = build_source(path, SOURCE)
        module.set_stream_prefetch(*stream_prefetch())  # InputError for a bad QWEN3LAB_PREFETCH
        _built[path] = module
    return _built[path]


def build_source(path: str, source: Path, prefix: str = "qwen3lab"):
    """Compile (or load from the cache) one kernels.cpp, with the simd.h beside it, for `path`: build() for this
    package's source; benchmarks/ab_kernels.py for another revision's, to time two kernel sources in one process."""
    from torch.utils.cpp_extension import load

    source = Path(source)
    _ninja_on_path()
    flags = _cflags(path)
    text = source.read_bytes() + source.with_name(HEADER.name).read_bytes()
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:12]
    name = f"{prefix}_{path}_{digest}"
    clear_stale_lock(_build_dir(name))
    return load(name=name, sources=[str(source)], extra_cflags=flags,
                extra_ldflags=LDFLAGS, extra_include_paths=[str(source.parent)], verbose=False)


def kernels():
    """The compiled module of the path in use (functions linear_small, linear_large, ...), or None."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            want = kernel_choice()  # InputError for a bad QWEN3LAB_KERNELS: raised, not turned into a fallback
            stream_prefetch()  # the same for a bad QWEN3LAB_PREFETCH (build() sets it on the module)
            module, reason = None, None
            if want == "torch":
                reason = f"turned off by {ENV}={os.environ.get(ENV, '').strip()}"
            else:
                path = want or available_paths()[0]
                try:
                    module = build(path)
                except Exception as e:  # any build failure (compiler, ninja, headers) means: use the fallback
                    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    reason = f"{path} build failed: {type(e).__name__}: {last}"
                    warnings.warn(f"qwen3lab fast kernels unavailable ({reason}); using PyTorch ops", stacklevel=2)
            _state.update(tried=True, module=module, reason=reason)
    return _state["module"]


def loaded():
    """The module if it is already loaded, else None: never starts a build (for optional uses like sampling)."""
    return _state["module"]


def path() -> str:
    """The kernel path in use: avx512, avx2, portable, or torch (no compiled kernels)."""
    k = kernels()
    return k.PATH if k is not None else "torch"


def status() -> str:
    """One line: which kernels are in use, or why none are."""
    k = kernels()
    if k is not None:
        return f"C++ {k.PATH} kernels ({k.WIDTH} floats a vector)"
    return f"PyTorch fallback ({_state['reason']})"


def reset(enabled: bool | None = None) -> None:
    """Tests: False forces the PyTorch fallback from now on; None or True decides again at the next kernels()
    (modules already built in this process are reused: loading one twice would rebuild it)."""
    with _lock:
        if enabled is False:
            _state.update(tried=True, module=None, reason="turned off by reset(enabled=False)")
        else:
            _state.update(tried=False, module=None, reason=None)
