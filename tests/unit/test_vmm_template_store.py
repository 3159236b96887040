"""The daemon's template store (host_sandboxer/vmm/template.py): concurrent first pods share one
build, a change of inputs replaces the slot's template, a template of another image is removed,
a failed build fails its waiters and the next pod builds again, a clone's RAM is its own copy.
`build` here writes the files a real build leaves (QEMU's part is tests/vm/test_template_pods.py)."""
import asyncio
import os

import pytest

from host_sandboxer.vmm.template import TemplateError, TemplateStore


def run(coro):
    return asyncio.run(coro)


def store(tmp_path) -> TemplateStore:
    (tmp_path / "shm").mkdir(exist_ok=True)
    return TemplateStore(tmp_path / "state", ram_root=tmp_path / "shm")


def builder(calls: list, fail: bool = False):
    async def build(template):
        calls.append(template.key)
        await asyncio.sleep(0.05)  # the others ask meanwhile
        if fail:
            raise RuntimeError("agent not ready")
        template.ram.write_bytes(b"ram")
        template.state.write_bytes(b"state")
        return {"pid": 1.0}
    return build


def test_concurrent_first_pods_wait_for_one_build_and_later_ones_reuse_it(tmp_path):
    calls = []
    templates = store(tmp_path)

    async def scenario():
        got = await asyncio.gather(*(templates.get("c1-m512-x0", {"argv": ["a"]}, "img", builder(calls))
                                     for _ in range(3)))
        again = await TemplateStore(tmp_path / "state", ram_root=tmp_path / "shm").get(
            "c1-m512-x0", {"argv": ["a"]}, "img", builder(calls))  # a restarted daemon
        return got, again

    got, again = run(scenario())
    assert len(calls) == 1 and len(set(map(repr, got))) == 1 and again == got[0]
    assert again.reported == {"pid": 1.0}  # the template's agent is every clone's
    assert oct(os.stat(templates.ram_dir).st_mode & 0o777) == "0o711"


def test_changed_inputs_replace_the_slot_and_another_image_goes(tmp_path):
    calls, templates = [], store(tmp_path)
    old = run(templates.get("c1-m512-x0", {"argv": ["a"]}, "img1", builder(calls)))
    other_size = run(templates.get("c2-m512-x0", {"argv": ["b"]}, "img1", builder(calls)))
    new = run(templates.get("c1-m512-x0", {"argv": ["a", "task.debug"]}, "img1", builder(calls)))
    assert not old.ram.exists() and new.ram.exists() and other_size.ram.exists()
    newest = run(templates.get("c1-m512-x0", {"argv": ["a"]}, "img2", builder(calls)))
    assert not new.ram.exists() and not other_size.ram.exists() and newest.ram.exists()
    assert sorted(p.name for p in templates.dir.iterdir()) == ["c1-m512-x0"]


def test_a_failed_build_fails_every_waiter_and_leaves_nothing_then_the_next_pod_builds(tmp_path):
    calls, templates = [], store(tmp_path)

    async def both():
        return await asyncio.gather(*(templates.get("s", {"k": 1}, "img", builder(calls, fail=True))
                                      for _ in range(2)), return_exceptions=True)

    assert [str(e) for e in run(both())] == ["agent not ready"] * 2
    assert len(calls) == 1 and list(templates.dir.iterdir()) == [] and list(templates.ram_dir.iterdir()) == []
    assert run(templates.get("s", {"k": 1}, "img", builder(calls))).ram.exists()


def test_a_clone_gets_a_private_copy_of_the_template_ram(tmp_path):
    templates = store(tmp_path)

    async def scenario():
        template = await templates.get("s", {"k": 1}, "img", builder([]))
        return template, await templates.clone_ram(template, "vmm-pod", None)

    template, ram = run(scenario())
    assert ram.read_bytes() == b"ram" and ram != template.ram
    assert oct(os.stat(ram).st_mode & 0o777) == "0o600"


def test_a_build_the_daemon_died_in_is_redone(tmp_path):
    """What a killed daemon leaves of a build: the slot's directory without meta.json, the RAM file."""
    calls, templates = [], store(tmp_path)
    first = run(templates.get("s", {"k": 1}, "img", builder(calls)))
    (first.dir / "meta.json").unlink()
    assert run(templates.get("s", {"k": 1}, "img", builder(calls))).ram.exists() and len(calls) == 2


def test_a_ram_directory_someone_else_made_is_refused(tmp_path):
    """/dev/shm is writable by every user: one could make the directory first, or a link."""
    templates = store(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    templates.ram_dir.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TemplateError, match="not a directory of ours"):
        run(templates.get("s", {"k": 1}, "img", builder([])))
    assert list((tmp_path / "elsewhere").iterdir()) == []
