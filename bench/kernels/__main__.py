"""`python -m bench.kernels`: time components as kernels here and print a table.

With no flags: every registered attention (plugins included) with every registered backend it can
take, causal, at sequence lengths 128, 256 and 512, forward. Backends that cannot run here, or cannot
do what a variant needs, are listed with the reason. A variant is a registered attention name or a
YAML mapping of one with options, and may name its positional encoding (default: none; decode: rope).

    python -m bench.kernels --variants mha --backends math sdpa flex
    python -m bench.kernels --variants mha gqa window '{name: mha, positional: alibi}' --directions forward backward
    python -m bench.kernels --component decode mlp norm moe quantization
    python -m bench.kernels --component decode --variants mha gla --contexts 256 1024 4096 8192 --n-layer 2
    python -m bench.kernels --component mlp norm --names swiglu rmsnorm
    python -m bench.kernels --component vision connector --image-size 64 --patch-size 8 --grid 16 16
    python -m bench.kernels --component image_decode --vision '{name: vit, n_embd: 128}' --connectors pixel_shuffle
    python -m bench.kernels --seq-lens 1024 2048 --device cuda --out results/kernels   # also store the rows
"""

from __future__ import annotations

import argparse
import sys

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import hardware
from bench.kernels.config import SECTION_NAMES, KernelSpec


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--component", nargs="+", choices=list(SECTION_NAMES), default=["attention"])
    p.add_argument("--backends", nargs="+", help="attention backends (default: all registered)")
    p.add_argument("--variants", nargs="+", type=_component_spec,
                   help="attention and decode: registered attention names or YAML mappings "
                        "('{name: gqa, n_kv_head: 4}', '{name: mha, positional: alibi}'); default: all registered")
    p.add_argument("--positional", type=_component_spec, help="positional encoding of variants that name none")
    p.add_argument("--names", nargs="+", help="mlp and norm: registered names (default: all registered)")
    p.add_argument("--vision", nargs="+", type=_component_spec,
                   help="vision: registered image encoders or YAML mappings (default: all registered); "
                        "image_decode: its encoder (the first)")
    p.add_argument("--connectors", nargs="+", type=_component_spec,
                   help="connector: registered connectors or YAML mappings (default: all registered); "
                        "image_decode: its connector (the first)")
    p.add_argument("--fusions", nargs="+", type=_component_spec, help="image_decode: fusions, one model each "
                                                                      "(default: prefix cross_attention)")
    p.add_argument("--image-size", type=int, help="vision and image_decode: image side, for encoders that take it")
    p.add_argument("--channels", type=int, help="vision and image_decode: image channels")
    p.add_argument("--patch-size", type=int, help="vision and image_decode: patch side, for encoders that take it (vit)")
    p.add_argument("--grid", nargs=2, type=int, metavar=("ROWS", "COLS"), help="connector: the patch grid")
    p.add_argument("--in-dim", type=int, help="connector: features per patch")
    p.add_argument("--n-embd", type=int, help="decode, connector and image_decode: the language model's width")
    p.add_argument("--n-layer", type=int, help="decode and image_decode: the language model's layers")
    p.add_argument("--prompt", type=int, help="decode and image_decode: prompt tokens")
    p.add_argument("--contexts", nargs="+", type=int,
                   help="decode: prompt lengths to prefill before decoding, each timed (replaces --prompt); "
                        "prints each variant's per-token latency and cache bytes against them")
    p.add_argument("--new-tokens", type=int, help="decode and image_decode: tokens decoded")
    p.add_argument("--seq-lens", nargs="+", type=int, help="attention sequence lengths")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--kv-heads", type=int, help="key/value heads of variants that require n_kv_head (gqa)")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--window", type=int, help="window of variants that require one")
    p.add_argument("--kv-rank", type=int, help="latent rank of variants that require kv_rank (mla)")
    p.add_argument("--directions", nargs="+", choices=["forward", "backward", "forward_backward"])
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, help="CPU threads (fixed and recorded)")
    p.add_argument("--min-time", type=float, default=0.1, help="seconds of samples per candidate")
    p.add_argument("--out", help="also store the rows in this results folder's database")
    return p.parse_args(argv)


def _component_spec(text: str):
    """A registered name, or a YAML mapping of one with options."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not a YAML mapping: {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a YAML mapping: {text!r}")
    return value


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def spec_from_args(args) -> KernelSpec:
    members = _given(variants=args.variants, positional=args.positional, n_kv_head=args.kv_heads, window=args.window,
                     kv_rank=args.kv_rank)
    sections = {}
    for component in args.component:
        if component == "attention":
            sections["attention"] = {**members, **_given(
                backends=args.backends, seq_lens=args.seq_lens, batch=args.batch, n_head=args.heads,
                head_dim=args.head_dim, directions=args.directions)}
        elif component == "decode":
            sections["decode"] = {**members, **_given(batch=args.batch, prompt=args.prompt, contexts=args.contexts,
                                                      new_tokens=args.new_tokens, n_embd=args.n_embd,
                                                      n_layer=args.n_layer)}
        elif component == "vision":
            sections["vision"] = _given(variants=args.vision, batch=args.batch, image_size=args.image_size,
                                        channels=args.channels, patch_size=args.patch_size, directions=args.directions)
        elif component == "connector":
            sections["connector"] = _given(variants=args.connectors, batch=args.batch, grid=args.grid,
                                           in_dim=args.in_dim, n_embd=args.n_embd, directions=args.directions)
        elif component == "image_decode":
            sections["image_decode"] = _given(
                fusions=args.fusions, vision=args.vision[0] if args.vision else None,
                connector=args.connectors[0] if args.connectors else None, batch=args.batch,
                image_size=args.image_size, channels=args.channels, patch_size=args.patch_size, n_embd=args.n_embd,
                n_layer=args.n_layer, prompt=args.prompt, new_tokens=args.new_tokens)
        elif component in ("mlp", "norm"):
            sections[component] = _given(names=args.names, directions=args.directions)
        elif component == "moe":
            sections[component] = _given(directions=args.directions)
        else:
            sections[component] = {}
    return KernelSpec(**sections, dtype=args.dtype, device=args.device, threads=args.threads, min_time=args.min_time)


def _shape(row: dict) -> str:
    keys = ("batch", "n_head", "n_kv_head", "seq_len", "head_dim", "window", "positional", "tokens", "n_embd", "dim",
            "in_features", "out_features", "prompt", "new_tokens", "image_size", "channels", "patch_size", "grid",
            "patches", "in_dim", "image_tokens", "prefix_positions")
    return " ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)


def _cache_cell(row: dict) -> str:
    """The cache a decode row holds after prefill (a KV cache or a state), and after decoding where the row says."""
    if row.get("kv_cache_bytes") is None:
        return "-"
    held = f"{row['kv_cache_bytes'] / 2**10:.1f} KiB"
    final = row.get("kv_cache_bytes_final")
    return f"{held} -> {final / 2**10:.1f} KiB" if final is not None else held


def render(rows: list[dict]) -> Table:
    table = Table(title=f"kernels on {escape(hardware.machine_label())}", title_justify="left")
    for column in ("component", "name", "backend", "direction", "shape", "status", "median ms (IQR)",
                   "TFLOP/s", "GB/s", "% peak", "peak mem", "ms/token", "cache held"):
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
                      f"{r['peak_memory_bytes'] / 2**20:.1f} MiB" if r.get("peak_memory_bytes") is not None else "-",
                      f"{1e3 * r['per_token_s']:.3f}" if r.get("per_token_s") is not None else "-", _cache_cell(r))
    return table


def render_contexts(rows: list[dict]) -> Table | None:
    """Decode rows timed at several contexts (``--contexts``): per variant and context, ms per token and the
    bytes its cache holds after the prompt — a KV cache grows with the context, a recurrent state does not.
    None where no decode row names a context."""
    timed = [r for r in rows if r["component"] == "decode" and r.get("context") is not None
             and r.get("phase") == "decode" and r["status"] == "ok"]
    if not timed:
        return None
    from bench.formatting import size

    contexts = sorted({r["context"] for r in timed})
    table = Table(title=f"decode against context (batch {timed[0]['batch']}): ms per token · bytes the cache holds "
                        "after the prompt", title_justify="left")
    for column in ("variant", *(f"{c} tokens" for c in contexts), "declared per sequence"):
        table.add_column(column, overflow="fold")
    by_name: dict[str, dict] = {}
    for r in timed:
        by_name.setdefault(r["name"], {})[r["context"]] = r
    for name, at in by_name.items():
        cells = [f"{1e3 * at[c]['per_token_s']:.3f} · {size(at[c]['kv_cache_bytes'])}" if c in at else "-"
                 for c in contexts]
        last = at[max(at)]
        declared = [f"KV cache {size(last['kv_cache_bytes_per_token'])}/token" if last.get("kv_cache_bytes_per_token") else None,
                    f"state {size(last['state_bytes'])}" if last.get("state_bytes") else None]
        table.add_row(escape(name), *cells, ", ".join(d for d in declared if d) or "-")
    return table


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        spec = spec_from_args(args)
    except ValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from bench.kernels.timer import run_kernels  # imports torch

    rows = run_kernels(spec)
    console.print(render(rows))
    contexts = render_contexts(rows)
    if contexts is not None:
        console.print(contexts)
    if args.out:
        from bench.store import Store

        store = Store(args.out)
        store.add_kernels(None, rows, hardware.environment())
        store.close()
        console.print(f"stored {len(rows)} rows in {args.out}/results.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
