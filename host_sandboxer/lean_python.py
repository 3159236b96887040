"""The command line of the daemon's lean helper processes (the vsock backend, the task relay).

They need the stdlib and a few modules of this package only: `-S` (no site-packages, no .pth
hooks), `-I` (no PYTHON* variables, no current directory on the path), this package's root put
on the path by hand. Idle PSS 11.7 -> 5.8 MB for the vsock backend (docs/benchmarks.md, "Host
memory"). This module imports nothing heavy: the relay builds its own command to re-exec itself.
"""
import os
import sys

import host_sandboxer

_BOOT = ("import sys; sys.path.insert(0, {root!r}); "
         "from {module} import main; sys.exit(main(sys.argv[1:]))")


def command(module: str, *args: str) -> list[str]:
    """argv running `module.main(args)` in a lean interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(host_sandboxer.__file__)))
    return [sys.executable, "-I", "-S", "-c", _BOOT.format(root=root, module=module), *args]
