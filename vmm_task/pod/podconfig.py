"""Decode SetupSandboxRequest.config: CRI's PodSandboxConfig, as protobuf or as Kuasar's JSON.

Kuasar's host sends `type_url "PodSandboxConfig"` with the config serialised as JSON; ours (and
anything packing the CRI message) sends `runtime.v1.PodSandboxConfig` protobuf bytes, decoded
through a field-compatible subset (`vmmtask/v1/podconfig.proto`). An empty Any means defaults.
"""

from typing import Optional

from vmm_common.userns import IDMapping, UserNamespace

CRI_TYPE = "runtime.v1.PodSandboxConfig"
KUASAR_JSON_TYPE = "PodSandboxConfig"
NAMESPACE_MODE_POD = 0  # runtime.v1.NamespaceMode.POD
_NAMESPACE_MODES = {"POD": 0, "CONTAINER": 1, "NODE": 2, "TARGET": 3}


class PodConfigError(ValueError):
    """The config cannot be decoded; the message says why."""


class PodConfig:
    """What SetupSandbox applies. `share_pid`: the pod's containers share one PID namespace;
    `userns`: the user namespace options (vmm_common/userns.py), None when the config has none."""

    __slots__ = ("hostname", "dns_servers", "dns_searches", "dns_options", "sysctls", "share_pid",
                 "userns")

    def __init__(self, hostname="", dns_servers=(), dns_searches=(), dns_options=(),
                 sysctls: Optional[dict] = None, share_pid=False,
                 userns: Optional[UserNamespace] = None):
        self.hostname = hostname
        self.dns_servers = list(dns_servers)
        self.dns_searches = list(dns_searches)
        self.dns_options = list(dns_options)
        self.sysctls = dict(sysctls or {})
        self.share_pid = share_pid
        self.userns = userns

    @property
    def has_dns(self) -> bool:
        return bool(self.dns_servers or self.dns_searches or self.dns_options)


def decode(type_url: str, value: bytes) -> PodConfig:
    if not type_url and not value:
        return PodConfig()
    if type_url == CRI_TYPE or type_url.endswith("/" + CRI_TYPE):
        return _from_protobuf(value)
    if type_url == KUASAR_JSON_TYPE:
        return _from_json(value)
    raise PodConfigError(f"unsupported sandbox config type {type_url!r} "
                         f"(expected {CRI_TYPE} or {KUASAR_JSON_TYPE})")


def _from_protobuf(value: bytes) -> PodConfig:
    from google.protobuf.message import DecodeError

    from vmm_common.protos.vmmtask.v1 import podconfig_pb2

    config = podconfig_pb2.PodSandboxConfig()
    try:
        config.ParseFromString(value)
    except DecodeError as e:
        raise PodConfigError(f"undecodable {CRI_TYPE}: {e}") from None
    dns, linux = config.dns_config, config.linux
    namespaces = linux.security_context.namespace_options
    userns = None
    if namespaces.HasField("userns_options"):
        options = namespaces.userns_options
        uids, gids = ([IDMapping(m.container_id, m.host_id, m.length) for m in ids]
                      for ids in (options.uids, options.gids))
        userns = UserNamespace(options.mode, uids, gids)
    return PodConfig(hostname=config.hostname, dns_servers=dns.servers, dns_searches=dns.searches,
                     dns_options=dns.options, sysctls=dict(linux.sysctls),
                     share_pid=namespaces.pid == NAMESPACE_MODE_POD, userns=userns)


def _from_json(value: bytes) -> PodConfig:
    """Kuasar's serde JSON; snake_case and protobuf-JSON camelCase names are both accepted."""
    import json

    try:
        config = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise PodConfigError(f"undecodable PodSandboxConfig JSON: {e}") from None
    if not isinstance(config, dict):
        raise PodConfigError("PodSandboxConfig JSON is not an object")
    dns = _get(config, "dns_config", dict)
    linux = _get(config, "linux", dict)
    namespaces = _get(_get(linux, "security_context", dict), "namespace_options", dict)
    sysctls = _get(linux, "sysctls", dict)
    userns = _get(namespaces, "userns_options", dict) if _has(namespaces, "userns_options") else None
    return PodConfig(
        hostname=_get(config, "hostname", str), dns_servers=_strings(dns, "servers"),
        dns_searches=_strings(dns, "searches"), dns_options=_strings(dns, "options"),
        sysctls={str(k): str(v) for k, v in sysctls.items()},
        share_pid=_mode(namespaces, "pid") == NAMESPACE_MODE_POD,
        userns=None if userns is None else UserNamespace(
            _mode(userns, "mode"), _mappings(userns, "uids"), _mappings(userns, "gids")))


def _mode(obj: dict, name: str) -> int:
    """A NamespaceMode by number or by name (absent: POD, proto3's zero)."""
    mode = obj.get(name, NAMESPACE_MODE_POD)
    mode = _NAMESPACE_MODES.get(mode, mode) if isinstance(mode, str) else mode
    if not isinstance(mode, int):
        raise PodConfigError(f"PodSandboxConfig namespace mode {name} is not a mode: {mode!r}")
    return mode


def _mappings(obj: dict, name: str) -> list[IDMapping]:
    mappings = []
    for entry in _get(obj, name, list):
        if not isinstance(entry, dict):
            raise PodConfigError(f"PodSandboxConfig {name} mapping is not an object")
        numbers = [_get(entry, field, int) for field in ("container_id", "host_id", "length")]
        if not all(0 <= n < 2 ** 32 for n in numbers):
            raise PodConfigError(f"PodSandboxConfig {name} mapping {entry} is out of range")
        mappings.append(IDMapping(*numbers))
    return mappings


def _has(obj: dict, snake_name: str) -> bool:
    return obj.get(snake_name, obj.get(_camel(snake_name))) is not None


def _camel(snake_name: str) -> str:
    first, *rest = snake_name.split("_")
    return first + "".join(word.title() for word in rest)


def _get(obj: dict, snake_name: str, kind: type):
    value = obj.get(snake_name, obj.get(_camel(snake_name)))
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise PodConfigError(f"PodSandboxConfig field {snake_name} is not a {kind.__name__}")
    return value


def _strings(obj: dict, name: str) -> list[str]:
    values = _get(obj, name, list)
    if not all(isinstance(v, str) for v in values):
        raise PodConfigError(f"PodSandboxConfig field {name} must hold strings")
    return values
