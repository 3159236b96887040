"""The agent build cuts modules off (initrd/agent.py: NOFOLLOW, UNUSED_STDLIB): an import of
one of them in the guest would fail at run time. Importing every agent module (and pyroute2, which
the agent imports lazily) on the host must load none of them."""
import json
import subprocess
import sys

from initrd import agent

PROBE = """
import importlib, json, pkgutil, sys
import vmm_task, vmm_common
for package in (vmm_task, vmm_common):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("_pb2_grpc"):  # host-side gRPC stubs
            importlib.import_module(module.name)
from pyroute2 import AsyncIPRoute
print(json.dumps(sorted(sys.modules)))
"""


def test_no_agent_module_imports_what_the_build_leaves_out():
    loaded = json.loads(subprocess.run([sys.executable, "-c", PROBE], cwd=agent.REPO, check=True,
                                       capture_output=True, text=True).stdout)
    assert "pyroute2.iproute" in loaded and "vmm_task.server" in loaded
    # pyroute2 imports these three at module level; the build neutralises exactly those imports.
    allowed = {"ssl", "_ssl", "unittest", "sqlite3", "_sqlite3"}
    cut = set(agent.NOFOLLOW + agent.UNUSED_STDLIB) - allowed
    offending = sorted(m for m in loaded if any(m == c or m.startswith(c + ".") for c in cut))
    assert offending == []
