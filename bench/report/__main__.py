"""`python -m bench.report DIR [DIR ...] [-o FILE] [--json]`: (re)write the HTML report of results
folders, or print their verdicts as one JSON object. A findings suite's folder (``python -m
bench.findings``: one study per subfolder) gives the findings table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.report import suite_folders, summary_json, write_findings, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("folders", nargs="+", help="results folders; several merge with machines side by side")
    parser.add_argument("-o", "--out", help="output file (default: report.html in the first folder)")
    parser.add_argument("--json", action="store_true",
                        help="print the verdicts as one JSON object on stdout (nothing else); write no report")
    args = parser.parse_args(argv)
    try:
        if args.json:
            print(json.dumps(summary_json(args.folders), indent=2))
            return 0
        suite = len(args.folders) == 1 and not Path(args.folders[0], "results.db").exists() and suite_folders(Path(args.folders[0]))
        path = write_findings(args.folders[0], args.out) if suite else write_report(args.folders, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
