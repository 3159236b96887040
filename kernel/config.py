"""Kernel config fragments: parse, merge, and check that the final .config kept every request.

Kconfig silently drops an option whose dependencies are not met (olddefconfig); a guest kernel that
quietly lacks vsock or virtiofs only fails at boot, so the build checks every requested option
against the final .config and fails naming each one that did not survive.
"""
from __future__ import annotations

import re
from pathlib import Path

FRAGMENTS_DIR = Path(__file__).resolve().parent / "fragments"

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Map option name -> value ('y', a string/number, or 'n' for '# CONFIG_X is not set')."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _SET.match(line):
            options[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            options[m.group(1)] = "n"
    return options


def fragment_paths(package: str | None = None, directory: Path = FRAGMENTS_DIR) -> list[Path]:
    """Fragments in apply order: the common ones (their names sort by concern: 00-base first),
    each followed by the kernel source package's own of the same name (fragments/<package>/:
    what one kernel version spells differently, e.g. an option another one renamed)."""
    paths = list(directory.glob("*.config"))
    if package is not None:
        paths += (directory / package).glob("*.config")
    return sorted(paths, key=lambda path: (path.name, path.parent != directory))


def all_fragment_paths(directory: Path = FRAGMENTS_DIR) -> list[Path]:
    """Every fragment, common or of any source package (what a build's cache key hashes)."""
    return sorted(directory.rglob("*.config"))


def requested_options(paths: list[Path]) -> dict[str, str]:
    """All fragments merged; a later fragment overrides an earlier one."""
    merged: dict[str, str] = {}
    for path in paths:
        merged.update(parse_config(path.read_text()))
    return merged


def apply_requests(base_config: str, requests: dict[str, str]) -> str:
    """The base .config with each requested option replaced by (or appended as) its request."""
    kept = [line for line in base_config.splitlines()
            if not ((m := _SET.match(line) or _UNSET.match(line)) and m.group(1) in requests)]
    for name, value in requests.items():
        kept.append(f"# {name} is not set" if value == "n" else f"{name}={value}")
    return "\n".join(kept) + "\n"


def missing_options(requests: dict[str, str], final_config: str) -> list[str]:
    """Human-readable lines for each request the final .config does not honour (empty = all kept)."""
    final = parse_config(final_config)
    problems = []
    for name, wanted in sorted(requests.items()):
        got = final.get(name, "n")
        if got != wanted:
            problems.append(f"{name}: requested {wanted}, final .config has {got}")
    return problems
