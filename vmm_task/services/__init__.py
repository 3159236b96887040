"""The agent's ttrpc services, one module per service.

Listed explicitly (not discovered at run time) so the Nuitka build sees every module it must
compile. A module of `_service_modules` has `register(server, ctx)`; one of `_LAZY_SERVICES` has
`methods(ctx)`, called on the service's first request: the Task service's protos (shim, task
events, runc oci, types) and container code load on the first Task call, not before ready; the
Streaming service's (stdio for `io_type = "streaming"`) on containerd's first stream.
"""


def _service_modules():
    from vmm_task.services import health, sandbox
    return (sandbox, health)


def _task_module():
    from vmm_task.services import task
    return task


def _streaming_module():
    from vmm_task.services import streaming
    return streaming


# service name -> its module's importer (the name is here so registering imports nothing)
_LAZY_SERVICES = {"containerd.task.v2.Task": _task_module,
                  "containerd.services.streaming.v1.Streaming": _streaming_module}


def register_all(server, ctx) -> None:
    """Register every service of the agent on `server` (a vmm_common.ttrpc.Server); their
    names go to `ctx.services` (the health service answers for them)."""
    recorder = _Recorder(server, ctx.services)
    for module in _service_modules():
        module.register(recorder, ctx)
    for service, load_module in _LAZY_SERVICES.items():
        server.register_lazy(service, lambda load_module=load_module: load_module().methods(ctx))
        ctx.services.append(service)


class _Recorder:
    """The server as services see it, noting each registered service name."""

    def __init__(self, server, names: list):
        self._server = server
        self._names = names

    def register(self, service: str, methods: dict) -> None:
        self._server.register(service, methods)
        self._names.append(service)
