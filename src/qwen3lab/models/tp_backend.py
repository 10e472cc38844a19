"""verify's backend contract over a tensor-parallel model (models/tp_run.py TPModel): each rank records its taps,
rank 0 gets them gathered into the canonical full shapes (models/tp.py gather_taps), so verify compares a
tensor-parallel run tap by tap with any reference. No graft: see TPBackend."""

from __future__ import annotations

from ..errors import InputError
from .base import RunResult, check_input_ids
from .tp_run import TPModel


class TPBackend:
    """verify's backend contract over a TPModel: `.run(input_ids, taps=None)` / `.run_decode(...)` with every
    rank's taps gathered into the canonical full shapes on rank 0. No graft (a grafted full tensor would have
    to be re-sliced per rank), so verify names the first divergent tap without isolating the culprit."""

    supports_graft = False

    def __init__(self, tp: TPModel):
        self.tp, self.cfg = tp, tp.cfg
        self.name = f"torch-tp{tp.world}"
        self.dtype = str(tp.dtype).removeprefix("torch.")
        self.device = tp.device

    def run(self, input_ids, taps=None, graft=None) -> RunResult:
        _no_graft(graft)
        return self.tp.run(check_input_ids(input_ids, self.cfg), taps)

    def run_decode(self, input_ids, decode_steps: int, taps=None, graft=None) -> RunResult:
        _no_graft(graft)
        return self.tp.run(check_input_ids(input_ids, self.cfg), taps, decode_steps=int(decode_steps))


def _no_graft(graft) -> None:
    if graft is not None:
        raise InputError("a tensor-parallel candidate cannot graft (taps are gathered, not re-sliced); "
                         "verify names the first divergent tap without isolating the culprit")
