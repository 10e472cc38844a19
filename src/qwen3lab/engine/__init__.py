"""The engine: token ids in, token ids out.

sampler.py   SamplingParams, greedy / temperature / top-k / top-p with HF semantics
task.py      InferTask: tokens, own cache, own sampling settings, finished flag
runner.py    batch_infer_one_round(model, tasks): one packed forward for a whole batch
generate.py  generate() / TokenStream: stop ids, stop strings, max_steps, streaming

The KV cache the model writes into (KVCache, one sequence's preallocated keys/values) is the model's:
models/kv_cache.py; the engine imports it from there, so models never import the engine.
Nothing is imported here.
"""
