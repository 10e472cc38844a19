"""The C++ kernels (kernels.cpp), compiled once at first use through torch.utils.cpp_extension.

`kernels()` returns the loaded module, or None when it cannot be had: not an x86 CPU with AVX-512
(F/BW/VL), no C++ compiler or ninja, a failed build, or QWEN3LAB_KERNELS=0 in the environment. Every caller
has a pure-PyTorch path for None, so the kernels are a speed-up, never a requirement. The reason is kept in
`status()` and warned about once.

The build lands in torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) under a
name carrying a hash of the source, so an edited kernels.cpp is rebuilt and a stale build is never loaded;
torch's file lock there makes concurrent first uses safe. It takes about 20-30 s once.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.cpp")
ENV = "QWEN3LAB_KERNELS"  # "0" turns the kernels off (pure PyTorch), e.g. to compare or to test the fallback
# -fopenmp: at::parallel_for is a header template that only runs in parallel when compiled with OpenMP; the
# libgomp it links is the one torch already loaded (same soname), so there is one thread pool, torch's.
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": None, "built": None}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _unavailable_reason() -> str | None:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off by {ENV}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    missing = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} - _cpu_flags()
    if missing:
        return f"CPU lacks {', '.join(sorted(missing))}"
    return None


def _cflags() -> list[str]:
    """CFLAGS plus the optional instruction sets this CPU has (the int8 kernel uses VNNI when present)."""
    return CFLAGS + (["-mavx512vnni"] if "avx512_vnni" in _cpu_flags() else [])


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


def _build():
    from torch.utils.cpp_extension import load

    _ninja_on_path()

    flags = _cflags()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    return load(name=f"qwen3lab_fast_{digest}", sources=[str(SOURCE)], extra_cflags=flags,
                extra_ldflags=LDFLAGS, verbose=False)


def kernels():
    """The compiled module (functions linear_small, linear_large, ...), or None (see status())."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if not _state["tried"]:
            reason = _unavailable_reason()
            module = None
            if reason is None:
                try:
                    module = _build()
                except Exception as e:  # any build failure (compiler, ninja, headers) means: use the fallback
                    reason = f"build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
            if module is None and not reason.startswith("turned off"):
                warnings.warn(f"qwen3lab fast kernels unavailable ({reason}); using PyTorch ops", stacklevel=2)
            _state.update(tried=True, module=module, reason=reason, built=module)
    return _state["module"]


def loaded():
    """The module if it is already loaded, else None: never starts a build (for optional uses like sampling)."""
    return _state["module"]


def status() -> str:
    """One line: whether the kernels are in use, or why not."""
    kernels()
    return "C++ AVX-512 kernels" if _state["module"] is not None else f"PyTorch fallback ({_state['reason']})"


def reset(enabled: bool | None = None) -> None:
    """Tests: enabled False forces the PyTorch fallback from now on; None or True decides again at the next
    kernels() (a module already built in this process is reused: loading it twice would rebuild it)."""
    with _lock:
        if enabled is False:
            _state.update(tried=True, module=None, reason="turned off by reset(enabled=False)")
        elif _state.get("built") is not None:
            _state.update(tried=True, module=_state["built"], reason=None)
        else:
            _state.update(tried=False, module=None, reason=None)
