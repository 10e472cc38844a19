"""Adapters that run an implementation other than our own model files: llama.cpp (and its GGUF files)."""
