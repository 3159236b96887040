"""The agent's `task.*` kernel command line parameters (Kuasar's names).

A bad or unknown `task.*` value never stops the boot: it is recorded in `TaskConfig.problems`
(the agent logs each one on the console) and the default is kept.
"""

SHAREFS_TYPES = ("virtiofs", "9p", "none")
LOG_LEVELS = ("error", "warn", "info", "debug", "trace")
CGROUP_MODES = ("v2", "v1", "hybrid")  # hybrid: v1 controllers + v2 at /sys/fs/cgroup/unified
RUNTIMES = ("crun", "runc")
_TRUE = ("", "1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class TaskConfig:
    """`debug`: ExecVMProcess allowed and the debug console served (vmm_task.debug_console);
    `debug_shell`: its shell (empty: the image's). `enable_tracing` is Kuasar's switch for its
    OpenTelemetry spans: accepted, but this agent records none (a note says so). `preload` (ours,
    given to a VM template's guest only): import before ready what a pod's start would import
    (vmm_task.init.preload), so that every clone of the template inherits it."""

    __slots__ = ("sharefs_type", "log_level", "debug", "debug_shell", "enable_tracing", "preload",
                 "cgroup", "runtime", "problems", "notes")

    def __init__(self):
        self.sharefs_type = "virtiofs"
        self.log_level = "info"
        self.debug = False
        self.debug_shell = ""
        self.enable_tracing = False
        self.preload = False
        self.cgroup = "v2"
        self.runtime = ""  # empty: the first of RUNTIMES found in the image
        self.problems: list[str] = []
        self.notes: list[str] = []  # accepted settings worth a line on the console

    def __repr__(self):
        return (f"TaskConfig(sharefs_type={self.sharefs_type}, log_level={self.log_level}, "
                f"debug={self.debug}, cgroup={self.cgroup}, runtime={self.runtime or 'auto'}"
                f"{', preload' if self.preload else ''})")


def split_cmdline(text: str) -> list[str]:
    """Split like the kernel does: whitespace separates, double quotes group (and are dropped)."""
    words, current, quoted, in_word = [], [], False, False
    for ch in text:
        if ch == '"':
            quoted, in_word = not quoted, True
        elif ch.isspace() and not quoted:
            if in_word:
                words.append("".join(current))
            current, in_word = [], False
        else:
            current.append(ch)
            in_word = True
    if in_word:
        words.append("".join(current))
    return words


def _boolean(config: TaskConfig, key: str, value: str, has_value: bool) -> bool | None:
    if value in _TRUE or not has_value:
        return True
    if value in _FALSE:
        return False
    config.problems.append(f"bad value task.{key}={value!r} (expected a boolean)")
    return None


def _choice(config: TaskConfig, key: str, value: str, allowed: tuple) -> str | None:
    if value in allowed:
        return value
    config.problems.append(f"bad value task.{key}={value!r} (expected one of {', '.join(allowed)})")
    return None


def parse_cmdline(text: str) -> TaskConfig:
    config = TaskConfig()
    for word in split_cmdline(text):
        if word == "--":
            break  # what follows is init's argv, not kernel parameters
        if not word.startswith("task."):
            continue
        key, has_value, value = word[len("task."):].partition("=")
        if key in ("debug", "enable_tracing", "preload"):
            flag = _boolean(config, key, value, has_value)
            if flag is not None:
                setattr(config, key, flag)
        elif key == "debug_shell":
            if value.startswith("/"):
                config.debug_shell = value
            else:
                config.problems.append(f"bad value task.debug_shell={value!r} (expected an "
                                       "absolute path)")
        elif key == "sharefs_type":
            config.sharefs_type = _choice(config, key, value, SHAREFS_TYPES) or config.sharefs_type
        elif key == "log_level":
            config.log_level = _choice(config, key, value.lower(), LOG_LEVELS) or config.log_level
        elif key == "cgroup":
            config.cgroup = _choice(config, key, value, CGROUP_MODES) or config.cgroup
        elif key == "runtime":
            config.runtime = _choice(config, key, value, RUNTIMES) or config.runtime
        else:
            config.problems.append(f"unknown parameter task.{key} (ignored)")
    if config.enable_tracing:
        config.notes.append("task.enable_tracing: this agent records no traces (Kuasar's "
                            "OpenTelemetry spans are not implemented)")
    return config


def read_cmdline(path: str = "/proc/cmdline") -> TaskConfig:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        config = TaskConfig()
        config.problems.append(f"cannot read {path}: {e.strerror}; using defaults")
        return config
    return parse_cmdline(text)
