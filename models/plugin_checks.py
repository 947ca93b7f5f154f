"""What a dry run checks in a plugin's components (those a spec's ``plugins:`` registered): traps the
registry cannot see in a class, found by building the component once at a small size.

- FLOPs: its accounting (its linear layers plus ``extra_flops_per_token``) against torch's
  FlopCounterMode; more than 2% apart, every FLOP and MFU figure of its runs would be off.
- Initial weights: a fused projection (one ``nn.Linear`` making several n_embd-wide blocks, as q, k
  and v) with no ``init_blocks()`` is drawn as one block, so with the same seed the variant no longer
  starts from the reference's q, k and v weights, and its paired differences measure the draw too.
"""

from __future__ import annotations

from torch import nn

from models.accounting import check_flops
from models.config import ModelConfig
from models.registry import Component, build_spec, get

FLOP_TOLERANCE = 0.02
CHECKED_FAMILIES = ("attention", "positional", "norm", "mlp", "moe")  # those check_flops counts


def is_plugin(component: Component) -> bool:
    """Whether a component was registered outside archbench's own models package."""
    return component.factory.__module__.partition(".")[0] != "models"


def plugin_warnings(config: ModelConfig) -> list[str]:
    """Why each plugin component of a model config would mislead a study, or [] when none would."""
    found = []
    for family in CHECKED_FAMILIES:
        spec = getattr(config, family, None)
        if spec is None or not is_plugin(component := get(family, spec["name"])):
            continue
        options = {k: v for k, v in spec.items() if k != "name"}
        if "backend" in component.options:
            options["backend"] = "math"  # matmuls the counter sees (CPU SDPA's it does not)
        try:
            problem = check_flops(family, spec["name"], options, rel_tol=FLOP_TOLERANCE)
        except Exception as e:  # noqa: BLE001 - a component that cannot be built small: say so, keep checking
            problem = f"{family} '{spec['name']}': its FLOPs could not be checked ({type(e).__name__}: {e})"
        if problem:
            found.append(problem)
        if family == "attention":
            found += unkeyed_fused_projections(spec, config)
    return found


def unkeyed_fused_projections(spec: dict, config: ModelConfig) -> list[str]:
    """A warning per fused projection of an attention that declares no ``init_blocks()``."""
    small = ModelConfig(n_layer=1, n_head=config.n_head, n_embd=config.n_embd, block_size=16, vocab_size=32,
                        bias=config.bias, attention=spec)
    module = build_spec("attention", spec, small)
    if hasattr(module, "init_blocks"):
        return []
    C = config.n_embd
    return [f"attention '{spec['name']}': its projection '{name}' ({m.in_features} → {m.out_features}) fuses "
            f"{m.out_features / C:g} blocks of n_embd={C} rows but the module declares no init_blocks(), so it is "
            "drawn as one block and, with the same seed, does not start from the reference's q, k and v weights; "
            "declare init_blocks() as models.attention.Attention does"
            for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and m.in_features == C and m.out_features >= 2 * C]
