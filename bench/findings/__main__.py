"""``python -m bench.findings``: run the findings suite's specs, then write its table (Markdown,
JSON and an HTML page linking each study's report). See ``bench.findings``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench.findings
from bench import run
from bench.findings import FINDINGS, markdown
from bench.report import suite_rows, write_findings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.findings", description=bench.findings.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", default=str(FINDINGS), help="the folder of finding specs (default ablations/findings)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these specs (file names without .yaml)")
    p.add_argument("--out", default="results/findings", help="results folder; one subfolder per spec")
    p.add_argument("--workers", default="auto", help="processes per study (see python -m bench.run --help)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every study")
    args = p.parse_args(argv)
    specs = sorted(Path(args.specs).glob("*.yaml"))
    if args.only:
        unknown = sorted(set(args.only) - {s.stem for s in specs})
        if unknown:
            print(f"error: --only {unknown[0]}: no such spec in {args.specs}; specs: {', '.join(s.stem for s in specs)}",
                  file=sys.stderr)
            return 2
        specs = [s for s in specs if s.stem in args.only]
    if not specs:
        print(f"error: no specs in {args.specs}", file=sys.stderr)
        return 2
    out = Path(args.out)
    failed = []
    for spec in specs:
        print(f"== {spec.stem} ==", flush=True)
        code = run.main([str(spec), "--out", str(out / spec.stem), "--workers", args.workers,
                         *[f"--set={s}" for s in args.set]])
        if code:
            failed.append(f"{spec.stem} (exit {code})")
    rows = suite_rows(out)
    (out / "findings.md").write_text(markdown(rows) + "\n")
    (out / "findings.json").write_text(json.dumps(rows, indent=2, default=str))
    print(markdown(rows))
    print(f"report: {write_findings(out)}")
    if failed:
        print(f"error: {', '.join(failed)} did not finish cleanly; their rows show what is stored", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
