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


@pytest.fixture(params=[pytest.param("kernels", marks=pytest.mark.kernels), "fallback"])
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


@pytest.fixture(autouse=True)
def _kernels_tier_is_marked(request, monkeypatch):
    """The unit tier (make test-fast) must not compile: a test that loads the C++ kernels for the first time in
    this process without @pytest.mark.kernels fails here, naming the mark, instead of silently costing ~30 s
    a path on a fresh machine."""
    if any(request.node.get_closest_marker(m) for m in ("kernels", "slow", "hf", "cuda", "browser")):
        return  # not in the unit tier
    from qwen3lab.fast import build

    real = build.build

    def guarded(path):
        if path not in build._built:
            pytest.fail(f"{request.node.nodeid} builds the C++ kernels ({path}): mark it @pytest.mark.kernels "
                        "(or give it the PyTorch fallback with the `mode` fixture / fast=False)")
        return real(path)

    monkeypatch.setattr(build, "build", guarded)
