"""Where a host process's memory goes (docs/benchmarks.md, "Host memory").

    python -m bench.host_memory PID...              Pss by mapping (anonymous, heap, each file)
    python -m bench.host_memory --imports MODULE... the Python heap each imported module costs

By mapping: /proc/PID/smaps summed per name ([anon] is mostly CPython's object arenas, [heap]
is malloc's: large Python objects, gRPC core, upb), the anon/file/shmem split from
smaps_rollup and the thread count. By module: tracemalloc around each module's execution,
its own allocations only (what the modules it imports cost is theirs), largest first.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import sys
import tracemalloc


def by_mapping(pid: int) -> tuple[collections.Counter, dict]:
    """({mapping name: Pss kB}, {Pss, Pss_Anon, Pss_File, Pss_Shmem from smaps_rollup})."""
    sizes: collections.Counter = collections.Counter()
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [name]
                name = fields[5] if len(fields) > 5 else "[anon]"
            elif fields[0] == "Pss:":
                sizes[name] += int(fields[1])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        rollup = {k.rstrip(":"): int(v) for k, v, *_ in (line.split() for line in f)
                  if k in ("Pss:", "Pss_Anon:", "Pss_File:", "Pss_Shmem:")}
    return sizes, rollup


def by_module(modules: list[str]) -> collections.Counter:
    """{module: kB of Python heap its own execution left allocated}, importing `modules`."""
    own: collections.Counter = collections.Counter()
    nested: list[int] = []

    class Timed:
        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            nested.append(0)
            before = tracemalloc.get_traced_memory()[0]
            try:
                self.loader.exec_module(module)
            finally:
                total = tracemalloc.get_traced_memory()[0] - before
                own[module.__name__] += (total - nested.pop()) // 1024
                if nested:
                    nested[-1] += total

    class Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            for finder in sys.meta_path[1:]:
                spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    if hasattr(spec.loader, "exec_module"):
                        spec.loader = Timed(spec.loader)
                    return spec
            return None

    tracemalloc.start()
    sys.meta_path.insert(0, Finder)
    try:
        for module in modules:
            importlib.import_module(module)
        own["(total traced)"] = tracemalloc.get_traced_memory()[0] // 1024
    finally:
        sys.meta_path.remove(Finder)
        tracemalloc.stop()
    return own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imports", action="store_true", help="the arguments are modules, not pids")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("targets", nargs="+")
    args = parser.parse_args()
    if args.imports:
        for module, kb in by_module(args.targets).most_common(args.top):
            print(f"{kb:8d} kB  {module}")
        return
    for pid in args.targets:
        sizes, rollup = by_mapping(int(pid))
        threads = len(os.listdir(f"/proc/{pid}/task"))
        print(f"pid {pid}: " + "  ".join(f"{k} {v} kB" for k, v in rollup.items()) + f"  threads {threads}")
        for name, kb in sizes.most_common(args.top):
            print(f"{kb:8d} kB  {name}")


if __name__ == "__main__":
    main()
