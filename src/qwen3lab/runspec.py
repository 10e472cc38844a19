"""RunSpec: how a model runs -- device, activation dtype, weight quantisation, fast path, kernel set, threads,
ndev -- validated once, here only.

    spec = RunSpec.make(device="cpu", dtype="int8")   # bfloat16 activations + int8 weights, fast path
    spec.torch_dtype, spec.quant, spec.fast           # torch.bfloat16, "int8", True

Every entry point that loads a model to run (the `generate` / `chat` / `bench` commands, Qwen3ForCausalLM,
qwen3lab.load's torch backends) builds its RunSpec first, so an impossible combination is refused before any
file is read, with one message naming the options as the caller spells them (`--quant int8` on the command
line, `quant='int8'` from Python: `cli=True`).

Notable:
- dtype is the activation dtype; "int8" / "int4" as a dtype is the shorthand for bfloat16 activations with
  those weights (weight-only quantisation). Quantised weights run on the fast CPU path only, with float32 or
  bfloat16 activations (what the kernels take).
- fast: None = wherever it exists (the CPU; elsewhere the plain eager model), True = required (refused off the
  CPU), False = the plain eager model.
- the kernel set (QWEN3LAB_KERNELS: torch | portable | avx2 | avx512) is read and checked against this CPU's
  features here too (`kernel_choice`); qwen3lab.fast.build compiles what it names. QWEN3LAB_PREFETCH (the
  decode linears' software prefetch distance, `stream_prefetch`) is checked here as well.
- light: nothing here imports torch at module level, so `qwen3lab --help` stays fast.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, Qwen3LabError

ACT_DTYPES = ("float32", "bfloat16", "float16", "float64")
QUANTS = ("int8", "int4")  # weight-only formats of the fast CPU path
QUANT_ACT_DTYPES = ("float32", "bfloat16")  # activations the quantised kernels take
RUN_DTYPES = ACT_DTYPES + QUANTS  # a quant name as dtype: bfloat16 activations + those weights
GROUP_SIZES = (32, 128)  # int4: weights per scale along the input dim (default_group below picks one)


def default_group(in_sizes) -> int | None:
    """int4's default group size for weights of these input sizes K: the largest of GROUP_SIZES dividing every
    one (128 for every Qwen3 checkpoint, 32 for some small test models); None when none does."""
    ks = set(in_sizes)
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if all(k % g == 0 for k in ks)), None)


_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
            "fp64": "float64", "double": "float64"}

# ---- kernel sets and this CPU's features ------------------------------------------------------------------
KERNEL_ENV = "QWEN3LAB_KERNELS"
KERNEL_PATHS = ("avx512", "avx2", "portable")  # compiled paths, best first
KERNEL_SETS = ("torch",) + KERNEL_PATHS
_OFF = ("0", "false", "no", "off")  # older spellings of "torch", still accepted
NEEDS = {  # /proc/cpuinfo flags each compiled path needs
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
    "portable": set(),
}


class MultiDeviceError(Qwen3LabError, NotImplementedError):
    """An ndev > 1 combination tensor parallelism cannot run (mps, quantised weights, too few devices)."""


def _cpuinfo(field: str) -> str:
    """The first `field` line's value in Linux's /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    return set(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ... (Linux x86; "" elsewhere)."""
    return _cpuinfo("vendor_id")


# The one-row (decode) linears' software prefetch distances, bytes ahead of the loads: a fact of the CPU's
# memory system that no feature flag tells, kept as two numbers, for weights narrower than float32 (bf16, int8:
# more instructions a byte, so the out-of-order window alone keeps fewer lines in flight) and for float32
# weights. Measured on Qwen3-0.6B's 113 weights, 2 threads, interleaved with a torch sum of 512 MiB (which reads
# about what the machine gives), medians of 8: on an Intel Xeon (Emerald Rapids, AVX-512 + AMX) with none, bf16
# streams at 74 % of the sum, int8 at 59 %, fp32 at 95 %; 2 KiB ahead 95 %, 85 %, 102 %; 4 KiB ahead 98 %,
# 88 %, 107 % (8 KiB: as 4). On AMD Zen 4 the hardware prefetcher alone kept the decode linears at 82 % of the
# sum while the kernels' own prefetching read (stream_read) reached only 66 %. On AMD Zen 3 (EPYC, family 25
# model 1; 2 threads, 9-15 interleaved passes, two runs each) 1 KiB ahead took bf16 from 30.8-31.8 to 32.8-35.9
# GB/s and int8 from 29.6 to 31.5-31.6 (768 B as good, 1.5-4 KiB less), a whole decode step 1.09x (bf16) and
# 1.08x (int8) in 8 interleaved rounds; fp32 lost (36.9 -> 32.2 GB/s), so it keeps none. Other CPUs keep none.
# QWEN3LAB_PREFETCH=<bytes> sets both distances, <narrow>,<float32> each (0: none).
PREFETCH_ENV = "QWEN3LAB_PREFETCH"
# (vendor, cpu family, first model, last model) -> (narrow, float32); None matches any family / model
PREFETCH_BY_CPU = {("GenuineIntel", None, None, None): (4096, 4096), ("AuthenticAMD", 25, 0x00, 0x0F): (1024, 0)}
PREFETCH_MAX = 1 << 20


def _int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def _measured_prefetch() -> tuple[int, int]:
    """PREFETCH_BY_CPU's distances for this CPU (the first entry that matches), else none."""
    vendor, family, model = cpu_vendor(), _int(_cpuinfo("cpu family")), _int(_cpuinfo("model"))
    for (v, fam, lo, hi), dist in PREFETCH_BY_CPU.items():
        if v == vendor and fam in (None, family) and (lo is None or (model is not None and lo <= model <= hi)):
            return dist
    return (0, 0)


def stream_prefetch() -> tuple[int, int]:
    """Bytes ahead the one-row linears prefetch on this CPU, (weights narrower than float32, float32 weights);
    0: none. QWEN3LAB_PREFETCH (one number for both, or two separated by a comma), else the table above. A value
    that is not an integer in 0 .. 1 MiB: InputError, one line."""
    v = os.environ.get(PREFETCH_ENV, "").strip()
    if not v:
        return _measured_prefetch()
    parts = [_int(p.strip()) for p in v.split(",")]
    if len(parts) > 2 or any(n is None or not 0 <= n <= PREFETCH_MAX for n in parts):
        raise InputError(f"{PREFETCH_ENV} must be a byte count from 0 to {PREFETCH_MAX}, or two separated by a "
                         f"comma (bf16 / int8 weights, float32 weights), got {v!r}")
    return (parts[0], parts[-1])


def missing(path: str) -> set[str]:
    """What this CPU lacks for kernel path `path` (empty: it can run it)."""
    if path != "portable" and platform.machine().lower() not in ("x86_64", "amd64"):
        return {f"x86-64 (this is {platform.machine()})"}
    return NEEDS[path] - cpu_flags()


def available_paths() -> list[str]:
    """The compiled kernel paths this CPU can run, best first (portable always)."""
    return [p for p in KERNEL_PATHS if not missing(p)]


def kernel_choice() -> str | None:
    """The kernel set QWEN3LAB_KERNELS asks for ("torch" for none), None when unset (the best this CPU has).
    An unknown name or a path this CPU lacks: InputError, one line."""
    v = os.environ.get(KERNEL_ENV, "").strip().lower()
    if not v:
        return None
    if v in _OFF:
        return "torch"
    if v not in KERNEL_SETS:
        raise InputError(f"{KERNEL_ENV} must be one of {', '.join(KERNEL_SETS)}, got {v!r}")
    if v != "torch" and missing(v):
        raise InputError(f"{KERNEL_ENV}={v}: this CPU lacks {', '.join(sorted(missing(v)))}; "
                         f"it can run {', '.join(available_paths() + ['torch'])}")
    return v


# ---- the spec ---------------------------------------------------------------------------------------------
def act_dtype_name(dtype) -> str:
    """A float dtype (name, alias or torch.dtype) -> its canonical name in ACT_DTYPES; InputError otherwise."""
    key = str(dtype).lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in ACT_DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(RUN_DTYPES)}")
    return key


def _opt(cli: bool, name: str, value) -> str:
    """An option as the caller spells it: `--quant int8` (command line) or `quant='int8'` (Python)."""
    return f"--{name.replace('_', '-')} {value}" if cli else f"{name}={value!r}"


@dataclass(frozen=True)
class RunSpec:
    device: str = "cpu"  # torch device string, checked to exist
    dtype: str = "bfloat16"  # activations (ACT_DTYPES)
    quant: str | None = None  # weight-only format (QUANTS) or None: weights in `dtype`
    group_size: int | None = None  # int4: weights per scale (GROUP_SIZES); None: the default (fast/quant.py)
    fast: bool = True  # the fast CPU path (fused projections + kernels) is used
    kernels: str | None = None  # QWEN3LAB_KERNELS's set, None: the best this CPU has
    threads: int | None = None  # torch intra-op threads; None: torch's default
    ndev: int = 1

    @classmethod
    def make(cls, device="cpu", dtype="bfloat16", quant: str | None = None, *, fast: bool | None = None,
             threads: int | None = None, ndev: int = 1, group_size: int | None = None, cli: bool = False,
             fast_name: str = "the fast path") -> RunSpec:
        """Validate one combination and return it, or raise InputError naming the options (see the module
        docstring). fast_name: how a refusal names the fast path (e.g. "backend 'torch-fast'")."""
        o = lambda name, value: _opt(cli, name, value)  # noqa: E731
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"{'--threads' if cli else 'threads'} must be >= 1, got {threads}")
        if isinstance(ndev, bool) or not isinstance(ndev, int) or ndev < 1:
            raise InputError(f"ndev must be an integer >= 1, got {ndev!r}")
        dtype_s = str(dtype).lower().removeprefix("torch.")
        if dtype_s in QUANTS:  # the shorthand: bfloat16 activations + dtype_s weights
            if quant not in (None, dtype_s):
                raise InputError(f"{o('dtype', dtype_s)} means {o('quant', dtype_s)}, but {o('quant', quant)} "
                                 f"was given")
            what = o("dtype", dtype_s)
            act, quant = "bfloat16", dtype_s
        else:
            act = act_dtype_name(dtype)
            if quant is not None and quant not in QUANTS:
                raise InputError(f"{'--quant' if cli else 'quant'} must be one of {', '.join(QUANTS)} or none, "
                                 f"got {quant!r}")
            if quant is not None and act not in QUANT_ACT_DTYPES:
                need = "--dtype float32 or bfloat16" if cli else "dtype 'float32' or 'bfloat16'"
                raise InputError(f"{o('quant', quant)} needs {need} activations, got {o('dtype', dtype_s)}")
            what = o("quant", quant) if quant else ""
        if group_size is not None and quant != "int4":
            raise InputError(f"{o('group_size', group_size)} is for int4 weights only")
        if quant == "int4" and group_size is not None:
            if group_size not in GROUP_SIZES:
                raise InputError(f"{'--group-size' if cli else 'group_size'} must be one of "
                                 f"{', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
        dev = _parse_device(device, cli)
        if quant is not None and dev.type != "cpu":
            raise InputError(f"{what}: {quant} weights run on the CPU fast path only, got {o('device', device)}")
        if quant is not None and fast is False:
            raise InputError(f"{what}: {quant} weights need the fast path; drop --no-fast" if cli else
                             f"{what}: {quant} weights need the fast path (fast=True)")
        if ndev > 1 and quant is not None:
            raise MultiDeviceError(f"{what}: {quant} weights with ndev={ndev}: tensor parallelism runs the eager "
                                   f"float leaves only")
        if fast is True and dev.type != "cpu":
            raise InputError(f"{fast_name} runs on the CPU only (its kernels are CPU ones), got "
                             f"{o('device', device)}")
        _check_present(dev, device, ndev, cli)
        use_fast = fast is not False and dev.type == "cpu" and ndev == 1  # TP: eager parallel leaves
        if use_fast:
            stream_prefetch()  # a bad QWEN3LAB_PREFETCH is refused here, before any file is read
        return cls(device=str(dev), dtype=act, quant=quant, group_size=group_size, fast=use_fast,
                   kernels=kernel_choice() if use_fast else None, threads=threads, ndev=ndev)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        """What the model's `.dtype` reads: the weight format when quantised, else the activation dtype."""
        return self.quant or self.dtype

    def describe(self) -> str:
        """e.g. "int4 weights (groups of 128), bfloat16 activations" or "float32"."""
        if self.quant is None:
            return self.dtype
        groups = f" (groups of {self.group_size})" if self.group_size else ""
        return f"{self.quant} weights{groups}, {self.dtype} activations"


def available_devices() -> list[str]:
    """The devices this machine offers, as torch spells them: cpu, cuda:0 .. cuda:N-1, mps."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def _offers() -> str:
    return f"this machine offers {', '.join(available_devices())}"


def _parse_device(device, cli: bool = False):
    import torch

    name = "--device" if cli else "device"
    # bool is an int to torch.device (True -> cuda:1); only a str, an index or a torch.device names a device
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InputError(f"{name} must be a device name like 'cpu' or 'cuda:0', got {type(device).__name__}; "
                         f"{_offers()}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"invalid {name} {str(device)[:100]!r} ({msg}); {_offers()}") from None


def _check_present(dev, device, ndev: int, cli: bool = False) -> None:
    """The device (and ndev of them) exist on this machine, or InputError / MultiDeviceError naming it and
    listing what the machine has. Only cpu / cuda / mps run a model here (meta holds no data, and a torch build
    may know device types, like xpu, that the models were never run on)."""
    import torch

    name = "--device" if cli else "device"
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and n_cuda == 0:
        raise InputError(f"{name} {str(device)!r} asked for, but no CUDA device is available "
                         f"(torch {torch.__version__}); {_offers()}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= n_cuda:
        raise InputError(f"{name} {str(device)!r}: this machine has {n_cuda} CUDA device(s); {_offers()}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise InputError(f"{name} {str(device)!r}: there is one cpu device; {_offers()}")
    if dev.type == "mps" and "mps" not in available_devices():
        raise InputError(f"{name} {str(device)!r}: MPS (Apple GPU) is not available here; {_offers()}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{name} {str(device)!r}: qwen3lab runs models on cpu, cuda or mps only; {_offers()}")
    if ndev > 1 and dev.type == "mps":
        raise MultiDeviceError(f"ndev={ndev}: tensor parallelism runs on cpu (gloo) or cuda (NCCL), not mps")
    cores = os.cpu_count() or 1
    if ndev > 1 and dev.type == "cpu" and ndev > cores and "WORLD_SIZE" not in os.environ:
        raise MultiDeviceError(f"ndev={ndev} cpu ranks need a core each; this machine has {cores}. "
                               f"Use ndev<={cores}, or torchrun across machines.")
    if ndev > 1 and dev.type == "cuda" and n_cuda < ndev and "WORLD_SIZE" not in os.environ:
        raise MultiDeviceError(f"ndev={ndev} needs {ndev} CUDA devices (one a rank); this machine has {n_cuda}. "
                               f"Use ndev<={n_cuda}, or torchrun across machines.")
