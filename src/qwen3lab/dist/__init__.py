"""Tensor-parallel plumbing on torch.distributed: process groups (group.py) and parallel leaves (layers.py).

Leaf level (layer 1): knows torch.distributed, not the model. Sharding a model (which leaf is which) lives at
the model layer (models/tp.py), as DESIGN.md says: parallelism is applied to a model from outside.
"""
