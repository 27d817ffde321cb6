"""The frozen base in 8 bits: the transformer blocks' Linear weights stored as int8 or float8 (torchao
weight-only, one scale per output row) and computed in the model's dtype; the LoRA stays in fp32.

Why: a 14B transformer is ~28 GB in bf16, more than a 24 GB card holds before any activation. Its blocks'
Linear weights are ~99% of it; stored in 8 bits they halve. What stays in the model dtype, and why:

- the patch embedding, the text and timestep embedders and the output head (outside the blocks: a few
  percent of the bytes, and every token passes through them);
- norms, biases and the modulation (Wan's ``scale_shift_table``, HunyuanVideo's adaptive-norm ``*.linear``):
  they scale and shift every activation of a block, so their error would not average out;
- the LoRA's own ``lora_A``/``lora_B`` (trained, fp32).

torchao dequantizes a weight per matmul (weight-only), so no fp8 matmul is needed: it runs on a CPU and on
any CUDA GPU; on a GPU without fp8 support (before Ada/Hopper) float8 is only a storage format, as here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from radial_lora.constants import BASE_QUANTIZATIONS

# "8bit" names the format measured closest to the bf16 base (benchmarks/quantized_base.py, RESULTS.md)
DEFAULT_8BIT = "int8"
# Bytes per output row of torchao's per-row scales: int8 keeps a float32 scale and an int8 zero point,
# float8 a float32 scale (measured on torchao 0.18: Int8Tensor, Float8Tensor)
SCALE_BYTES_PER_ROW = {"int8": 5, "float8": 4}


def resolve_scheme(name: str) -> str | None:
    """``model.base_quantization`` -> ``"int8"``, ``"float8"`` or None (the base stays in its dtype)."""
    if name not in BASE_QUANTIZATIONS:
        raise ValueError(f"model.base_quantization: {name!r} is not one of {', '.join(map(repr, BASE_QUANTIZATIONS))}")
    return None if name == "none" else DEFAULT_8BIT if name == "8bit" else name


def block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The transformer's block lists in the order they run (Wan ``blocks``; HunyuanVideo ``transformer_blocks``
    then ``single_transformer_blocks``): the direct ``ModuleList`` children."""
    return [(name, m) for name, m in model.named_children() if isinstance(m, torch.nn.ModuleList)]


def transformer_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every transformer block with its qualified name, in execution order."""
    return [(f"{name}.{i}", block) for name, blocks in block_lists(model) for i, block in enumerate(blocks)]


def is_quantized_linear(module: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` (relative to a block) is a Linear whose weight goes to 8 bits: not a LoRA matrix, not
    an adaptive norm's modulation."""
    return isinstance(module, torch.nn.Linear) and "lora_" not in name and "norm" not in name


def quantized_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers of the blocks that :func:`quantize_base` stores in 8 bits (qualified names)."""
    return [
        (f"{prefix}.{name}", m)
        for prefix, block in transformer_blocks(model)
        for name, m in block.named_modules()
        if is_quantized_linear(m, name)
    ]


def _torchao_config(scheme: str) -> Any:
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels fail to load on a CPU
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if scheme == "int8" else Float8WeightOnlyConfig()


def quantize_base(model: torch.nn.Module, scheme: str) -> int:
    """Store the blocks' frozen Linear weights in ``scheme`` ("int8" or "float8") in place; the LoRA layers
    PEFT added (before or after) are untouched. Returns how many layers were quantized."""
    from torchao.quantization import quantize_

    config = _torchao_config(scheme)
    chosen = {id(m) for _, m in quantized_linears(model)}
    for p in (m.weight for _, m in quantized_linears(model)):
        if p.requires_grad:
            raise ValueError("model.base_quantization: the base weights must be frozen before they are quantized")
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    return len(chosen)


# -- bytes ------------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's storage holds; a torchao tensor (int8/float8 data, scales) is the sum of its parts."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None or type(t) in (torch.Tensor, torch.nn.Parameter) and type(t.data) is torch.Tensor:
        return t.numel() * t.element_size()
    names, _ = inner()
    return sum(tensor_bytes(getattr(t, n)) for n in names)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (quantized ones counted as stored)."""
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class WeightShape:
    """What a block's weight bytes depend on: its parameters, and of those the quantizable Linear weights
    (elements) and their output rows (one scale each)."""

    params: int
    linear_elements: int
    linear_rows: int

    def bytes(self, scheme: str | None, dtype_bytes: int = 2) -> int:
        """Bytes stored: every parameter at ``dtype_bytes``, the quantizable Linear weights at 1 byte plus
        their per-row scales when ``scheme`` is set."""
        if scheme is None:
            return self.params * dtype_bytes
        rest = self.params - self.linear_elements
        return rest * dtype_bytes + self.linear_elements + self.linear_rows * SCALE_BYTES_PER_ROW[scheme]


def block_weight_shapes(model: torch.nn.Module) -> list[WeightShape]:
    """:class:`WeightShape` of every block (works on the meta device: no memory)."""
    shapes = []
    for _, block in transformer_blocks(model):
        linears = [m for name, m in block.named_modules() if is_quantized_linear(m, name)]
        shapes.append(
            WeightShape(
                params=sum(p.numel() for p in block.parameters()),
                linear_elements=sum(m.weight.numel() for m in linears),
                linear_rows=sum(m.out_features for m in linears),
            )
        )
    return shapes
