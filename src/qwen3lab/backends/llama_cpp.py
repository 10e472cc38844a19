"""llama.cpp as a verify candidate: `qwen3lab verify --candidate llama.cpp:MODEL.gguf` (or `llama.cpp` alone: the
checkpoint converted to a GGUF of --dtype's type by llama.cpp's own converter, backends/gguf.py).

llama.cpp runs for real, through the llama-cpp-python bindings over the libllama.so that `make peer` built (the
bindings are pointed at it with LLAMA_CPP_LIB_PATH). Every graph node whose name the built-in llama.cpp name map
knows (backends/maps/llama.cpp.toml) is read in ggml's eval callback (`cb_eval`: asked for a node, then called
once it is computed), and the map turns ggml's names and `ne` layouts into canonical taps, the same map a
dump written from that callback by hand goes through. So:

- prefill: one llama_decode of the whole prompt with every row's logits; decode steps (`run_decode`): the
  prompt, then one llama_decode per token through llama.cpp's own KV cache, each step's nodes named `step{j}.`;
- isolation (grafting): in the same callback, after a node's own value is recorded, the reference's value of
  its tap is written over it (the "overwrite in the debug callback" pattern of README's porter's walkthrough),
  so every later node reads the reference's input; nodes that are views (no bytes of their own) or not
  contiguous are recorded but not overwritten;
- options (`--candidate-opt key=value`): `kv=f16|f32|bf16|q8_0` (the KV cache type: llama.cpp's default is
  f16; reported as the candidate's kv_dtype, which loosens only the taps after the cache), `threads=N`;
- flash attention is off, so the attention probabilities (`kq_soft_max`) exist as a node.

The candidate's dtype is the GGUF's file type (F32 -> float32, BF16 -> bfloat16, F16 -> float16, Q8_0 -> q8_0,
Q4_0 -> q4_0), which picks verify's tolerance. The GGUF must be of the model verify loads (hidden size, layers,
vocabulary are checked against config.json).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from pathlib import Path

import numpy as np

from .. import taps as _taps
from ..errors import DumpError, InputError
from . import gguf as _gguf

KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}  # ggml_type
KV_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0"}
FILE_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "Q8_0": "q8_0", "Q4_0": "q4_0"}
_NP = {0: np.float32, 1: np.float16, 26: np.int32}  # ggml_type -> NumPy (bf16, 30, is widened by hand)
_ELEM = {0: 4, 1: 2, 26: 4, 30: 2}
_KQV_OUT = re.compile(r"kqv_out-(\d+)")


class _Head(ctypes.Structure):
    """The leading fields of ggml.h's `struct ggml_tensor` (unchanged for years): type, buffer, ne, nb, op,
    op_params, flags, src (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64 bytes, GGML_MAX_SRC 10)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10)]


def _bindings():
    """llama-cpp-python over `make peer`'s libllama.so, and libggml-base.so for the tensor functions."""
    why = _gguf.missing(tools=(), library=True)
    if why:
        raise InputError(f"--candidate llama.cpp: {why}")
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(_gguf.lib_dir()))
    import llama_cpp  # the optional bindings (make peer), imported only when this candidate is asked for

    g = ctypes.CDLL(str(_gguf.lib_dir() / "libggml-base.so"))
    vp = ctypes.c_void_p
    for fn, res, args in (("ggml_get_name", ctypes.c_char_p, [vp]), ("ggml_op_desc", ctypes.c_char_p, [vp]),
                          ("ggml_nbytes", ctypes.c_size_t, [vp]), ("ggml_n_dims", ctypes.c_int, [vp]),
                          ("ggml_is_contiguous", ctypes.c_bool, [vp]),
                          ("ggml_backend_tensor_get", None, [vp, vp, ctypes.c_size_t, ctypes.c_size_t]),
                          ("ggml_backend_tensor_set", None, [vp, vp, ctypes.c_size_t, ctypes.c_size_t])):
        getattr(g, fn).restype, getattr(g, fn).argtypes = res, args
    return llama_cpp, g


class LlamaCppCandidate:
    """The plugin contract (backends/plugin.py): run(ids, graft=None) and run_decode(ids, steps, graft=None)
    -> {canonical tap: array}."""

    supports_graft = True

    def __init__(self, model_path, gguf: str | None = None, dtype: str | None = None, kv: str = "f16",
                 threads: str | int | None = None, cfg=None, name_map=None):
        self.cfg, self.map = cfg, name_map
        if kv not in KV_TYPES:
            raise InputError(f"--candidate-opt kv={kv!r}: one of {', '.join(KV_TYPES)}")
        try:
            self.threads = int(threads) if threads is not None else max(1, min(os.cpu_count() or 1, 8))
        except ValueError:
            raise InputError(f"--candidate-opt threads={threads!r}: an integer >= 1") from None
        if self.threads < 1:
            raise InputError(f"--candidate-opt threads={threads!r}: an integer >= 1")
        self.lib, self.g = _bindings()
        if gguf:
            self.path = Path(gguf)
            if not self.path.is_file():
                raise InputError(f"--candidate llama.cpp:{gguf}: no such GGUF file")
        else:
            if model_path is None:
                raise InputError("--candidate llama.cpp (no GGUF given) converts the checkpoint: give --model-path")
            self.path = _gguf.gguf(Path(model_path), dtype or "float32", log=lambda m: None)
        self.kv, self.kv_dtype = kv, KV_DTYPE[kv]
        self._quiet = self.lib.llama_log_callback(lambda level, text, user: None)  # kept: C holds the pointer
        self.lib.llama_log_set(self._quiet, None)
        self.lib.llama_backend_init()
        mp = self.lib.llama_model_default_params()
        self.model = self.lib.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise InputError(f"--candidate llama.cpp:{self.path}: llama.cpp could not load this GGUF")
        self.dtype = self._file_dtype()
        # the KV cache's contents are read too (the map's cache rules): verify compares them when asked for
        self.cache_taps = [f"layers.{i}.{site}" for i in range(cfg.num_hidden_layers)
                           for site in ("k_cache", "v_cache")] if cfg is not None else []
        self.name = f"llama.cpp {self.path.name} (kv {kv}, {self.threads} threads)"

    def _file_dtype(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.lib.llama_model_desc(self.model, buf, len(buf))
        desc = self.desc = buf.value.decode(errors="replace")  # e.g. "qwen3 0.6B BF16"
        kind = desc.split()[-1] if desc.split() else ""
        if kind not in FILE_DTYPE:
            raise InputError(f"--candidate llama.cpp:{self.path}: file type {kind!r} ({desc!r}) has no verify "
                             f"tolerance; one of {', '.join(FILE_DTYPE)}")
        return FILE_DTYPE[kind]

    def check(self, cfg) -> None:
        """The GGUF is of this model: hidden size, layer count and vocabulary against config.json."""
        lib, m = self.lib, self.model
        arch = self.desc.split()[0] if self.desc.split() else ""
        want = "qwen3moe" if cfg.is_moe else "qwen3"
        if arch != want:
            raise InputError(f"--candidate llama.cpp:{self.path} is a {arch!r} model; config.json is {want!r}")
        got = {"hidden_size": lib.llama_model_n_embd(m), "num_hidden_layers": lib.llama_model_n_layer(m),
               "vocab_size": lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(m))}
        bad = [f"{k}: GGUF {v}, config.json {getattr(cfg, k)}" for k, v in got.items() if v != getattr(cfg, k)]
        if bad:
            raise InputError(f"--candidate llama.cpp:{self.path} is not this model ({'; '.join(bad)})")

    # ---- runs --------------------------------------------------------------------------------------------
    def run(self, input_ids, graft=None) -> dict[str, np.ndarray]:
        return self._run(list(input_ids), 0, graft)

    def run_decode(self, input_ids, decode_steps: int, graft=None) -> dict[str, np.ndarray]:
        return self._run(list(input_ids), int(decode_steps), graft)

    def _run(self, ids: list[int], steps: int, graft) -> dict[str, np.ndarray]:
        P = len(ids) - steps
        if P < 1:
            raise InputError(f"llama.cpp candidate: {len(ids)} ids leave no prompt before {steps} decode steps")
        cap = _Capture(self, P, graft)
        ctx = self._context(len(ids), cap)
        try:
            for j, (start, end) in enumerate([(0, P)] + [(P + s, P + s + 1) for s in range(steps)]):
                cap.begin(None if j == 0 else j - 1)
                self._decode(ctx, ids[start:end], start)
                cap.end()
        finally:
            self.lib.llama_free(ctx)
        return cap.taps

    def write_dump(self, ids: list[int], path, graft=None, config_sha256: str | None = None) -> Path:
        """The prefill's nodes under their ggml names and ne layouts (what a port's own eval callback would
        write: `name#k`, metadata "ops"), as a dump for `--candidate dump:FILE --map llama.cpp`; with graft
        (the reference's canonical taps, e.g. from --export-reference) the isolated twin for `--isolated`."""
        cap = _Capture(self, len(ids), graft)
        ctx = self._context(len(ids), cap)
        try:
            cap.begin(None)
            self._decode(ctx, ids, 0)
            raw, ops = dict(cap.raw), dict(cap.ops)
            cap.end()
        finally:
            self.lib.llama_free(ctx)
        return _taps.write_dump(path, raw, backend=f"llama.cpp eval callback ({self.path.name})", dtype=self.dtype,
                                input_ids=ids, positions=list(range(len(ids))), config_sha256=config_sha256,
                                extra={"ops": json.dumps(ops), "kv_dtype": self.kv_dtype})

    def _context(self, n: int, cap):
        p = self.lib.llama_context_default_params()
        p.n_ctx = max(256, -(-n // 256) * 256)
        p.n_batch = p.n_ubatch = max(n, 1)  # the prompt in one ubatch: one graph, one node per tap
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn_type = 0  # off: kq_soft_max (the probabilities) is a node of its own
        p.type_k = p.type_v = KV_TYPES[self.kv]
        p.cb_eval = cap.callback
        p.cb_eval_user_data = None
        p.no_perf = True
        ctx = self.lib.llama_init_from_model(self.model, p)
        if not ctx:
            raise InputError(f"llama.cpp candidate: could not make a context (n_ctx {p.n_ctx}, kv {self.kv})")
        return ctx

    def _decode(self, ctx, ids: list[int], start: int) -> None:
        lib = self.lib
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), start + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, 1
            batch.n_tokens = len(ids)
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise InputError(f"llama.cpp candidate: llama_decode returned {rc} at positions {start}..")
        finally:
            lib.llama_batch_free(batch)

    def __del__(self):
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None


class _Capture:
    """The eval callback of one run: records mapped nodes per llama_decode call and grafts the reference."""

    def __init__(self, cand: LlamaCppCandidate, prefill: int, graft):
        self.cand, self.g, self.P = cand, cand.g, prefill
        self.graft = graft
        self.taps: dict[str, np.ndarray] = {}
        self.callback = cand.lib.ggml_backend_sched_eval_callback(self._on_node)  # kept alive with the run
        self.error: BaseException | None = None
        self.ungrafted: set[str] = set()  # taps whose node could not take the reference's value

    def begin(self, step: int | None) -> None:
        self.step, self.raw, self.ops, self.seen = step, {}, {}, {}

    def _on_node(self, t, ask, user) -> bool:
        try:
            name = _name(self.g, t)
            if ask:
                return self.cand.map.wants(name)
            self._record(t, name)
        except BaseException as e:  # noqa: BLE001 - nothing may unwind through C; raised after the decode
            self.error = self.error or e
        return True

    def _record(self, t, name: str) -> None:
        op = self.g.ggml_op_desc(t).decode()
        k = self.seen[name] = self.seen.get(name, -1) + 1
        key = f"{name}#{k}"
        hit = self.cand.map.match(key, op, self.step)
        if hit is None:
            return
        arr = _read(self.g, t)
        self.raw[key], self.ops[key] = arr, op
        tap, rule = hit
        if self.graft is None or tap not in self.graft or not self.g.ggml_is_contiguous(t):
            return
        try:
            ref = self.cand.map.to_foreign(np.asarray(self.graft[tap]), rule, arr.shape, tap, self.cand.cfg, self.P)
        except DumpError:  # the node's shape is not the reference's (e.g. another expert count): not grafted
            self.ungrafted.add(tap)
            return
        _write(self.g, t, ref)

    def end(self) -> None:
        """After one llama_decode: its nodes through the map, reshaped to the canonical shapes."""
        if self.error is not None:
            raise InputError(f"llama.cpp candidate: the eval callback failed: {self.error}") from self.error
        dropped: dict[str, list[str]] = {}
        got = self.cand.map.apply(self.raw, {"ops": self.ops}, self.cand.cfg, self.cand.path, dropped,
                                  step=self.step, prefill=self.P)
        T = self.P if self.step is None else 1
        S = self.P if self.step is None else self.P + self.step + 1
        for name, a in got.items():
            try:
                shape = _taps.canonical_shape(self.cand.cfg, name, T, S)
            except KeyError:
                shape = a.shape
            self.taps[name] = a.reshape(shape) if a.size == int(np.prod(shape)) else a


def _name(g, t) -> str:
    """The node's ggml name; o_proj's output, which llama.cpp leaves unnamed ("node_N"), is called "attn_out-i"
    after its input kqv_out-i, so the map can take it."""
    name = (g.ggml_get_name(t) or b"").decode(errors="replace")
    if name and not name.startswith("node_"):
        return name
    src1 = _Head.from_address(t).src[1]
    if src1 and g.ggml_op_desc(t) == b"MUL_MAT":
        m = _KQV_OUT.fullmatch((g.ggml_get_name(src1) or b"").decode(errors="replace"))
        if m:
            return f"attn_out-{m[1]}"
    return name


def _read(g, t) -> np.ndarray:
    """A node's values as a NumPy array listed in ggml's ne order (fastest dim first; the bytes row-major in the
    reversed shape, as a dump from the eval callback holds them), float32 for float types."""
    h = _Head.from_address(t)
    n = max(1, g.ggml_n_dims(t))
    if h.type not in _ELEM:
        raise InputError(f"llama.cpp candidate: node {g.ggml_get_name(t)!r} has ggml type {h.type}, not f32 / f16 / "
                         f"bf16 / i32")
    size = g.ggml_nbytes(t)
    buf = np.empty(size, dtype=np.uint8)
    g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, size)
    elem = np.uint16 if h.type == 30 else _NP[h.type]
    shape, strides = tuple(h.ne[i] for i in range(n))[::-1], tuple(h.nb[i] for i in range(n))[::-1]
    # ggml_nbytes is the extent of the strides, so the strided view stays inside buf
    a = np.ascontiguousarray(np.lib.stride_tricks.as_strided(buf, shape=shape + (_ELEM[h.type],),
                                                             strides=strides + (1,)))
    a = a.view(elem).reshape(shape)
    if h.type == 30:
        a = _gguf.bf16_to_f32(a)
    return np.ascontiguousarray(a.astype(np.float32) if a.dtype == np.float16 else a).reshape(shape[::-1])


def _write(g, t, ref: np.ndarray) -> None:
    """Overwrite a contiguous node with `ref` (listed in ne order, as _read gives), in the node's own type."""
    h = _Head.from_address(t)
    if h.type == 30:  # bfloat16
        data = _gguf.f32_to_bf16(ref)
    else:
        data = np.ascontiguousarray(ref, dtype=_NP[h.type])
    size = g.ggml_nbytes(t)
    if data.nbytes != size:
        raise InputError(f"llama.cpp candidate: graft of {g.ggml_get_name(t)!r}: {data.nbytes} bytes for a node of "
                         f"{size}")
    g.ggml_backend_tensor_set(t, data.ctypes.data, 0, size)


def open_llama_cpp(rest: str, *, cfg, model_path=None, dtype: str | None = None, role: str = "candidate",
                   options=None, **_):
    """The registry's opener (__init__.py) for `llama.cpp:MODEL.gguf`, or `llama.cpp` alone (the checkpoint
    converted at --dtype), its nodes named through the built-in llama.cpp name map; behind the plugin wrapper,
    so its taps pass the shared check (check.py) like every adapter's."""
    from .namemap import NameMap  # the map's TOML parser: only when this adapter is asked for
    from .plugin import PluginBackend

    options = dict(options or {})
    unknown = set(options) - {"kv", "threads"}
    if unknown:
        raise InputError(f"--candidate-opt {', '.join(sorted(unknown))}: the llama.cpp candidate takes kv=f16|f32|"
                         f"bf16|q8_0 and threads=N")
    gguf = rest or None
    obj = LlamaCppCandidate(model_path, gguf, dtype=dtype if gguf is None else None, cfg=cfg,
                            name_map=NameMap.load("llama.cpp"), **options)
    obj.check(cfg)
    b = PluginBackend(obj, cfg, f"llama.cpp:{rest}" if rest else "llama.cpp", obj.dtype, role)
    b.name = obj.name
    return b
