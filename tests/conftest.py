"""Shared test fixtures."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP threads
    made one bfloat16 MoE run take 18 s instead of 0.04 s. Request it from a module-scoped autouse fixture."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["kernels", "fallback"])
def mode(request):
    """Each test twice: on the compiled kernels (skipped, with the reason, where they cannot be built) and on
    the pure-PyTorch fallback leaves."""
    from qwen3lab.fast import build

    build.reset(enabled=request.param == "kernels")
    if request.param == "kernels" and build.kernels() is None:
        build.reset()
        pytest.skip(f"kernels unavailable: {build.status()}")
    yield request.param
    build.reset()
