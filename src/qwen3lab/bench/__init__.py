"""Benchmarks: `qwen3lab bench attention|moe|generate` (run.run_bench_command). Shared parts by job: settings.py,
timing.py (warm-up, repeats, medians, busy machine), memory.py (peak RSS), machine.py (CPU, flags), bandwidth.py
(bandwidth probe, roofline), report.py (records, tables, JSON), compare.py, plot.py; one thin file per benchmark
(attention.py, moe.py, generate.py) and the peers' adapters (modules.py: HF layers, llama_cpp.py). options.py holds
every option and check that runs before a bench (no torch: the CLI builds its options from it)."""
