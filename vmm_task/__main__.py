"""`vmm-task`: PID 1 of the guest, or `vmm-task --listen unix:///PATH` on a host (dev mode).

As PID 1 (decided by our pid, whatever argv the kernel passed) it boots the guest and serves on
vsock port 1024 for ever. Otherwise it is an ordinary process serving the same services on a unix
socket, still a child-subreaper so containers re-parented to it are reaped by its Reaper.
Only os, sys and time load before the mode is known: every import costs guest boot time.
"""

import os
import sys
import time

T_MAIN = time.clock_gettime(time.CLOCK_BOOTTIME)

USAGE = """\
usage: vmm-task                              (as PID 1 in the guest: boot, serve vsock://1024)
       vmm-task --listen unix:///PATH [options]   (dev mode on a host)
options:
  --listen ADDRESS    unix:///ABSOLUTE/PATH (or vsock://PORT)
  --run-dir DIR       the agent's own runtime files (default: PATH.d beside a unix socket)
  --state-dir DIR     the directory the host shares with the agent (default: the run dir)
  --runtime NAME      crun or runc, or a path (default: the first found on PATH)
  --pod-pause PATH    the pod PID namespace's init (default: pod-pause on PATH; built by
                      `python -m initrd.pod_pause`)
  --log-level LEVEL   error, warn, info, debug or trace (default: info)
  --debug             allow grpc.SandboxService/ExecVMProcess (task.debug in the guest)
  --debug-console ADDRESS  serve Kuasar's debug console there, unix:///PATH (in the guest:
                      vsock://1025 with task.debug)
  --manage-network    allow UpdateInterfaces/UpdateRoutes to change this process's network
                      namespace (run it in one of its own, e.g. unshare --net)
  --port-forward ADDRESS  also serve port-forward streams there (unix:///PATH or vsock://PORT)
  --version
"""
_VALUED = ("--listen", "--run-dir", "--state-dir", "--runtime", "--pod-pause", "--log-level",
           "--port-forward", "--debug-console")


class UsageError(Exception):
    pass


def parse_args(args: list[str]) -> dict:
    """The dev-mode options as a dict keyed like the flags (without "--")."""
    options = {"debug": False, "manage-network": False, "log-level": "info", "runtime": "",
               "pod-pause": "pod-pause"}
    it = iter(args)
    for arg in it:
        flag, has_value, value = arg.partition("=")
        if flag in _VALUED:
            if not has_value:
                value = next(it, None)
                if value is None:
                    raise UsageError(f"{flag} needs a value")
            options[flag[2:]] = value
        elif arg in ("--debug", "--manage-network"):
            options[arg[2:]] = True
        elif arg in ("--help", "-h", "--version"):
            options[arg.lstrip("-")[0]] = True
        else:
            raise UsageError(f"unknown argument {arg!r}")
    return options


def main(argv: list[str] | None = None) -> int:
    if os.getpid() == 1:
        import gc
        gc.disable()  # no collections during the start-up imports; server.serve turns it back on
        from vmm_task.init import pid1
        pid1.run(T_MAIN)  # never returns
    try:
        options = parse_args(sys.argv[1:] if argv is None else list(argv))
    except UsageError as e:
        return _usage_error(str(e))
    if options.get("h"):
        print(USAGE, end="")
        return 0
    if options.get("v"):
        from vmm_task import __version__
        print(f"vmm-task {__version__}")
        return 0
    if "listen" not in options:
        return _usage_error("not PID 1, so --listen is required")
    if "run-dir" not in options and not options["listen"].startswith("unix://"):
        return _usage_error("--run-dir is required with a vsock:// listen address")
    return run_dev(options)


def _usage_error(message: str) -> int:
    print(f"vmm-task: {message}\n{USAGE}", file=sys.stderr, end="")
    return 2


def run_dev(options: dict) -> int:
    """Dev mode: no init duties, same services; SIGTERM/SIGINT stop it cleanly."""
    import asyncio
    import signal

    import prctl

    from vmm_task import server
    from vmm_task.logs import setup_logging

    listeners = {}
    for option in ("listen", "port-forward", "debug-console"):
        address = options.get(option)
        try:
            listeners[option] = server.listen(address) if address else None
        except (OSError, ValueError) as e:
            print(f"vmm-task: cannot listen on {address}: {e}", file=sys.stderr)
            _close(listeners)
            return 1
    setup_logging(options["log-level"])
    prctl.set_child_subreaper(True)
    prctl.set_name("vmm-task")
    run_dir = options.get("run-dir") or options["listen"].removeprefix(server.UNIX_PREFIX) + ".d"
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    ctx = _dev_context(options, run_dir)

    async def serve_until_signalled() -> None:
        if listeners["debug-console"] is not None:
            from vmm_task import debug_console
            ctx.cleanups.append(debug_console.start(listeners["debug-console"], ctx.reaper))
        serving = asyncio.ensure_future(server.serve(ctx, listeners["listen"], T_MAIN,
                                                     listeners["port-forward"]))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, serving.cancel)
        try:
            await serving
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(serve_until_signalled())
    finally:
        _close(listeners)
    return 0


def _close(listeners: dict) -> None:
    """Close the listening sockets, removing the files of unix ones."""
    import socket

    for listener in filter(None, listeners.values()):
        if listener.family == socket.AF_UNIX:
            _unlink(listener.getsockname())
        listener.close()


def _dev_context(options: dict, run_dir: str):
    from vmm_task import server
    from vmm_task.context import AgentContext
    from vmm_task.events import EventQueue
    from vmm_task.reaper import Reaper

    return AgentContext(reaper=Reaper(), events=EventQueue(), dev_mode=True,
                        debug=options["debug"], state_dir=options.get("state-dir") or run_dir,
                        run_dir=run_dir, runtime=server.find_runtime(options["runtime"]),
                        pod_pause=server.find_program([options["pod-pause"]]),
                        manage_network=options["manage-network"],
                        started_boottime=T_MAIN)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    sys.exit(main())
