"""Test set-up. Without a GPU, Triton kernels run through Triton's CPU interpreter, which must be
switched on before triton is first imported (importing ultimus_kernels imports it).

Every test starts from a fresh random seed (inputs are random and new each run), printed with any
failure; ULTIMUS_TEST_SEED=N replays a failure with the same inputs."""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _util import FUSED, backend_or_skip  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(autouse=True)
def seed(request):
    """Seeds torch with a fresh seed per test (or ULTIMUS_TEST_SEED) and records it for the report."""
    value = int(os.environ.get("ULTIMUS_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("torch seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "torch seed":
                report.sections.append(("torch seed", f"{value} (replay: ULTIMUS_TEST_SEED={value} pytest ...)"))


@pytest.fixture(params=FUSED)
def fused_backend(request):
    """(backend, device) for every fused backend that runs here; the others skip with the reason."""
    return request.param, backend_or_skip(request.param)
