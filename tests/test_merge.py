"""Expert merging (`--prune-method merge`).

Merging must be the function the manifest records: the bundle generates what the reference
generates with the same merges applied, the merge really changes the model (it is not the
dropped bundle under another name), neuron alignment undoes a permutation exactly, and a
manifest whose merge record is malformed or names experts it may not is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsexport.build import BuildConfig, build_bundle
from dsexport.calibration.pruning import PruneConfig
from dsexport.calibration.run import calibrate
from dsexport.core.errors import BundleError
from dsexport.core.jsonio import Fields
from dsexport.core.sections import PruningRecord
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.merge import merge_experts
from dsexport.exporter.reference import DeepseekReference
from dsexport.runtime import Engine

TEXT = ("Merging folds the experts a workload does not need into the ones it keeps. The router still "
        "picks two experts per token, and the cache holds only the latent. ") * 40


def test_alignment_undoes_a_neuron_permutation():
    """An expert merged with a neuron-permuted copy of itself is itself, for any coefficient:
    only a correct alignment gives that (unaligned averaging blurs every neuron)."""
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)
    perm = torch.randperm(48, generator=g)
    merged = merge_experts((gate, up, down), [((gate[perm], up[perm], down[:, perm]), 0.3)], 0.7)
    for got, want in zip(merged, (gate, up, down)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    unaligned = 0.7 * gate + 0.3 * gate[perm]
    assert (unaligned - gate).abs().max() > 0.1  # the permutation was not a no-op


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("merge") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("variant", ["v3_noaux_tc", "v2_greedy"])
def test_merged_bundle_is_the_merged_reference(artifacts, profile_file, tmp_path, variant):
    ckpt = artifacts.checkpoint(variant)
    profile = calibrate(ckpt, [profile_file], samples=16, seq_len=32, min_tokens=2)
    bundles = {}
    for method in ("drop", "merge"):
        out = tmp_path / method
        build_bundle(BuildConfig(ckpt, out, prune=PruneConfig(0.5, "frequency", "per-layer", method)), profile=profile)
        bundles[method] = Engine.load(out, threads=2)
    record = bundles["merge"].manifest.pruning
    assert record.method == "merge" and record.merges, "no layer merged anything"
    for layer, merges in record.merges.items():
        kept, removed = record.layers[layer]
        assert {m.into for m in merges} <= set(kept) and {e for m in merges for e, _ in m.sources} <= set(removed)
        assert all(abs(m.weight + sum(w for _, w in m.sources) - 1) < 1e-6 for m in merges)

    reader = CheckpointReader(ckpt)
    view = reader.with_config(bundles["merge"].manifest.model).with_merges(record.merges)
    reference = DeepseekReference.from_checkpoint(view)
    cfg = reader.config
    prompt = np.random.default_rng(3).integers(3, cfg.vocab_size, size=12).tolist()
    output = bundles["merge"].generate(prompt, max_new_tokens=20, ignore_eos=True).output_ids
    with torch.no_grad():
        ref = reference(torch.tensor([prompt + output]))[0].numpy()
    assert (ref[len(prompt) - 1:-1].argmax(-1) == np.array(output)).all()  # greedy, token for token

    ids = np.asarray([prompt], np.int64)
    logits = {m: e.forward(ids, np.arange(ids.shape[1])[None], np.ones_like(ids), e.empty_cache(1))[0][0]
              for m, e in bundles.items()}
    np.testing.assert_allclose(logits["merge"], ref[:len(prompt)], atol=1e-3, rtol=0)  # fp32: only reordered arithmetic
    assert np.abs(logits["merge"] - logits["drop"]).max() > 1e-2  # the merge changed the kept experts


def _record(layers: dict) -> dict:
    return {"fraction": 0.5, "criterion": "frequency", "scope": "per-layer", "removed_experts": 2,
            "routed_experts": 4, "bytes_saved": 10, "bytes_per_expert": 5, "method": "merge", "layers": layers}


@pytest.mark.parametrize("merged, words", [
    ([{"into": 5, "weight": 0.5, "sources": [[2, 0.5]]}], "not kept"),
    ([{"into": 0, "weight": 0.5, "sources": [[1, 0.5]]}], "removed expert id"),  # a kept expert as a source
    ([{"into": 0, "weight": 0.9, "sources": [[2, 0.5]]}], "sum to 1"),
    ([{"into": 0, "weight": 0.5, "sources": [[2, "x"]]}], "expected a number"),
    ([{"into": 0, "weight": 0.5, "sources": [[2, 0.5]]}, {"into": 1, "weight": 0.5, "sources": [[2, 0.5]]}],
     "merged twice"),
])
def test_malformed_merge_records_are_refused(merged, words):
    layers = {"1": {"kept": [0, 1], "removed": [2, 3], "merged": merged}}
    with pytest.raises(BundleError, match=words):
        PruningRecord.read(Fields(_record(layers), "manifest.json: pruning", BundleError))
    ok = {"1": {"kept": [0, 1], "removed": [2, 3], "merged": [{"into": 0, "weight": 0.25, "sources": [[2, 0.5], [3, 0.25]]}]}}
    assert PruningRecord.read(Fields(_record(ok), "pruning", BundleError)).to_json()["layers"] == ok
