"""Quantization transforms of a model's linear layers, via torchao (torch.ao where torchao is absent).

Post-training (``stage = "post"``): int8 dynamic (weights and activations), int8 weight-only, int4
weight-only with a group size. Training-time (``stage = "train"``): fake-quantized weights (QAT),
applied by ``build_model`` so the model trains with the rounding it will be served with.
The LM head (tied to the embedding) and MoE routers stay in float, as is usual.
"""

from __future__ import annotations

import importlib.util
import io
from typing import Literal

import torch
from torch import Tensor, nn

from models.registry import register


def _keep_float(fqn: str) -> bool:
    return fqn.endswith(("lm_head", "router"))


def quantizable(module: nn.Module, fqn: str) -> bool:
    """The linear layers a transform applies to."""
    return isinstance(module, nn.Linear) and not _keep_float(fqn)


def _torchao_probe() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return "torchao not installed (pip install 'archbench[quant]')"
    return None


def tensor_bytes(t: Tensor) -> int:
    """Storage bytes of a tensor, looking inside torchao's quantized tensor subclasses."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights that quantization transforms apply to."""
    return sum(tensor_bytes(m.weight) for fqn, m in model.named_modules() if quantizable(m, fqn))


def model_bytes(model: nn.Module) -> int:
    """Serialized size of the state dict: what the model costs on disk, whatever its format."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


class Quantizer:
    """A transform of a model's linear layers; ``apply`` changes the model in place and returns it."""

    stage: Literal["post", "train"] = "post"
    format = ""  # how weights are stored after apply, for reports

    def apply(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError


@register("quantization", "int8_dynamic")
class Int8Dynamic(Quantizer):
    """int8 weights and dynamically quantized int8 activations (torchao; torch.ao without it)."""

    format = "int8 weights, per-token int8 activations"

    def apply(self, model: nn.Module) -> nn.Module:
        if _torchao_probe() is None:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=quantizable)
            return model
        # torch.ao's eager dynamic quantization: CPU only, deprecated but present in torch 2.x
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        names = {fqn: default_dynamic_qconfig for fqn, m in model.named_modules() if quantizable(m, fqn)}
        return quantize_dynamic(model, names, inplace=True)


@register("quantization", "int8_weight_only", probe=_torchao_probe)
class Int8WeightOnly(Quantizer):
    """int8 per-channel weights, float activations (torchao)."""

    format = "int8 per-channel weights"

    def apply(self, model: nn.Module) -> nn.Module:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=quantizable)
        return model


def _int4_note() -> str | None:
    if torch.cuda.is_available():
        return None
    return "CPU: int4 values stored unpacked in int8 (torchao has no packed int4 CPU kernel here)"


@register("quantization", "int4_weight_only", probe=_torchao_probe, note=_int4_note)
class Int4WeightOnly(Quantizer):
    """int4 weights with one scale per group of input channels (torchao)."""

    def __init__(self, *, group_size: int = 32):
        self.group_size = group_size

    @staticmethod
    def check(config, options: dict) -> str | None:
        """Every quantized linear layer's input width (n_embd, the MLP or expert hidden size) must be
        a multiple of group_size; the layers are read from a shapes-only model of this config."""
        widths: dict[int, str] = {}  # input width -> the first layer that has it
        from models.accounting import shapes_only

        for fqn, m in shapes_only(config).named_modules():
            if quantizable(m, fqn):
                widths.setdefault(m.in_features, fqn)
        bad = sorted(w for w in widths if w % options["group_size"])
        if bad:
            return (f"group_size={options['group_size']} must divide every quantized layer's input width; "
                    f"{bad[0]} ({widths[bad[0]]}) is not a multiple")
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_

        if next(model.parameters()).is_cuda:
            # tinygemm's packed int4 kernel: bf16 activations
            from torchao.quantization import Int4WeightOnlyConfig

            model.to(torch.bfloat16)
            config = Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d")
            self.format = f"int4 packed (tinygemm), group {self.group_size}, bf16 activations"
        else:
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup

            config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size))
            self.format = f"int4 values in int8 storage, group {self.group_size}"
        quantize_(model, config, filter_fn=quantizable)
        return model


@register("quantization", "fake_quant", probe=_torchao_probe)
class FakeQuant(Quantizer):
    """Quantization-aware training: weights fake-quantized (round-trip, straight-through) while training."""

    stage = "train"

    def __init__(self, *, bits: Literal[4, 8] = 4, group_size: int = 32):
        self.bits, self.group_size = bits, group_size
        self.format = f"fake-quantized int{bits} weights, group {group_size} (float storage)"

    check = staticmethod(Int4WeightOnly.check)

    def apply(self, model: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        dtype = torch.int4 if self.bits == 4 else torch.int8
        weights = IntxFakeQuantizeConfig(dtype, group_size=self.group_size)
        quantize_(model, QATConfig(weight_config=weights, step="prepare"), filter_fn=quantizable)
        return model


def quantize(model: nn.Module, spec) -> Quantizer:
    """Apply a post-training quantization spec (a name or mapping) to a trained model in place."""
    from models.registry import build_spec

    quantizer = build_spec("quantization", spec)
    quantizer.apply(model)
    return quantizer
