"""Config parsing and checkpoint loading: layouts, dtypes, FP8, rope forms, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsexport.core.errors import CheckpointError
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.core.config import load_config, parse_config
from dsexport.exporter.reference import DeepseekReference

# DeepSeek-V3's released config.json (the keys that matter), as shipped: rope_scaling + rope_theta.
V3_OFFICIAL = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_official_v3_config_reads_rope_scaling_and_theta():
    cfg = parse_config(V3_OFFICIAL)
    assert cfg.rope.type == "yarn" and cfg.rope.factor == 40 and cfg.rope.theta == 10000
    assert cfg.rope.original_max_position_embeddings == 4096
    assert cfg.topk_method == "noaux_tc" and cfg.n_group == 8 and cfg.topk_group == 4
    assert cfg.latent_dim == 576
    # softmax scale carries YaRN's mscale^2: 0.1*ln(40)+1 = 1.3689
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * np.log(40) + 1) ** 2)


def test_transformers5_rope_parameters_read_the_same():
    raw = dict(V3_OFFICIAL)
    scaling = raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn", "rope_theta": 10000.0}
    assert parse_config(raw).rope == parse_config(V3_OFFICIAL).rope


def test_moonlight_style_config_loads():
    raw = dict(V3_OFFICIAL, n_group=1, topk_group=1, n_routed_experts=64, num_experts_per_tok=6,
               first_k_dense_replace=1, q_lora_rank=None, rope_theta=50000, routed_scaling_factor=2.446,
               hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, rope_scaling=None)
    cfg = parse_config(raw)
    assert cfg.q_lora_rank is None and cfg.n_group == 1 and cfg.rope.type == "default" and cfg.rope.theta == 50000


def test_v2_lite_config_loads_with_greedy_routing():
    raw = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "n_shared_experts": 2,
           "n_routed_experts": 64, "num_experts_per_tok": 6, "kv_lora_rank": 512, "q_lora_rank": None,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
           "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
           "scoring_func": "softmax", "routed_scaling_factor": 1.0, "rope_theta": 10000,
           "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                            "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
           "max_position_embeddings": 163840}
    cfg = parse_config(raw)
    assert cfg.topk_method == "greedy" and cfg.rope_interleave and not cfg.norm_topk_prob


@pytest.mark.parametrize("change, words", [
    ({"model_type": "deepseek_v32", "index_topk": 2048}, "DeepSeek-V3.2"),
    ({"index_topk": 2048, "index_n_heads": 64}, "DeepSeek-V3.2"),
    ({"model_type": "llama"}, "deepseek_v2, deepseek_v3"),
    ({"rope_scaling": {"type": "longrope", "factor": 4}}, "longrope"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
])
def test_architectures_that_differ_in_kind_are_refused(change, words):
    with pytest.raises(CheckpointError, match=words):
        parse_config(dict(V3_OFFICIAL, **change))


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(tmp_path)


def _reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return DeepseekReference.from_checkpoint(CheckpointReader(path))(ids)


@pytest.fixture(scope="module")
def v3(artifacts):
    return artifacts.checkpoint("v3_noaux_tc")


@pytest.fixture(scope="module")
def ids():
    return torch.tensor([[5, 17, 99, 3, 250, 41, 7]])


def test_sharded_checkpoint_with_index(artifacts, v3, ids, tmp_path):
    hf = artifacts.hf_model("v3_noaux_tc")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    torch.testing.assert_close(_reference_logits(tmp_path, ids), _reference_logits(v3, ids), rtol=0, atol=1e-5)


def test_sharded_checkpoint_without_index(artifacts, v3, ids, tmp_path):
    hf = artifacts.hf_model("v3_noaux_tc")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors.index.json").unlink()
    torch.testing.assert_close(_reference_logits(tmp_path, ids), _reference_logits(v3, ids), rtol=0, atol=1e-5)


def test_stacked_expert_layout(v3, ids, tmp_path):
    """transformers 5's in-memory layout: gate_up_proj [E, 2I, H] and down_proj [E, H, I] per layer."""
    tensors = load_file(str(v3 / "model.safetensors"))
    cfg = load_config(v3)
    stacked = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        E = cfg.n_routed_experts
        gate = torch.stack([tensors[f"{p}{e}.gate_proj.weight"] for e in range(E)])
        up = torch.stack([tensors[f"{p}{e}.up_proj.weight"] for e in range(E)])
        stacked[p + "gate_up_proj"] = torch.cat([gate, up], dim=1)
        stacked[p + "down_proj"] = torch.stack([tensors[f"{p}{e}.down_proj.weight"] for e in range(E)])
    save_file(stacked, str(tmp_path / "model.safetensors"))
    shutil.copy(v3 / "config.json", tmp_path / "config.json")
    stacked_reader, per_expert_reader = CheckpointReader(tmp_path), CheckpointReader(v3)
    for a, b in zip(stacked_reader.experts(1), per_expert_reader.experts(1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # bit-equal weights; logits may differ in the last bits (buffer alignment picks BLAS paths)
    torch.testing.assert_close(_reference_logits(tmp_path, ids), _reference_logits(v3, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sources_match_transformers(dtype, tmp_path, ids):
    """bf16/fp16 files: the reference upcasts to fp32; transformers loaded in fp32 is the oracle."""
    from transformers import AutoModelForCausalLM

    from dsexport.exporter.synthetic import write_checkpoint

    path = write_checkpoint(tmp_path, "v2_greedy", seed=3, dtype=dtype)
    assert next(iter(load_file(str(path / "model.safetensors")).values())).dtype == dtype
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(_reference_logits(path, ids), hf(ids).logits, rtol=0, atol=1e-4)


def _quantize_fp8_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What DeepSeek's release holds: e4m3 weights and one float32 scale_inv per 128x128 block."""
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    scale = torch.empty(br, bc)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = block.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_block_scaled_checkpoint_is_dequantized_on_load(tmp_path, ids):
    """An FP8 checkpoint (2-D weights e4m3 + weight_scale_inv, blocks not dividing the shape)
    loads as the fp32 checkpoint holding the dequantized values, checked through transformers."""
    from transformers import AutoModelForCausalLM

    from dsexport.exporter.synthetic import write_checkpoint

    src = write_checkpoint(tmp_path / "src", "v3_noaux_tc", seed=4, hidden_size=160, intermediate_size=200)
    tensors = load_file(str(src / "model.safetensors"))
    fp8, dequant = {}, {}
    for name, t in tensors.items():
        if t.ndim == 2 and name.endswith("proj.weight"):
            q, s = _quantize_fp8_blockwise(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            dequant[name] = q.float() * s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
        else:
            fp8[name] = dequant[name] = t
    assert any(t.shape[1] % 128 for k, t in fp8.items() if k.endswith("proj.weight"))  # partial edge blocks
    (tmp_path / "fp8").mkdir()
    (tmp_path / "deq").mkdir()
    save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"))
    save_file(dequant, str(tmp_path / "deq" / "model.safetensors"))
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = V3_OFFICIAL["quantization_config"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(raw))
    shutil.copy(src / "config.json", tmp_path / "deq" / "config.json")

    reader = CheckpointReader(tmp_path / "fp8")
    name = "model.layers.1.self_attn.q_b_proj.weight"
    assert reader.raw(name).dtype == torch.float8_e4m3fn
    torch.testing.assert_close(reader.get(name), dequant[name], rtol=0, atol=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(_reference_logits(tmp_path / "fp8", ids), hf(ids).logits, rtol=0, atol=1e-4)


def test_checkpoint_code_is_never_executed(v3, ids, tmp_path):
    """trust_remote_code repositories ship modeling code; loading must not import it."""
    ckpt = tmp_path / "remote"
    shutil.copytree(v3, ckpt)
    marker = tmp_path / "executed"
    for module in ("modeling_deepseek.py", "configuration_deepseek.py"):
        (ckpt / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                       "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (ckpt / "config.json").write_text(json.dumps(raw))
    _reference_logits(ckpt, ids)
    assert not marker.exists()


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header"), "not a readable safetensors"),
    (lambda d: (d / "model.safetensors").unlink(), "no \\*.safetensors"),
])
def test_corrupt_or_missing_weights_are_clear_errors(v3, tmp_path, damage, words):
    ckpt = tmp_path / "c"
    shutil.copytree(v3, ckpt)
    damage(ckpt)
    with pytest.raises(CheckpointError, match=words):
        CheckpointReader(ckpt)


def test_wrong_tensor_shape_names_the_tensor(v3, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(v3, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight' has shape \[3, 3\], expected"):
        DeepseekReference.from_checkpoint(CheckpointReader(ckpt))


@pytest.mark.parametrize("variant", ["v2_greedy", "v2_group_limited", "v3_noaux_tc", "v3_flat_tied"])
def test_reference_model_matches_transformers(artifacts, variant):
    """The reference (the spec every stage is checked against) equals transformers 5.x."""
    from dsexport.exporter.reference import LatentCache

    path = artifacts.checkpoint(variant)
    hf = artifacts.hf_model(variant)
    ref = DeepseekReference.from_checkpoint(CheckpointReader(path))
    ids = torch.randint(3, hf.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ref(ids), expected, rtol=0, atol=1e-4)
        cache = LatentCache(ref.cfg.num_hidden_layers)
        pieces = [ref(ids[:, :20], cache=cache)] + [ref(ids[:, t:t + 1], cache=cache) for t in range(20, 33)]
        torch.testing.assert_close(torch.cat(pieces, 1), expected, rtol=0, atol=1e-4)
