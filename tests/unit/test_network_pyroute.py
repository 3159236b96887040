"""host_sandboxer.network.pyroute: the daemon loads pyroute2's IPRoute closure, not the package's
import-everything __init__ (~5 MB of the daemon's PSS), and that still works with the pinned
pyroute2. Each check runs in a fresh interpreter: sys.modules is what is measured."""
from __future__ import annotations

import json
import subprocess
import sys

import pyroute2.config.version

LOAD_PLUMBING = """
import json, sys
from host_sandboxer.network import plumbing
from host_sandboxer.network.pyroute import IPRoute
with IPRoute() as ipr:
    links = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("pyroute2")),
                  "links": links}))
"""


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_the_pinned_pyroute2():
    # the lean load relies on 0.9.7's layout (config.log, iproute.linux); a new version re-measures
    assert pyroute2.config.version.__version__ == "0.9.7"


def test_the_plumbing_loads_iproute_alone_and_it_reads_links():
    loaded = _run(LOAD_PLUMBING)
    assert "lo" in loaded["links"]
    assert "pyroute2.iproute.linux" in loaded["modules"]
    assert [m for m in loaded["modules"] if m.startswith(
        ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.ipset", "pyroute2.plan9",
         "pyroute2.netlink.nl80211", "pyroute2.conntrack"))] == []
    assert len(loaded["modules"]) < 120  # the full package loads ~160 pyroute2 modules


def test_asking_the_package_for_more_loads_all_of_it():
    loaded = _run("""
import json, sys
from host_sandboxer.network import pyroute
import pyroute2
from pyroute2 import NDB, AsyncIPRoute
print(json.dumps({"ndb": NDB.__module__, "async": AsyncIPRoute.__name__,
                  "version": pyroute2.__version__}))
""")
    assert loaded == {"ndb": "pyroute2.ndb.main", "async": "AsyncIPRoute", "version": "0.9.7"}
