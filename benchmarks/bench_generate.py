"""`qwen3lab bench generate` as a script: the table, then one JSON line.

Same options as `qwen3lab bench generate --help`; e.g. `python benchmarks/bench_generate.py --runs 5 --json out.json`.
"""

from qwen3lab.bench.run import script_main

if __name__ == "__main__":
    script_main("generate")
