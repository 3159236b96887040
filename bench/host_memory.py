"""Where a host process's memory goes (docs/benchmarks.md, "Host memory").

    python -m bench.host_memory PID...              Pss by mapping (anonymous, heap, each file)
    python -m bench.host_memory --imports MODULE... the Python heap each imported module costs
    python -m bench.host_memory --pods N            per pod, with N pods running: Pss by kind
                                                    of mapping of QEMU, virtiofsd and the daemon

By mapping: /proc/PID/smaps summed per name ([anon] is mostly CPython's object arenas, [heap]
is malloc's: large Python objects, gRPC core, upb), the anon/file/shmem split from
smaps_rollup and the thread count. By module: tracemalloc around each module's execution,
its own allocations only (what the modules it imports cost is theirs), largest first.
By kind (--pods): N pods started through the daemon (bench.sandboxer), then each process's
mappings sorted into KINDS and summed over the processes of one executable, over N.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import sys
import time
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


KINDS = ("guest RAM (memfd, shared)", "TCG translation cache (anon rwx)", "anon (malloc arenas, stacks)",
         "[heap] (main malloc arena)", "[stack]", "shared file (pmem root image)", "executable",
         "shared libraries", "other")


def kind(header: list[str], exe: str) -> str:
    """The KINDS entry of one smaps mapping (`header`: range perms offset dev inode [name])."""
    perms, name = header[1], header[5] if len(header) > 5 else ""
    if name.startswith("/memfd:"):
        return KINDS[0]
    if not name:
        return KINDS[1] if perms.startswith("rwx") else KINDS[2]
    if name in ("[heap]", "[stack]"):
        return KINDS[3] if name == "[heap]" else KINDS[4]
    if perms[3] == "s":
        return KINDS[5]
    if name == exe:
        return KINDS[6]
    return KINDS[7] if ".so" in name else KINDS[8]


def by_kind(pid: int) -> collections.Counter:
    """{KINDS entry: Pss kB} of one process."""
    sizes: collections.Counter = collections.Counter()
    exe = os.readlink(f"/proc/{pid}/exe")
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):
                where = kind(fields, exe)
            elif fields[0] == "Pss:":
                sizes[where] += int(fields[1])
    return sizes


def per_pod_by_kind(pods: int) -> dict[str, collections.Counter]:
    """{process: {KINDS entry: Pss kB per pod}} with `pods` pods running (bench.sandboxer):
    each pod's QEMU and virtiofsd, the daemon and its helper processes, all over `pods`."""
    from bench import sandboxer

    bench = sandboxer.Bench()
    try:
        for first in range(0, pods, 5):
            bench.start_pods([f"k{i}" for i in range(first, min(pods, first + 5))])
        time.sleep(2.0)  # as sandboxer.per_pod: the last guests settle
        daemon = bench.daemon.proc.pid
        processes = [("daemon", daemon)] + [
            (exe if exe.startswith(sandboxer.POD_EXES) else f"helper {exe}", pid)
            for exe, pid in sandboxer.children(daemon)]
        table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for name, pid in processes:
            table[name].update(by_kind(pid))
        return {name: collections.Counter({k: round(v / pods) for k, v in kinds.items()})
                for name, kinds in table.items()}
    finally:
        bench.close()


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


def print_kinds(table: dict[str, collections.Counter], pods: int) -> None:
    """A markdown table: one row per KINDS entry, one column per process, kB per pod."""
    names = sorted(table)
    print(f"| kB per pod, {pods} pods | " + " | ".join(names) + " | all |")
    print("|---|" + "---:|" * (len(names) + 1))
    for what in KINDS + ("all",):
        cells = [sum(table[n].values()) if what == "all" else table[n][what] for n in names]
        print(f"| {what} | " + " | ".join(map(str, cells)) + f" | {sum(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imports", action="store_true", help="the arguments are modules, not pids")
    parser.add_argument("--pods", type=int, default=0, help="start this many pods, then by kind")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("targets", nargs="*")
    args = parser.parse_args()
    if args.pods:
        print_kinds(per_pod_by_kind(args.pods), args.pods)
        return
    if not args.targets:
        parser.error("give PIDs, modules with --imports, or --pods N")
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
