"""The optimizer family: AdamW, Muon (Newton–Schulz on block matrices, AdamW for the rest), Lion."""

from __future__ import annotations

import pytest
import torch

from bench.config import TrainConfig, resolve_run
from bench.parallel import Strategy, World, make_optimizers
from bench.plan import run_id
from bench.train import train
from models import build_model
from models.optimizers import muon_matrices
from tests.conftest import tiny
from tests.test_train import MARKOV, TINY, curve, fp32

# each optimizer at a learning rate that trains the tiny model (Lion's is ~10× smaller than AdamW's)
SETTINGS = {"adamw": {"lr": 3e-3}, "muon": {"lr": 0.02, "optimizer": {"name": "muon", "adamw_lr": 3e-3}},
            "lion": {"lr": 3e-4, "optimizer": "lion"}}


def conditioned(rows: int, cols: int, condition: float, seed: int = 0) -> torch.Tensor:
    """A random matrix whose singular values run log-evenly from 1 down to 1/condition."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    return u @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), k)) @ v.T


def test_muon_orthogonalises_each_block_matrix_into_the_documented_band_scaled_by_its_shape():
    model = build_model(tiny())
    train_config = TrainConfig(lr=1.0, weight_decay=0.0, optimizer={"name": "muon", "momentum": 0.0, "nesterov": False})
    optimizers = make_optimizers(model, train_config)
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    for name, p in params.items():
        p.grad = torch.zeros_like(p)
    tall, wide = "blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_proj.weight"  # (128, 32) and (32, 128)
    params[tall].grad = conditioned(128, 32, 100.0, seed=1)
    params[wide].grad = conditioned(32, 128, 100.0, seed=2)
    for optimizer in optimizers:
        optimizer.step()
    for name, shape_scale in ((tall, 2.0), (wide, 1.0)):  # lr × √max(1, rows/cols)
        update = before[name] - params[name].detach()
        singular = torch.linalg.svdvals(update) / shape_scale
        # Newton–Schulz's quintic (5 steps) maps singular values spread 100× into roughly (0.5, 1.5)
        assert singular.min() > 0.5 and singular.max() < 1.5, (name, singular.min(), singular.max())
        assert singular.max() / singular.min() < 2.0
    assert torch.equal(params["wte.weight"], before["wte.weight"])  # AdamW side: zero gradient, no decay


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else_at_its_own_learning_rate():
    model = build_model(tiny())
    hidden, rest = muon_matrices(model)
    assert {n for n, _ in hidden} == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")}
    assert "wte.weight" in {n for n, _ in rest}  # the embedding (tied to the head)
    strategy = Strategy(World(0, 1, 0), torch.device("cpu"))
    strategy.setup(model, TrainConfig(lr=0.02, optimizer={"name": "muon", "adamw_lr": 3e-3}), micro=1, accumulation=1)
    muon, adamw = strategy.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    owned = [id(p) for o in strategy.optimizers for g in o.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # every parameter, exactly once
    strategy.set_lr(0.01)  # the schedule halfway down
    assert {g["lr"] for g in muon.param_groups} == {0.01}
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.01 * 3e-3 / 0.02] * 2)  # decayed and not


@pytest.mark.parametrize("name", SETTINGS)
def test_each_optimizer_lowers_the_loss(name):
    settings = SETTINGS[name]
    run = resolve_run(TINY, MARKOV, fp32(steps=40, batch_size=8, seq_len=32, warmup_steps=5, eval_every=40, **settings))
    result = train(run)
    assert result["status"] == "finished"
    assert result["val_loss"] < 0.9 * torch.log(torch.tensor(16.0)).item()  # below the uniform guess, ln 16


@pytest.mark.parametrize("name", ["muon", "lion"])
def test_a_killed_run_resumes_bitwise_with_each_optimizer(tmp_path, name):
    run = resolve_run(TINY, MARKOV, fp32(steps=12, batch_size=4, micro_batch_size=2, seq_len=32, eval_every=6,
                                         checkpoint_every=4, **SETTINGS[name]))
    whole = train(run, tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill(record):
        if record["step"] == 6:
            raise Killed

    with pytest.raises(Killed):
        train(run, tmp_path / "resumed", on_step=kill)
    resumed = train(run, tmp_path / "resumed")
    assert resumed["resumed_from"] == 4
    assert [r["train_loss"] for r in curve(tmp_path / "resumed")] == [r["train_loss"] for r in curve(tmp_path / "whole")]
    assert resumed["val_loss"] == whole["val_loss"]


def test_gradient_accumulation_is_the_same_experiment_under_muon():
    settings = SETTINGS["muon"]
    whole = resolve_run(TINY, MARKOV, fp32(steps=5, batch_size=8, seq_len=32, eval_every=5, **settings))
    split = resolve_run(TINY, MARKOV, fp32(steps=5, batch_size=8, micro_batch_size=2, seq_len=32, eval_every=5, **settings))
    assert train(split)["val_loss"] == pytest.approx(train(whole)["val_loss"], rel=1e-4)


def test_the_optimizer_is_part_of_a_runs_identity_and_adamw_keeps_the_ids_from_before():
    base = dict(steps=20, batch_size=4, seq_len=32, lr=3e-3)
    default = resolve_run(TINY, MARKOV, base)
    assert default.train.optimizer == {"name": "adamw", "lr_weight_decay": None}
    # AdamW at its defaults is left out of the identity: the id of the run before the optimizer family (for
    # this data version: epochs of batches since version 2)
    explicit = resolve_run(TINY, MARKOV, {**base, "optimizer": {"name": "adamw"}})
    assert run_id(default) == "00ee9e6a544b4236" and run_id(explicit) == run_id(default)
    assert run_id(resolve_run(TINY, MARKOV, {**base, "optimizer": {"name": "adamw", "lr_weight_decay": 1e-3}})) != run_id(default)
    lion = resolve_run(TINY, MARKOV, {**base, "optimizer": "lion"})
    assert lion.train.optimizer == {"name": "lion", "beta1": 0.9, "beta2": 0.99, "lr_weight_decay": None}
    assert run_id(lion) != run_id(default)


def test_bad_optimizer_specs_are_refused_naming_what_would_do():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'.*valid: adamw, lion, muon"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="option 'momentum' expects float"):
        TrainConfig(optimizer={"name": "muon", "momentum": "high"})
    with pytest.raises(ValueError, match="muon cannot train under DeepSpeed ZeRO.*use strategy ddp or fsdp"):
        TrainConfig(optimizer="muon", batch_size=8, distributed={"strategy": "deepspeed", "zero_stage": 2, "nproc": 2})


@pytest.mark.parametrize("lr", [1e-3, 4e-3])
def test_adamw_lion_and_muon_decay_alike_at_a_stated_lr_times_weight_decay(lr):
    """Lion's lr is 3-10× smaller than AdamW's: matched on weight decay means matched on lr × weight_decay,
    the per-step decay both apply, whatever lr each is tuned to."""
    for name in ("adamw", "lion", "muon"):
        optimizers = make_optimizers(build_model(tiny()), TrainConfig(lr=lr, optimizer={"name": name, "lr_weight_decay": 1.2e-3}))
        decayed = [g for o in optimizers for g in o.param_groups if g["weight_decay"] > 0]
        assert decayed and all(g["weight_decay"] * lr == pytest.approx(1.2e-3) for g in decayed), name
    default = make_optimizers(build_model(tiny()), TrainConfig(lr=lr, weight_decay=0.1, optimizer="lion"))
    assert max(g["weight_decay"] for g in default[0].param_groups) == 0.1  # without it, train.weight_decay as given


def test_a_tuned_lr_must_reach_muons_adamw_part(tmp_path):
    from bench.spec import Spec

    spec = {"name": "o", "base": {"data": {"source": "markov"}}, "tune": {"train.lr": [1e-2, 2e-2]},
            "variants": {"adamw": {}, "muon": {"train.optimizer": {"name": "muon", "adamw_lr": 3e-3}}}}
    with pytest.raises(ValueError, match="variants.muon: muon's adamw_lr is fixed at 0.003 while train.lr is tuned"):
        Spec.model_validate(spec)
    tied = {**spec, "variants": {"adamw": {}, "muon": {"train.optimizer": {"name": "muon", "adjust_lr": "match_rms_adamw"}}}}
    assert Spec.model_validate(tied).tune_grid("muon") == {"train.lr": [1e-2, 2e-2]}
    both = {**spec, "tune": {"train.lr": [1e-2, 2e-2], "train.optimizer.adamw_lr": [3e-3, 6e-3]}}
    assert Spec.model_validate(both).tune_grid("muon")["train.optimizer.adamw_lr"] == [3e-3, 6e-3]
