"""The agent's ttrpc services, one module per service, each with `register(server, ctx)`.

Listed explicitly (not discovered at run time) so the Nuitka build sees every module it must
compile; a new service adds its module to `_service_modules`.
"""


def _service_modules():
    from vmm_task.services import health, sandbox, task
    return (sandbox, health, task)


def register_all(server, ctx) -> None:
    """Register every service of the agent on `server` (a vmm_common.ttrpc.Server); their
    names go to `ctx.services` (the health service answers for them)."""
    recorder = _Recorder(server, ctx.services)
    for module in _service_modules():
        module.register(recorder, ctx)


class _Recorder:
    """The server as services see it, noting each registered service name."""

    def __init__(self, server, names: list):
        self._server = server
        self._names = names

    def register(self, service: str, methods: dict) -> None:
        self._server.register(service, methods)
        self._names.append(service)
