"""The resident vmm-sandboxer process: one asyncio loop serving the Controller for all pods.

`serve()` listens on the Controller socket (0600), recovers the pods recorded in the state dir
(the Controller answers once that is done), publishes events to containerd when an address is configured, and runs until
SIGTERM/SIGINT. Leaving does not stop pods: containerd may restart its runtime at any time, and
their VMs run on (QEMU, virtiofsd and the vsock backend are not tied to the daemon's life); a
new daemon on the same STATE_DIR takes them over, and their mounts, in the pods' mount
namespace of the state dir (host_sandboxer/mountns), pinned while pods are left.
"""

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

from host_sandboxer.controller import Controller
from host_sandboxer.events import EventPublisher
from host_sandboxer.mountns.space import Pinned
from host_sandboxer.sandbox.manager import Sandboxes
from host_sandboxer.sandbox.statedir import StateDir
from vmm_common.protos.containerd.services.sandbox.v1 import sandbox_pb2_grpc

log = logging.getLogger(__name__)


def watch_children_with_pidfds() -> None:
    """Python 3.11's default child watcher is a thread per child blocked in waitpid: two per
    pod (QEMU, virtiofsd), each with its stack and malloc arena. A pidfd in the event loop
    needs no thread (3.12 does this by itself)."""
    if sys.version_info < (3, 12):
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)


class AfterRecovery(grpc.aio.ServerInterceptor):
    """Holds each Controller call until the pods are recovered. The socket is there from the
    start: containerd dials a missing socket again only until its connect deadline, and a
    restart under load (imports, then up to RECOVERY_WAIT_S of takeover) could outlast it, after
    which its sandbox calls fail until its next attempt; a call answered before recovery would
    find the pod unknown."""

    def __init__(self, recovered: asyncio.Event):
        self.recovered = recovered

    async def intercept_service(self, continuation, handler_call_details):
        await self.recovered.wait()
        return await continuation(handler_call_details)


async def serve(listen: Path, state_dir: Path, config) -> None:
    watch_children_with_pidfds()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    publisher = EventPublisher(config.containerd.address or None)
    publisher.start()
    state = StateDir(state_dir)
    state.mount_space = Pinned(state.root)  # the pods' mounts, out of the host's mount table
    sandboxes = Sandboxes(state, config, publisher)
    recovered = asyncio.Event()
    server = grpc.aio.server(interceptors=[AfterRecovery(recovered)])
    sandbox_pb2_grpc.add_ControllerServicer_to_server(Controller(sandboxes), server)
    listen.parent.mkdir(parents=True, exist_ok=True)
    listen.unlink(missing_ok=True)
    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly open to others
    try:
        server.add_insecure_port(f"unix://{listen}")
        await server.start()
    finally:
        os.umask(old_umask)
    await sandboxes.recover()
    recovered.set()
    log.info("vmm-sandboxer listening on %s, state in %s, %d pod(s) recovered",
             listen, state_dir, len(sandboxes.pods))
    await stop.wait()
    log.info("vmm-sandboxer stopping (pods are left running)")
    await server.stop(2.0)
    await sandboxes.close()
    await publisher.close()
    listen.unlink(missing_ok=True)
    if not sandboxes.pods:  # else their mounts stay, for the next daemon
        state.mount_space.release()
    # Leave without asyncio's teardown: it closes the subprocess transports still open, and a
    # transport closed while its child runs kills the child (asyncio base_subprocess close()),
    # which would take every pod's QEMU and virtiofsd down with a graceful stop.
    logging.shutdown()
    os._exit(0)
