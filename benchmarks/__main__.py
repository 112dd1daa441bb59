"""``python -m benchmarks [--quick] [--out FILE] [--only SECTION,...]``: print the tables, write the JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import report
from benchmarks.run import FULL, QUICK, SECTIONS, run

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small corpus and counts: about a minute")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections to run (default: all of {SECTIONS})"
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    config = QUICK if args.quick else FULL
    results = run(config, sections=sections, progress=lambda message: print(f"... {message}", file=sys.stderr))
    results["mode"] = "quick" if args.quick else "full"
    results["targets"] = report.targets(results)
    print(report.render(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
