"""`python -m bench.kernels`: time components as kernels here and print a table.

With no flags: the attention backends (math, sdpa, flex, flash-attn, xformers) on causal MHA at
sequence lengths 128, 256 and 512, forward — under a minute on a 2-core CPU. Backends that cannot
run here are listed with the reason.

    python -m bench.kernels --component attention --variants mha gqa window --directions forward backward
    python -m bench.kernels --component decode mlp norm moe quantization
    python -m bench.kernels --seq-lens 1024 2048 --device cuda --out results/kernels   # also store the rows
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import hardware
from bench.kernels import SECTIONS, KernelSpec, run_kernels


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--component", nargs="+", choices=list(SECTIONS), default=["attention"])
    p.add_argument("--backends", nargs="+", help="attention backends (default: all registered)")
    p.add_argument("--variants", nargs="+", help="attention: mha gqa mqa window alibi; decode: mha gqa mqa window")
    p.add_argument("--seq-lens", nargs="+", type=int, help="attention sequence lengths")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--kv-heads", type=int, help="key/value heads for gqa")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--directions", nargs="+", choices=["forward", "backward", "forward_backward"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (fixed and recorded)")
    p.add_argument("--min-time", type=float, default=0.1, help="seconds of samples per candidate")
    p.add_argument("--out", help="also store the rows in this results folder's database")
    return p.parse_args(argv)


def spec_from_args(args) -> KernelSpec:
    attention = {k: v for k, v in {
        "backends": args.backends, "variants": args.variants, "seq_lens": args.seq_lens, "batch": args.batch,
        "n_head": args.heads, "n_kv_head": args.kv_heads, "head_dim": args.head_dim, "window": args.window,
        "directions": args.directions}.items() if v is not None}
    sections = {}
    for component in args.component:
        if component == "attention":
            sections["attention"] = attention
        elif component == "decode":
            sections["decode"] = {k: v for k, v in {"variants": args.variants, "batch": args.batch}.items()
                                  if v is not None and not (k == "variants" and "alibi" in v)}
        else:
            sections[component] = {"directions": args.directions} if args.directions and component != "quantization" else {}
    return KernelSpec(**sections, dtype=args.dtype, device=args.device, threads=args.threads, min_time=args.min_time)


def _shape(row: dict) -> str:
    keys = ("batch", "n_head", "n_kv_head", "seq_len", "head_dim", "window", "tokens", "n_embd", "dim",
            "in_features", "out_features", "prompt", "new_tokens")
    return " ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)


def render(rows: list[dict]) -> Table:
    table = Table(title=f"kernels on {escape(hardware.machine_label())}", title_justify="left")
    for column in ("component", "name", "backend", "direction", "shape", "status", "median ms (IQR)",
                   "TFLOP/s", "GB/s", "% peak", "peak mem"):
        table.add_column(column, overflow="fold")
    for r in rows:
        timed = "median_s" in r
        time_cell = f"{1e3 * r['median_s']:.3f} ({1e3 * r['iqr_s']:.3f})" + (" noisy" if r["noisy"] else "") if timed else "-"
        pct = r.get("pct_peak_flops", r.get("pct_peak_bandwidth"))
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        backend = r["backend"] + (f" [{r['kernel']}]" if r.get("kernel") and r["kernel"] not in r["backend"] else "")
        name = r["name"] + (f" {r['phase']}" if r.get("phase") else "")
        table.add_row(r["component"], escape(name), escape(backend), r["direction"], _shape(r), escape(status), time_cell,
                      f"{r['flops_per_s'] / 1e12:.3f}" if "flops_per_s" in r else "-",
                      f"{r['bytes_per_s'] / 1e9:.1f}" if "bytes_per_s" in r else "-",
                      f"{pct:.1f}" if pct is not None else "-",
                      f"{r['peak_memory_bytes'] / 2**20:.1f} MiB" if r.get("peak_memory_bytes") is not None else "-")
    return table


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        spec = spec_from_args(args)
    except ValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = run_kernels(spec)
    console.print(render(rows))
    if args.out:
        from bench.store import Store

        store = Store(args.out)
        store.add_kernels(None, rows, hardware.environment())
        store.close()
        console.print(f"stored {len(rows)} rows in {args.out}/results.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
