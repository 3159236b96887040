"""The guest build's source changes (`initrd/nuitka-agent.yml`, Nuitka anti-bloat) applied on the
host, so host-side checks import what the guest really imports.

`install(load_changes())` puts an import hook first on `sys.meta_path` that loads each module the
file names from its source with the file's changes (`module_code`, `replacements_plain`): e.g. the
guest's `pyroute2` package without its eager imports. Used by tests/unit/test_initrd_agent_imports.py,
whose probes count every module loaded: so this module imports nothing at module level beyond what
the interpreter has already loaded, and `load_changes` (YAML) runs outside the probe.
"""
import importlib.machinery
import sys


def load_changes() -> dict[str, list[dict]]:
    """module name -> its anti-bloat entries, as Nuitka reads them."""
    from nuitka.utils.Yaml import getYamlPackage  # Nuitka's own YAML (the build tool's)

    from initrd.agent import PACKAGE_CONFIG

    entries = getYamlPackage().safe_load(PACKAGE_CONFIG.read_text())
    return {entry["module-name"]: entry["anti-bloat"] for entry in entries}


def apply(source: str, changes: list[dict]) -> str:
    """`source` as the guest build compiles it."""
    for change in changes:
        unknown = set(change) - {"description", "module_code", "replacements_plain"}
        if unknown:
            raise ValueError(f"anti-bloat keys this emulation does not know: {sorted(unknown)}")
        if "module_code" in change:
            source = change["module_code"]
        for old, new in (change.get("replacements_plain") or {}).items():
            source = source.replace(old, new)
    return source


class _ChangedSourceLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, changes: list[dict]):
        super().__init__(fullname, path)
        self._changes = changes

    def get_code(self, fullname):  # never the cached bytecode of the unchanged source
        source = apply(self.get_source(fullname), self._changes)
        return compile(source, self.path, "exec", dont_inherit=True)


class _GuestSourceFinder:  # a sys.meta_path finder (importlib.abc would load importlib.resources)
    def __init__(self, changes: dict[str, list[dict]]):
        self._changes = changes

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._changes:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return None
        spec.loader = _ChangedSourceLoader(fullname, spec.origin, self._changes[fullname])
        return spec


def install(changes: dict[str, list[dict]]) -> None:
    """From now on, the modules `changes` names (`load_changes()`) import as the guest has them."""
    sys.meta_path.insert(0, _GuestSourceFinder(changes))
