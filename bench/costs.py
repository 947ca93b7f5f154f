"""What a variant costs next to its reference, read from the store: the second half of a headline
("... and it cuts the KV cache 4× and trains 1.15× faster (95% CI 1.14-1.16×) here").

Parameters and peak memory come from the variant's runs; training speed only from the study's
side-by-side timing of the two training steps (``bench.speed``: interleaved rounds with a CI), never
from runs timed at different moments on a shared machine; serving costs from the study's decode
timings on the same machine, matched to the variant by its attention's name. Latencies timed one
after the other (decode, a quantized model's forward) are stated as measured, without "faster" or
"slower": on a shared machine their ratio carries no interval. A variant that decodes with a state of
constant size (a recurrent mixer, or a hybrid with some) states that state per sequence beside its KV
cache per token, never a KV cache of 0 as if decoding were free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from bench.formatting import count, duration, missing, size

SAME = 0.05  # sizes within ±5% (KV cache, memory, model bytes) are not worth a word
SAME_PARAMS = 0.005  # parameter counts are exact; below 0.5% a difference is not worth a word


@dataclass(frozen=True)
class Cost:
    """One cost of a variant and of its reference, with what it means in words."""

    what: str  # "parameters", "training speed", ...
    variant: float
    reference: float
    unit: str = ""  # after both values, e.g. " tokens/s", " per token"

    @property
    def ratio(self) -> float:
        return self.variant / self.reference

    def phrase(self) -> str | None:
        """The comparison in words with both values and their unit, or None where there is nothing to say."""
        r = self.ratio
        show = FORMATS[self.what]
        both = f"{show(self.variant)} against {show(self.reference)}{self.unit}"
        if self.what in ("parameters", "active parameters"):
            what = "active parameters per token" if self.what == "active parameters" else "parameters"
            if abs(r - 1) < SAME_PARAMS:  # the same active count is news (a MoE); the same total is not
                return f"has the same {what} ({both})" if self.what == "active parameters" else None
            return f"has {abs(1 - r):.0%} {'fewer' if r < 1 else 'more'} {what} ({both})"
        if self.what in TIMED_APART:
            return f"{TIMED_APART[self.what]} in {both} (timed one after the other)"
        if abs(r - 1) < SAME:
            return None
        if self.what == "peak memory":
            return f"peaks at {r:.2f}× the memory in training ({both})"
        smaller, larger = SIZES[self.what]
        return f"{smaller if r < 1 else larger} {max(r, 1 / r):.1f}× ({both})"


FORMATS = {"parameters": count, "active parameters": count, "KV cache": size,
           "decode latency": duration, "peak memory": size, "model size": size, "inference latency": duration,
           "quantization time": duration}
TIMED_APART = {"decode latency": "decodes", "inference latency": "runs a val batch",
               "quantization time": "quantizes"}
SIZES = {"KV cache": ("cuts the KV cache", "grows the KV cache"), "model size": ("shrinks the model", "grows the model")}


def attention_name(config) -> str | None:
    """The registry name of a run's attention (None where the config does not say, or a hybrid's layers
    differ: the decode timings of one attention do not describe it)."""
    model = (config or {}).get("model", {}) if isinstance(config, dict) else {}
    if model.get("hybrid"):
        return None
    attention = model.get("attention")
    return attention.get("name") if isinstance(attention, dict) else attention


def decode_costs(kernels: pd.DataFrame, machine: str) -> pd.DataFrame:
    """Per attention name on `machine` and length decoded (a section timed at several ``contexts`` has
    one per context): per-token decode latency, the bytes its cache holds at the end of decoding (a KV
    cache's or a state's; after the prompt in rows that do not say), that length, and what the layers
    declare (KV-cache bytes per token, state bytes per sequence, at the timed dtype; NaN where not
    declared); names timed in more than one configuration are left out (ambiguous)."""
    columns = ["name", "per_token_s", "kv_cache_bytes", "tokens", "kv_cache_bytes_per_token", "state_bytes"]
    if kernels.empty or not {"component", "phase"} <= set(kernels):  # no decode timings in this study
        return pd.DataFrame(columns=columns)
    rows = kernels[(kernels["component"] == "decode") & (kernels["status"] == "ok") & (kernels["machine"] == machine)
                   & (kernels["phase"] == "decode")]
    out = []
    for name, group in rows.groupby("name"):
        if group["spec_hash"].nunique() > 1 or len(group.drop_duplicates(["n_kv_head", "window", "positional"])) > 1:
            continue
        group = group.assign(tokens=(group["prompt"] + group["new_tokens"]).astype(int))
        for tokens, at in group.groupby("tokens"):
            last = at.iloc[-1]
            held = last.get("kv_cache_bytes_final")
            out.append({"name": name, "per_token_s": float(last["per_token_s"]),
                        "kv_cache_bytes": float(last["kv_cache_bytes"] if missing(held) else held), "tokens": int(tokens),
                        **{k: float("nan") if missing(last.get(k)) else float(last[k])
                           for k in ("kv_cache_bytes_per_token", "state_bytes")}})
    return pd.DataFrame(out, columns=columns)


def paired_speed(kernels: pd.DataFrame, variant: str, reference: str, machine: str) -> dict | None:
    """The latest side-by-side training-speed timing of `variant` against `reference` on `machine`."""
    if kernels.empty or not {"component", "reference"} <= set(kernels):
        return None
    rows = kernels[(kernels["component"] == "train_step") & (kernels["status"] == "ok") & (kernels["machine"] == machine)
                   & (kernels["name"] == variant) & (kernels["reference"] == reference)]
    return rows.iloc[-1].to_dict() if not rows.empty else None


@dataclass(frozen=True)
class SpeedCost:
    """Training speed timed side by side (``bench.speed``): the phrase carries its interval."""

    row: dict
    what: str = "training speed"

    def phrase(self) -> str:
        from bench.speed import speed_phrase

        return speed_phrase(self.row)


def _finite(*values) -> bool:
    return all(v is not None and isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


@dataclass(frozen=True)
class DecodeMemory:
    """What decoding keeps, where a variant or its reference has a state of constant size: each one's
    KV-cache bytes per token and state bytes per sequence (None: none declared), and where the study
    timed both, the bytes each held at the end of one `tokens`-token sequence."""

    variant: tuple[float | None, float | None]  # (KV cache per token, state per sequence)
    reference: tuple[float | None, float | None]
    held: tuple[float, float] | None = None
    tokens: int | None = None
    what: str = "decode memory"

    @staticmethod
    def _keeps(kv: float | None, state: float | None) -> str:
        parts = [f"a {size(state)} state per sequence"] if state else []
        if kv:
            parts.append(f"{size(kv)} of KV cache per token")
        elif state and kv is not None:
            parts.append("no KV cache")
        return " and ".join(parts) or "no declared cache"

    def phrase(self) -> str | None:
        same_held = self.held is None or abs(self.held[0] - self.held[1]) <= SAME * max(self.held)
        if self.variant == self.reference and same_held:
            return None  # the same cache: not worth a word
        text = f"decodes with {self._keeps(*self.variant)} against {self._keeps(*self.reference)}"
        if self.held is not None:
            text += f" ({size(self.held[0])} against {size(self.held[1])} held per {self.tokens}-token sequence)"
        return text


def _declared(value) -> float | None:
    return None if missing(value) else float(value)


def costs(variant: str, reference: str, variants: pd.DataFrame, runs: pd.DataFrame, kernels: pd.DataFrame,
          machine: str) -> list[Cost | SpeedCost]:
    """The costs of `variant` against `reference` on `machine`: parameters and peak memory (medians over
    the runs ``variants`` summarises), training speed (timed side by side, where the study did), KV
    cache and per-token decode latency (the study's decode timings of their attentions, at the longest
    length both were timed at; else the trained model's KV bytes per token). Where either keeps a
    state of constant size (``state_bytes``), the KV cache is stated with it (``DecodeMemory``)."""
    table = variants.set_index("variant")
    if variant not in table.index or reference not in table.index:
        return []
    mine, theirs = table.loc[variant], table.loc[reference]
    # on a CPU the peak is the process's resident set (libraries, data and all): no cost of the variant
    on_gpu = "device" in runs and runs.loc[runs["variant"].isin([variant, reference]), "device"].eq("cuda").all()

    def measured(column: str, what: str, unit: str = "") -> list[Cost]:
        if column in table and _finite(mine[column], theirs[column]):
            return [Cost(what, float(mine[column]), float(theirs[column]), unit)]
        return []

    # parameters first, then what serving costs, then what training costs
    out = measured("params", "parameters")
    if "active_params" in table and any(_finite(row.get("active_params")) and row["active_params"] != row["params"]
                                        for row in (mine, theirs)):  # a MoE: active parameters first
        out = measured("active_params", "active parameters") + out
    speed = paired_speed(kernels, variant, reference, machine)
    training = [SpeedCost(speed)] if speed else []
    if on_gpu:
        training += measured("peak_memory_bytes", "peak memory")
    names = {}
    for name in (variant, reference):
        configs = runs.loc[runs["variant"] == name, "config"] if "config" in runs else []
        names[name] = next((attention_name(c) for c in configs if attention_name(c)), None)
    decode = decode_costs(kernels, machine)
    mine_timed, theirs_timed = (decode[decode["name"] == names[v]].set_index("tokens") for v in (variant, reference))
    common = sorted(set(mine_timed.index) & set(theirs_timed.index)) if names[variant] != names[reference] else []
    if common:  # the longest length both were timed at
        a, b = mine_timed.loc[common[-1]], theirs_timed.loc[common[-1]]
        tokens = int(common[-1])
        if _declared(a["state_bytes"]) or _declared(b["state_bytes"]):
            out.append(DecodeMemory((_declared(a["kv_cache_bytes_per_token"]), _declared(a["state_bytes"])),
                                    (_declared(b["kv_cache_bytes_per_token"]), _declared(b["state_bytes"])),
                                    (a["kv_cache_bytes"], b["kv_cache_bytes"]), tokens))
        else:
            out.append(Cost("KV cache", a["kv_cache_bytes"], b["kv_cache_bytes"], f" per {tokens}-token sequence"))
        out.append(Cost("decode latency", a["per_token_s"], b["per_token_s"], " per token"))
    else:
        states = {name: _summarised(table, name, "state_bytes") for name in (variant, reference)}
        if states[variant] or states[reference]:  # the trained models' own (bf16)
            out.append(DecodeMemory((_summarised(table, variant, "kv_cache_bytes_per_token"), states[variant]),
                                    (_summarised(table, reference, "kv_cache_bytes_per_token"), states[reference])))
        else:
            out += measured("kv_cache_bytes_per_token", "KV cache", " per token")
    return out + training


def _summarised(table: pd.DataFrame, variant: str, column: str) -> float | None:
    """A variant's `column` as the summary gives it (the median over its runs; None: not recorded)."""
    return _declared(table.loc[variant, column]) if column in table else None


def quantization_costs(runs: pd.DataFrame, reference: pd.DataFrame | None = None) -> list[Cost]:
    """A post-training quantized variant against its own float checkpoint, or against another method's
    runs (medians over seeds): the serialized model's bytes, the latency of one val batch, the
    per-token decode latency and, between two methods, the time each took to quantize."""
    columns = [("model_bytes", "model size", 1.0), ("latency_ms", "inference latency", 1e-3),
               ("decode_ms_per_token", "decode latency", 1e-3)]
    if reference is not None:
        columns.append(("quantize_seconds", "quantization time", 1.0))
    out = []
    for column, what, scale in columns:
        theirs_column = column if reference is not None else f"{column}_float"
        other = reference if reference is not None else runs
        if column in runs and theirs_column in other and not runs.empty and not other.empty:
            mine, theirs = runs[column].median(), other[theirs_column].median()
            if _finite(mine, theirs):
                out.append(Cost(what, float(mine) * scale, float(theirs) * scale,
                                " per token" if column.startswith("decode") else ""))
    return out


def cost_sentence(costs: list[Cost | SpeedCost], machine: str) -> str:
    """The costs that differ, as the second sentence of a headline ("It has ..., and ... on <machine>.")."""
    phrases = [p for c in costs if (p := c.phrase())]
    if not phrases:
        return ""
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"It {listed} on {machine}."
