"""`vmm-sandboxer` entry point: `check [--config FILE]` validates image and host."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from host_sandboxer.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmm-sandboxer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="boot a throwaway VM from the configured image, call the "
                                              "agent's Check, print one JSON line")
    check.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    args = parser.parse_args(argv)
    return _check(args.config)


def _check(config_path: str | None) -> int:
    from host_sandboxer.check import run_check
    from host_sandboxer.vmm.vm import VmError

    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"vmm-sandboxer check: {e}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_check(config))
    except VmError as e:
        print(json.dumps({"ok": False, "failed": e.stage, "error": str(e).splitlines()[0]}), flush=True)
        print(f"vmm-sandboxer check failed ({e.stage}): {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
