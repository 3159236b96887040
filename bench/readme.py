"""Put the figures of the last `make bench` into README.md: the table between the
`<!-- figures:begin -->` and `<!-- figures:end -->` markers is replaced by the report's
markdown (build/bench/report.md), so the README shows measured numbers, not typed ones.

    python -m bench.readme [--report build/bench/report.md] [--readme README.md]
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def splice(readme: str, report_md: str) -> str:
    """`readme` with the text between the markers replaced by `report_md` (its own title
    dropped: the README has the section heading)."""
    head, sep, rest = readme.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    body = "\n".join(line for line in report_md.strip().splitlines() if not line.startswith("# "))
    return f"{head}{BEGIN}\n{body.strip()}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=REPO / "build" / "bench" / "report.md")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args(argv)
    try:
        args.readme.write_text(splice(args.readme.read_text(), args.report.read_text()))
    except (OSError, ValueError) as e:
        print(f"bench.readme: {e}", file=sys.stderr)
        return 1
    print(f"bench.readme: {args.readme} figures from {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
