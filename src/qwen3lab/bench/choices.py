"""Names the bench options accept, kept free of heavy imports so `qwen3lab --help` does not load torch."""

KINDS = ("attention", "moe", "generate")
BENCH_DTYPES = ("bfloat16", "float16", "float32")  # attention, moe: one of these
# generate: a comma list of these; int8 / int4 = bfloat16 activations + those weights, ours only (fast CPU path)
GENERATE_DTYPES = (*BENCH_DTYPES, "int8", "int4")
HF_ATTN_IMPLS = ("sdpa", "eager")  # transformers attention implementations the HF peer may use
HF_EXPERTS_IMPLS = ("grouped_mm", "batched_mm", "eager")  # transformers MoE experts implementations
