"""The run's leak guard (leak_guard.py): after each test module and at the end of the session,
any process this run started that is still alive, mount left under its directories, network
namespace or temp file it made is an error naming each one (and is then taken away, so it is
reported once). The fixtures that stop a test's daemon, VMs or agent report what they had to
take away themselves, in that test (leak_guard.take_left_in).

Every tempfile.mkdtemp() of the run (the VM fixtures', the daemon harness', the daemon's own)
lands in one short per-run directory (unix socket paths must stay under 108 bytes), so what a
test leaves there is seen; pytest's basetemp stays where it was.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from leak_guard import RUN_VARIABLE, RunGuard, fail_if_left, mark_run


def pytest_configure(config):
    mark_run()  # before any process is started: they all inherit it
    # `timeout`, a CI runner or kill(1) stop a run with SIGTERM, which would end pytest on the
    # spot: fixtures would not stop the daemons, VMs and agents they started. As Ctrl-C, it
    # ends the run with every teardown done.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def run_guard(tmp_path_factory):
    basetemp = tmp_path_factory.getbasetemp()  # computed before the temp dir moves
    tmp_dir = Path(tempfile.mkdtemp(prefix="vt-"))
    outer_tmpdir = os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(tmp_dir), str(tmp_dir)
    guard = RunGuard(os.environ[RUN_VARIABLE], basetemp, tmp_dir)
    yield guard
    tempfile.tempdir = None
    if outer_tmpdir is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = outer_tmpdir
    try:
        _fail_on_leftovers(guard, "the test session")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def module_leak_guard(run_guard, request):
    yield
    _fail_on_leftovers(run_guard, request.module.__name__)


def _fail_on_leftovers(guard: RunGuard, what: str) -> None:
    found = guard.leftovers()
    guard.clear(found)
    fail_if_left(found, what)
