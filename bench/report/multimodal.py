"""The report's multimodal section: validation images with each variant's answers beside the truth,
accuracy by question type, and a contrastive study's recall both ways. Read from the runs' final
metrics (``val_samples``, ``val_accuracy_<type>``, ``val_recall_*``); nothing is recomputed."""

from __future__ import annotations

import pandas as pd

from bench.formatting import significant

RECALL = {"val_recall_i2t": "image → text recall@1", "val_recall_t2i": "text → image recall@1"}


def _mean_sd(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    sd = f" ± {significant(values.std(), 2)}" if len(values) > 1 else ""
    return f"{significant(values.mean(), 3)}{sd}"


def _by_variant(runs: pd.DataFrame, columns: dict[str, str], variants: list[str]) -> dict | None:
    """A table of each variant's mean ± sd over its finished runs, one column per metric present."""
    present = {c: label for c, label in columns.items() if c in runs and runs[c].notna().any()}
    if not present:
        return None
    rows = [{"variant": v, "n": int(len(group)), "cells": [_mean_sd(group[c]) for c in present]}
            for v in variants if not (group := runs[runs["variant"] == v]).empty]
    return {"columns": list(present.values()), "rows": rows}


def _samples(runs: pd.DataFrame, variants: list[str]) -> list[dict]:
    """The first validation examples, each with every variant's answer (from its lowest seed)."""
    if "val_samples" not in runs:
        return []
    answers: dict[str, list[dict]] = {}
    for variant in variants:
        kept = runs[(runs["variant"] == variant) & runs["val_samples"].map(lambda s: isinstance(s, list) and bool(s))]
        if not kept.empty:
            answers[variant] = kept.sort_values("seed").iloc[0]["val_samples"]
    if not answers:
        return []
    first = next(iter(answers.values()))
    return [{**{k: sample[k] for k in ("image", "type", "question", "truth")},
             "answers": [{"variant": v, "answer": got[i]["answer"], "right": got[i]["answer"] == sample["truth"]}
                         for v, got in answers.items() if i < len(got)]}
            for i, sample in enumerate(first)]


def multimodal_section(runs: pd.DataFrame, variants: list[str]) -> dict | None:
    """The section's content, or None when no run of the study read images."""
    finished = runs[runs["status"] == "finished"]
    read_images = "val_samples" in finished and finished["val_samples"].map(lambda s: isinstance(s, list)).any()
    # question types are accuracy columns of runs that read images (not a quantized run's val_accuracy_float)
    types = sorted(c for c in finished.columns if read_images and c.startswith("val_accuracy_")
                   and finished[c].notna().any())
    accuracy = _by_variant(finished, {"val_accuracy": "all questions",
                                      **{c: c.removeprefix("val_accuracy_") for c in types}}, variants) if types else None
    recall = _by_variant(finished, RECALL, variants)
    samples = _samples(finished, variants)
    if not (accuracy or recall or samples):
        return None
    return {"accuracy": accuracy, "recall": recall, "samples": samples}
