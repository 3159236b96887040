"""The guest's serial console: read from QEMU over a unix socket into a size-capped log file.

We connect to a socket QEMU serves (rather than QEMU writing a file itself) because the guest
is untrusted: a guest printing without end must not fill the host's disk. QEMU drops what the
guest prints while no one is connected, so a restarted daemon connects again and appends.  The log is a
`CappedLog`: it rotates at `limit` bytes (`console.log` -> `console.log.1`).  Each complete
line is time-stamped on arrival, which gives the boot timeline and lets callers wait for a
marker such as "vmm-task ready" without polling; the last lines are kept for error messages.
"""
from __future__ import annotations

import asyncio
import collections
import re
import time
from dataclasses import dataclass
from pathlib import Path

from host_sandboxer.vmm.capped_log import DEFAULT_LIMIT, CappedLog
from vmm_common.capped_text import capped

MAX_LINE = 4096  # a longer run without newline is cut into lines of this size
TAIL_LINES = 200
_PRINTK_TIME = re.compile(r"^\[\s*(\d+\.\d+)\]")


@dataclass(frozen=True)
class ConsoleLine:
    text: str
    host_time: float  # time.monotonic() when the line arrived
    guest_time: float | None  # printk timestamp ("[    1.234567] ...") if the line has one


class ConsoleLog:
    def __init__(self, log_path: Path, socket_path: Path, limit: int = DEFAULT_LIMIT):
        self.log_path = log_path
        self.socket_path = socket_path
        self.first_output: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._lines: collections.deque[ConsoleLine] = collections.deque(maxlen=TAIL_LINES)
        self._partial = bytearray()
        self._waiters: list[tuple[str, asyncio.Future[ConsoleLine]]] = []
        self._reader_task: asyncio.Task | None = None
        self._log = CappedLog(log_path, limit)

    async def connect(self) -> None:
        """Connect to QEMU's console socket and read it until QEMU goes away."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        self._reader_task = asyncio.create_task(self._read(reader, writer))

    def line_containing(self, needle: str) -> asyncio.Future[ConsoleLine]:
        """A future for the first line containing `needle` (lines already kept count too)."""
        fut = asyncio.get_running_loop().create_future()
        for line in self._lines:
            if needle in line.text:
                fut.set_result(line)
                return fut
        self._waiters.append((needle, fut))
        return fut

    def tail(self, lines: int = 30) -> str:
        """The last `lines` console lines (and any unterminated output) as text, each capped:
        the guest writes them, and error messages and Status quote them."""
        texts = [line.text for line in list(self._lines)[-lines:]]
        if self._partial:
            texts.append(self._partial.decode(errors="replace"))
        return "\n".join(capped(text) for text in texts)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._log.close()
        self.socket_path.unlink(missing_ok=True)
        for _, fut in self._waiters:
            fut.cancel()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                self._take(chunk)
        finally:
            writer.close()

    def _take(self, chunk: bytes) -> None:
        now = time.monotonic()
        if not self.first_output.done():
            self.first_output.set_result(now)
        self._log.write(chunk)
        self._partial += chunk
        while True:
            end = self._partial.find(b"\n")
            if end < 0 and len(self._partial) < MAX_LINE:
                break
            cut = end if 0 <= end < MAX_LINE else MAX_LINE
            raw = bytes(self._partial[:cut])
            del self._partial[:cut + (1 if cut == end else 0)]
            self._add_line(raw.rstrip(b"\r").decode(errors="replace"), now)

    def _add_line(self, text: str, now: float) -> None:
        stamp = _PRINTK_TIME.match(text)
        line = ConsoleLine(text, now, float(stamp.group(1)) if stamp else None)
        self._lines.append(line)
        still = []
        for needle, fut in self._waiters:
            if fut.done():
                continue
            if needle in text:
                fut.set_result(line)
            else:
                still.append((needle, fut))
        self._waiters = still
