"""`dsexport plan`'s text: the build it describes, pruning per layer, the memory plan, paging."""

from __future__ import annotations

import click

from ..table import format_table, human_bytes


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _build_line(p) -> str:
    q = p.quant
    quant = ("weights fp32" if q is None else
             "weights " + ", ".join(f"{part} int{b}" for part, b in q.bits.items()) + f" ({q.scheme}, blocks of "
             f"{q.block_size}, experts {q.block_for('routed_experts')}, activations {q.activations})")
    parts = [f"build: {p.backend} for {p.target.name}, precision {p.precision}", quant,
             f"MoE lowering {p.moe_lowering}" + (f" (prompts: {p.prefill_moe_lowering})" if p.prefill_moe_lowering else ""),
             f"context {p.context}", "paged experts" if p.paged else "experts in the graph",
             "MTP drafting graph" if p.mtp else "no MTP graph"]
    if p.tensorrt:
        parts.append(f"TensorRT {p.tensorrt}, engine {p.engine_plan.precision}")
    return "; ".join(parts)


def print_plan(p) -> None:
    click.echo(_build_line(p))
    click.echo()
    if p.pruning:
        r = p.pruning
        click.echo(format_table(["layer", "experts kept", "removed", "removed ids"],
                                [[layer, len(kept), len(removed), ",".join(map(str, removed)) or "-"]
                                 for layer, (kept, removed) in r.layers.items()], align_right={0, 1, 2}))
        click.echo(f"pruning by {r.criterion} ({r.scope}) saves {human_bytes(r.bytes_saved)} at the build's "
                   "quantization" + (f"; {r.refused_removals} removals refused to keep routing well defined"
                                     if r.refused_removals else ""))
        click.echo()
    m = p.memory
    rows = [["weights", _gb(m.weights_bytes)], [f"latent KV cache ({m.context} tokens)", _gb(m.kv_cache_bytes)],
            ["activations and workspace", _gb(m.activation_bytes)], ["runtime overhead", _gb(m.overhead_bytes)],
            ["total", _gb(m.total_bytes)],
            ["usable on the device", _gb(m.usable_bytes) if m.usable_bytes else "the host's"]]
    click.echo(format_table(["item", "bytes"], rows, align_right={1}))
    if m.fits is not None:
        click.echo(f"{'fits' if m.fits else 'does not fit'}: margin {m.margin_bytes / 1e9:+.2f} GB")
    for line in p.suggestions():
        click.echo(f"  would fit with: {line}")
    paging = p.paging
    if not paging["can_page"]:
        click.echo(f"expert paging: not available ({paging['reason']})")
    elif paging["cache_bytes"] is not None:
        click.echo(f"expert paging: {paging['cache_bytes'] / 1e9:.2f} GB left for an expert cache of the "
                   f"{paging['store_bytes'] / 1e9:.2f} GB {paging['store_precision']} store (one token needs "
                   f"{paging['min_cache_bytes'] / 1e9:.2f} GB)")
    est = m.decode_estimate()
    if est:
        click.echo(f"decode estimate (from bandwidth, not measured): at most {est['roofline_tokens_per_s']:.1f} tok/s; "
                   f"~{est['at_measured_fraction']:.1f} tok/s at the {est['measured_fraction']} of bandwidth dsexport "
                   "reaches on x86")
