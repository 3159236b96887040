"""`vmm-sandboxer` entry point: `--listen SOCKET --dir STATE_DIR [--config FILE]` serves
containerd's Sandbox API; `check [--config FILE]` validates image and host."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from host_sandboxer.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmm-sandboxer", description=__doc__)
    parser.add_argument("--listen", help="serve the Controller on this unix socket (created 0600)")
    parser.add_argument("--dir", help="state directory (created 0700)")
    parser.add_argument("--config", dest="serve_config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("check", help="boot a throwaway VM from the configured image, call the "
                                              "agent's Check, print one JSON line")
    check.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.config or args.serve_config)  # `--config F check` or `check --config F`
    if not (args.listen and args.dir):
        parser.error("serving needs --listen SOCKET and --dir STATE_DIR (or the `check` command)")
    return _serve(args)


def _serve(args) -> int:
    import logging
    from pathlib import Path

    from host_sandboxer.daemon import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.serve_config)
    except ConfigError as e:
        print(f"vmm-sandboxer: {e}", file=sys.stderr)
        return 2
    from host_sandboxer.containment.cgroups import CgroupError
    try:
        asyncio.run(serve(Path(args.listen).absolute(), Path(args.dir).absolute(), config))
    except CgroupError as e:
        print(f"vmm-sandboxer: {e}", file=sys.stderr)
        return 2
    return 0


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
