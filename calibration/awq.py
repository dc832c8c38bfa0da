"""The scales of `--quant-method awq` (exporter/awq.py applies them), searched on calibration text.

Per MoE layer, on up to MAX_TOKENS of the layer's input from the calibration text (the fp32 model
run layer by layer, as calibration/run.py does: one layer in memory at a time):

  input scale  s = mean|x|^a per channel (normalized so sqrt(max x min) = 1); a from GRID, chosen
               to minimize the error of the quantized layer's output (routed experts at the
               tokens' own routing, plus the shared experts) against the fp32 output;
  down scale   t[e] = mean|silu(g) * u|^b over the tokens routed to expert e, b from GRID the same
               way (given the chosen s).

a = 0 and b = 0 are plain rounding, so the search never picks scales that are worse than
round-to-nearest on the calibration tokens. The candidate layers round their activations as the
bundle's kernels will (int8 per block, core/quant.py), so the search sees the error the bundle has.
"""

from __future__ import annotations

from typing import Callable

import torch

from dsexport.core.quant import QuantSpec
from dsexport.exporter.awq import Scales
from dsexport.exporter.quantize import fake_quantize
from dsexport.exporter.reference import MoE, route, set_activation_quant

from .run import load_layer, run_layer, token_batches

GRID = tuple(i / 8 for i in range(9))  # 0, 0.125, ..., 1
MAX_TOKENS = 4096


def _normalized(stat: torch.Tensor, power: float) -> torch.Tensor:
    s = stat.clamp_min(1e-6) ** power
    return s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()


class _LayerSearch:
    """The MoE layer's fp32 weights and sample inputs; the error of a candidate rescaling."""

    def __init__(self, moe: MoE, x: torch.Tensor, quant: QuantSpec, layer: int):
        self.moe, self.x, self.quant, self.layer = moe, x, quant, layer  # x [N, D]
        self.want = moe(x)  # [N, D] the fp32 output

    def _fq(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(name, w, self.quant, self.layer, tuple(self.moe.expert_ids))

    def error(self, s_in: torch.Tensor, s_down: torch.Tensor) -> float:
        """Mean squared output error of the layer rescaled by (s_in [D], s_down [E, I]) and rounded."""
        m = self.moe
        state = {"router": m.router * s_in, "w_gate": self._fq("mlp.w_gate", m.w_gate * s_in),
                 # a row scale leaves a row's rounding unchanged: round up once, divide after
                 "w_up": self._fq("mlp.w_up", m.w_up * s_in) / s_down[:, :, None],
                 "w_down": self._fq("mlp.w_down", m.w_down * s_down[:, None, :])}
        if m.bias is not None:
            state["bias"] = m.bias
        if m.shared is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = getattr(m.shared, proj).weight
                state[f"shared.{proj}.weight"] = self._fq(f"mlp.shared.{proj}.weight", w * s_in if proj != "down_proj" else w)
        with torch.device("meta"):
            rescaled = MoE(m.cfg, self.layer)
        rescaled.load_state_dict(state, strict=True, assign=True)
        holder = torch.nn.Module()  # set_activation_quant reads a decoder layer's .mlp and .layer
        holder.mlp, holder.layer = rescaled, self.layer
        set_activation_quant(holder, self.quant)  # the kernels' int8 input rounding, as the bundle runs
        return float(((rescaled(self.x / s_in) - self.want) ** 2).mean())

    def down_statistic(self) -> torch.Tensor:
        """[E, I] mean |silu(g) * u| over the tokens routed to each expert (1 where none were)."""
        m = self.moe
        _, idx = route(self.x @ m.router.T, m.bias, m.cfg, m.groups)  # [N, k]
        stat = torch.ones(m.w_down.shape[0], m.w_down.shape[2])
        for e in range(stat.shape[0]):
            tokens = (idx == e).any(-1)
            if tokens.any():
                h = self.x[tokens]
                stat[e] = (torch.nn.functional.silu(h @ m.w_gate[e].T) * (h @ m.w_up[e].T)).abs().mean(0)
        return stat


def search_layer(moe: MoE, x: torch.Tensor, quant: QuantSpec, layer: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input scale [D], down scale [E, I], the search's record) for one MoE layer."""
    search = _LayerSearch(moe, x, quant, layer)
    E, _, I = moe.w_down.shape
    ones = torch.ones(E, I)
    x_stat = x.abs().mean(0)  # [D]
    errors_in = {a: search.error(_normalized(x_stat, a), ones) for a in GRID}
    a = min(errors_in, key=errors_in.get)
    s_in = _normalized(x_stat, a)
    d_stat = search.down_statistic()
    errors_down = {b: search.error(s_in, _normalized(d_stat, b)) for b in GRID}
    b = min(errors_down, key=errors_down.get)
    record = {"input_power": a, "down_power": b, "error_rtn": errors_in[0.0], "error_awq": errors_down[b]}
    return s_in, _normalized(d_stat, b), record


@torch.no_grad()
def search_scales(reader, sequences: list[list[int]], quant: QuantSpec,
                  progress: Callable[[str, int, int], None] = lambda stage, done, total: None) -> tuple[Scales, dict]:
    """The AWQ scales of every MoE layer of the reader's model (a pruned/merged view included)."""
    cfg = reader.config
    batches, rope = token_batches(reader, sequences)
    total_tokens = sum(x.shape[0] * x.shape[1] for _, x in batches)
    keep = max(1, total_tokens // MAX_TOKENS)  # every keep-th token of the layer input
    scales, records = {}, {}
    for i in range(cfg.num_hidden_layers):
        progress("awq", i, cfg.num_hidden_layers)
        layer = load_layer(reader, i)
        seen: list[torch.Tensor] = []
        if cfg.is_moe_layer(i):
            layer.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, cfg.hidden_size)[::keep]))
        run_layer(layer, batches, rope)
        if seen:
            s_in, s_down, records[i] = search_layer(layer.mlp, torch.cat(seen)[:MAX_TOKENS], quant, i)
            scales[i] = (s_in, s_down)
        del layer
    progress("awq", cfg.num_hidden_layers, cfg.num_hidden_layers)
    return scales, records
