"""Feed-forward blocks. Context: (config). The output projection into the residual stream is named
``c_proj`` so that the GPT's initialisation scales it by 1/sqrt(2·n_layer), as nanoGPT does."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from models.registry import register


def relu_squared(x: Tensor) -> Tensor:
    return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu2": relu_squared, "silu": F.silu}


def gated_hidden(n_embd: int, multiple_of: int = 64) -> int:
    """Hidden size of a gated MLP with the parameters of a 4·d GELU MLP: 2/3·4·d rounded up to a
    multiple of 64 (Shazeer 2020; LLaMA). Exact for widths divisible by 24 (96, 192, 384, 768)."""
    return multiple_of * math.ceil(2 * 4 * n_embd / 3 / multiple_of)


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
    """Gated linear unit: act(x·W) ⊙ (x·V) → linear (Shazeer 2020), hidden matched to the 4·d MLP."""

    def __init__(self, config, *, activation: str, hidden: int | None = None):
        super().__init__()
        hidden = hidden or gated_hidden(config.n_embd)
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
register("mlp", "swiglu", description="SwiGLU, hidden 2/3·4·d rounded up to 64 (Shazeer 2020; LLaMA)",
         fixed={"activation": "silu"})(GatedMLP)
register("mlp", "geglu", description="GeGLU, hidden 2/3·4·d rounded up to 64 (Shazeer 2020)",
         fixed={"activation": "gelu"})(GatedMLP)
