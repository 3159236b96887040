"""VM templates (docs/templates.md): two clones restored from one template are distinct guests
once SetupSandbox ran. Each gets its own vsock CID, shared directory and MAC by hot-plug after
the restore; the agent reseeds the kernel CRNG (without that both clones print the template's
next UUID: measured) and mounts the late share (without that the share's busybox is not there).

The template and restore steps are bench/template_trial.py's, on the daemon's snapshot.py and hotplug.py
(the daemon's own path: tests/vm/test_template_pods.py).
"""
import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from bench import template_trial as trial
from host_sandboxer.config import DEFAULT_IMAGE_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_IMAGE_DIR / "manifest.json").exists(),
                                reason="no guest image (make guest-image)")


async def _template_and_clones(count: int) -> list[dict]:
    config = trial.trial_config(DEFAULT_IMAGE_DIR)
    work = Path(tempfile.mkdtemp(prefix="tmpl-"))  # short: unix socket paths live in it
    template = None
    try:
        template = await trial.make_template(config, work, "copy")
        return [await trial.restore_clone(config, work, template, i, "copy") for i in range(count)]
    finally:
        if template:
            Path(template["ram_file"]).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def test_two_clones_of_one_template_differ_in_random_bytes_cid_share_and_mac():
    first, second = asyncio.run(_template_and_clones(2))
    for index, clone in enumerate((first, second)):
        assert "error" not in clone, clone
        assert clone["setup_sandbox"] == "ok"
        assert clone["share"] == f"clone {index}"  # its own directory, mounted by the agent
        assert clone["nic"] == clone["mac"]
        # The agent answered through a backend that drops every packet whose source CID is not
        # the clone's (host_sandboxer/vsock/device.py): the guest took the hot-plugged CID.
        assert clone["timeline_s"]["agent_answered"] > 0
    assert first["guest_cid"] != second["guest_cid"]
    assert first["mac"] != second["mac"]
    assert first["kernel_uuid_after_setup"] != second["kernel_uuid_after_setup"]
