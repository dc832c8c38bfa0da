"""The PyTorch reference on an NVIDIA GPU, and what reduced precision does to the embedded model.

Run on a machine with CUDA (no TensorRT needed):

    python benchmarks/cuda_reference_check.py [--out result.json]

Measures, on the embedded trained model's held-out English and code text (teacher-forced
windows) and on greedy continuations:
  - CUDA fp32 (TF32 off) against CPU fp32: the reference is device-independent;
  - CUDA fp32 with TF32 matmuls on (TensorRT's default on Ampere+, Orin included) against fp32;
  - bf16, fp16, and fp16 with RMSNorm statistics in fp32 (the engine plan's fp32 islands;
    routing is always fp32 in the reference) against fp32: max |logit diff|, top-1 agreement,
    perplexity change, greedy-token agreement;
  - transformers' DeepSeek-V3 class on CUDA fp32 against the reference on CUDA fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from tokenizers import Tokenizer

from dsexport import EMBEDDED_MODEL
from dsexport.exporter import reference
from dsexport.exporter.checkpoint import CheckpointReader

WINDOW, WINDOWS, GREEDY_TOKENS = 128, 8, 48
PROMPTS = ("And God said unto Moses,", "def parse_args(argv):\n", "In the beginning", "    for i in range(")
_original_positions = reference.positions_and_mask
_dtype = torch.float32


def _positions(*args, **kwargs):
    cos, sin, mask = _original_positions(*args, **kwargs)
    return cos.to(_dtype), sin.to(_dtype), mask


def _rms_fp32(self, x):  # RMSNorm statistics in fp32, output in the activation dtype
    xf = x.float()
    return (self.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


@torch.no_grad()
def run_mode(model, windows, device, dtype, greedy_prompts):
    global _dtype
    _dtype = dtype
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    logits = [m(torch.tensor([w], device=device)).float().cpu()[0] for w in windows]
    outs = []
    for p in greedy_prompts:
        ids = torch.tensor([p], device=device)
        for _ in range(GREEDY_TOKENS):
            nxt = m(ids)[0, -1].float().argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        outs.append(ids[0, len(p):].tolist())
    del m
    return logits, outs


def compare(base, other, windows):
    diff = max((a - b).abs().max().item() for a, b in zip(base[0], other[0]))
    finite = all(torch.isfinite(b).all().item() for b in other[0])
    top1 = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(base[0], other[0]))
    total = sum(a.shape[0] for a in base[0])

    def nll(logits_list):
        s, n = 0.0, 0
        for lg, w in zip(logits_list, windows):
            lp = torch.log_softmax(lg[:-1].double(), -1)
            s -= lp.gather(1, torch.tensor(w[1:])[:, None]).sum().item()
            n += len(w) - 1
        return s / n

    ppl_base, ppl = math.exp(nll(base[0])), math.exp(nll(other[0]))
    greedy = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(base[1], other[1]))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(base[1], other[1])]
    return {"max_abs_logit_diff": diff, "finite": finite, "top1_agreement": top1 / total,
            "ppl": ppl, "ppl_fp32": ppl_base, "ppl_delta_rel": ppl / ppl_base - 1,
            "greedy_tokens_equal": f"{greedy}/{sum(len(a) for a in base[1])}", "first_greedy_divergence": first_diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference.positions_and_mask = _positions
    tok = Tokenizer.from_file(str(EMBEDDED_MODEL / "tokenizer.json"))
    windows = []
    for name in ("test.english.txt", "test.code.txt"):
        ids = tok.encode((EMBEDDED_MODEL / name).read_text()).ids
        windows += [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]
    prompts = [tok.encode(p).ids for p in PROMPTS]
    reader = CheckpointReader(EMBEDDED_MODEL)
    model = reference.DeepseekReference.from_checkpoint(reader)
    result = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "windows": len(windows), "window_tokens": WINDOW, "greedy_tokens": GREEDY_TOKENS}
    start = time.time()
    cpu = run_mode(model, windows, "cpu", torch.float32, prompts)
    gpu = run_mode(model, windows, "cuda", torch.float32, prompts)
    result["cuda_fp32_vs_cpu_fp32"] = compare(cpu, gpu, windows)
    torch.backends.cuda.matmul.allow_tf32 = True
    result["cuda_tf32_vs_fp32"] = compare(gpu, run_mode(model, windows, "cuda", torch.float32, prompts), windows)
    torch.backends.cuda.matmul.allow_tf32 = False
    result["cuda_bf16_vs_fp32"] = compare(gpu, run_mode(model, windows, "cuda", torch.bfloat16, prompts), windows)
    result["cuda_fp16_vs_fp32"] = compare(gpu, run_mode(model, windows, "cuda", torch.float16, prompts), windows)
    reference.RMSNorm.forward = _rms_fp32
    result["cuda_fp16_norms_fp32_vs_fp32"] = compare(gpu, run_mode(model, windows, "cuda", torch.float16, prompts),
                                                    windows)
    try:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            hf_logits = [hf(torch.tensor([w], device="cuda")).logits.float().cpu()[0] for w in windows]
        result["transformers_cuda_fp32_vs_reference_cuda_fp32"] = max(
            (a - b).abs().max().item() for a, b in zip(gpu[0], hf_logits))
    except Exception as e:  # noqa: BLE001  (report, do not hide, a failure of the oracle there)
        result["transformers_cuda_fp32_vs_reference_cuda_fp32"] = f"failed: {type(e).__name__}: {e}"
    result["seconds"] = time.time() - start
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        open(args.out, "w").write(text)


if __name__ == "__main__":
    main()
