"""What the guest agent imports, checked on the host with the guest build's source changes applied
(`initrd/antibloat.py` emulates `initrd/nuitka-agent.yml`):

- the build cuts modules off (initrd/agent.py: NOFOLLOW, UNUSED_STDLIB): importing every agent
  module and the pyroute2 closure the agent uses must load none of them (in the guest the import
  would fail at run time);
- PID 1's start-up (everything before the ready line) must not load what waits for first use;
- every change in nuitka-agent.yml must still hit the installed library: a new pyroute2 or
  protobuf release that moved a line would silently undo a cut."""
import functools
import importlib.util
import marshal
import os
import subprocess
import sys
import sysconfig

from initrd import agent, antibloat

EVERY_MODULE = """
import importlib, marshal, pkgutil, sys
from initrd import antibloat
antibloat.install(marshal.loads(sys.stdin.buffer.read()))
import vmm_task, vmm_common
for package in (vmm_task, vmm_common):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("_pb2_grpc"):  # host-side gRPC stubs
            importlib.import_module(module.name)
import pyroute2.iproute  # what vmm_task.netlink imports on the first network call
print(*sorted(sys.modules))
"""

# What vmm_task.init.pid1 does before printing the ready line (boot steps aside).
START_UP = """
import marshal, sys
from initrd import antibloat
antibloat.install(marshal.loads(sys.stdin.buffer.read()))
import asyncio
from vmm_task.init import pid1
from vmm_task import server
from vmm_task.context import AgentContext
from vmm_task.events import EventQueue
from vmm_task.reaper import Reaper
server.build_server(AgentContext(reaper=Reaper(), events=EventQueue(), dev_mode=False))
print(*sorted(sys.modules))
"""

# Loaded on first use, never before ready: pyroute2 (first network call), port-forwarding (the
# host's first port-forward connection), the container code and
# the Task service's protos (first Task call), protobuf's pure-Python backend (never: upb runs),
# ast (inspect's source-code helpers), datetime and calendar (protobuf's datetime conversions),
# typing (annotations only, left unevaluated).
NOT_AT_START_UP = ("pyroute2", "vmm_task.netlink.links", "vmm_task.netlink.routes",
                   "vmm_task.portforward", "vmm_common.splice", "vmm_task.debug_console",
                   "vmm_task.container", "vmm_task.kuasar", "vmm_task.services.task",
                   "vmm_task.services.streaming",
                   "vmm_task.pod.setup",
                   "vmm_common.protos.containerd.task", "google.protobuf.internal.python_message",
                   "json", "pathlib", "dataclasses", "ipaddress", "ast",
                   "datetime", "calendar", "typing")


@functools.cache
def _run(probe: str) -> str:
    """The output of `probe` run with the guest's source changes and like the guest's interpreter:
    no site (`-S`, as the build's no_site flag), so nothing but the probe's own imports loads."""
    changes = marshal.dumps(antibloat.load_changes())  # marshal: the probe loads no json
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    return subprocess.run([sys.executable, "-S", "-c", probe], cwd=agent.REPO, env=env,
                          check=True, input=changes, capture_output=True).stdout.decode()


def _loaded(probe: str) -> list[str]:
    return _run(probe).split()


def _matching(modules: list[str], names) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_no_agent_module_imports_what_the_build_leaves_out():
    loaded = _loaded(EVERY_MODULE)
    assert "pyroute2.iproute.linux" in loaded and "vmm_task.server" in loaded
    # asyncio.base_events tries `import ssl` and goes on without it, as it does in the guest
    cut = set(agent.NOFOLLOW + agent.UNUSED_STDLIB) - {"ssl", "_ssl"}
    assert _matching(loaded, cut) == []


def test_the_guest_pyroute2_package_imports_only_what_the_agent_uses():
    loaded = _loaded(EVERY_MODULE)
    # the package's eager imports (NDB, IPDB, ipset, wireguard, plan9...) are gone in the guest
    assert _matching(loaded, ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.ipset",
                              "pyroute2.plan9", "pyroute2.netlink.nl80211")) == []


def test_start_up_defers_what_waits_for_first_use():
    loaded = _loaded(START_UP)
    assert "vmm_task.services.sandbox" in loaded and "vmm_common.ttrpc.server" in loaded
    assert _matching(loaded, NOT_AT_START_UP) == []


# task.preload (a VM template's agent): PID 1's start-up, then the preload.
PRELOADED = START_UP.replace("print(*sorted(sys.modules))", """
from vmm_task.init import preload
preload.import_pod_modules()
print(*sorted(sys.modules))
""")


def test_preload_imports_what_a_pod_would_on_first_use():
    """What a VM template's clone would otherwise import during its pod's start (network,
    SetupSandbox, the Task service, port-forwarding) is loaded by task.preload; the rest of what
    waits for first use (the debug console, splice, protobuf's Python backend) still waits."""
    loaded = _loaded(PRELOADED)
    pod_modules = ("pyroute2.iproute", "vmm_task.netlink.links", "vmm_task.netlink.routes",
                   "vmm_task.pod.setup", "vmm_task.pod.entropy", "vmm_task.services.task",
                   "vmm_task.container.runtime", "vmm_task.container.table", "vmm_task.kuasar.storages",
                   "vmm_task.services.streaming", "vmm_task.portforward",
                   "vmm_common.protos.containerd.task.v2.shim_pb2", "vmm_common.protos.vmmtask.v1.podconfig_pb2")
    assert [m for m in pod_modules if m not in loaded] == []
    assert _matching(loaded, ("vmm_task.debug_console", "google.protobuf.internal.python_message")) == []


def test_every_guest_source_change_still_applies():
    for module, changes in antibloat.load_changes().items():
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin.endswith(".py"), module
        source = spec.loader.get_source(module)
        for change in changes:
            for old in change.get("replacements_plain") or {}:
                assert old in source, f"{module}: {old!r} no longer in its source"
            assert antibloat.apply(source, [change]) != source, f"{module}: changes nothing"


GUEST_INSPECT = """
import marshal, sys
from initrd import antibloat
antibloat.install(marshal.loads(sys.stdin.buffer.read()))
import inspect
print("ast" in sys.modules)
print(inspect.signature(divmod))  # a text signature: parsed with ast
print(inspect.getsource(antibloat.apply).splitlines()[0])
print(inspect.getsource(inspect.BlockFinder).splitlines()[0])  # a class: found by an ast visitor
"""


def test_the_guest_inspect_loads_ast_on_first_use_and_still_reads_source():
    assert _run(GUEST_INSPECT).splitlines() == [
        "False", "(x, y, /)", "def apply(source: str, changes: list[dict]) -> str:",
        "class BlockFinder:"]


GUEST_TIMESTAMPS = """
import marshal, sys
from initrd import antibloat
antibloat.install(marshal.loads(sys.stdin.buffer.read()))
from google.protobuf import duration_pb2, timestamp_pb2
print("datetime" in sys.modules, "calendar" in sys.modules)
import datetime
stamp = timestamp_pb2.Timestamp()
stamp.FromDatetime(datetime.datetime(2026, 11, 24, 7, 0, 1, 250000))
print(stamp.seconds, stamp.nanos, stamp.ToDatetime().isoformat())
print(stamp.ToDatetime(tzinfo=datetime.timezone.utc).isoformat())
print(duration_pb2.Duration(seconds=90).ToTimedelta())
"""


def test_the_guest_protobuf_loads_datetime_on_first_conversion_and_still_converts():
    assert _run(GUEST_TIMESTAMPS).splitlines() == [
        "False False", "1795503601 250000000 2026-11-24T07:00:01.250000",
        "2026-11-24T07:00:01.250000+00:00", "0:01:30"]
