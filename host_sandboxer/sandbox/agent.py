"""The daemon's link to one pod's agent: a single ttrpc connection on vsock port 1024.

ttrpc multiplexes calls, so one connection carries every call of the pod (including the
long-held Waits and GetEvents). If the connection breaks while the VM lives it is redialled
on the next call; calls in flight fail with ConnectionError and their callers decide.
"""

import asyncio
import logging

from vmm_common import ttrpc

log = logging.getLogger(__name__)


class AgentLink:
    def __init__(self, open_connection, pod_id: str, client=None):
        """`open_connection()` returns (reader, writer) to the agent's port; `client`: a ttrpc
        client already connected to it (a restored VM's: vmm/clone.py), used until it breaks."""
        self._open = open_connection
        self._pod_id = pod_id
        self._client = client
        self._lock = asyncio.Lock()

    async def _connected(self):
        async with self._lock:
            if self._client is None or self._client.closed:
                reader, writer = await self._open()
                self._client = ttrpc.Client(reader, writer)
            return self._client

    async def call(self, service: str, method: str, request, response_type, timeout: float | None = 30.0):
        try:
            client = await self._connected()
        except (ConnectionError, OSError) as exc:
            raise ConnectionError(f"pod {self._pod_id}: cannot reach the agent: {exc}") from exc
        try:
            return await client.call(service, method, request, response_type, timeout=timeout)
        except ttrpc.RpcError as exc:
            if not client.closed:
                raise  # the agent's answer
            await self._drop(client)
            raise ConnectionError(f"pod {self._pod_id}: link to the agent lost during {method}: "
                                  f"{exc.message}") from exc

    async def _drop(self, client) -> None:
        async with self._lock:
            if self._client is client:
                self._client = None
        await client.close()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
