"""Fixtures of the e2e layer: the node (tests/e2e/node.py) once per test module, and a scenario's
pods on the runtime under test, `runc` (containerd's own, the baseline), `vmm` (this project) or
`vmm-streaming` (this project with `io_type = "streaming"`), all in the same run on the same
containerd."""
from __future__ import annotations

import json
import re

import pytest

from host_sandboxer.config import DEFAULT_IMAGE_DIR
from node import node_environment
from pods import Pods

RUNTIMES = ("runc", "vmm", "vmm-streaming")
# io_type decides only how stdio travels: scenarios marked `stdio` run on every runtime, the
# others (networking, stats, OOM, ...) on runc and vmm, where vmm-streaming is the same code
STDIO_ONLY = ("vmm-streaming",)
_HERE = "tests/e2e/"


def pytest_configure(config):
    config.addinivalue_line("markers", "node_restart: restarts containerd or vmm-sandboxer under running "
                                       "pods (runs last in its module)")
    config.addinivalue_line("markers", "stdio: depends on how stdio travels, so runs with "
                                       "io_type = \"streaming\" (vmm-streaming) too")


def pytest_generate_tests(metafunc):
    """A scenario's runtimes: all of RUNTIMES when it is marked `stdio`, else all but STDIO_ONLY."""
    if "runtime" in metafunc.fixturenames:
        stdio = metafunc.definition.get_closest_marker("stdio") is not None
        metafunc.parametrize("runtime", [r for r in RUNTIMES if stdio or r not in STDIO_ONLY], indirect=True)


def pytest_collection_modifyitems(items):
    """Within each e2e module, scenarios that restart containerd or vmm-sandboxer go last, runc's
    before vmm's (stable otherwise): a vmm pod that does not survive a restart can leave
    containerd unable to finish recovering (issue 12), which must not fail the baseline or any
    other scenario. Items of other directories keep their places."""
    def order(item):
        if item.get_closest_marker("node_restart") is None:
            return 0
        runtime = getattr(item, "callspec", None) and item.callspec.params.get("runtime")
        return 2 if runtime and runtime.startswith("vmm") else 1
    for module in {item.module for item in items if item.nodeid.startswith(_HERE)}:
        slots = [i for i, item in enumerate(items) if item.module is module]
        for slot, item in zip(slots, sorted((items[i] for i in slots), key=order)):
            items[slot] = item


@pytest.fixture(scope="module")
def node():
    with node_environment() as up:
        yield up


@pytest.fixture
def runtime(request) -> str:
    """The CRI runtime handler under test; vmm needs the guest image `make test` builds first."""
    if request.param.startswith("vmm"):
        missing = [p.name for p in (DEFAULT_IMAGE_DIR / "kernel", DEFAULT_IMAGE_DIR / "initrd.img")
                   if not p.is_file()]
        if missing:
            pytest.skip(f"vmm: guest image absent ({', '.join(missing)} in {DEFAULT_IMAGE_DIR}): "
                        f"run `make guest-image`")
    return request.param


LOG_TAIL_LINES = 60  # of each node log, shown under a failed scenario


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        report = outcome.get_result()
        item.e2e_call_failed = report.failed or hasattr(report, "wasxfail")
        if report.failed:
            for title, text in _logs_since(getattr(item, "e2e_log_marks", {})):
                report.sections.append((title, text))


def _logs_since(marks: dict) -> list[tuple[str, str]]:
    """The last lines each node log (containerd, vmm-sandboxer) got since the scenario began:
    a failure in CI is then explained by the daemons' own words, the node being gone after."""
    sections = []
    for log, offset in marks.items():
        try:
            with open(log, "rb") as file:
                file.seek(offset if offset <= log.stat().st_size else 0)  # a restart may rewrite it
                lines = file.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            continue
        sections.append((f"{log.name} (last {len(lines)} lines of the scenario)", "\n".join(lines)))
    return sections


@pytest.fixture
def pods(node, runtime, request):
    """The scenario's pods, removed after it. When the scenario itself failed, removal still runs
    but its errors only go to the log: the scenario's failure already says what went wrong."""
    made = Pods(node.crictl, runtime)
    request.node.e2e_log_marks = {log: log.stat().st_size for log in
                                  (node.work / "containerd.log", node.work / "vmm-sandboxer.log") if log.exists()}
    yield made
    try:
        made.close()
    except AssertionError as e:
        if not getattr(request.node, "e2e_call_failed", False):
            raise
        print(f"after the failure: {e}")


# name -> figure: measurements scenarios report (`figures` fixture), printed as JSON after the run
_figures: dict[str, object] = {}


@pytest.fixture
def figures() -> dict:
    """Where a scenario records the figures it measured; they are printed after the run."""
    return _figures


# a runtime among a test's ids (which "-" joins, and "vmm-streaming" contains), longest name first
_RUNTIME_IN_IDS = re.compile("(?:^|-)(%s)(?:-|$)" % "|".join(sorted(RUNTIMES, key=len, reverse=True)))
# scenario -> runtime -> [outcome, seconds]: the comparison table printed after the run
_table: dict[str, dict[str, list]] = {}


def pytest_runtest_logreport(report):
    if not report.nodeid.startswith(_HERE) or "[" not in report.nodeid:
        return
    name, _, ids = report.nodeid.split("::")[-1].rstrip("]").partition("[")
    found = _RUNTIME_IN_IDS.search(ids)
    if found is None:
        return
    runtime = found.group(1)
    others = "-".join(part for part in (ids[:found.start()], ids[found.end():]) if part)
    scenario = f"{name}[{others}]" if others else name
    cell = _table.setdefault(scenario, {}).setdefault(runtime, ["passed", 0.0])
    cell[1] += report.duration
    if report.when == "call" and hasattr(report, "wasxfail"):
        cell[0] = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        cell[0] = "failed" if report.when == "call" else f"error ({report.when})"
    elif report.skipped and cell[0] == "passed":
        cell[0] = "skipped"


def pytest_terminal_summary(terminalreporter):
    if _figures:
        terminalreporter.section("e2e: figures measured")
        terminalreporter.write_line(json.dumps(_figures, indent=1, sort_keys=True))
    if not _table:
        return
    width = max(map(len, _table))
    terminalreporter.section("e2e: each scenario on each runtime (outcome, seconds incl. setup/teardown)")
    terminalreporter.write_line(f"{'scenario':<{width}}  " + "".join(f"{r:<22}" for r in RUNTIMES))
    for scenario, cells in _table.items():
        row = "".join(f"{cells[r][0]} {cells[r][1]:.1f}".ljust(22) if r in cells else "-".ljust(22)
                      for r in RUNTIMES)
        terminalreporter.write_line(f"{scenario:<{width}}  {row}")
