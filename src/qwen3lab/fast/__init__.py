"""Fast CPU inference, applied to a loaded Qwen3LMHeadModel from outside the model file.

    from qwen3lab.fast import optimize
    optimize(model)                  # fused QKV / gate-up weights + streaming kernels, weights unchanged
    optimize(model, quant="int8")    # the same with weight-only int8 (per-output-row scales)
    optimize(model, quant="int4")    # weight-only int4, one scale per 128 weights along K (group_size=32 too)

Notable:
- fusion concatenates q/k/v (and gate/up) once at load into one weight [(Hq+2Hkv)Dh, D] ([2I, D]) and makes
  the checkpoint-named Parameters row views of it: one weight stream per step instead of three (two), no extra
  memory, the names loading and verification know are unchanged, and taps q/k/v/gate/up are exact slices.
- every linear layer the forward runs becomes a FastLinear / Int8Linear (linear.py) over the C++ kernels
  (kernels.cpp, built at first use by build.py for the best path the CPU has; PyTorch ops when they cannot be
  built), and the model's other leaves (RMSNorm, RoPE, decode attention, SiLU * up) get the kernels too
  (`set_kernels`): the module tree stays the only forward, taps where they were, so verify runs these kernels.
- the MoE router (`mlp.gate`) stays in the model dtype under int8 / int4: routing decides which experts run, and
  it is tiny.
- memory: the file pages of copied (fused, quantised, aligned) checkpoint tensors are given back (qwen3lab/pages.py),
  so the process holds each weight once.
- alignment: every weight the kernels stream starts on a 64-byte boundary (align_weights).
- numerics: float32 accumulation everywhere, one rounding to the model dtype per output, like F.linear; taps
  and grafting work as on the plain model (verification runs this path op by op).
- threads: torch's intra-op pool (torch.set_num_threads); see set_threads().
- prefill GEMM: many-row bf16 / int8 linears take whichever of two GEMMs measured faster on this CPU
  (tune.py), decided at optimize() so the first timed forward does not pay for the measurement; int4 always
  takes its dequantised-band sgemm (linear_q4_large: there is no exact bf16 route to race it against).
"""

# The package's public names; the code lives in the modules named (no logic here).
from .build import kernels, status
from .fuse import align_weights, fuse_layer, fuse_projections
from .linear import FastLinear, Int4Linear, Int8Linear
from .quant import QUANT_MODES, quantise
from .speedup import describe, optimize, set_kernels, set_threads, use_kernels

__all__ = ["optimize", "fuse_projections", "fuse_layer", "align_weights", "quantise", "kernels", "status",
           "set_threads", "set_kernels", "use_kernels", "describe", "FastLinear", "Int8Linear", "Int4Linear",
           "QUANT_MODES"]
