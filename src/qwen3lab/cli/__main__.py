"""`python -m qwen3lab.cli`: the same command as `qwen3lab`."""

from . import main

main()
