"""Server.register_lazy: a service whose methods load on its first request, over a real socket."""
from google.protobuf import empty_pb2, wrappers_pb2

from tests.unit.test_ttrpc_calls import METHODS, SERVICE, client_of, expect_error, run, serving
from vmm_common import ttrpc


def test_a_lazy_service_loads_once_on_its_first_request():
    loads = []

    def load():
        loads.append(SERVICE)
        return METHODS

    server = ttrpc.Server()
    server.register_lazy(SERVICE, load)

    async def go():
        async with serving(server) as path, client_of(path) as client:
            assert loads == []
            for text in ("one", "two"):
                reply = await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value=text),
                                          wrappers_pb2.StringValue)
                assert reply.value == text
            message = await expect_error(ttrpc.Code.UNIMPLEMENTED, client.call(
                SERVICE, "Nope", empty_pb2.Empty(), empty_pb2.Empty))
            assert message == f"unknown method {SERVICE}/Nope"
            assert loads == [SERVICE]
    run(go())


def test_an_unknown_method_of_a_lazy_service_is_unimplemented_by_name():
    server = ttrpc.Server()
    server.register_lazy(SERVICE, lambda: METHODS)

    async def go():
        async with serving(server) as path, client_of(path) as client:
            message = await expect_error(ttrpc.Code.UNIMPLEMENTED, client.call(
                SERVICE, "Nope", empty_pb2.Empty(), empty_pb2.Empty))
            assert message == f"unknown method {SERVICE}/Nope"
    run(go())


def test_a_failing_loader_answers_internal_and_the_server_keeps_serving():
    attempts = []

    def load():
        attempts.append(1)
        if len(attempts) == 1:
            raise ImportError("No module named 'vmm_common.protos.gone_pb2'")
        return METHODS

    server = ttrpc.Server()
    server.register_lazy(SERVICE, load)
    server.register("test.Other", {"Echo": METHODS["Echo"]})

    async def go():
        async with serving(server) as path, client_of(path) as client:
            message = await expect_error(ttrpc.Code.INTERNAL, client.call(
                SERVICE, "Echo", wrappers_pb2.StringValue(value="x"), wrappers_pb2.StringValue))
            assert message == (f"service {SERVICE} failed to load: "
                               "No module named 'vmm_common.protos.gone_pb2'")
            reply = await client.call("test.Other", "Echo", wrappers_pb2.StringValue(value="up"),
                                      wrappers_pb2.StringValue)
            assert reply.value == "up"
            reply = await client.call(SERVICE, "Echo", wrappers_pb2.StringValue(value="again"),
                                      wrappers_pb2.StringValue)  # loaded on the retry
            assert reply.value == "again"
    run(go())


def test_a_loader_returning_non_methods_is_internal_naming_the_method():
    server = ttrpc.Server()
    server.register_lazy(SERVICE, lambda: {"Echo": print})

    async def go():
        async with serving(server) as path, client_of(path) as client:
            message = await expect_error(ttrpc.Code.INTERNAL, client.call(
                SERVICE, "Echo", wrappers_pb2.StringValue(value="x"), wrappers_pb2.StringValue))
            assert f"{SERVICE}/Echo: use ttrpc.unary()" in message
    run(go())


def test_a_service_name_is_registered_once_lazily_or_not():
    server = ttrpc.Server()
    server.register_lazy(SERVICE, lambda: METHODS)
    for register in (lambda: server.register(SERVICE, METHODS),
                     lambda: server.register_lazy(SERVICE, lambda: METHODS)):
        try:
            register()
        except ValueError as e:
            assert SERVICE in str(e)
        else:
            raise AssertionError("registered twice")
