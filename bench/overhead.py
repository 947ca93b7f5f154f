"""What archbench's abstractions cost, measured side by side in one run.

    python -m bench.overhead factory   # factory-built GPT vs a hand-written nanoGPT, one training step
    python -m bench.overhead loop      # bench.train's loop vs a bare forward/backward/step loop, + MFU
    python -m bench.overhead distributed   # tokens/s from 1 to 2 processes: DDP, FSDP, ZeRO-1/2/3
    python -m bench.overhead step      # attention.yaml's training step: tokens/s, MFU, the choices made here
                                       # (--spec ablations/shakespeare-gpu.yaml on a GPU)

Both compare side by side in one run, interleaved so machine noise hits both alike, and print the
ratio of medians. Targets: factory/hand-written < 1.05; loop/bare < 1.05 (eval and checkpoint
steps excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from models import ModelConfig, build_model

# nanoGPT's shakespeare-char model (6 layers, 6 heads, 384 wide, block 256), dropout off so both
# models draw no random numbers
NANOGPT_SHAKESPEARE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.0)


class NanoGPT(nn.Module):
    """A plain GPT-2 written out by hand: learned positions, LayerNorm, GELU MLP, SDPA, tied head."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int, **_):
        super().__init__()
        self.n_head = n_head
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    ln_1=nn.LayerNorm(n_embd),
                    c_attn=nn.Linear(n_embd, 3 * n_embd),
                    attn_proj=nn.Linear(n_embd, n_embd),
                    ln_2=nn.LayerNorm(n_embd),
                    c_fc=nn.Linear(n_embd, 4 * n_embd),
                    mlp_proj=nn.Linear(4 * n_embd, n_embd),
                )
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for layer in self.layers:
            h = layer["ln_1"](x)
            q, k, v = layer["c_attn"](h).split(h.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + layer["attn_proj"](y)
            x = x + layer["mlp_proj"](F.gelu(layer["c_fc"](layer["ln_2"](x))))
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy parameters in creation order (the two models create the same tensors in the same order)."""
    pairs = list(zip(source.parameters(), target.parameters(), strict=True))
    with torch.no_grad():
        for s, t in pairs:
            assert s.shape == t.shape, (s.shape, t.shape)
            t.copy_(s)


def factory_vs_hand_written(steps: int = 10, batch: int = 4, warmup: int = 2) -> dict[str, float]:
    """Time one training step (forward, backward, AdamW) of each model, interleaved; return the figures."""
    torch.manual_seed(0)
    config = ModelConfig(**NANOGPT_SHAKESPEARE)
    factory = build_model(config)
    hand = NanoGPT(**NANOGPT_SHAKESPEARE)
    copy_weights(factory, hand)
    data = torch.randint(0, config.vocab_size, (steps + warmup, batch, config.block_size + 1))

    def factory_step(model, x, y):
        return model(x, y)[1]

    def hand_step(model, x, y):
        return model(x, y)

    # correctness first: same weights, same batch, same loss
    x, y = data[0, :, :-1], data[0, :, 1:]
    a, b = factory_step(factory, x, y).item(), hand_step(hand, x, y).item()
    if not math.isclose(a, b, rel_tol=1e-5):
        raise AssertionError(f"factory and hand-written models disagree: loss {a} vs {b}")

    runs = [(factory, factory_step), (hand, hand_step)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m, _ in runs]
    times: list[list[float]] = [[], []]
    for i in range(steps + warmup):
        x, y = data[i, :, :-1], data[i, :, 1:]
        order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate who goes first
        for j in order:
            model, step = runs[j]
            start = time.perf_counter()
            loss = step(model, x, y)
            loss.backward()
            optimizers[j].step()
            optimizers[j].zero_grad(set_to_none=True)
            if i >= warmup:
                times[j].append(time.perf_counter() - start)
    ratios = [f / h for f, h in zip(*times)]
    return {
        "factory_ms": 1e3 * statistics.median(times[0]),
        "hand_written_ms": 1e3 * statistics.median(times[1]),
        "ratio": statistics.median(ratios),
        "threads": torch.get_num_threads(),
        "steps": steps,
    }


def loop_vs_bare(steps: int = 16, batch: int = 4) -> dict[str, float]:
    """Per-step wall time of bench.train's loop and of a bare loop on the same model and batches,
    interleaved step by step; eval and checkpoint steps excluded."""
    from bench.data import load_dataset
    from bench.parallel import make_optimizers
    from bench.config import resolve_run
    from bench.train import Trainer, _autocast

    model = {k: v for k, v in NANOGPT_SHAKESPEARE.items() if k != "vocab_size"}
    run = resolve_run(model, {"source": "stdlib", "tokenizer": "char"},
                      dict(steps=steps, batch_size=batch, eval_every=10**6, checkpoint_every=None, warmup_steps=0))
    ours = Trainer(run, None)
    bare = Trainer(run, None)  # the same model, device and dtype, built the same way
    m = bare.model
    (opt,) = make_optimizers(m, run.train)  # AdamW, as the loop's
    batches = [load_dataset(run.data).train_batch(s, run.seed, batch, run.seq_len) for s in range(steps)]
    loop = ours.steps()
    times: dict[str, list[float]] = {"loop": [], "bare": []}
    mfu = []
    for i, (x, y) in enumerate(batches[:-1]):  # the loop's last step evaluates: not timed
        start = time.perf_counter()
        mfu.append(next(loop)["mfu"])
        middle = time.perf_counter()
        with _autocast(bare.device, bare.dtype):
            loss = m(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        end = time.perf_counter()
        if i > 0:  # the first step warms up
            times["loop"].append(middle - start)
            times["bare"].append(end - middle)
    ratios = [a / b for a, b in zip(times["loop"], times["bare"])]
    loop_ms, bare_ms = (1e3 * statistics.median(times[k]) for k in ("loop", "bare"))
    return {"loop_ms": loop_ms, "bare_ms": bare_ms, "ratio": statistics.median(ratios),
            "mfu": statistics.median(mfu), "tokens_per_s": batch * run.seq_len / (loop_ms / 1e3),
            "dtype": str(ours.dtype).removeprefix("torch."), "threads": torch.get_num_threads()}


def distributed_scaling(steps: int = 10, batch: int = 16) -> list[dict]:
    """Tokens/s of one run on 1 and on 2 processes (torchrun, one thread each) per strategy; efficiency
    is tokens/s(2) / (2 × tokens/s(1)). The two sizes alternate per strategy, in one invocation."""
    import tempfile
    from pathlib import Path

    from bench.executor import launch_torchrun
    from bench.parallel import DistributedConfig
    from bench.config import resolve_run

    strategies = [DistributedConfig(strategy="ddp"), DistributedConfig(strategy="fsdp"),
                  *[DistributedConfig(strategy="deepspeed", zero_stage=k) for k in (1, 2, 3)]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in strategies:
            tokens_per_s = {}
            for nproc in (1, 2):
                run = resolve_run(dict(n_layer=4, n_head=4, n_embd=128, positional="rope"),
                                  {"source": "stdlib", "tokenizer": "bpe", "vocab_size": 1024},
                                  dict(steps=steps, batch_size=batch, seq_len=128, eval_every=10**6, checkpoint_every=None,
                                       device="cpu", dtype="float32", threads=1,
                                       distributed={**strategy.model_dump(), "nproc": nproc}))
                folder = Path(tmp) / f"{strategy.label}-{nproc}".replace(" ", "")
                folder.mkdir()
                launch_torchrun(run, folder)
                records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                tokens_per_s[nproc] = statistics.median(r["tokens_per_s"] for r in records[2:])  # after warm-up
            rows.append({"strategy": strategy.label, "one": tokens_per_s[1], "two": tokens_per_s[2],
                         "efficiency": tokens_per_s[2] / (2 * tokens_per_s[1])})
    return rows


def model_shape_matmul_peak(model: nn.Module, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """FLOP/s of the matmuls a training step of `model` does, at its own shapes: every linear layer's
    forward (x·Wᵀ), input gradient (g·W) and weight gradient (gᵀ·x) for `tokens` rows, timed
    interleaved and weighted by how often each shape occurs. The best a step of this model could do
    if nothing but its matmuls took time."""
    from collections import Counter

    from bench.timing import time_interleaved

    shapes = Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))
    calls, flops = {}, {}
    for (k, n), count in shapes.items():
        x, w, g = (torch.randn(*shape, device=device, dtype=dtype) for shape in ((tokens, k), (n, k), (tokens, n)))
        for name, fn in (("forward", lambda x=x, w=w: x @ w.T), ("input grad", lambda g=g, w=w: g @ w),
                         ("weight grad", lambda g=g, x=x: g.T @ x)):
            calls[f"{name} {tokens}×{k}×{n}"] = fn
            flops[f"{name} {tokens}×{k}×{n}"] = (2 * tokens * k * n, count)
    timings = time_interleaved(calls, device, min_time=0.1, flush_l2=False)  # warm cache: as in the step
    total_flops = sum(f * c for f, c in flops.values())
    total_s = sum(timings[label].median * flops[label][1] for label in calls)
    return {"flops_per_s": total_flops / total_s,
            "per_shape": {label: flops[label][0] / timings[label].median for label in calls}}


def step_throughput(spec_path: str = "ablations/attention.yaml", steps: int = 30) -> dict:
    """The spec baseline's training step (seed 0) with the sdpa backend, eager (the default before
    ``backend: auto``), with ``backend: auto``, and with auto compiled: interleaved step by step on the
    same data; warm-up (compilation included) excluded as in the runs' tokens/s. Also what
    ``compile: auto`` decides for a run of the spec's own budget."""
    from bench import autotune, hardware
    from bench.config import RunConfig, budget_steps
    from bench.workers import workers_decision
    from bench.plan import expand
    from bench.spec import load_spec
    from bench.train import Trainer, _autocast, steady_state

    spec, sources = load_spec(spec_path, [])
    base = expand(spec, sources, only=[spec.baseline], seeds=[0]).train_runs[0].config
    budget = dict(steps=steps + 1, tokens=None, flops=None, seconds=None, eval_every=10**6, checkpoint_every=None)
    model = base.model.to_dict()
    sdpa, auto = ({**model, "attention": {**model["attention"], "backend": name}} for name in ("sdpa", "auto"))

    def trainer(model_fields: dict, compile_setting: bool) -> Trainer:
        return Trainer(RunConfig.model_validate({**base.model_dump(), "model": model_fields,
                                                 "train": {**base.train.model_dump(), **budget, "compile": compile_setting}}), None)

    trainers = {"sdpa": trainer(sdpa, False), "auto": trainer(auto, False), "auto compiled": trainer(auto, True)}
    loops = {name: t.steps() for name, t in trainers.items()}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(steps):  # the last (evaluating) step is not taken
        order = list(loops)[i % len(loops):] + list(loops)[:i % len(loops)]  # rotate who goes first
        for name in order:
            start = time.perf_counter()
            losses[name].append(next(loops[name])["train_loss"])
            times[name].append(time.perf_counter() - start)
    tuned = trainers["auto"]
    autocast = lambda: _autocast(tuned.device, tuned.dtype)  # noqa: E731
    speed = autotune.compile_speed(tuned.model, tuned.micro, tuned.seq_len, tuned.dtype, autocast)
    spec_steps = budget_steps(base)  # None: a time budget
    micro_steps = spec_steps and spec_steps * (tuned.per_rank // tuned.micro)
    shape_peak = model_shape_matmul_peak(tuned.model, tuned.micro * base.seq_len, tuned.device, tuned.dtype)
    tokens_per_step = tuned.tokens_per_step
    steady = {name: steady_state(t) for name, t in times.items()}
    layouts = workers_decision(tuned.run_config)  # the whole machine, as --workers auto runs a sweep
    return {"workers": layouts["workers"], "workers_reason": layouts["reason"],
            "machine_tokens_per_s": layouts.get("steps_per_s", {}).get(str(layouts["workers"]), 0) * tokens_per_step,
            "dtype": str(tuned.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "flops_per_token": tuned.flops_per_token, "square_peak": hardware.peak_matmul_flops(tuned.device, tuned.dtype),
            "shape_peak": shape_peak["flops_per_s"], "per_shape": shape_peak["per_shape"],
            "tokens_per_s": {name: tokens_per_step / statistics.median(t) for name, t in steady.items()},
            "warmup_steps": {name: len(times[name]) - len(t) for name, t in steady.items()},
            "max_loss_difference": {name: max(abs(a - b) for a, b in zip(losses["sdpa"], run_losses))
                                    for name, run_losses in losses.items() if name != "sdpa"},
            "compile_auto": autotune.compile_decision(speed, micro_steps)["reason"], "spec_steps": spec_steps,
            "attention_choices": tuned.kernels.records(),
            "model": base.model, "batch": (base.train.batch_size, base.seq_len), "spec": spec.name, "variant": spec.baseline}


def print_step_throughput(r: dict) -> None:
    m = r["model"]
    print(f"training step of {r['spec']}'s baseline {r['variant']} ({m.n_layer}×{m.n_embd}, {m.n_head} heads, vocab {m.vocab_size}), "
          f"batch {r['batch'][0]}×{r['batch'][1]}, {r['dtype']}, {r['threads']} threads, "
          f"{r['flops_per_token'] / 1e3:.0f} kFLOP/token:")
    for choice in r["attention_choices"]:
        print(f"  backend auto ({choice['direction']}): {choice['backend']}, {choice['reason']}")
    print(f"  compile auto for the spec's {r['spec_steps']} steps: {r['compile_auto']}")
    sdpa_tps = r["tokens_per_s"]["sdpa"]
    for name, label in (("sdpa", "sdpa, eager (the old default)"), ("auto", "backend auto, eager"),
                        ("auto compiled", "backend auto, compiled")):
        tps = r["tokens_per_s"][name]
        flops = tps * r["flops_per_token"]
        compared = (f"  {tps / sdpa_tps:.2f}× sdpa, train loss within {r['max_loss_difference'][name]:.1g} of it"
                    if name != "sdpa" else "")
        print(f"  {label:32s} {tps:8.0f} tokens/s {flops / 1e9:6.1f} GFLOP/s  MFU {100 * flops / r['shape_peak']:4.1f}% "
              f"(model shapes), {100 * flops / r['square_peak']:4.1f}% (square){compared}"
              f"  [{r['warmup_steps'][name]} warm-up steps excluded]")
    if r["machine_tokens_per_s"]:
        flops = r["machine_tokens_per_s"] * r["flops_per_token"]
        print(f"  --workers auto runs {r['workers']} process(es) ({r['workers_reason']}): the machine trains "
              f"{r['machine_tokens_per_s']:.0f} tokens/s, {flops / 1e9:.1f} GFLOP/s, MFU {100 * flops / r['shape_peak']:.1f}% "
              f"(model shapes), {100 * flops / r['square_peak']:.1f}% (square) with backend auto, eager")
    print(f"  matmul peak at the model's own shapes {r['shape_peak'] / 1e9:.1f} GFLOP/s "
          f"(square matmuls 1024–4096: {r['square_peak'] / 1e9:.1f} GFLOP/s); per shape:")
    for label, flops in r["per_shape"].items():
        print(f"    {label:28s} {flops / 1e9:6.1f} GFLOP/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["factory", "loop", "distributed", "step"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 16 distributed, else 4)")
    parser.add_argument("--spec", default="ablations/attention.yaml", help="step: whose baseline (default attention.yaml)")
    args = parser.parse_args(argv)
    if args.what == "step":
        print_step_throughput(step_throughput(args.spec, steps=max(args.steps, 30)))
        return 0
    if args.what == "distributed":
        batch = args.batch or 16
        rows = distributed_scaling(steps=args.steps, batch=batch)
        print(f"tokens/s from 1 to 2 processes (torchrun, gloo, 1 thread each), 4×128 GPT, global batch {batch}×128:")
        for r in rows:
            print(f"  {r['strategy']:18s} 1 process {r['one']:8.0f}  2 processes {r['two']:8.0f}  "
                  f"scaling efficiency {100 * r['efficiency']:5.1f}%")
        return 0
    args.batch = args.batch or 4
    if args.what == "loop":
        r = loop_vs_bare(batch=args.batch)
        print(
            f"training loop vs bare loop, nanoGPT shakespeare-char size (6×384, block 256), batch {args.batch}, "
            f"{r['dtype']}, {r['threads']} threads:\n"
            f"  bench.train loop  {r['loop_ms']:8.1f} ms per step (median, eval/checkpoint steps excluded)\n"
            f"  bare loop         {r['bare_ms']:8.1f} ms per step (median)\n"
            f"  ratio (median of paired ratios) {r['ratio']:.3f}  — target < 1.05: {'met' if r['ratio'] < 1.05 else 'NOT met'}\n"
            f"  MFU {100 * r['mfu']:.1f}% of this machine's measured {r['dtype']} matmul peak "
            f"({r['tokens_per_s']:.0f} tokens/s)"
        )
        return 0
    r = factory_vs_hand_written(args.steps, args.batch)
    print(
        f"one training step, nanoGPT shakespeare-char size (6×384, block 256), batch {args.batch}, "
        f"{r['threads']} threads, {r['steps']} interleaved steps:\n"
        f"  factory-built GPT   {r['factory_ms']:8.1f} ms (median)\n"
        f"  hand-written GPT    {r['hand_written_ms']:8.1f} ms (median)\n"
        f"  ratio (median of paired ratios) {r['ratio']:.3f}  — target < 1.05: "
        f"{'met' if r['ratio'] < 1.05 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
