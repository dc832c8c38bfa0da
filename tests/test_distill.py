"""`dsexport distill`: the compressed student learns from the original, and what it writes is a
checkpoint the rest of dsexport (and transformers) reads as the student.

(a) a few steps lower the held-out KL; the output builds and validates against itself;
(b) under torchrun with 2 gloo ranks the weights equal the single-process run's;
(c) transformers' DeepseekV3 on the output computes dsexport's pruned student;
(d) bad input is one error line, exit code 2;
(e) QAT: the forward rounds routed experts as the build will, the backward passes through.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dsexport.calibration.data import load_sequences
from dsexport.calibration.distill import DistillConfig, as_built, build_student, distill, finalize_student
from dsexport.calibration.distill_output import REMOVED_BIAS, transformers_equivalence, write_student
from dsexport.core.config import load_config
from dsexport.core.quant import QuantSpec
from dsexport.exporter.checkpoint import CheckpointReader
from dsexport.exporter.reference import DeepseekReference
from dsexport.exporter.synthetic import TOKENIZER_TEXT
from dsexport.runtime.tokenizer import BundleTokenizer

VARIANT = "v3_noaux_tc"  # 16 experts in 4 groups (2 kept per token), top-3, correction bias
# A few optimizer steps on small windows: seconds per run on 2 cores.
SMALL = ["--samples", 40, "--seq-len", 32, "--batch", 8, "--micro-batch", 4, "--threads", 1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny tensors only lose to thread hand-offs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill") / "calib.txt"
    path.write_text(TOKENIZER_TEXT * 30)
    return path


def _kept(report: dict) -> dict[int, list[int]]:
    return {int(layer): v["kept"] for layer, v in report["pruning"]["layers"].items()}


def test_distill_lowers_held_out_kl_and_the_output_builds_and_validates(artifacts, calib, tmp_path, run_cli):
    ckpt = artifacts.checkpoint(VARIANT)
    out = tmp_path / "student"
    code, stdout, err = run_cli("distill", "--model", ckpt, "--calib", calib, "--out", out, "--prune", 0.25,
                                "--train", "moe", "--lr", 1e-3, "--steps", 12, "--eval-every", 4, *SMALL, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    history = [h["held_out_kl"] for h in report["history"]]
    assert min(history[1:]) < 0.95 * history[0]  # the training metric (cached top-k + rest) went down
    held = report["quality"]["held_out"]  # exact KL and perplexity, before and after, on held-out windows
    assert held["after"]["kl"] < 0.95 * held["before"]["kl"]
    assert "ETA" in err  # progress with an ETA on stderr

    kept = _kept(report)
    assert json.loads((out / "config.json").read_text())["kept_experts"] == [kept.get(i, []) for i in range(3)]
    assert load_config(out).kept_experts == tuple(tuple(kept.get(i, ())) for i in range(3))  # build reads it
    written, original = load_file(str(out / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert written.keys() == original.keys()
    for layer, ids in kept.items():
        bias = written[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        removed = [e for e in range(16) if e not in ids]
        assert (bias[removed] == REMOVED_BIAS).all() and torch.equal(bias[ids], original[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"][ids])
        assert not torch.equal(written[f"model.layers.{layer}.mlp.experts.{ids[0]}.up_proj.weight"],
                               original[f"model.layers.{layer}.mlp.experts.{ids[0]}.up_proj.weight"])  # trained
        assert torch.equal(written[f"model.layers.{layer}.mlp.experts.{removed[0]}.up_proj.weight"],
                           original[f"model.layers.{layer}.mlp.experts.{removed[0]}.up_proj.weight"])  # left as it was
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert torch.equal(written[name], original[name])  # not trained in --train moe: copied
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()

    bundle = tmp_path / "bundle"
    code, _, err = run_cli("build", "--model", out, "--out", bundle)
    assert code == 0, err
    assert json.loads((bundle / "manifest.json").read_text())["model"]["kept_experts"][1] == kept[1]
    code, stdout, err = run_cli("validate", bundle, "--reference", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["metrics"]["max_abs_logit_diff"] < 1e-3

    code, _, err = run_cli("distill", "--model", ckpt, "--calib", calib, "--out", out, "--prune", 0.25, "--steps", 1,
                           *SMALL)
    assert code == 2 and "--overwrite" in err  # an existing output is replaced only when asked


def test_torchrun_two_ranks_equal_one_process(artifacts, calib, tmp_path, run_cli):
    """Same global batch of 8 windows per step, each of 2 gloo ranks taking 4; DDP averages the
    gradients. Tolerance: the runs differ only in float32 summation order (relative ~1e-6 of a
    gradient). AdamW divides each update by the gradient's running RMS, so on coordinates whose
    gradient is near zero that relative error can grow up to a fraction of the step size; we bound
    the difference at 2% of the most any weight can move (lr x steps) and the two updates'
    difference at 0.1% of the update's norm. Measured: 4.9e-7 (bound 1.6e-5; the largest
    update is 5.3e-4) and 6.5e-6 of the norm."""
    ckpt = artifacts.checkpoint(VARIANT)
    steps, lr = 4, 2e-4
    args = ["distill", "--model", ckpt, "--calib", calib, "--prune", 0.25, "--train", "moe", "--steps", steps,
            "--lr", lr, "--eval-every", 2, *SMALL, "--json"]
    script = tmp_path / "dsexport_main.py"
    script.write_text("from dsexport.cli import main\nmain()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), *map(str, args), "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, stdout, err = run_cli(*args, "--out", tmp_path / "one")
    assert code == 0, err
    one, two = json.loads(stdout), json.loads((tmp_path / "two" / "distill_report.json").read_text())
    assert two["ranks"] == 2 and one["ranks"] == 1 and one["steps"] == two["steps"] == steps
    assert two["train_tokens"]["all_ranks"] == one["train_tokens"]["all_ranks"] == 2 * two["train_tokens"]["rank0"]

    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    original = load_file(str(ckpt / "model.safetensors"))
    trained = [k for k in a if not torch.equal(a[k], original[k]) and "bias" not in k]
    assert len(trained) > 20 and all(torch.equal(a[k], b[k]) for k in a if k not in trained and "bias" not in k)
    max_diff = max((a[k] - b[k]).abs().max().item() for k in trained)
    update = sum(((a[k] - original[k]) ** 2).sum() for k in trained).sqrt()
    assert max_diff <= 0.02 * lr * steps, max_diff
    assert sum(((a[k] - b[k]) ** 2).sum() for k in trained).sqrt() <= 1e-3 * update


@pytest.fixture(scope="module")
def pruned_student(artifacts, calib, tmp_path_factory):
    """A student with one expert removed from every routing group (no group left with one), a few
    steps of --train all, written with write_student."""
    ckpt = artifacts.checkpoint(VARIANT)
    reader = CheckpointReader(ckpt)
    kept = {1: [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14], 2: [0, 1, 2, 5, 6, 7, 8, 9, 10, 12, 13, 15]}
    view = reader.with_config(reader.config.with_kept_experts(kept))
    windows, _ = load_sequences([calib], BundleTokenizer.from_directory(ckpt), 24, 32)
    with torch.random.fork_rng():
        result = distill(reader, view, windows, DistillConfig(train="all", steps=3, batch=8, lr=1e-3))
    out = tmp_path_factory.mktemp("student")
    write_student(reader, result.student, out, {})
    return ckpt, out, kept, windows


def test_transformers_computes_the_pruned_student(pruned_student):
    """transformers ignores kept_experts; the removed experts' correction bias (-1e4) keeps them
    unselected. Tolerance 1e-4 on logits, as the parity tests: both are fp32 implementations."""
    from transformers import AutoModelForCausalLM

    ckpt, out, kept, windows = pruned_student
    report = json.loads((out / "distill_report.json").read_text())
    assert report["transformers_equivalent"] == {"exact": True, "groups_of_one": {}}
    reader = CheckpointReader(out)
    student = DeepseekReference.from_checkpoint(reader.with_config(reader.config.with_kept_experts(kept)))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    teacher = DeepseekReference.from_checkpoint(CheckpointReader(ckpt))
    x = torch.tensor(windows[:4])
    with torch.no_grad():
        ours, theirs = student(x), hf(x).logits
        assert (ours - theirs).abs().max() < 1e-4
        assert (ours - teacher(x)).abs().max() > 0.1  # the student is not the teacher: the check could fail

    singleton = reader.config.with_kept_experts({1: [0, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]})  # group 0: one
    assert transformers_equivalence(singleton) == {"exact": False, "groups_of_one": {"1": [0]}}


@pytest.mark.parametrize("args, words", [
    (["--train", "experts"], "--train must be one of router, norms, moe, all"),
    (["--prune", 1.5], "between 0 and 1"),
    (["--calib", "MISSING"], "does not exist"),
])
def test_bad_input_is_one_error_line(artifacts, calib, tmp_path, run_cli, args, words):
    base = {"--train": "moe", "--prune": 0.25, "--calib": calib}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = tmp_path / "missing.txt" if value == "MISSING" else value
    flags = [str(x) for kv in base.items() for x in kv]
    code, _, err = run_cli("distill", "--model", artifacts.checkpoint(VARIANT), "--out", tmp_path / "o", *flags)
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_qat_rounds_routed_experts_as_the_build_and_passes_gradients(pruned_student):
    ckpt, out, kept, windows = pruned_student
    reader = CheckpointReader(ckpt)
    view = reader.with_config(reader.config.with_kept_experts(kept))
    quant = QuantSpec({"routed_experts": 4}, block_size=32, activations="fp32")  # weights only: no activation rounding
    student = build_student(view, DistillConfig(train="moe", quant=quant))
    x = torch.tensor(windows[:2])
    logits = student(x)
    logits.logsumexp(-1).sum().backward()
    grad = student.layers[1].mlp.parametrizations.w_up.original.grad
    assert grad is not None and grad.abs().sum() > 0  # straight through the rounding
    built = DeepseekReference.from_checkpoint(view, quant)  # what `build` with this spec computes
    with torch.no_grad():
        assert (logits - built(x)).abs().max() < 1e-4
        plain = DeepseekReference.from_checkpoint(view)
        assert (plain(x) - built(x)).abs().max() > 1e-3  # int4 rounding is visible: the check could fail
        assert (as_built(finalize_student(student), quant)(x) - built(x)).abs().max() < 1e-4


def test_merge_student_starts_from_the_merged_experts(artifacts, calib, tmp_path, run_cli):
    """--prune-method merge: the student starts from the kept experts with the removed ones folded
    in (exporter/merge.py), so after one step at a negligible learning rate (1e-12: the weights
    move by ~1e-12) an absorbing expert's written weights are the merged ones, not the original's."""
    from dsexport.core.sections import ExpertMerge

    ckpt = artifacts.checkpoint(VARIANT)
    out = tmp_path / "merged"
    code, stdout, err = run_cli("distill", "--model", ckpt, "--calib", calib, "--out", out, "--prune", 0.25,
                                "--prune-method", "merge", "--train", "moe", "--lr", 1e-12, "--steps", 1, *SMALL, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    kept = _kept(report)
    merges = {int(layer): tuple(ExpertMerge(m["into"], m["weight"], tuple(map(tuple, m["sources"])))
                                for m in v.get("merged", []))
              for layer, v in report["pruning"]["layers"].items()}
    assert any(merges.values())
    reader = CheckpointReader(ckpt)
    view = reader.with_config(reader.config.with_kept_experts(kept)).with_merges(merges)
    written, original = load_file(str(out / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    layer, merge = next((layer, ms[0]) for layer, ms in merges.items() if ms)
    name = f"model.layers.{layer}.mlp.experts.{merge.into}.down_proj.weight"
    down = view.experts(layer)[2][kept[layer].index(merge.into)]  # [H, I], merged
    assert (written[name] - down).abs().max() < 1e-6
    assert (written[name] - original[name]).abs().max() > 1e-3  # the merge changed it: the check could fail


def test_out_is_never_the_checkpoint_or_inside_it(artifacts, calib, run_cli):
    ckpt = artifacts.checkpoint(VARIANT)
    before = sorted(p.name for p in ckpt.iterdir())
    for out, words in ((ckpt, "is or holds the checkpoint"), (ckpt / "student", "lies inside the checkpoint")):
        code, _, err = run_cli("distill", "--model", ckpt, "--calib", calib, "--out", out, "--prune", 0.25, "--overwrite")
        lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
        assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing written into or removed from it
