"""Fixtures of the e2e layer: the node (tests/e2e/node.py) once per test module, and a scenario's
pods on the runtime under test, `runc` (containerd's own, the baseline) or `vmm` (this project),
both in the same run on the same containerd."""
from __future__ import annotations

import pytest

from host_sandboxer.config import DEFAULT_IMAGE_DIR
from node import node_environment
from pods import Pods

RUNTIMES = ("runc", "vmm")


@pytest.fixture(scope="module")
def node():
    with node_environment() as up:
        yield up


@pytest.fixture(params=RUNTIMES)
def runtime(request) -> str:
    """The CRI runtime handler under test; vmm needs the guest image `make test` builds first."""
    if request.param == "vmm":
        missing = [p.name for p in (DEFAULT_IMAGE_DIR / "kernel", DEFAULT_IMAGE_DIR / "initrd.img")
                   if not p.is_file()]
        if missing:
            pytest.skip(f"vmm: guest image absent ({', '.join(missing)} in {DEFAULT_IMAGE_DIR}): "
                        f"run `make guest-image`")
    return request.param


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        item.e2e_call_failed = outcome.get_result().failed or hasattr(outcome.get_result(), "wasxfail")


@pytest.fixture
def pods(node, runtime, request):
    """The scenario's pods, removed after it. When the scenario itself failed, removal still runs
    but its errors only go to the log: the scenario's failure already says what went wrong."""
    made = Pods(node.crictl, runtime)
    yield made
    try:
        made.close()
    except AssertionError as e:
        if not getattr(request.node, "e2e_call_failed", False):
            raise
        print(f"after the failure: {e}")
