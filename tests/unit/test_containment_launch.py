"""The wrapper a confined helper starts through (containment/launch.py): argv, and what a real
helper started through it is (root: setpriv changes users and capabilities)."""
import asyncio
import os
from pathlib import Path

import pytest

from host_sandboxer.containment.launch import NO_CAPABILITIES, Confinement, wrap
from host_sandboxer.vmm import process
from host_sandboxer.vmm.helper_output import HelperOutput

REPORT = ["sh", "-c", 'echo "$(id -u) $(id -g) $(id -G)"; grep -E "^(CapEff|CapBnd|NoNewPrivs)" /proc/self/status']
CAP_CHOWN, CAP_SYS_ADMIN = 1 << 0, 1 << 21


def test_nothing_to_do_is_no_wrapper():
    assert wrap(["qemu", "-x"], Confinement()) == ["qemu", "-x"]


def test_argv_joins_cgroups_then_setpriv_then_the_helper():
    argv = wrap(["qemu"], Confinement(("/cg/a/cgroup.procs", "/cg/b/cgroup.procs"), user=7, groups=(36,),
                                      capabilities=("chown",), no_new_privs=True, die_with_us=True))
    assert argv[:2] == ["sh", "-c"]
    assert argv[3:7] == ["vmm-join-cgroup", "/cg/a/cgroup.procs", "/cg/b/cgroup.procs", "--"]
    assert argv[7:] == ["setpriv", "--pdeathsig", "KILL", "--reuid=7", "--regid=7", "--groups=36",
                        "--inh-caps=-all", "--bounding-set=-all,+chown", "--no-new-privs", "--", "qemu"]


def _report(confinement: Confinement, tmp_path: Path) -> dict[str, str]:
    async def run():
        output = HelperOutput(tmp_path / "out.log")
        proc = await process.spawn(REPORT, output, confinement=confinement)
        status = await proc.wait()
        return status, output.tail(20)
    status, text = asyncio.run(run())
    assert status == 0, text
    ids, *caps = text.splitlines()
    return {"ids": ids, **{line.split(":")[0]: line.split()[1] for line in caps}}


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv changes users and capabilities as root")
def test_a_helper_of_its_own_user_has_no_capability_and_no_new_privileges(tmp_path):
    seen = _report(Confinement(user=2000000123, capabilities=NO_CAPABILITIES, no_new_privs=True), tmp_path)
    assert seen == {"ids": "2000000123 2000000123 2000000123", "CapEff": "0" * 16, "CapBnd": "0" * 16,
                    "NoNewPrivs": "1"}


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv changes users and capabilities as root")
def test_a_root_helper_keeps_only_the_capabilities_it_is_given(tmp_path):
    seen = _report(Confinement(capabilities=("chown", "sys_admin"), no_new_privs=True), tmp_path)
    assert seen["ids"].split()[:2] == ["0", "0"]
    assert int(seen["CapEff"], 16) == int(seen["CapBnd"], 16) == CAP_CHOWN | CAP_SYS_ADMIN


def test_a_cgroup_that_cannot_be_joined_ends_the_helper_before_it_runs(tmp_path):
    async def run():
        output = HelperOutput(tmp_path / "out.log")
        proc = await process.spawn(["touch", str(tmp_path / "ran")], output,
                                   confinement=Confinement((str(tmp_path / "no-such-cgroup" / "cgroup.procs"),)))
        return await proc.wait(), output.tail()
    status, text = asyncio.run(run())
    assert status == 125 and "vmm-join-cgroup" in text and "no-such-cgroup" in text
    assert not (tmp_path / "ran").exists()
