"""Activation-aware scaling (`--quant-method awq`): an exact rewrite of the MoE layers that makes
their weights round better.

Rounding error hurts most on the input channels whose activations are large. AWQ (Lin et al.
2024) scales those weight columns up by s before rounding and the activations down by s, which
leaves the fp32 model unchanged and moves rounding error to channels that matter less. In a
DeepSeek MoE layer the scales fold into weights the model already has, so the bundle keeps its
graph and its kernels:

  input scale s [D], one per MoE layer: post_attention_layernorm.weight / s (its output is the
      MoE input: router, shared and routed experts read nothing else), router columns x s (the
      routing is unchanged), shared and routed experts' gate/up columns x s;
  down scale t [E, I], per routed expert: up rows / t and down columns x t (SwiGLU's output is
      linear in up's output, so silu(g) * (u / t) feeds down x t exactly).

calibration/awq.py searches the scales on calibration text; the bundle stores them
(core/quant.py: AWQ_FILE) so the reference `validate` compares against applies the same
rewrite. This module is the rewrite, as a checkpoint reader view (like merges).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsexport.core.errors import BundleError

Scales = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (input scale [D], down scale [E_kept, I])


def save_scales(scales: Scales, path: Path) -> None:
    tensors = {}
    for layer, (s_in, s_down) in scales.items():
        tensors[f"layers.{layer}.input"] = s_in.contiguous().float()
        tensors[f"layers.{layer}.down"] = s_down.contiguous().float()
    save_file(tensors, str(path), metadata={"format": "dsexport-awq", "version": "1"})


def load_scales(path: Path, cfg) -> Scales:
    """The scales a bundle stores, each checked against the model's shapes and for positive finite values."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001  (the library's own errors: a malformed file)
        raise BundleError(f"{path.name}: not a readable safetensors file ({e})") from None
    scales: Scales = {}
    for layer in cfg.moe_layers:
        s_in, s_down = tensors.pop(f"layers.{layer}.input", None), tensors.pop(f"layers.{layer}.down", None)
        if s_in is None or s_down is None:
            raise BundleError(f"{path.name}: no scales for MoE layer {layer}")
        want = ((cfg.hidden_size,), (cfg.num_experts(layer), cfg.moe_intermediate_size))
        if (tuple(s_in.shape), tuple(s_down.shape)) != want:
            raise BundleError(f"{path.name}: layer {layer}'s scales have shapes {list(s_in.shape)}, "
                              f"{list(s_down.shape)}; the model needs {list(want[0])}, {list(want[1])}")
        for t in (s_in, s_down):
            if not (torch.isfinite(t).all() and (t > 0).all()):
                raise BundleError(f"{path.name}: layer {layer}'s scales must be positive finite numbers")
        scales[layer] = (s_in.float(), s_down.float())
    if tensors:
        raise BundleError(f"{path.name}: unexpected tensors {sorted(tensors)[:3]}")
    return scales


def rescaled_tensor(scales: Scales, name: str, t: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor as the rescaled model holds it (CheckpointReader.get applies this)."""
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() or int(parts[2]) not in scales:
        return t
    s_in, rest = scales[int(parts[2])][0], ".".join(parts[3:])
    if rest == "post_attention_layernorm.weight":
        return t / s_in
    if rest in ("mlp.gate.weight", "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"):
        return t * s_in
    return t


def rescaled_experts(scales: Scales, layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """A layer's stacked kept experts (gate [E, I, D], up [E, I, D], down [E, D, I]) rescaled."""
    if layer not in scales:
        return gate, up, down
    s_in, s_down = scales[layer]  # [D], [E, I]
    return gate * s_in, up * s_in / s_down[:, :, None], down * s_down[:, None, :]


def with_awq(reader, scales: Scales | None):
    """The reader's view of the rescaled model (CheckpointReader.with_awq)."""
    return reader.with_awq(scales)
