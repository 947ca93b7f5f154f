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
    # the model's own widths and heads (a plugin's options may need them), one short layer, a small vocabulary
    try:
        small = ModelConfig.from_dict({**config.to_dict(), "n_layer": 1, "block_size": 16, "vocab_size": 32})
    except ValueError:  # an option that needs the model's own context length (a window): check at full size
        small = config
    found = []
    for family in CHECKED_FAMILIES:
        spec = getattr(small, family, None)
        if spec is None or not is_plugin(component := get(family, spec["name"])):
            continue
        options = {k: v for k, v in spec.items() if k != "name"}
        if "backend" in component.options:
            options["backend"] = "math"  # matmuls the counter sees (CPU SDPA's it does not)
        try:
            counted = ModelConfig.from_dict({**small.to_dict(), family: {"name": spec["name"], **options}})
            problem = check_flops(family, spec["name"], options, config=counted, rel_tol=FLOP_TOLERANCE)
            found += [problem] if problem else []
            if family == "attention":
                found += unkeyed_fused_projections(build_spec("attention", spec, small), spec["name"], small.n_embd)
        except Exception as e:  # noqa: BLE001 - a component that cannot be built small: say so, keep checking
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            found.append(f"{family} '{spec['name']}': could not be checked at a small size ({type(e).__name__}: {reason})")
    return found


def unkeyed_fused_projections(module: nn.Module, name: str, n_embd: int) -> list[str]:
    """A warning per fused projection (q with k and v: more than n_embd output rows from the input) of
    an attention module that declares no ``init_blocks()``."""
    if hasattr(module, "init_blocks"):
        return []
    return [f"attention '{name}': its projection '{path}' ({m.in_features} → {m.out_features} rows) fuses blocks "
            "but the module declares no init_blocks(), so it is drawn as one block and, with the same seed, does "
            "not start from the reference's q, k and v weights; declare init_blocks() as models.attention.Attention does"
            for path, m in module.named_modules()
            if isinstance(m, nn.Linear) and m.in_features == n_embd and m.out_features > n_embd]
