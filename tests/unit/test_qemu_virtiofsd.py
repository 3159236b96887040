"""virtiofsd (the real one the config's default finds: /usr/lib/qemu/virtiofsd on Debian 12,
/usr/libexec/virtiofsd on Debian 13) started and stopped without a VM, and its failures."""
import asyncio
from pathlib import Path

import pytest

from host_sandboxer.config import SharefsConfig
from host_sandboxer.vmm import process
from host_sandboxer.vmm.virtiofsd import PID_DIR, Virtiofsd, VirtiofsdError

VIRTIOFSD = SharefsConfig().virtiofsd


def daemon(tmp_path: Path, binary: Path = VIRTIOFSD, source: Path | None = None) -> Virtiofsd:
    source = source or tmp_path / "share"
    return Virtiofsd(binary, source, tmp_path / "fs.sock", tmp_path / "virtiofsd.log")


@pytest.mark.skipif(not VIRTIOFSD.is_file(), reason=f"{VIRTIOFSD} absent (make setup installs it)")
def test_start_listens_and_stop_cleans_up(tmp_path):
    (tmp_path / "share").mkdir()
    fsd = daemon(tmp_path)

    async def scenario():
        await fsd.start()
        assert fsd.socket_path.is_socket() and fsd.proc.returncode is None
        pid_file = PID_DIR / (str(fsd.socket_path).replace("/", ".") + ".pid")
        assert pid_file.exists()
        await fsd.stop()
        return pid_file

    pid_file = asyncio.run(scenario())
    assert fsd.proc.returncode is not None
    assert not fsd.socket_path.exists() and not pid_file.exists()


def test_missing_binary_and_source_are_named(tmp_path):
    with pytest.raises(VirtiofsdError, match=f"virtiofsd not found at {tmp_path / 'nope'}"):
        asyncio.run(daemon(tmp_path, binary=tmp_path / "nope").start())
    with pytest.raises(VirtiofsdError, match=f"shared directory {tmp_path / 'absent'} is not a directory"):
        asyncio.run(daemon(tmp_path, source=tmp_path / "absent").start())


@pytest.mark.skipif(not VIRTIOFSD.is_file(), reason=f"{VIRTIOFSD} absent")
def test_virtiofsd_refusing_its_options_is_reported(tmp_path):
    (tmp_path / "share").mkdir()
    fsd = daemon(tmp_path)
    fsd.argv += ["-o", "no-such-option"]
    with pytest.raises(VirtiofsdError, match=r"virtiofsd exited with status \d+: .*no-such-option"):
        asyncio.run(fsd.start())
    assert not fsd.socket_path.exists()


@pytest.mark.skipif(not VIRTIOFSD.is_file(), reason=f"{VIRTIOFSD} absent")
def test_ended_says_how_it_ended_spawned_or_adopted(tmp_path):
    """What the daemon's VM watch awaits: a killed virtiofsd, whether ours or adopted (pidfd)."""
    (tmp_path / "share").mkdir()

    async def scenario():
        ours = daemon(tmp_path)
        await ours.start()
        ended = asyncio.ensure_future(ours.ended())
        await asyncio.sleep(0.1)
        assert not ended.done()
        ours.proc.kill()
        assert await asyncio.wait_for(ended, 5) == "killed by SIGKILL"
        await ours.stop()

        theirs = daemon(tmp_path)
        await theirs.start()
        adopted = daemon(tmp_path)
        assert adopted.adopt(process.identity(theirs.proc))
        ended = asyncio.ensure_future(adopted.ended())
        theirs.proc.kill()
        assert "exit status unknown" in await asyncio.wait_for(ended, 5)
        await theirs.stop()

    asyncio.run(scenario())
