"""Feed-forward blocks. Context: (config). The output projection into the residual stream is named
``c_proj`` so that the GPT's initialisation scales it by 1/sqrt(2·n_layer), as nanoGPT does."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from models.registry import register


def relu_squared(x: Tensor) -> Tensor:
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu2": relu_squared, "silu": F.silu}


def gelu_mlp_params(n_embd: int, bias: bool) -> int:
    """Parameters of the 4·d MLP (GPT-2): 2·4d·d weights, plus 4d + d biases."""
    return 8 * n_embd * n_embd + (5 * n_embd if bias else 0)


def gated_mlp_params(n_embd: int, hidden: int, bias: bool) -> int:
    """Parameters of a gated MLP of that hidden size: 3·h·d weights, plus 2h + d biases."""
    return 3 * hidden * n_embd + (2 * hidden + n_embd if bias else 0)


def gated_hidden(n_embd: int, *, bias: bool = True, multiple_of: int = 8, tolerance: float = 0.01) -> int:
    """Hidden size h of a gated MLP with the parameters of the 4·d GELU MLP (Shazeer 2020; LLaMA).

    h minimises |3·h·d − 8·d²|, biases counted when the config has them (3·h·d + 2h + d against
    8·d² + 5·d): the best multiple of ``multiple_of`` (8) when that is within ``tolerance`` (1%) of
    the GELU MLP's count — every width from d = 120 up — else the best integer, within 1% from
    d = 16 up. Narrower widths that no h matches within 1% get a warning with the exact ratio.
    E.g. d = 768 → 2048 (exact), d = 128 → 344 (0.8% over; 384, a multiple of 64, was 12.5% over).
    """
    target = gelu_mlp_params(n_embd, bias)
    ideal = target / (3 * n_embd + (2 if bias else 0))  # where the parameter counts are equal

    def best(step: int) -> int:
        low = max(step, step * math.floor(ideal / step))  # at least one unit of hidden
        return min((low, low + step), key=lambda h: (abs(gated_mlp_params(n_embd, h, bias) - target), h))

    def matched(h: int) -> bool:
        return abs(gated_mlp_params(n_embd, h, bias) - target) < tolerance * target

    hidden = best(multiple_of)
    if not matched(hidden):
        hidden = best(1)
    if not matched(hidden):
        params = gated_mlp_params(n_embd, hidden, bias)
        warnings.warn(f"gated MLP at n_embd={n_embd} (bias={bias}): no hidden size matches the 4·d MLP's "
                      f"{target} parameters within {tolerance:.0%}; hidden={hidden} has {params}, "
                      f"ratio {params}/{target} = {params / target:.4f}", stacklevel=2)
    return hidden


class MLP(nn.Module):
    """Linear → activation → linear, hidden = 4·d by default."""

    def __init__(self, config, *, activation: str, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * config.n_embd
        self.act = ACTIVATIONS[activation]
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GatedMLP(nn.Module):
    """Gated linear unit: act(x·W) ⊙ (x·V) → linear (Shazeer 2020). By default the hidden size matches
    the 4·d MLP's parameters within 1% (``gated_hidden``); the ``hidden`` option overrides it."""

    def __init__(self, config, *, activation: str, hidden: int | None = None):
        super().__init__()
        hidden = hidden or gated_hidden(config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[activation]
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # gate and value, fused
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(self.act(gate) * value))


register("mlp", "gelu", description="GELU MLP, hidden 4·d (GPT-2)", fixed={"activation": "gelu"})(MLP)
register("mlp", "relu2", description="squared-ReLU MLP, hidden 4·d (So et al. 2021, Primer)",
         fixed={"activation": "relu2"})(MLP)
register("mlp", "swiglu",
         description="SwiGLU, hidden ≈ 2/3·4·d: the 4·d MLP's parameters within 1% (Shazeer 2020; LLaMA)",
         fixed={"activation": "silu"})(GatedMLP)
register("mlp", "geglu", description="GeGLU, hidden ≈ 2/3·4·d: the 4·d MLP's parameters within 1% (Shazeer 2020)",
         fixed={"activation": "gelu"})(GatedMLP)
