"""The agent as PID 1 of the guest: boot duties, then serve on vsock port 1024 forever.

Every boot step is independent: a failure is logged on the console naming what failed and the
boot goes on. Only a configuration the agent cannot serve with at all (no vsock listener) powers
the VM off, with a message; nothing here ever returns or exits (PID 1 exiting panics the kernel).
"""

import logging
import os
import socket
import time

from vmm_common.portforward import VSOCK_PORT as PORT_FORWARD_PORT
from vmm_task.context import STATE_DIR
from vmm_task.init import cmdline, console, cpu_hotplug, loopback, mounts, signals
from vmm_task.init.power import power_off
from vmm_task.logs import setup_logging

log = logging.getLogger("vmm_task")
VSOCK_ADDRESS = "vsock://1024"
PORT_FORWARD_ADDRESS = f"vsock://{PORT_FORWARD_PORT}"  # the host's CRI port-forward streams
GUEST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "XDG_RUNTIME_DIR": "/run"}


def boot() -> tuple[cmdline.TaskConfig, list[str]]:
    """Mounts, console, command line, cgroups, loopback, shared directory.
    Returns the parsed config and every problem met (already logged)."""
    started = time.clock_gettime(time.CLOCK_BOOTTIME)
    problems = mounts.mount_base()          # /dev first: the console lives there
    problem = console.attach_console()
    problems += [problem] if problem else []
    config = cmdline.read_cmdline()
    setup_logging(config.log_level)
    for problem in problems + config.problems:
        log.error("boot: %s", problem)
    for note in config.notes:
        log.info("boot: %s", note)
    problems += config.problems
    later = mounts.mount_cgroups(config.cgroup)
    later += mounts.mount_shared_dir(config.sharefs_type, STATE_DIR)
    os.environ.update(GUEST_ENV)
    try:
        loopback.bring_up("lo")
    except OSError as e:
        later.append(str(e))
    try:
        socket.sethostname("localhost")
    except OSError as e:
        later.append(f"cannot set the hostname: {e}")
    for problem in later:
        log.error("boot: %s", problem)
    log.info("boot: %r; steps took %.3f s", config,
             time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    return config, problems + later


def run(t_main: float) -> None:
    """Boot and serve; never returns."""
    import asyncio

    try:
        config, problems = boot()
        asyncio.run(_serve(config, problems, t_main))
        reason = "the agent's server stopped"
    except BaseException as e:  # PID 1 must not exit: the only clean way out is power-off
        log.exception("agent failed")
        reason = f"the agent failed: {e!r}"
    power_off(reason)


async def _serve(config: cmdline.TaskConfig, problems: list[str], t_main: float) -> None:
    import asyncio

    from vmm_task import server
    from vmm_task.context import AgentContext
    from vmm_task.events import EventQueue
    from vmm_task.reaper import Reaper

    signals.survive_signals(asyncio.get_running_loop())
    try:
        listener = server.listen(VSOCK_ADDRESS)
    except OSError as e:
        power_off(f"cannot listen on {VSOCK_ADDRESS} (is there a virtio-vsock device?): {e}")
    ctx = AgentContext(reaper=Reaper(), events=EventQueue(), dev_mode=False, debug=config.debug,
                       runtime=server.find_runtime(config.runtime),
                       pod_pause=server.find_program(["pod-pause"]), manage_network=True,
                       boot_problems=problems, sharefs_type=config.sharefs_type, started_boottime=t_main)
    try:
        ctx.cleanups.append(cpu_hotplug.start(asyncio.get_running_loop()))
    except OSError as e:
        ctx.boot_problems.append(f"hot-added vCPUs will not be onlined: {e}")
    if config.debug:
        from vmm_task import debug_console
        try:
            ctx.cleanups.append(debug_console.start(server.listen(debug_console.ADDRESS),
                                                    ctx.reaper, config.debug_shell))
        except OSError as e:
            ctx.boot_problems.append(f"no debug console: cannot listen on "
                                     f"{debug_console.ADDRESS}: {e}")
            log.error("boot: %s", ctx.boot_problems[-1])
    try:
        port_forward = server.listen(PORT_FORWARD_ADDRESS)
    except OSError as e:
        port_forward = None
        ctx.boot_problems.append(f"no port-forwarding: cannot listen on {PORT_FORWARD_ADDRESS}: {e}")
        log.error("boot: %s", ctx.boot_problems[-1])
    if config.preload:
        from vmm_task.init import preload
        preload.import_pod_modules()
    await server.serve(ctx, listener, t_main, port_forward)
