"""PID 1 must survive every signal a user or the kernel may send it.

The kernel already drops signals to PID 1 that have no handler, but a handler (here: a log line)
documents that they arrived. Children get default dispositions back (see Reaper.spawn).
"""

import asyncio
import logging
import signal

log = logging.getLogger(__name__)
SURVIVED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def survive_signals(loop: asyncio.AbstractEventLoop) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed peer is an EPIPE error, not death
    for signum in SURVIVED:
        loop.add_signal_handler(signum, _ignored, signum)


def _ignored(signum: int) -> None:
    log.warning("received %s: PID 1 keeps running", signal.Signals(signum).name)
