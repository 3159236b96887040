"""Controller.Status's verbose `info` map, in the form containerd's CRI and crictl read it.

containerd 2.4's CRI returns the map as PodSandboxStatusResponse.info after decoding its "info"
key into its SandboxInfo and writing it back (internal/cri/server/sandbox_status.go,
setUpdatedResources: a value there that is not that JSON fails the whole call). crictl
(cmd/crictl/util.go, outputStatusData) decodes every value starting with "{" as a JSON object
and shows the others as strings with their double quotes trimmed. So structured values are
written as JSON, never as a Python repr, and a plain string that would pass for an object is
written as a JSON string.
"""

import json

CRI_INFO_KEY = "info"  # containerd's SandboxInfo (podsandbox/types/sandbox_info.go)
# containerd's ProcessStatus names for the pod's process (here the VMM): by pod state
_PROCESS_STATUS = {"created": "created", "ready": "running", "stopped": "stopped"}


def info_value(value) -> str:
    """`value` as an info map string that crictl and containerd read back as it was meant."""
    if value is None:
        return ""
    if isinstance(value, str):
        return json.dumps(value) if value.startswith("{") and not _is_json_object(value) else value
    if isinstance(value, (bool, dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def verbose_info(pod) -> dict[str, str]:
    """The pod's boot figures and state, plus containerd's own "info" key (the VMM's pid and
    state where CRI puts the pause process's)."""
    exited = pod.vm_exited.done()
    info = dict(pod.boot_info)
    info.update(state=pod.state, containers=",".join(sorted(pod.containers)),
                exit_status=pod.exit_status if exited else None,
                exit_reason=pod.exit_reason if exited else None, unhealthy=pod.unhealthy)
    info = {key: info_value(value) for key, value in info.items()}
    status = "stopped" if exited else _PROCESS_STATUS.get(pod.state, "unknown")
    info[CRI_INFO_KEY] = json.dumps({"pid": pod.vmm_pid, "processStatus": status})
    return info
