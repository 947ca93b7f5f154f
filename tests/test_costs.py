"""The cost half of a headline: what a variant costs against its reference, read from the store."""

from __future__ import annotations

import pandas as pd

from bench.costs import Cost, cost_sentence, costs, decode_costs, quantization_costs

MACHINE = "test cpu (2 threads)"


def _variants() -> pd.DataFrame:
    return pd.DataFrame([
        {"variant": "mha", "params": 104_190.0, "tokens_per_s": 45_830.0, "peak_memory_bytes": 2.0e9, "kv_cache_bytes_per_token": 1024.0},
        {"variant": "mqa", "params": 91_710.0, "tokens_per_s": 50_390.0, "peak_memory_bytes": 2.0e9, "kv_cache_bytes_per_token": 256.0},
        {"variant": "norm", "params": 104_190.0, "tokens_per_s": 46_000.0, "peak_memory_bytes": 2.0e9, "kv_cache_bytes_per_token": 1024.0},
    ])


def _runs(device: str = "cpu") -> pd.DataFrame:
    attention = {"mha": "mha", "mqa": "mqa", "norm": "mha"}
    return pd.DataFrame([{"variant": v, "device": device, "config": {"model": {"attention": {"name": a}}}}
                         for v, a in attention.items()])


def _decode(name: str, kv_heads: int, per_token_s: float) -> list[dict]:
    common = {"component": "decode", "status": "ok", "machine": MACHINE, "name": name, "spec_hash": "h", "n_kv_head": kv_heads,
              "window": None, "positional": "rope", "prompt": 128, "new_tokens": 32,
              "kv_cache_bytes": 160 * 4096.0 * kv_heads / 4}
    return [{**common, "phase": "prefill", "per_token_s": None}, {**common, "phase": "decode", "per_token_s": per_token_s}]


def _speed(name: str, ratio: float, low: float, high: float) -> dict:
    return {"component": "train_step", "status": "ok", "machine": MACHINE, "name": name, "reference": "mha",
            "ratio": ratio, "ci_low": low, "ci_high": high, "rounds": 20}


KERNELS = pd.DataFrame(_decode("mha", 4, 4.04e-3) + _decode("mqa", 1, 3.42e-3))


def test_a_variant_with_another_attention_gets_kv_cache_and_decode_costs_from_the_decode_timings():
    facts = {c.what: c for c in costs("mqa", "mha", _variants(), _runs(), KERNELS, MACHINE)}
    # the runs' own tokens/s (50.39k against 45.83k) were timed at different moments: no speed claim
    assert set(facts) == {"parameters", "KV cache", "decode latency"}  # no CPU peak memory
    assert facts["KV cache"].ratio == 0.25 and facts["KV cache"].unit == " per 160-token sequence"
    timed = pd.concat([KERNELS, pd.DataFrame([_speed("mqa", 1.06, 1.02, 1.10)])], ignore_index=True)
    sentence = cost_sentence(costs("mqa", "mha", _variants(), _runs(), timed, MACHINE), MACHINE)
    assert sentence == ("It has 12% fewer parameters (91.71k against 104.19k), cuts the KV cache 4.0× (160 KiB against "
                        "640 KiB per 160-token sequence), decodes in 3.42 ms against 4.04 ms per token (timed one after "
                        "the other) and "
                        "trains 1.06× faster (95% CI 1.02–1.10×, 20 interleaved rounds of training steps) on test cpu "
                        "(2 threads).")


def test_a_speed_claim_needs_its_interval_to_exclude_one():
    timed = pd.DataFrame([_speed("norm", 1.01, 0.97, 1.05)])
    facts = costs("norm", "mha", _variants(), _runs(), timed, MACHINE)
    assert [c.what for c in facts] == ["parameters", "KV cache", "training speed"]  # the trained models' KV: equal
    assert cost_sentence(facts, MACHINE) == ("It shows no resolved difference in training speed (1.01×, 95% CI 0.97–1.05×, "
                                             "20 interleaved rounds of training steps) on test cpu (2 threads).")
    slower = costs("norm", "mha", _variants(), _runs(), pd.DataFrame([_speed("norm", 0.8, 0.75, 0.85)]), MACHINE)
    assert "trains 1.25× slower (95% CI 0.75–0.85×" in cost_sentence(slower, MACHINE)
    assert cost_sentence(costs("norm", "mha", _variants(), _runs(), KERNELS, MACHINE), MACHINE) == ""


def test_without_decode_timings_the_kv_cache_comes_from_the_trained_model_and_gpu_memory_counts():
    facts = {c.what: c for c in costs("mqa", "mha", _variants().assign(peak_memory_bytes=[2e9, 1.5e9, 2e9]),
                                      _runs("cuda"), KERNELS.iloc[:0], MACHINE)}
    assert facts["KV cache"].phrase() == "cuts the KV cache 4.0× (256 B against 1.00 KiB per token)"
    assert facts["peak memory"].phrase() == "peaks at 0.75× the memory in training (1.40 GiB against 1.86 GiB)"


def test_decode_timings_of_one_name_in_two_configurations_are_ambiguous_and_left_out():
    other = pd.DataFrame(_decode("mha", 2, 1e-3)).assign(spec_hash="other")
    assert list(decode_costs(pd.concat([KERNELS, other]), MACHINE)["name"]) == ["mqa"]
    assert decode_costs(KERNELS, "another machine").empty
    assert decode_costs(pd.DataFrame([{"component": "mlp", "status": "ok", "machine": MACHINE}]), MACHINE).empty  # none timed


def test_a_quantized_variant_costs_bytes_and_latency_against_its_float_checkpoint():
    runs = pd.DataFrame({"model_bytes": [1.0e6, 1.0e6], "model_bytes_float": [4.0e6, 4.0e6],
                         "latency_ms": [12.0, 14.0], "latency_ms_float": [10.0, 10.0]})
    facts = quantization_costs(runs)
    # latencies timed one after the other are stated, not compared: no "slower" without an interval
    assert [c.phrase() for c in facts] == ["shrinks the model 4.0× (977 KiB against 3.81 MiB)",
                                           "runs a val batch in 13.0 ms against 10.0 ms (timed one after the other)"]
    assert Cost("parameters", 100.0, 100.2).phrase() is None
    decoding = runs.assign(decode_ms_per_token=[2.0, 2.0], decode_ms_per_token_float=[1.0, 1.0])
    assert quantization_costs(decoding)[-1].phrase() == "decodes in 2.00 ms against 1.00 ms per token (timed one after the other)"


def test_two_quantization_methods_cost_what_each_took_besides_bytes_and_latency():
    gptq = pd.DataFrame({"model_bytes": [1.0e6], "latency_ms": [12.0], "decode_ms_per_token": [2.0], "quantize_seconds": [3.0]})
    rtn = pd.DataFrame({"model_bytes": [1.0e6], "latency_ms": [12.0], "decode_ms_per_token": [2.0], "quantize_seconds": [0.03]})
    assert [c.phrase() for c in quantization_costs(gptq, rtn)] == [
        None, "runs a val batch in 12.0 ms against 12.0 ms (timed one after the other)",
        "decodes in 2.00 ms against 2.00 ms per token (timed one after the other)",
        "quantizes in 3.00 s against 30.0 ms (timed one after the other)"]


def test_a_moe_states_its_active_parameters_before_its_total():
    variants = pd.DataFrame([{"variant": "dense", "params": 924_420.0, "active_params": 924_420.0},
                             {"variant": "top2", "params": 2_510_000.0, "active_params": 925_000.0}])
    facts = costs("top2", "dense", variants, _runs().iloc[:0], KERNELS.iloc[:0], MACHINE)
    assert [c.phrase() for c in facts] == [
        "has the same active parameters per token (925.00k against 924.42k)",
        "has 172% more parameters (2.51M against 924.42k)"]


def _decode_at(name: str, context: int, per_token_s: float, kv_per_token: float, state: float | None) -> dict:
    held = context * kv_per_token + (state or 0)
    return {"component": "decode", "status": "ok", "machine": MACHINE, "name": name, "spec_hash": "c", "n_kv_head": None,
            "window": None, "positional": "rope", "prompt": context, "new_tokens": 32, "context": context,
            "phase": "decode", "per_token_s": per_token_s, "kv_cache_bytes": held,
            "kv_cache_bytes_final": held + 32 * kv_per_token, "kv_cache_bytes_per_token": kv_per_token,
            "state_bytes": state}


def test_a_variant_with_a_state_states_it_beside_the_kv_cache_at_the_longest_context_both_were_timed_at():
    variants = pd.DataFrame([{"variant": "mha", "params": 1000.0, "kv_cache_bytes_per_token": 1024.0, "state_bytes": None},
                             {"variant": "gla", "params": 1000.0, "kv_cache_bytes_per_token": 0.0, "state_bytes": 4096.0}])
    runs = pd.DataFrame([{"variant": v, "device": "cpu", "config": {"model": {"attention": {"name": v}}}}
                         for v in ("mha", "gla")])
    kernels = pd.DataFrame([_decode_at("mha", c, 1e-3 * c / 256, 1024.0, None) for c in (256, 1024, 4096)]
                           + [_decode_at("gla", c, 1e-3, 0.0, 4096.0) for c in (256, 1024)])  # gla: not at 4096
    facts = {c.what: c for c in costs("gla", "mha", variants, runs, kernels, MACHINE)}
    assert set(facts) == {"parameters", "decode memory", "decode latency"}  # no "KV cache" of 0 against 1 KiB
    # the KV cache is never stated as 0 (free): the state per sequence is said beside it, at 1024 + 32 tokens
    assert facts["decode memory"].phrase() == (
        "decodes with a 4.00 KiB state per sequence and no KV cache against 1.00 KiB of KV cache per token "
        "(4.00 KiB against 1.03 MiB held per 1056-token sequence)")
    assert facts["decode latency"].phrase() == "decodes in 1.00 ms against 4.00 ms per token (timed one after the other)"
    # without decode timings: what the trained models declare (bf16), as the summary has it
    trained = costs("gla", "mha", variants, runs, kernels.iloc[:0], MACHINE)
    assert [c.phrase() for c in trained] == [None, "decodes with a 4.00 KiB state per sequence and no KV cache "
                                                   "against 1.00 KiB of KV cache per token"]
    same = costs("gla", "gla", variants, runs, kernels.iloc[:0], MACHINE)
    assert cost_sentence(same, MACHINE) == ""  # the same state: not worth a word


def test_decode_costs_keep_one_row_per_length_and_prefer_the_bytes_held_after_decoding():
    kernels = pd.DataFrame([_decode_at("mha", c, 1e-3, 1024.0, None) for c in (256, 1024)])
    found = decode_costs(kernels, MACHINE)
    assert list(found["tokens"]) == [288, 1056] and list(found["kv_cache_bytes"]) == [288 * 1024.0, 1056 * 1024.0]


def test_a_hybrid_is_never_matched_to_the_decode_timings_of_its_main_attention():
    from bench.costs import attention_name

    assert attention_name({"model": {"attention": {"name": "gla", "conv": 0}}}) == "gla"
    assert attention_name({"model": {"attention": "gla", "hybrid": {"attention": "mha", "every": 2}}}) is None
