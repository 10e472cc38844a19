"""Running a tensor-parallel model: rank 0 drives, the other ranks follow.

`TPModel` is model-like (cfg, dtype, device, new_cache, forward(batch) -> logits [R, V]), so the engine
(generate, batch_infer_one_round, a server's scheduler) drives it exactly as it drives Qwen3LMHeadModel.
Each call on rank 0 first broadcasts the step (ids, positions, spans, logits rows) to the followers, then
every rank runs the same forward on its shard; the collectives inside the leaves line them up. KV caches
live on every rank (each holds its KV heads). new_cache's caches (standalone paged caches, a private pool
each): rank 0's carry a key the followers map to their own, freed when rank 0's is garbage-collected. The
engine's (LLMEngine, a server):
`new_kv_pool(num_blocks, block_size)` makes a pool of the rank's KV heads on every rank from the one block
count rank 0's engine decided; a span's PagedSeqCache travels as its block table, and each follower views
its own pool through that table, so rank 0's block manager alone decides where every sequence lives.
Commands travel on the command group (dist/group.py: no timeout while idle); one lock makes each command
one unit when several threads hold the TPModel (a server's engine thread, its shutdown).

Start: `start_local(path, world, ...)` spawns world-1 follower processes (torch.multiprocessing spawn) and
joins as rank 0; under torchrun, `join_launched(path, ...)` joins the launched world, and on ranks > 0 it
runs the follower loop and exits the process when rank 0 stops. Every rank reports its load (ok or the
error) before any forward, so a bad setting ends all ranks with one message; a dead rank makes the next
collective fail (or time out: dist/group.py), raised on rank 0 as DistError.
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import sys
import threading
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import Qwen3Config
from ..dist import group
from ..dist.group import DistError
from ..dist.layers import STATS
from ..weights import load_weights
from .base import RunResult
from .batch import ForwardBatch, Span
from .paged_cache import PagedSeqCache
from .tp import build_shard, check_tp, gather_taps, shard_rule

PING_S = 30.0  # TPModel.check_alive: ping the ranks after this long without a command
# this process's resident bytes just before its shard was loaded, and its peak just after (bench / tests)
RSS_BEFORE_LOAD, PEAK_AFTER_LOAD = [0], [0]


def rss_now() -> int:
    """Resident bytes of this process now (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return 0


def load_rank(path, rank: int, world: int, device, dtype) -> torch.nn.Module:
    """The rank's shard, reading only its slices of the checkpoint."""
    RSS_BEFORE_LOAD[0] = rss_now()
    cfg = Qwen3Config.from_file(path)
    check_tp(cfg, world)
    w = load_weights(path, cfg, dtype=dtype, device=device, shard=shard_rule(cfg, rank, world))
    model = build_shard(cfg, w, rank, world, device=device, dtype=dtype)
    PEAK_AFTER_LOAD[0] = peak_rss()
    return model


def _ready(rank: int, world: int, fn):
    """Run fn on every rank and share the outcome; any rank's failure is raised on all of them."""
    try:
        out, err = fn(), None
    except Exception as e:  # noqa: BLE001 -- sent to every rank, raised there with the rank named
        out, err = None, f"{type(e).__name__}: {e}"
    errs: list = [None] * world
    dist.all_gather_object(errs, err)
    bad = [(r, m) for r, m in enumerate(errs) if m]
    if bad:
        r, m = bad[0]
        raise DistError(f"rank {r} of {world} failed to load: {m}")
    return out


def peak_rss() -> int:
    """This process's peak resident set size in bytes: Linux VmHWM (ru_maxrss would carry the high-water mark
    of the process that forked this one across exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415 -- POSIX only; absent on Windows

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _bcast(obj=None):
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group.commands())
    return box[0]


def _cache_ref(cache, end: int):
    """How a span's cache travels: None, a new_cache cache's key (each rank holds its own standalone cache under
    it), or an engine cache's block table over the ranks' pools (a list) up to position `end`."""
    key = None if cache is None else getattr(cache, "tp_key", None)
    if key is not None:
        return key
    if isinstance(cache, PagedSeqCache):
        return cache.block_table[:-(-end // cache.pool.block_size)]
    return None


class _Rank:
    """What every rank does for one command (rank 0 after broadcasting it, the others after receiving it)."""

    def __init__(self, model):
        self.model = model
        self.caches: dict[int, object] = {}
        self.pool = None  # this rank's paged KV pool ("pool" command)

    def _cache(self, ref, start: int):
        if isinstance(ref, list):  # a block table over this rank's pool; `start` positions are filled
            return PagedSeqCache(self.pool, ref, start)
        return None if ref is None else self.caches.get(ref)

    def do(self, cmd: tuple):
        kind = cmd[0]
        for key in cmd[-1]:  # caches rank 0 has dropped since the last command
            self.caches.pop(key, None)
        if kind == "ping":  # keeps the command group's idle wait short of its timeout (TPModel.check_alive)
            return None
        if kind == "cache":
            self.caches[cmd[1]] = self.model.new_cache(cmd[2])
            return self.caches[cmd[1]]
        if kind == "pool":  # every rank makes its pool, or every rank raises the first failure
            m = self.model
            self.pool = _ready(m.rank, m.world, lambda: m.new_kv_pool(cmd[1], cmd[2]))
            return self.pool
        if kind == "forward":
            _, ids, pos, spans, rows, _ = cmd
            dev = self.model.device
            batch = ForwardBatch(torch.tensor(ids, dtype=torch.long, device=dev),
                                 torch.tensor(pos, dtype=torch.long, device=dev),
                                 [Span(self._cache(k, s), s, n) for k, s, n in spans],
                                 None if rows is None else torch.tensor(rows, dtype=torch.long, device=dev))
            return self.model(batch)
        if kind == "run":
            return self._run(*cmd[1:-1])
        if kind == "plant":  # a sharding bug on purpose (tests): leaf cmd[1]'s all_reduce left out, on every rank
            self.model.get_submodule(cmd[1]).skip_reduce = cmd[2]
            return None
        if kind == "stats":  # every rank's peak RSS (bytes) and time in collectives, gathered on rank 0
            mine = {"rank": self.model.rank, "peak_rss": peak_rss(), "rss_before_load": RSS_BEFORE_LOAD[0],
                    "peak_after_load": PEAK_AFTER_LOAD[0],
                    "collective_s": STATS.seconds,
                    "collective_calls": STATS.calls, "collective_bytes": STATS.bytes}
            if cmd[1]:
                STATS.reset()
            out: list = [None] * self.model.world if self.model.rank == 0 else None
            dist.gather_object(mine, out, dst=0)
            return out
        raise DistError(f"unknown tensor-parallel command {kind!r}")

    def _run(self, ids, decode_steps, names):
        """A verify run (TorchBackend.run / run_decode) with taps recorded on every rank, gathered to rank 0
        in canonical full shapes; rank 0 gets the RunResult, the others None."""
        from .torch_model import TorchBackend  # noqa: PLC0415 -- the backend contract, only for verify runs

        be = TorchBackend.__new__(TorchBackend)  # the contract's run methods over this rank's shard
        be.cfg, be.model, be.device = self.model.cfg, self.model, self.model.device
        r = be.run(ids, taps=names) if decode_steps is None else be.run_decode(ids, decode_steps, taps=names)
        w = self.model.world
        taps = gather_taps(r.taps, self.model.cfg, self.model.rank, w) \
            if names is not None else {}
        return None if self.model.rank else RunResult(r.logits, taps)


def follow(model) -> None:
    """Ranks > 0: do what rank 0 broadcasts until it says stop (or dies: the collective raises). SIGINT and
    SIGTERM are left to rank 0 (a terminal's Ctrl-C reaches every local rank, torchrun's SIGTERM every rank):
    rank 0 drains its work and then stops the followers; if rank 0 dies instead, its closed connections end
    the wait here at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    me = _Rank(model)
    while True:
        cmd = _bcast()
        if cmd[0] == "stop":
            dist.barrier()  # every rank leaves together: none tears down while another is still in a collective
            return
        me.do(cmd)


class TPModel:
    """Rank 0's handle on the world: model-like (see module doc). `close()` stops the followers."""

    def __init__(self, model, world: int, procs=()):
        self.local = model
        self.cfg: Qwen3Config = model.cfg
        self.world = world
        self.procs = list(procs)
        self._me = _Rank(model)
        self._keys = itertools.count()
        self._freed: list[int] = []
        self._lock = threading.RLock()
        self._last = time.monotonic()  # when the last command went out
        self.closed = False
        atexit.register(self.close)

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    def _send(self, *cmd):
        with self._lock:
            return self._send_locked(cmd)

    def _send_locked(self, cmd: tuple):
        if self.closed:
            raise DistError("this tensor-parallel model is closed")
        freed, self._freed = self._freed, []
        cmd = (*cmd, freed)
        self._last = time.monotonic()
        try:
            _bcast(cmd)
            return self._me.do(cmd)
        except DistError:  # every rank failed alike (a pool that does not fit): the followers have left
            self._teardown()
            raise
        except RuntimeError as e:
            dead = [p.pid for p in self.procs if not p.is_alive()]
            self._teardown()
            raise DistError(f"tensor-parallel run lost a rank ({'pids ' + str(dead) if dead else 'a peer'} "
                            f"gone): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def new_cache(self, capacity: int):
        key = next(self._keys)
        cache = self._send("cache", key, int(capacity))
        cache.tp_key = key
        weakref.finalize(cache, self._freed.append, key)
        return cache

    def new_kv_pool(self, num_blocks: int, block_size: int):
        """A paged KV pool on every rank (each its KV heads), num_blocks each; rank 0's is returned."""
        return self._send("pool", int(num_blocks), int(block_size))

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one pool block takes on a rank (all ranks alike)."""
        return self.local.kv_block_bytes(block_size)

    @property
    def memory_sharers(self) -> int:
        """Ranks drawing on the free memory rank 0 sees: the cpu ranks of this host; one a GPU."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world)) if self.device.type == "cpu" else 1

    def check_alive(self) -> None:
        """DistError when this model is closed or a follower it spawned has died; for a server's idle loop. After
        PING_S idle (or half the idle timeout) it also pings every rank: torchrun's followers are checked too,
        and the followers' wait never reaches the command group's timeout however long the server idles."""
        dead = [p.pid for p in self.procs if not p.is_alive()]
        if dead or self.closed:
            raise DistError(f"tensor-parallel run lost a rank (pids {dead} gone)" if dead else
                            "this tensor-parallel model is closed")
        if time.monotonic() - self._last > min(PING_S, group.idle_timeout_s() / 2):
            self._send("ping")

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        spans = [(_cache_ref(s.cache, s.start + s.length), s.start, s.length) for s in batch.spans]
        rows = None if batch.logits_rows is None else batch.logits_rows.tolist()
        return self._send("forward", batch.input_ids.tolist(), batch.positions.tolist(), spans, rows)

    __call__ = forward

    def run(self, input_ids, taps=None, decode_steps: int | None = None):
        """verify's backend contract on all ranks: RunResult (logits, taps gathered to full shapes)."""
        ids = np.asarray(input_ids, dtype=np.int64).tolist()
        return self._send("run", ids, decode_steps, taps)

    def rank_stats(self, reset: bool = False) -> list[dict]:
        """Per rank: peak RSS (bytes), seconds / calls / bytes in collectives since the last reset."""
        return self._send("stats", bool(reset))

    def plant_skip_reduce(self, leaf: str, on: bool = True) -> None:
        """Tests: leave out the all_reduce of row-parallel `leaf` (e.g. "model.layers.0.self_attn.o_proj")."""
        self._send("plant", leaf, bool(on))

    def close(self) -> None:
        """Tell the followers to stop, wait for them, leave the process group (so another world can start)."""
        with self._lock:
            if self.closed:
                return
            try:
                _bcast(("stop",))
                dist.barrier()  # the followers' side of the same barrier (follow)
            except RuntimeError:
                pass
            self._teardown()

    def _teardown(self) -> None:
        self.closed = True
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        group.shutdown()


def _follower_main(path, rank: int, world: int, port: int, device, dtype) -> None:
    group.split_threads(world)
    group.init(rank, world, "127.0.0.1", port, device)
    code = 0
    try:
        model = _ready(rank, world, lambda: load_rank(path, rank, world, device, dtype))
        follow(model)
    except Exception as e:  # noqa: BLE001 -- a follower's end is reported by rank 0; say why here too
        print(f"qwen3lab rank {rank}: {e}", file=sys.stderr)
        code = 1
    finally:
        group.shutdown()
        sys.stderr.flush()
        # a spawned follower has nothing left to clean up; ending it here skips the interpreter's teardown, in
        # which gloo's threads were destroyed joinable ("terminate called without an active exception", SIGABRT)
        os._exit(code)


def start_local(path, world: int, device="cpu", dtype=torch.float32) -> TPModel:
    """Spawn world-1 follower processes on this machine and join as rank 0 (gloo on cpu, NCCL on cuda)."""
    cfg = Qwen3Config.from_file(path)
    check_tp(cfg, world)  # before anything starts: one clear error, no processes to stop
    port = group.free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_follower_main, args=(str(path), r, world, port, str(device), dtype), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    group.split_threads(world)
    group.init(0, world, "127.0.0.1", port, device)
    try:
        model = _ready(0, world, lambda: load_rank(path, 0, world, device, dtype))
    except BaseException:
        for p in procs:
            p.join(timeout=10)
        group.shutdown()
        raise
    return TPModel(model, world, procs)


def join_launched(path, world: int, device="cpu", dtype=torch.float32) -> TPModel:
    """Under torchrun: join the launched world. Rank 0 returns the TPModel; other ranks follow rank 0 and
    then end the process (SystemExit 0) -- the rest of the script is rank 0's."""
    w = group.from_env(device)
    if w.size != world:
        group.shutdown()
        raise DistError(f"ndev={world} but torchrun launched WORLD_SIZE={w.size}; pass ndev={w.size}")
    group.split_threads(world)
    model = _ready(w.rank, world, lambda: load_rank(path, w.rank, world, w.device, dtype))
    if w.rank == 0:
        return TPModel(model, world)
    try:
        follow(model)
    finally:
        group.shutdown()
    raise SystemExit(0)
