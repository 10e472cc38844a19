"""The engine: token ids in, token ids out.

sampler.py   SamplingParams, greedy / temperature / top-k / top-p with HF semantics
task.py      InferTask: tokens, own cache, own sampling settings, finished flag
runner.py    batch_infer_one_round(model, tasks): one packed forward for a whole batch
generate.py  generate() / TokenStream: stop ids, stop strings, max_steps, streaming
block_manager.py  paged KV blocks: free list, reference counts, prefix caching (hash per full block, LRU)
scheduler.py      continuous batching: token budget, chunked prefill, max_num_seqs, preemption by recompute
llm_engine.py     LLMEngine: add_request / step / abort / stats over one paged KV pool (the server's engine)

The KV cache the model writes into is the model's (models/paged_cache.py: KVPool, PagedSeqCache; one kind for
every path: LLMEngine's shared pool, and model.new_cache's private pool for generate and the batch rounds); the
engine imports it from there, so models never import the engine.
Nothing is imported here.
"""
