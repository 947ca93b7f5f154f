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


def _cast_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a linear cast by ``cast_quantizable``: its input in the layer's dtype."""
    x = args[0]
    module._input_dtype = x.dtype  # read back by _restore_output
    return (x.to(module._run_dtype), *args[1:])


def _restore_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Forward hook of a linear cast by ``cast_quantizable``: its output in the dtype its input had."""
    return output.to(module.__dict__.pop("_input_dtype", output.dtype))


def cast_quantizable(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Cast only the linear layers a transform applies to (weight and bias) to `dtype`, and run them
    in it: each one's input is cast to `dtype` on the way in and its output back to the input's dtype
    on the way out. Embeddings, norms, the LM head and routers keep their dtype, and so do the
    activations between layers. Returns the names of the cast layers."""
    cast = []
    for fqn, module in model.named_modules():
        if quantizable(module, fqn) and not hasattr(module, "_run_dtype"):
            run_in_dtype(module, dtype)
            cast.append(fqn)
    return cast


def run_in_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast one layer to `dtype` and run it in it, its output returned in its input's dtype."""
    module.to(dtype)
    module._run_dtype = dtype
    module.register_forward_pre_hook(_cast_input)
    module.register_forward_hook(_restore_output)


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


# How post-training int4 maps weights on each device (see Int4WeightOnly.apply), which QAT copies.
# CPU (IntxWeightOnlyConfig): symmetric, values -8..7 around a zero point of 0, fp32 scales.
# CUDA (tinygemm): asymmetric, values 0..15 with a float zero point, scales and zero points in bf16,
# computed on the weights cast to bf16.
INT4_MAPPING = {"cpu": "symmetric", "cuda": "asymmetric (float zero point, bf16 scales)"}


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
        from torchao.quantization import MappingType, quantize_

        if next(model.parameters()).is_cuda:
            # tinygemm's packed int4 kernel takes bf16 weights and activations: only the layers it
            # quantizes are cast (and run) in bf16; embeddings, norms and the LM head keep their dtype
            from torchao.quantization import Int4WeightOnlyConfig

            cast_quantizable(model, torch.bfloat16)
            config = Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d")
            self.format = (f"int4 packed (tinygemm), group {self.group_size}, {INT4_MAPPING['cuda']}; "
                           "bf16 weights and activations in the quantized layers only")
        else:
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup

            config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size),
                                          mapping_type=MappingType.SYMMETRIC)
            self.format = f"int4 values in int8 storage, group {self.group_size}, {INT4_MAPPING['cpu']}"
        quantize_(model, config, filter_fn=quantizable)
        return model


class _InDtype(nn.Module):
    """A weight fake quantizer applied to the weight cast to `dtype` (as post-training quantization
    casts it first); the result comes back in the weight's dtype, gradients straight through."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, w: Tensor) -> Tensor:
        return self.inner(w.to(self.dtype)).to(w.dtype)


class _AsServed(nn.Module):
    """Fake-quantizes a weight as post-training int4 quantizes it on the device the weight is on:
    the QAT run trains on the device its float counterpart is trained and quantized on."""

    def __init__(self, on_cpu: nn.Module, on_cuda: nn.Module):
        super().__init__()
        self.on_cpu, self.on_cuda = on_cpu, on_cuda  # not .cpu/.cuda: those are Module methods

    def forward(self, w: Tensor) -> Tensor:
        return self.on_cuda(w) if w.is_cuda else self.on_cpu(w)


@register("quantization", "fake_quant", probe=_torchao_probe)
class FakeQuant(Quantizer):
    """Quantization-aware training: weights fake-quantized (round-trip, straight-through) while training,
    with the mapping of the post-training path they are compared with. int4: as ``int4_weight_only``
    on the device the weights are on (CPU symmetric; CUDA asymmetric, tinygemm's); int8: symmetric, as
    ``int8_weight_only`` (whose scales are per channel, not per group)."""

    stage = "train"

    def __init__(self, *, bits: Literal[4, 8] = 4, group_size: int = 32):
        self.bits, self.group_size = bits, group_size
        mapping = (f"on CPU {INT4_MAPPING['cpu']}, on CUDA {INT4_MAPPING['cuda']} (as int4_weight_only)"
                   if bits == 4 else "symmetric")
        self.format = f"fake-quantized int{bits} weights, group {group_size} (float storage), {mapping}"

    check = staticmethod(Int4WeightOnly.check)

    def weight_config(self, device_type: str):
        """The torchao fake-quantization config of the weights that train on `device_type`."""
        from torchao.quantization import MappingType, ZeroPointDomain
        from torchao.quantization.qat import IntxFakeQuantizeConfig

        if self.bits == 4 and device_type == "cuda":  # tinygemm's qparams (torchao's own int4 QAT for it)
            return IntxFakeQuantizeConfig(torch.uint4, group_size=self.group_size, mapping_type=MappingType.ASYMMETRIC,
                                          scale_precision=torch.bfloat16, zero_point_precision=torch.bfloat16,
                                          zero_point_domain=ZeroPointDomain.FLOAT)
        dtype = torch.int4 if self.bits == 4 else torch.int8
        return IntxFakeQuantizeConfig(dtype, group_size=self.group_size, mapping_type=MappingType.SYMMETRIC)

    def fake_quantizer(self, device_type: str) -> nn.Module:
        """What fake-quantizes a weight on `device_type` (callable on a weight of any device)."""
        from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

        quantizer = FakeQuantizerBase.from_config(self.weight_config(device_type))
        if self.bits == 4 and device_type == "cuda":
            quantizer = _InDtype(quantizer, torch.bfloat16)  # tinygemm quantizes the bf16-cast weights
        return quantizer

    def apply(self, model: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        quantize_(model, QATConfig(weight_config=self.weight_config("cpu"), step="prepare"), filter_fn=quantizable)
        if self.bits == 4:  # the mapping differs by device: pick it where the weights are (model.to moves them later)
            for module in model.modules():
                if getattr(module, "weight_fake_quantizer", None) is not None:
                    module.weight_fake_quantizer = _AsServed(self.fake_quantizer("cpu"), self.fake_quantizer("cuda"))
        return model


def post_training(model: dict) -> bool:
    """Whether a model config (as a dict) names a post-training quantization: its runs quantize a float
    run's checkpoint rather than train (a training-time one, QAT, trains)."""
    from models.registry import get

    spec = model.get("quantization")
    return spec is not None and get("quantization", spec["name"]).factory.stage == "post"


def quantize(model: nn.Module, spec, calibration: Tensor | None = None) -> Quantizer:
    """Apply a post-training quantization spec (a name or mapping) to a trained model in place;
    `calibration`: training-split token windows for the methods that need them (GPTQ, AWQ)."""
    from models.registry import build_spec

    quantizer = build_spec("quantization", spec)
    if hasattr(quantizer, "calibration_size"):
        quantizer.apply(model, calibration)
    else:
        quantizer.apply(model)
    return quantizer
