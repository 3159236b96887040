"""The NAT rule that hands the pod namespace's localhost TCP to the daemon's listener.

In the pod's network namespace (where CRI dials `localhost:PORT` for a port-forward) nothing
listens: the pod's servers run in the VM. One nftables table there redirects every locally
generated TCP connection to 127.0.0.1 to the daemon's one listener, which learns the port asked
for from SO_ORIGINAL_DST. `nft` (Debian package nftables) runs in a child forked by the thread
that entered the namespace, so the rule lands there and nowhere else.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from host_sandboxer.network.errors import NetworkError

TABLE = "vmm_port_forward"
NFT_TIMEOUT_S = 10.0
_SEARCH_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))


def ruleset(listen_port: int) -> str:
    """The table, replacing any earlier one (a restarted daemon listens on a new port) in one
    transaction: declaring the table first makes the delete succeed when there is none."""
    return (f"table ip {TABLE} {{}}\n"
            f"delete table ip {TABLE}\n"
            f"table ip {TABLE} {{\n"
            f"  chain output {{\n"
            f"    type nat hook output priority -100; policy accept;\n"
            f"    ip daddr 127.0.0.1 meta l4proto tcp redirect to :{listen_port}\n"
            f"  }}\n"
            f"}}\n")


def install(listen_port: int) -> None:
    """Redirect localhost TCP of the calling thread's namespace to `listen_port`."""
    nft = shutil.which("nft", path=_SEARCH_PATH)
    if nft is None:
        raise NetworkError("nft not found (the Debian package nftables provides it)")
    _run(nft, ruleset(listen_port))


def remove() -> None:
    """Delete the table from the calling thread's namespace; absent (or no nft: then nothing
    was ever installed) is fine."""
    nft = shutil.which("nft", path=_SEARCH_PATH)
    if nft is not None:
        _run(nft, f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")


def _run(nft: str, script: str) -> None:
    try:
        done = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworkError(f"nft: {e}") from None
    if done.returncode != 0:
        raise NetworkError(f"nft: {' '.join(done.stderr.split())[:500]}")
