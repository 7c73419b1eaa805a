"""
Two tiers of tests. `python -m pytest -q` is the quick tier, about two minutes on 2 CPU cores:
every module's core behaviour. `python -m pytest -q --full` adds the full tier, which CI runs:
torchrun launches, multi-step training runs, the studies and the compile-heavy checks. In the
quick tier those show as skipped, with the switch named, never silently absent; so do CUDA
cases on a machine without a GPU.
"""
import pytest
import torch

FULL = "full tier: run `python -m pytest --full`"
# a device parameter for tests that run on each device: CUDA is skipped, not left out, without one
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here"))]


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the full tier (CI)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: in the full tier only (torchrun, long runs, "
                                       "studies, heavy compiles); run with --full")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(pytest.mark.skip(reason=FULL))
