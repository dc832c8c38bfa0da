"""Quantized weights for the reference model (torch): `fake_quantize` gives the dequantized
weights a quantized bundle computes with, so the reference checks the lowering exactly.

The spec and the numpy arithmetic live in the torch-free core (dsexport.core.quant); they are
re-exported here for the build side's convenience.
"""

from __future__ import annotations

import dataclasses

import torch

from dsexport.core.quant import (BLOCK_SIZES, PARTS, PRESETS, SCHEMES, QuantSpec, absorbed_values,  # noqa: F401
                                 dequantize_rows, pack, pack_zero_points, quantize_rows, weight_layout)

QuantConfig = QuantSpec  # the name earlier releases used


def part_of(reference_name: str) -> str | None:
    """The part a reference-layout weight belongs to (None: kept fp32)."""
    if reference_name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in f".{reference_name}" and reference_name.endswith(".weight") and "layernorm" not in reference_name \
            and "kv_b_proj" not in reference_name:
        return "attention"
    if reference_name.startswith("mlp.shared."):
        return "shared_experts" if "proj" in reference_name else None
    if reference_name in ("mlp.w_gate", "mlp.w_up", "mlp.w_down"):
        return "routed_experts"
    if reference_name.startswith("mlp.") and reference_name.endswith("proj.weight"):
        return "dense_mlp"
    return None


def fake_quantize(name: str, tensor: torch.Tensor, quant: QuantSpec | None, layer: int | None = None,
                  expert_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """The weights the quantized graph computes with, for the reference model (routed experts:
    each at its own width when quant.expert_bits says so; pass the layer and its expert ids)."""
    if quant is not None and quant.active and quant.absorbed == "fp16" and name.endswith("kv_b_proj.weight"):
        return torch.from_numpy(absorbed_values(tensor.detach().float().numpy()))
    part = part_of(name) if quant is not None else None
    if part == "routed_experts" and layer is not None and quant.expert_bits.get(layer):
        return torch.stack([fake_quantize(name, tensor[slot], dataclasses.replace(
            quant, bits={**quant.bits, "routed_experts": quant.bits_for_expert(layer, e)}, expert_bits={}))
            if quant.bits_for_expert(layer, e) else tensor[slot] for slot, e in enumerate(expert_ids)])
    bits = quant.bits.get(part) if part else None
    if bits is None:
        return tensor
    w = tensor.detach().float().numpy()
    bits, block = quant.layout_for(part, bits, w.shape[-1])
    q, d, zero = quantize_rows(w, bits, block, quant.scheme)
    return torch.from_numpy(dequantize_rows(q, d, bits, block, w.shape[-1], zero))
