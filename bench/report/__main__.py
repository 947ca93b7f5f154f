"""`python -m bench.report DIR [DIR ...] [-o FILE]`: (re)write the HTML report of results folders."""

from __future__ import annotations

import argparse
import sys

from bench.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("folders", nargs="+", help="results folders; several merge with machines side by side")
    parser.add_argument("-o", "--out", help="output file (default: report.html in the first folder)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.folders, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
