"""Vision-language models assembled from the registry: fusion, freezing, accounting, decoding, the dual
encoder and the refusals of configs and runs that cannot work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.config import resolve_run
from bench.train import evaluate_pairs
from models import ModelConfig, build_model, flops_per_token
from models.accounting import counted_flops, sequence_flops, shapes_only
from models.optimizers import adamw

TEXT = {"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 40, "block_size": 32, "attention": {"name": "mha", "backend": "math"}}
VIT = {"name": "vit", "image_size": 16, "channels": 1, "patch_size": 4, "n_layer": 1, "n_embd": 32,
       "attention": {"name": "mha", "backend": "math"}}  # math: FlopCounterMode sees its matmuls


def vlm(**model) -> torch.nn.Module:
    return build_model({**TEXT, "vision": VIT, **model}, seed=3)


def batch(rows: int = 2, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 40, (rows, length), generator=gen)
    return idx, torch.roll(idx, -1, 1), torch.rand(rows, 1, 16, 16, generator=gen)


def test_prefix_puts_image_tokens_first_and_takes_the_loss_on_the_text_only():
    model = vlm(connector="linear", fusion="prefix")
    idx, targets, images = batch()
    out = model(idx, targets, images=images)
    assert out.logits.shape == (2, 6, 40)  # 16 image positions ran through the blocks, none reached the head
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.reshape(-1, 40), targets.reshape(-1)))
    # the text reads the image: another image changes every text position's logits (causal: all follow it)
    other = model(idx, images=torch.rand(2, 1, 16, 16)).logits
    assert (other - out.logits).abs().amax(dim=(0, 2)).min() > 1e-4
    assert model.fusion.prefix_tokens == 16  # the 4×4 patches' tokens, before the text


def test_cross_attention_starts_as_the_text_only_model_bitwise():
    text_only = build_model(TEXT, seed=3)
    fused = vlm(fusion={"name": "cross_attention", "every": 1})
    idx, targets, images = batch()
    assert torch.equal(fused(idx, images=images).logits, text_only(idx).logits)  # tanh(0) gates: exactly x
    fused(idx, targets, images=images).loss.backward()
    gates = [layer.gates.grad for layer in fused.fusion.layers.values()]
    assert len(gates) == 2 and all(g is not None and g[0].abs() > 0 for g in gates)  # the gates learn first
    with torch.no_grad():
        for layer in fused.fusion.layers.values():
            layer.gates.fill_(0.5)
    assert not torch.equal(fused(idx, images=images).logits, text_only(idx).logits)


def test_a_frozen_encoder_gets_no_gradient_and_no_optimizer_state():
    model = vlm(vision={**VIT, "trainable": False})
    idx, targets, images = batch()
    model(idx, targets, images=images).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())
    assert model.connector.proj.weight.grad is not None  # the connector learns to read it
    trained = {id(p) for opt in adamw(model, _train(3e-3)) for g in opt.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in model.vision.parameters()}


def test_the_encoder_trains_at_its_own_learning_rate():
    model = vlm(vision={**VIT, "lr": 1e-3})
    groups = adamw(model, _train(4e-3))[0].param_groups
    vision = {id(p) for p in model.vision.parameters()}
    scales = {g["lr_scale"] for g in groups if {id(p) for p in g["params"]} <= vision}
    assert scales == {0.25}
    assert {g["lr_scale"] for g in groups if not {id(p) for p in g["params"]} & vision} == {1.0}


def _train(lr: float):
    from bench.config import TrainConfig

    return TrainConfig(lr=lr)


@pytest.mark.parametrize("model", [
    {"connector": "linear", "fusion": "prefix"},
    {"connector": {"name": "pixel_shuffle", "factor": 2}, "fusion": "prefix"},
    {"connector": {"name": "resampler", "queries": 3}, "fusion": {"name": "cross_attention", "every": 2}},
    {"contrastive": "siglip"},
])
def test_the_accounting_counts_what_torch_counts(model):
    net = vlm(**model)
    idx, targets, images = batch(rows=3, length=8)
    counted = counted_flops(net, idx, targets, None, images)
    expected = sequence_flops(net, 8, causal=False) * 3
    assert counted == pytest.approx(expected, rel=0.01)
    config = ModelConfig(**{**TEXT, "vision": VIT, **model})
    assert flops_per_token(config, seq_len=8) == pytest.approx(3 * sequence_flops(shapes_only(config), 8, False) / 8)


@pytest.mark.parametrize("fusion", ["prefix", {"name": "cross_attention", "every": 1}])
def test_decoding_with_a_cache_equals_the_full_forward(fusion):
    model = vlm(fusion=fusion).eval()
    with torch.no_grad():  # open the gates, so that cross-attention reads the image while decoding
        for name, p in model.named_parameters():
            if name.endswith("gates"):
                p.fill_(0.7)
    idx, _, images = batch(rows=2, length=7)
    with torch.no_grad():
        full = model(idx, images=images).logits
        cache = model.new_cache()
        steps = [model(idx[:, :4], cache=cache, images=images).logits]  # the prefill reads the image
        steps += [model(idx[:, t : t + 1], cache=cache).logits for t in range(4, 7)]  # then text alone
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        assert (model(idx, images=1 - images).logits - full).abs().max() > 1e-3
    assert torch.equal(model.generate(idx, 4, temperature=0, images=images),
                       model.generate(idx, 4, temperature=0, images=images, use_cache=False))


def test_the_prefix_takes_cache_positions_and_cross_attention_does_not():
    idx, _, images = batch(rows=1, length=5)
    for fusion, positions in (("prefix", 16 + 5), ({"name": "cross_attention"}, 5)):
        model = vlm(fusion=fusion)
        cache = model.new_cache()
        model(idx, cache=cache, images=images)
        assert cache.length == positions


def test_the_dual_encoder_scores_pairs_with_its_loss():
    model = vlm(contrastive="clip")
    idx, targets, images = batch(rows=4, length=6)
    targets[:, 4:] = -1  # each caption is read at its last labelled position: 3
    out = model(idx, targets, images=images)
    image, text = model.embed(idx, targets, images)
    assert out.logits.shape == (4, 4)
    assert torch.allclose(out.logits, model.pair_loss.logits(image, text))
    assert torch.allclose(out.loss, model.pair_loss(image, text))
    assert torch.allclose(image.norm(dim=1), torch.ones(4)) and torch.allclose(text.norm(dim=1), torch.ones(4))
    changed = idx.clone()
    changed[:, 5] = 1  # after the read position: the causal text encoder never sees it
    assert torch.equal(model.embed(changed, targets, images)[1], text)


def test_recall_counts_a_retrieved_twin_caption_as_right():
    model = vlm(contrastive="clip")
    idx, targets, images = batch(rows=4, length=6)
    idx[1], targets[1] = idx[0], targets[0]  # pairs 0 and 1 share a caption, with two different images
    recall = evaluate_pairs(model, [(idx, targets, images)], torch.device("cpu"), torch.float32)
    image, text = model.embed(idx, targets, images)
    scores = model.pair_loss.logits(image, text)
    twins = {0: {0, 1}, 1: {0, 1}, 2: {2}, 3: {3}}
    i2t = sum(int(scores[i].argmax()) in twins[i] for i in range(4)) / 4
    t2i = sum(int(scores[:, i].argmax()) in twins[i] for i in range(4)) / 4
    assert recall["recall_i2t"] == pytest.approx(i2t) and recall["recall_t2i"] == pytest.approx(t2i)


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, words", [
    ({"connector": "linear"}, ["model.connector", "model.vision"]),
    ({"fusion": "prefix"}, ["model.fusion", "model.vision"]),
    ({"contrastive": "clip"}, ["model.contrastive", "model.vision"]),
    ({"vision": {**VIT, "image_size": 18}}, ["image_size=18", "patch_size=4"]),
    ({"vision": VIT, "connector": {"name": "pixel_shuffle", "factor": 3}}, ["pixel_shuffle", "4×4"]),
    ({"vision": VIT, "contrastive": "clip", "fusion": "prefix"}, ["model.fusion", "contrastive"]),
])
def test_a_model_that_cannot_work_is_refused_by_name(model, words):
    with pytest.raises(ValueError) as refused:
        ModelConfig(**{**TEXT, **model})
    assert all(word in str(refused.value) for word in words), str(refused.value)


DIGITS = {"source": "images", "scene": "digits", "grid": 2, "n_train": 64, "n_val": 16}


@pytest.mark.parametrize("model, data, words", [
    ({"n_layer": 1, "n_head": 2, "n_embd": 16}, DIGITS, ["data.source 'images'", "model.vision=None"]),
    ({"n_layer": 1, "n_head": 2, "n_embd": 16, "vision": "vit"}, {"source": "task", "task": "induction", "vocab_size": 16,
                                                                   "seq_len": 16, "n_train": 8},
     ["model.vision=vit", "data.source 'task'"]),
    ({"n_layer": 1, "n_head": 2, "n_embd": 16, "vision": {"name": "vit", "image_size": 24, "patch_size": 4}}, DIGITS,
     ["model.vision.image_size=24", "1×16×16"]),
    ({"n_layer": 1, "n_head": 2, "n_embd": 16, "vision": "vit", "contrastive": "clip"}, DIGITS, ["data.format=qa", "data.format: caption"]),
])
def test_a_run_whose_data_and_model_disagree_is_refused_by_key(model, data, words):
    with pytest.raises(ValueError) as refused:
        resolve_run(model, data, {"batch_size": 4, "steps": 1})
    assert all(word in str(refused.value) for word in words), str(refused.value)


def test_a_run_takes_the_image_size_from_its_data_and_fits_the_prefix_in_its_positions():
    run = resolve_run({"n_layer": 1, "n_head": 2, "n_embd": 16, "vision": {"name": "vit", "patch_size": 4}},
                      {**DIGITS, "scene": "shapes"}, {"batch_size": 4, "steps": 1})
    assert (run.model.vision["image_size"], run.model.vision["channels"]) == (16, 3)
    assert run.model.block_size == run.seq_len + 16  # learned positions cover the 16 image tokens too


# -- serving ------------------------------------------------------------------------------------------


def _served(fusion) -> torch.nn.Module:
    model = vlm(fusion=fusion, positional="rope").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gates"):
                p.fill_(0.7)  # cross-attention open: requests with other images decode differently
    return model


@pytest.mark.parametrize("fusion", ["prefix", {"name": "cross_attention", "every": 1}])
def test_continuous_batching_of_requests_with_their_own_images_equals_each_alone(fusion):
    from tests.test_serve import Collector

    from bench.serve.engine import Engine, Sequence

    model = _served(fusion)
    gen = torch.Generator().manual_seed(1)
    prompts = [[1, 2, 3], [5, 8, 13, 21, 4], [7, 7]]
    images = [torch.rand(1, 1, 16, 16, generator=gen) for _ in prompts]
    engine = Engine(model, max_batch=3).start()
    collectors = [Collector() for _ in prompts]
    try:
        for prompt, image, c in zip(prompts, images, collectors):
            engine.submit(Sequence(prompt, 5, c, image=image))
        assert all(c.done.wait(30) for c in collectors)
    finally:
        engine.stop()
    assert engine.batching == "continuous" and engine.max_batched >= 2
    for prompt, image, c in zip(prompts, images, collectors):
        alone = model.generate(torch.tensor([prompt]), 5, temperature=0, images=image)[0, len(prompt):].tolist()
        assert c.tokens == alone


def _png(pixels) -> str:
    import numpy as np

    from bench.pictures import png_base64

    return png_base64(np.asarray(pixels, dtype=np.uint8))


def test_the_service_takes_an_image_and_refuses_one_it_cannot_read():
    import base64

    import numpy as np

    from fastapi.testclient import TestClient

    from bench.pictures import MAX_IMAGE_BYTES
    from bench.serve.app import create_app
    from bench.serve.engine import Engine

    model = _served("prefix")
    grey = np.random.default_rng(0).integers(0, 256, (1, 16, 16))
    with TestClient(create_app(Engine(model), None, max_tokens=model.config.block_size)) as client:
        ok = client.post("/generate", json={"tokens": [1, 2, 3], "max_new_tokens": 4, "image": _png(grey)})
        assert ok.status_code == 200, ok.text
        image = torch.from_numpy(grey[None].astype(np.float32) / 255)
        assert ok.json()["tokens"] == model.generate(torch.tensor([[1, 2, 3]]), 4, temperature=0, images=image)[0, 3:].tolist()
        refusals = {
            "not valid base64": "%%%",
            "not a decodable image": base64.b64encode(b"not a png at all").decode(),
            "more than the": base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 1)).decode(),
            "but this model reads 16×16": _png(grey[:, :8, :8]),
            "but this model reads 1 channel": _png(np.repeat(grey, 3, axis=0)),
        }
        for words, encoded in refusals.items():
            refused = client.post("/generate", json={"tokens": [1, 2], "max_new_tokens": 2, "image": encoded})
            assert refused.status_code == 400 and words in refused.json()["error"], (words, refused.text)
        missing = client.post("/generate", json={"tokens": [1, 2], "max_new_tokens": 2})
        assert missing.status_code == 400 and "base64 PNG of 16×16" in missing.json()["error"]
        assert client.get("/health").json()["status"] == "ok"  # refusals leave the service serving
    text_only = build_model(TEXT, seed=0).eval()
    with TestClient(create_app(Engine(text_only), None, max_tokens=32)) as client:
        refused = client.post("/generate", json={"tokens": [1, 2], "max_new_tokens": 2, "image": _png(grey)})
        assert refused.status_code == 400 and "reads no images" in refused.json()["error"]


# -- a study end to end -------------------------------------------------------------------------------

STUDY = """\
name: tiny-vlm
base:
  model: {n_layer: 1, n_head: 2, n_embd: 16, vision: {name: vit, patch_size: 8, n_layer: 1, n_embd: 16, n_head: 2}}
  data: {source: images, scene: shapes, grid: 2, n_train: 64, n_val: 24}
  train: {batch_size: 8, eval_every: 4, warmup_steps: 1, device: cpu, dtype: float32}
budget: {steps: 8}
variants:
  prefix: {}
  cross: {model.fusion: {name: cross_attention}}
seeds: 2
speed: null
serving: {concurrency: [2], requests: 4, new_tokens: 2}
"""

PAIRS = """\
name: tiny-clip
base:
  model: {n_layer: 1, n_head: 2, n_embd: 16, vision: {name: vit, patch_size: 8, n_layer: 1, n_embd: 16, n_head: 2},
          contrastive: clip}
  data: {source: images, scene: shapes, grid: 2, n_train: 64, n_val: 24, format: caption}
  train: {batch_size: 8, eval_every: 4, warmup_steps: 1, device: cpu, dtype: float32}
budget: {steps: 8}
variants:
  clip: {}
  siglip: {model.contrastive: siglip}
metric: val_recall_i2t
seeds: 2
speed: null
"""


def test_a_multimodal_study_runs_end_to_end_and_its_report_shows_images_and_answers(tmp_path):
    import html as html_lib
    import re

    from bench.run import main as run_main
    from bench.store import load

    spec = tmp_path / "vlm.yaml"
    spec.write_text(STUDY)
    assert run_main([str(spec), "--out", str(tmp_path / "vlm")]) == 0
    store = load(tmp_path / "vlm")
    runs = store.runs
    assert set(runs["status"]) == {"finished"} and len(runs) == 4
    # each variant served its validation questions with their images over HTTP, none refused
    assert sorted(store.serving["variant"]) == ["cross", "prefix"] and (store.serving["errors"] == 0).all()
    samples = runs.iloc[0]["val_samples"]
    assert len(samples) == 8 and {"image", "type", "question", "truth", "answer"} <= set(samples[0])
    page = (tmp_path / "vlm" / "report.html").read_text()
    assert "<h2>Images and answers" in page and "Accuracy by question type" in page
    assert page.count('<img src="data:image/png;base64,') == 8
    for question_type in ("position", "colour", "count", "exists", "caption"):
        assert f'<th class="num">{question_type}</th>' in page
    truth = re.findall(r"truth: <strong>(.*?)</strong>", page)
    assert [html_lib.unescape(t) for t in truth] == [s["truth"] for s in samples]
    assert re.search(r'class="(yes|no)">cross: ', page) and re.search(r'class="(yes|no)">prefix: ', page)

    pairs = tmp_path / "clip.yaml"
    pairs.write_text(PAIRS)
    assert run_main([str(pairs), "--out", str(tmp_path / "clip")]) == 0
    recall = load(tmp_path / "clip").runs
    assert recall["val_recall_i2t"].between(0, 1).all() and recall["val_recall_t2i"].between(0, 1).all()
    page = (tmp_path / "clip" / "report.html").read_text()
    assert "Retrieval on the validation pairs" in page and "image → text recall@1" in page
    assert "<img" not in page  # a contrastive study keeps no answers to show


# -- edges found in review ------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> str:
    """A base64 PNG whose header claims width × height pixels (its data is one grey row)."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 17)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def test_an_image_claiming_a_huge_size_is_refused_before_any_pixel_is_decoded():
    from bench.pictures import ImageRefused, image_tensor

    with pytest.raises(ImageRefused, match="sensible size"):
        image_tensor(_png_claiming(14000, 14000), 1, 16)  # PIL's decompression-bomb guard, as a refusal
    with pytest.raises(ImageRefused, match="10000×10000 pixels"):
        image_tensor(_png_claiming(10000, 10000), 1, 16)  # refused on its header: 100 M pixels never decoded


def test_generating_past_the_positions_crops_the_text_to_what_the_prefix_leaves():
    model = build_model({**TEXT, "block_size": 24, "vision": VIT}, seed=0).eval()  # 16 image + 8 text positions
    idx, _, images = batch(rows=1, length=4)
    out = model.generate(idx, 6, temperature=0, images=images)  # 10 text tokens: past the 8 left
    assert out.shape == (1, 10)
    assert torch.equal(out, model.generate(idx, 6, temperature=0, images=images, use_cache=False))


def test_the_serving_budget_counts_cross_attentions_image_keys_and_values():
    from bench.serve.engine import Engine

    model = _served({"name": "cross_attention", "every": 1})
    cache = model.new_cache()
    model(torch.tensor([[1, 2]]), cache=cache, images=torch.rand(1, 1, 16, 16))
    text_bytes = sum(layer.nbytes() for layer in cache.layers)
    engine = Engine(model, kv_budget_bytes=cache.nbytes())
    assert engine.sequence_bytes == cache.nbytes() - text_bytes == 2 * 2 * 16 * 32 * 4  # layers × (k, v) × M × C × fp32
    assert engine.fits_alone(2) and not engine.fits_alone(3)


def test_a_frozen_encoder_costs_its_forward_pass_only():
    trained = ModelConfig(**{**TEXT, "vision": VIT})
    frozen = ModelConfig(**{**TEXT, "vision": {**VIT, "trainable": False}})
    per_image = shapes_only(trained).vision.flops_per_image()
    assert flops_per_token(frozen, seq_len=8) == pytest.approx(flops_per_token(trained, seq_len=8) - 2 * per_image / 8)


def test_the_encoders_own_learning_rate_is_its_own_under_muon_and_refused_where_it_cannot_hold():
    from models.optimizers import muon

    model = vlm(vision={**VIT, "lr": 1e-3})
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch ≥ 2.9")
    groups = [g for opt in muon(model, _train(4e-3), adamw_lr=8e-3) for g in opt.param_groups]
    vision = {id(p) for p in model.vision.parameters()}
    assert {g["lr_scale"] for g in groups if {id(p) for p in g["params"]} <= vision} == {0.25}
    with pytest.raises(ValueError, match="vision.lr=0.001 cannot be kept under train.distributed.strategy=fsdp"):
        resolve_run({"n_layer": 1, "n_head": 2, "n_embd": 16, "vision": {"name": "vit", "patch_size": 8, "lr": 1e-3}},
                    {**DIGITS, "scene": "shapes"}, {"batch_size": 4, "steps": 1, "distributed": {"strategy": "fsdp"}})
    with pytest.raises(ValueError, match="post-training quantization of a model that reads images"):
        resolve_run({"n_layer": 1, "n_head": 2, "n_embd": 16, "vision": {"name": "vit", "patch_size": 8},
                     "quantization": "int8_weight_only"}, {**DIGITS, "scene": "shapes"}, {"batch_size": 4, "steps": 1})


def test_the_images_section_is_for_runs_that_read_images():
    import pandas as pd

    from bench.report.multimodal import multimodal_section

    quantized = pd.DataFrame({"variant": ["int8"], "seed": [0], "status": ["finished"], "val_accuracy": [0.9],
                              "val_accuracy_float": [0.91], "val_accuracy_delta": [-0.01]})
    assert multimodal_section(quantized, ["int8"]) is None
