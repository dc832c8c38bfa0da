"""Expert counts may differ per layer, and routing groups may be left uneven or empty.

Pruning (a later stage) removes experts per layer; here the export and the reference take the
same plan and must agree, for every routing method. Groups left with one expert score that
expert alone; empty groups are never kept (docs/lowering.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.build import BuildConfig, build_bundle
from dsexport.exporter.reference import DeepseekReference
from dsexport.runtime import Engine

PLANS = {
    # 16 experts in 4 groups of 4, topk_group 2, top-3: groups of 4, 1, 2, 3; then two empty groups
    "v3_noaux_tc": {1: [0, 1, 2, 3, 4, 8, 9, 12, 13, 14], 2: [0, 1, 2, 3, 4, 5, 6, 7]},
    # 8 experts in 4 groups of 2, topk_group 2, top-2: uneven, then one group of 1 and two empty
    "v2_group_limited": {2: [0, 2, 3, 5, 6], 3: [1, 2, 3]},
    "v2_greedy": {1: [0, 3, 5], 2: [1, 2, 4, 6, 7]},
    "v3_flat_tied": {1: [0, 2, 4], 2: [1, 2, 3, 4, 5, 6, 7]},
}


@pytest.mark.parametrize("variant", sorted(PLANS))
def test_export_with_per_layer_expert_counts_matches_the_reference(artifacts, tmp_path, variant):
    ckpt = artifacts.checkpoint(variant)
    plan = PLANS[variant]
    build_bundle(BuildConfig(ckpt, tmp_path / "b", kept_experts=plan))
    reader = CheckpointReader(ckpt)
    reader.config = cfg = reader.config.with_kept_experts(plan)
    assert [cfg.num_experts(i) for i in plan] == [len(v) for v in plan.values()]

    reference = DeepseekReference.from_checkpoint(reader)
    for layer, ids in plan.items():
        assert reference.layers[layer].mlp.w_gate.shape[0] == len(ids)

    engine = Engine.load(tmp_path / "b", threads=2)
    for layer, ids in plan.items():
        assert engine.manifest.to_json()["model"]["kept_experts"][layer] == ids
    prompt = np.random.default_rng(5).integers(3, cfg.vocab_size, size=12).tolist()
    output = engine.generate(prompt, max_new_tokens=32, ignore_eos=True).output_ids
    tokens = prompt + output
    with torch.no_grad():
        ref_logits = reference(torch.tensor([tokens]))[0].numpy()
    # greedy tokens of the runtime are the reference's argmax at each step
    assert (ref_logits[len(prompt) - 1:-1].argmax(-1) == np.array(output)).all()
    logits, _ = engine.forward(np.array([tokens]), np.arange(len(tokens))[None], np.ones((1, len(tokens)), np.int64),
                               engine.empty_cache(1))
    assert np.abs(logits[0] - ref_logits).max() <= 1e-4


def test_a_plan_below_top_k_is_refused(artifacts):
    from dsexport.core.errors import UserError

    cfg = CheckpointReader(artifacts.checkpoint("v3_noaux_tc")).config
    with pytest.raises(UserError, match="need at least top-k = 3"):
        cfg.with_kept_experts({1: [0, 1]})
