"""What a handler knows about its call: names, metadata, deadline."""
import asyncio
from collections.abc import Callable, Iterable, Mapping

from vmm_common.protos.ttrpc.request_pb2 import KeyValue

Metadata = Mapping[str, str | Iterable[str]]


def encode_metadata(metadata: Metadata | None) -> list[KeyValue]:
    """{"k": "v", "k2": ["a", "b"]} -> the Request's repeated KeyValue."""
    pairs = []
    for key, value in (metadata or {}).items():
        values = [value] if isinstance(value, str) else list(value)
        pairs.extend(KeyValue(key=key, value=v) for v in values)
    return pairs


def decode_metadata(pairs: Iterable[KeyValue]) -> dict[str, list[str]]:
    metadata: dict[str, list[str]] = {}
    for kv in pairs:
        metadata.setdefault(kv.key, []).append(kv.value)
    return metadata


class CallContext:
    """A plain class, not a dataclass: @dataclass compiles source at import, slow in the guest."""
    __slots__ = ("service", "method", "metadata", "deadline", "undelivered")

    def __init__(self, service: str, method: str, metadata: dict[str, list[str]] | None = None,
                 deadline: float | None = None):
        self.service = service
        self.method = method
        self.metadata = {} if metadata is None else metadata
        # Event-loop time (loop.time()) by which the caller wants an answer; None: no limit.
        self.deadline = deadline
        # Callbacks run if the handler's answer never reaches the client (the call was
        # cancelled, timed out or the connection broke): a handler that consumed something
        # (GetEvents took an event) registers one to give it back.
        self.undelivered: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"CallContext({self.service}/{self.method}, deadline={self.deadline})"

    def get(self, key: str) -> str | None:
        """First metadata value for `key` (e.g. "containerd-namespace")."""
        values = self.metadata.get(key)
        return values[0] if values else None

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())
