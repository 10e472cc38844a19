"""The engine: token ids in, token ids out.

kv_cache.py  KVCache, one sequence's preallocated keys/values [L, Hkv, capacity, Dh]
sampler.py   SamplingParams, greedy / temperature / top-k / top-p with HF semantics
task.py      InferTask: tokens, own cache, own sampling settings, finished flag
runner.py    batch_infer_one_round(model, tasks): one packed forward for a whole batch
generate.py  generate() / TokenStream: stop ids, stop strings, max_steps, streaming

Nothing is imported here: models/torch_model.py imports engine.kv_cache, and the runner imports the model.
"""
