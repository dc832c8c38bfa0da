"""The MTP module and the Hugging Face writer: DeepSeek's layout in, DeepSeek's layout out."""

from __future__ import annotations

import json

import torch

from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.hf_format import save_hf_checkpoint
from dsexport.exporter.mtp import MTPModule
from dsexport.exporter.reference import DeepseekReference


def _random_mtp(cfg, seed=0) -> MTPModule:
    torch.manual_seed(seed)
    mtp = MTPModule(cfg)
    with torch.no_grad():
        for name, p in mtp.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return mtp.eval()


def test_written_checkpoint_is_read_back_by_transformers_and_by_dsexport(artifacts, tmp_path):
    """Reference -> save_hf_checkpoint -> transformers' own model gives the oracle's logits, and
    dsexport reads the MTP weights back from model.layers.{L} unchanged."""
    from transformers import AutoModelForCausalLM

    src = artifacts.checkpoint("v3_noaux_tc")
    model = DeepseekReference.from_checkpoint(CheckpointReader(src))
    mtp = _random_mtp(model.cfg)
    raw = json.loads((src / "config.json").read_text())
    out = save_hf_checkpoint(model, mtp, raw, tmp_path / "ckpt")
    L = model.cfg.num_hidden_layers
    reader = CheckpointReader(out)
    assert f"model.layers.{L}.eh_proj.weight" in reader and f"model.layers.{L}.shared_head.head.weight" in reader

    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, artifacts.hf_model("v3_noaux_tc")(ids).logits, rtol=0, atol=1e-5)

    loaded = MTPModule.from_checkpoint(reader)
    main = DeepseekReference.from_checkpoint(reader)
    with torch.no_grad():
        _, hidden = main(ids, return_hidden=True)
        torch.testing.assert_close(loaded.predict(main, hidden[:, :-1], ids[:, 1:]),
                                   mtp.predict(model, hidden[:, :-1], ids[:, 1:]), rtol=0, atol=1e-5)


def test_mtp_follows_the_engines_formula(artifacts):
    """logits(t+2) = head(shared_head.norm(block(eh_proj([enorm(emb(t+1)), hnorm(h_t)])))), block at t's position."""
    model = DeepseekReference.from_checkpoint(CheckpointReader(artifacts.checkpoint("v3_noaux_tc")))
    mtp = _random_mtp(model.cfg, seed=1)
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hidden = model(ids, return_hidden=True)
        got = mtp.predict(model, hidden[:, :-1], ids[:, 1:])
        # the same by hand, one position at a time with the latent cache: position t sees t' <= t
        from dsexport.exporter.reference import LatentCache, positions_and_mask

        cache = LatentCache()
        rows = []
        for t in range(ids.shape[1] - 1):
            x = mtp.eh_proj(torch.cat([mtp.enorm(model.embed_tokens(ids[:, t + 1:t + 2])), mtp.hnorm(hidden[:, t:t + 1])], -1))
            cos, sin, mask = positions_and_mask(model.inv_freq, model.rope_scale, (1, 1), t, None, None)
            rows.append(model.lm_head(mtp.shared_head_norm(mtp.block(x, cos, sin, mask, cache))))
    torch.testing.assert_close(got, torch.cat(rows, 1), rtol=0, atol=1e-5)
    assert got.shape == (1, 9, model.cfg.vocab_size)
