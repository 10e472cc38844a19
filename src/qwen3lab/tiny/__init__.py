"""Small-matrix mode (`qwen3lab tiny`): a Qwen3 small enough to print every matrix in full, run through the
NumPy oracle, with numerical stability checks, a hand-computed walkthrough and a torch-vs-oracle compare.

config.py (sizes from flags), weights.py (init rules, weights files), forward.py (oracle taps + scores),
printer.py (full matrices), stability.py (checks), scalar.py (the loop forward), explain.py (walkthrough),
compare.py (torch vs oracle through verify), run.py (the command).
"""

from .run import run_tiny, run_tiny_command

__all__ = ["run_tiny", "run_tiny_command"]
