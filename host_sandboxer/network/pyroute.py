"""pyroute2's IPRoute and NetlinkError without the package's import-everything __init__.

`import pyroute2` runs pyroute2/__init__.py, which imports every submodule (NDB, IPDB, ipset,
nl80211, wireguard, plan9...): ~300 modules, ~10 MB of the daemon's PSS. The plumbing needs
`pyroute2.iproute.linux` (IPRoute, tc) alone. So the package module is registered from its spec
(with its __path__) without running its __init__, keeping what the guest's cut __init__ keeps
(initrd/nuitka-agent.yml: version and logger); the submodules then import as usual, ~100 of them.
Measured with pyroute2 0.9.7: ~226 modules and ~19 MB PSS for the whole interpreter against
~304 and ~25 MB (docs/networking.md). Python cannot unload modules: once loaded they stay until
the daemon exits, however many networked pods remain.

Anyone asking the package for a name it lacks that is not a submodule (`from pyroute2 import
NDB`) gets the full package: its __init__ runs then, so nothing in the same process breaks.
"""
from __future__ import annotations

import importlib.util
import sys
import types


def _lean_package() -> types.ModuleType:
    spec = importlib.util.find_spec("pyroute2")
    package = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
    sys.modules["pyroute2"] = package
    from pyroute2.config import log
    from pyroute2.config.version import __version__

    package.log, package.__version__ = log, __version__

    def full_package(name: str):
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            raise AttributeError(name)  # a submodule: `from pyroute2 import netns` imports it
        del package.__getattr__  # runs once; the real __init__ defines every public name
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = full_package
    return package


if "pyroute2" not in sys.modules:
    _lean_package()

from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

__all__ = ["IPRoute", "NetlinkError"]
