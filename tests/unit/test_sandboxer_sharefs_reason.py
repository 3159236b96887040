"""The reason a guest gives for an unhealthy shared directory becomes the pod's Status
`unhealthy` and a log line: capped. The guest is a stand-in answering Health/Check (no VM
needed to send what a hostile agent would)."""
import asyncio
import types

from host_sandboxer.sandbox import sharefs_watch
from vmm_common.protos.vmmtask.v1 import health_pb2


class NotServingGuest:
    async def call(self, service, method, request, response_type, timeout=None):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING,
                                              reason="r" * (1 << 20))


def test_a_guests_huge_unhealthy_reason_is_capped(caplog):
    async def scenario():
        exited = asyncio.get_running_loop().create_future()
        pod = types.SimpleNamespace(id="p1", agent=NotServingGuest(), vm=None, unhealthy="",
                                    vm_exited=exited)
        watching = asyncio.create_task(sharefs_watch.watch(pod, 0.01))
        while not pod.unhealthy:
            await asyncio.sleep(0.01)
        exited.set_result(0)
        await asyncio.wait_for(watching, 5)
        return pod.unhealthy

    with caplog.at_level("ERROR"):
        unhealthy = asyncio.run(scenario())
    assert unhealthy.startswith("rrr") and unhealthy.endswith(f"[{(1 << 20) - 1024} more characters cut]")
    assert len(unhealthy) < 1100 and len(caplog.text) < 2000
