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
    __slots__ = ("sharefs_type", "log_level", "debug", "cgroup", "runtime", "problems")

    def __init__(self):
        self.sharefs_type = "virtiofs"
        self.log_level = "info"
        self.debug = False
        self.cgroup = "v2"
        self.runtime = ""  # empty: the first of RUNTIMES found in the image
        self.problems: list[str] = []

    def __repr__(self):
        return (f"TaskConfig(sharefs_type={self.sharefs_type}, log_level={self.log_level}, "
                f"debug={self.debug}, cgroup={self.cgroup}, runtime={self.runtime or 'auto'})")


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
        if key == "debug":
            if value in _TRUE or not has_value:
                config.debug = True
            elif value in _FALSE:
                config.debug = False
            else:
                config.problems.append(f"bad value task.debug={value!r} (expected a boolean)")
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
