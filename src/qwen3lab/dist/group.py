"""Process-group setup for tensor parallelism: gloo on CPU, NCCL on CUDA, always with a timeout.

Why a timeout everywhere: a rank that dies leaves the others blocked in a collective; with the group's
timeout they raise instead, so a bad run ends every rank with an error rather than a hang. The timeout is
QWEN3LAB_DIST_TIMEOUT seconds (default 120). Waiting for rank 0's next command is not a collective that should
time out (a chat user thinking, a server with no requests): those waits run on a second, gloo-only group
(`commands()`) whose timeout is QWEN3LAB_DIST_IDLE_TIMEOUT seconds (default one week); a rank that dies still
shows at once there, as its connections close ("Connection closed by peer").

Two ways in: `init(rank, world, addr, port)` for ranks this process spawned itself, or `from_env()` when a
launcher (torchrun) set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import DistError  # defined without torch (the CLI names it before torch loads); raised here


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


_COMMANDS: list = [None]  # the gloo group rank 0's commands travel on (init)


def timeout_s(var: str = "QWEN3LAB_DIST_TIMEOUT", default: str = "120") -> float:
    raw = os.environ.get(var, default)
    try:
        t = float(raw)
    except ValueError:
        raise DistError(f"{var} must be a number of seconds, got {raw!r}") from None
    if t <= 0:
        raise DistError(f"{var} must be > 0, got {raw!r}")
    return t


def idle_timeout_s() -> float:
    return timeout_s("QWEN3LAB_DIST_IDLE_TIMEOUT", str(7 * 24 * 3600))


def commands():
    """The process group for rank 0's commands (gloo, the idle timeout; see the module doc)."""
    assert _COMMANDS[0] is not None, "commands() before init()"
    return _COMMANDS[0]


def free_port() -> int:
    """A TCP port free on loopback now (for the rendezvous of locally spawned ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one rank of a world."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init(rank: int, world: int, addr: str, port: int, device: str | torch.device = "cpu",
         method: str | None = None) -> World:
    """Join a world of `world` ranks as `rank` (rendezvous tcp://addr:port, or `method` e.g. "env://");
    NCCL for CUDA, gloo otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    wait, idle = (datetime.timedelta(seconds=t) for t in (timeout_s(), idle_timeout_s()))  # bad values: said first
    try:
        dist.init_process_group(backend, init_method=method or f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=wait)
        _COMMANDS[0] = dist.new_group(backend="gloo", timeout=idle)
    except Exception as e:  # noqa: BLE001 -- every failure to rendezvous is reported the same way
        raise DistError(f"rank {rank}/{world}: could not join the process group at {addr}:{port} "
                        f"({backend}): {e}") from None
    return World(rank, world, dev)


def from_env(device: str | torch.device = "cpu") -> World:
    """Join the world a launcher describes in RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    env = os.environ
    try:
        rank, world, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
    except (KeyError, ValueError) as e:
        raise DistError(f"torchrun environment incomplete or invalid: {e}") from None
    # env:// rather than tcp://: torchrun's agent already serves a store on MASTER_PORT and tells its workers
    # (TORCHELASTIC_USE_AGENT_STORE) to use it instead of binding the port again
    return init(rank, world, env["MASTER_ADDR"], port, device, method="env://")


def rank_threads(world: int) -> int:
    """The threads each local rank gets: this machine's cores shared between them (at least one each)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def split_threads(world: int) -> int:
    """CPU: set this rank's torch threads to its share of the cores (rank_threads)."""
    n = rank_threads(world)
    torch.set_num_threads(n)
    return n


def shutdown() -> None:
    _COMMANDS[0] = None
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the command group too
