"""critest, Kubernetes SIG Node's CRI validation suite, on the e2e node (node.py) against each
runtime handler in turn (`runc`, containerd's own, then `vmm`), on the same containerd: a report
of every spec on both, not a pass/fail test (`make critest`; ~3 min for runc, much longer for vmm
whose every pod boots a VM).

    .venv/bin/python tests/e2e/critest_run.py [--runtimes runc vmm] [--out build/critest]
                                              [--focus REGEX] [--guest-image DIR]

Writes <out>/<runtime>.json (ginkgo's report), <out>/<runtime>.log and <out>/report.md (spec x
runtime). The image-service specs are skipped: they test containerd, not a runtime.

With `--check`, the exit status is the verdict CI uses: 1 when a spec that passed on runc did not
pass on vmm and is not among the specs docs/critest.md lists as impossible in a VM.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: leak_guard's names
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))     # the checkout: scripts.demo, as pytest has it

import tools  # noqa: E402
from host_sandboxer.config import DEFAULT_IMAGE_DIR  # noqa: E402
from node import Node, node_environment  # noqa: E402

SKIP = "Image Manager|Image Consistency|Image Identifier|Image Volume"
EXCEPTIONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "critest.md"
EXCEPTIONS_HEADING = "## Specs that cannot pass in a VM"


def run(node: Node, runtime: str, out: Path, focus: str | None) -> dict[str, dict]:
    """Run critest on `runtime`; spec name -> {state, seconds, message}."""
    report = out / f"{runtime}.json"
    argv = [str(tools.upstream("critest")), "--runtime-endpoint", node.endpoint,
            "--image-endpoint", node.endpoint, "--test-images-file", str(node.images_file),
            "--runtime-handler", runtime, "--ginkgo.no-color", "--ginkgo.skip", SKIP,
            f"--ginkgo.json-report={report}"] + (["--ginkgo.focus", focus] if focus else [])
    with open(out / f"{runtime}.log", "wb") as log:
        subprocess.run(node.netns.argv(*argv), stdout=log, stderr=subprocess.STDOUT)
    specs = {}
    for suite in json.loads(report.read_text()):
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join(spec.get("ContainerHierarchyTexts") or []) + " " + spec["LeafNodeText"]
            failure = (spec.get("Failure") or {}).get("Message", "")
            specs[name] = {"state": spec["State"], "seconds": spec.get("RunTime", 0) / 1e9,
                           "message": " ".join(failure.split())[:300]}
    return specs


def markdown(results: dict[str, dict[str, dict]], seconds: dict[str, float]) -> str:
    runtimes = list(results)
    ran = {r: {n: s for n, s in results[r].items() if s["state"] != "skipped"} for r in runtimes}
    lines = ["| runtime | passed | failed | ran | wall time |", "|---|---:|---:|---:|---:|"]
    for r in runtimes:
        passed = sum(s["state"] == "passed" for s in ran[r].values())
        lines.append(f"| {r} | {passed} | {len(ran[r]) - passed} | {len(ran[r])} | {seconds[r]:.0f} s |")
    lines += ["", "| spec | " + " | ".join(runtimes) + " |", "|---|" + "---|" * len(runtimes)]
    for name in sorted(set().union(*(ran[r] for r in runtimes))):
        cells = [f"{ran[r][name]['state']} {ran[r][name]['seconds']:.1f}s" if name in ran[r] else "-"
                 for r in runtimes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Failures:", ""]
    for r in runtimes:
        lines += [f"- {r}: {n}: {s['message']}" for n, s in sorted(ran[r].items()) if s["state"] != "passed"]
    return "\n".join(lines) + "\n"


def documented_exceptions(doc: Path = EXCEPTIONS_DOC) -> set[str]:
    """The spec names (in backticks, one list item each) under EXCEPTIONS_HEADING of `doc`."""
    section = doc.read_text().split(EXCEPTIONS_HEADING, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^- `([^`]+)`", section, re.M))


def regressions(baseline: dict[str, dict], ours: dict[str, dict], allowed: set[str]) -> list[str]:
    """Specs that passed on the baseline and did not pass on ours, less the `allowed` ones."""
    return sorted(name for name, spec in baseline.items()
                  if spec["state"] == "passed" and ours.get(name, {}).get("state") != "passed"
                  and name not in allowed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtimes", nargs="+", default=["runc", "vmm"])
    parser.add_argument("--out", type=Path, default=Path("build/critest"))
    parser.add_argument("--focus", help="only the specs matching this regular expression")
    parser.add_argument("--guest-image", type=Path, default=DEFAULT_IMAGE_DIR,
                        help="directory with the vmm guest's kernel and initrd.img (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="fail when a spec passing on runc does not pass on vmm (docs/critest.md's "
                             "list excepted)")
    args = parser.parse_args()
    # A SIGTERM (CI's time limit) ends the run like Ctrl-C: critest is killed, the node torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if (reason := tools.skip_reason(("critest",))) is not None:
        print(reason, file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results, seconds = {}, {}
    with node_environment(args.guest_image / "kernel", args.guest_image / "initrd.img") as node:
        for runtime in args.runtimes:
            began = time.monotonic()
            results[runtime] = run(node, runtime, args.out, args.focus)
            seconds[runtime] = time.monotonic() - began
            print(f"critest on {runtime}: {sum(s['state'] == 'passed' for s in results[runtime].values())} "
                  f"passed of {sum(s['state'] != 'skipped' for s in results[runtime].values())} "
                  f"in {seconds[runtime]:.0f} s", flush=True)
    (args.out / "report.md").write_text(markdown(results, seconds))
    print(f"critest: {args.out / 'report.md'}")
    if not {"runc", "vmm"} <= results.keys():
        return 0
    allowed = documented_exceptions()
    lost = regressions(results["runc"], results["vmm"], allowed)
    for name in lost:
        print(f"critest: passes on runc, not on vmm: {name}: {results['vmm'].get(name, {}).get('message', 'not run')}")
    for name in sorted(allowed & {n for n, spec in results["vmm"].items() if spec["state"] == "passed"}):
        print(f"critest: listed in docs/critest.md as impossible in a VM, yet passed on vmm: {name}")
    print(f"critest: {len(lost)} spec(s) pass on runc and not on vmm, beyond docs/critest.md's list")
    return 1 if lost and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
