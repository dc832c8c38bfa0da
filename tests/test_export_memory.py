"""Export streams layer by layer: peak memory does not grow with the number of layers."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _export_peak_rss_mb(checkpoint, out) -> float:
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
    script = textwrap.dedent(f"""
        from dsexport.exporter.export import export_model
        export_model({str(checkpoint)!r}, {str(out)!r})
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print(int(hwm.split()[1]) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


def test_peak_export_memory_is_flat_in_depth(tmp_path):
    from dsexport.exporter.synthetic import write_checkpoint

    # ~13 MB of routed experts per layer, so 2 -> 14 layers adds ~160 MB of weights.
    shape = dict(hidden_size=256, moe_intermediate_size=256, n_routed_experts=16, intermediate_size=512,
                 first_k_dense_replace=1)
    sizes, peaks = {}, {}
    for layers in (2, 14):
        ckpt = write_checkpoint(tmp_path / f"c{layers}", "v3_noaux_tc", num_hidden_layers=layers, **shape)
        sizes[layers] = (ckpt / "model.safetensors").stat().st_size / 2**20
        peaks[layers] = _export_peak_rss_mb(ckpt, tmp_path / f"e{layers}")
    weight_growth = sizes[14] - sizes[2]
    rss_growth = peaks[14] - peaks[2]
    print(f"\ncheckpoint {sizes[2]:.0f} -> {sizes[14]:.0f} MB; export peak RSS {peaks[2]:.0f} -> {peaks[14]:.0f} MB")
    # Holding the model would add >= weight_growth; one layer at a time adds ~nothing.
    assert rss_growth < 0.2 * weight_growth, (rss_growth, weight_growth)
