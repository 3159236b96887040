"""QMP's connect (host_sandboxer/vmm/qemu.py): the tries before QEMU listens are quiet, a QMP
failure once connected is still qemu.qmp's logged error. A unix socket plays QEMU's."""
import asyncio
import logging
import socket

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from host_sandboxer.vmm.qemu_fds import connected_unix_socket


def test_connects_once_the_socket_listens_without_logging_the_refused_tries(tmp_path, caplog):
    path = tmp_path / "qmp.sock"

    async def scenario():
        connecting = asyncio.create_task(connected_unix_socket(path))
        await asyncio.sleep(0.05)  # no file yet
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        await asyncio.sleep(0.05)  # bound, not listening: refused
        assert not connecting.done()
        server.listen()
        client = await asyncio.wait_for(connecting, 5)
        assert client.getpeername() == str(path)
        client.close()
        server.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(scenario())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_failed_qmp_handshake_still_logs_and_raises(tmp_path, caplog):
    path = tmp_path / "qmp.sock"

    async def scenario():
        async def hang_up(reader, writer):  # accepts, sends no greeting, closes
            writer.close()

        server = await asyncio.start_unix_server(hang_up, str(path))
        try:
            with pytest.raises(ConnectError):
                await QMPClient("vm").connect(await connected_unix_socket(path))
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
    assert any(r.levelno == logging.ERROR and r.name.startswith("qemu.qmp") and "Failed to establish session"
               in r.getMessage() for r in caplog.records)


def test_a_refused_qmp_command_is_told_in_qemus_words():
    from qemu.qmp import ExecuteError
    from qemu.qmp.message import Message
    from qemu.qmp.models import ErrorResponse
    from host_sandboxer.vmm.qemu import qmp_error
    reply = {"error": {"class": "GenericError", "desc": "State blocked by non-migratable device"}}
    refused = ExecuteError(ErrorResponse(reply), Message({"execute": "migrate"}), Message(reply))
    assert qmp_error(refused) == "State blocked by non-migratable device"
