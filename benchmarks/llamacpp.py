"""llama.cpp on the same checkpoint, in the same run: the baseline dsexport is compared with.

Builds llama.cpp from the sources that PyPI's llama-cpp-python sdist vendors (vendor/llama.cpp),
CPU only, into a cache dir (reused when present); converts the checkpoint to GGUF f32 with the
vendored convert_hf_to_gguf.py, quantizes it with llama-quantize, and runs llama-bench on each
quantization with the weights read into memory (no mmap). Prints prefill (pp) and decode (tg)
tokens/s and the roofline fraction: bytes read per decoded token (from the GGUF's tensor table:
gguf_bytes_per_token) x tok/s / the 2-thread copy bandwidth of
benchmarks/bandwidth.py, measured in the same run (before each bench; the best is used). Each
bench waits for idle CPUs first and warns when other processes ran during it: on a shared 2-core
VM they halve the figures.

    python benchmarks/llamacpp.py --checkpoint /tmp/ckpt-m [--quants q8_0 q4_0 f32]

Workarounds, all applied at run time by a small wrapper around the converter; no llama.cpp file
is edited and nothing is committed:
- Tokenizer: the converter identifies a BPE pre-tokenizer by hashing the token ids of a test
  string, and M's small BPE vocabulary matches no known hash ("BPE pre-tokenizer was not
  recognized"). The converter has no option to name it, so the wrapper falls back to "gpt-2"
  when, and only when, the hash is unknown and tokenizer.json's pre_tokenizer is a plain
  ByteLevel with use_regex (exactly GPT-2's regex split). Only tokenization is affected, not speed.
- Routing: a DeepSeek-V3 config written by transformers 5 has no "scoring_func" (V3 always uses
  sigmoid). The converter writes expert_gating_func only when it finds that key, and llama.cpp's
  deepseek2 loader then defaults to softmax; the wrapper sets scoring_func="sigmoid" for
  model_type deepseek_v3 when absent, as DeepSeek's own V3 config.json has it.
- No q-LoRA: llama.cpp's deepseek2 loader decides "lite" (no q-LoRA) by layer count (26, 27, or
  48 with a 128256 vocabulary) and otherwise requires the q_lora_rank key, which the converter
  omits when q_lora_rank is null ("key not found in model: deepseek2.attention.q_lora_rank" in
  llama-quantize). The wrapper writes q_lora_rank=0; the loader and graph then use attn_q as for
  V2-Lite (they test q_lora_rank > 0 and the presence of attn_q).
- MTP: config.json says num_nextn_predict_layers=1 but M has no MTP layer. The vendored converter
  skips MTP tensors for DeepseekV3ForCausalLM (skip_mtp) and writes no nextn count, so nothing
  to do; a real V3 checkpoint's layer 61 would be dropped the same way.
- llama-bench in this llama.cpp replaced `--mmap 0` with `--load-mode none` (weights read into
  memory); the script uses whichever flag the built llama-bench accepts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

try:
    from bandwidth import copy_bandwidth
except ImportError:  # imported as benchmarks.llamacpp
    from benchmarks.bandwidth import copy_bandwidth

VERSION = "0.3.36"  # llama-cpp-python; vendors ggml-org/llama.cpp@0c1e57098
CACHE = Path.home() / ".cache" / "dsexport-bench" / "llama.cpp"
TOOLS = ("llama-bench", "llama-quantize")

CONVERT = r'''
import json, runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base, deepseek
get_pre = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return get_pre(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((self.dir_model / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            base.logger.warning("dsexport-bench: unknown hash, pre_tokenizer is ByteLevel+regex: using 'gpt-2'")
            return "gpt-2"
        raise
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
set_params = deepseek.DeepseekV2Model.set_gguf_parameters
def set_gguf_parameters(self):
    if self.hparams.get("model_type") == "deepseek_v3" and "scoring_func" not in self.hparams:
        self.hparams["scoring_func"] = "sigmoid"
    set_params(self)
    if self.hparams.get("q_lora_rank") is None:
        self.gguf_writer.add_q_lora_rank(0)
deepseek.DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
'''


def sh(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join("<wrapper>" if "\n" in str(c) else str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def build_llamacpp(cache: Path = CACHE, version: str = VERSION, jobs: int = 2) -> dict:
    """Download and unpack the sdist, build the tools; returns paths, commit and build time."""
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"llama_cpp_python-{version}"
    src = root / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        sdist = cache / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            sh([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                f"llama-cpp-python=={version}", "-d", cache])
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    changelog = (root / "CHANGELOG.md").read_text() if (root / "CHANGELOG.md").is_file() else ""
    section = changelog.split(f"## [{version}]", 1)[-1].split("\n## [", 1)[0]
    commit = m.group(1) if (m := re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)) else "unknown"
    build, seconds = cache / f"build-{version}", None
    bins = {t: build / "bin" / t for t in TOOLS}
    if not all(p.is_file() for p in bins.values()):
        t0 = time.perf_counter()
        sh(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
            "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"])
        sh(["cmake", "--build", build, "--config", "Release", f"-j{jobs}", "--target", *TOOLS])
        seconds = time.perf_counter() - t0
        print(f"built llama.cpp in {seconds / 60:.1f} min", flush=True)
    print(f"llama.cpp: llama-cpp-python {version} sdist, ggml-org/llama.cpp@{commit} ({src})", flush=True)
    return {"src": src, "bin": build / "bin", "version": version, "commit": commit, "build_seconds": seconds}


def ensure_converter_deps(src: Path, checkpoint: Path) -> None:
    """Install the converter's python packages into this environment, only those missing."""
    def missing(module: str) -> bool:
        return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode != 0
    if missing("gguf"):
        sh([sys.executable, "-m", "pip", "install", "-e", src / "gguf-py"])
    if (checkpoint / "tokenizer.model").is_file() and (missing("sentencepiece") or missing("google.protobuf")):
        sh([sys.executable, "-m", "pip", "install", "sentencepiece", "protobuf"])


def convert(checkpoint: Path, llama: dict, quants, cache: Path = CACHE) -> dict[str, Path]:
    """GGUF f32 of the checkpoint, then each quantization; reused when present."""
    files = sorted(checkpoint.glob("*.safetensors")) + [checkpoint / "config.json"]
    key = hashlib.sha256(repr([llama["version"]] + [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                                                    for p in files]).encode()).hexdigest()[:12]
    out = cache / "gguf" / f"{checkpoint.name}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "model-f32.gguf"
    if not f32.is_file():
        ensure_converter_deps(llama["src"], checkpoint)
        tmp = f32.with_suffix(".tmp")
        sh([sys.executable, "-c", CONVERT, llama["src"], checkpoint, "--outtype", "f32", "--outfile", tmp])
        tmp.rename(f32)
    paths = {}
    for q in quants:
        path = out / f"model-{q}.gguf"
        if q != "f32" and not path.is_file():
            sh([llama["bin"] / "llama-quantize", f32, path.with_suffix(".tmp"), q.upper(), os.cpu_count()])
            path.with_suffix(".tmp").rename(path)
        paths[q] = path
    return paths


def llama_bench(llama: dict, gguf: Path, threads: int, prompt: int, gen: int, reps: int) -> dict:
    """pp and tg tokens/s (mean and runs) from llama-bench's JSON, weights read into memory."""
    exe = llama["bin"] / "llama-bench"
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    no_mmap = ["--load-mode", "none"] if "--load-mode" in help_text else ["--mmap", "0"]
    cmd = [exe, "-m", gguf, "-t", threads, "-p", prompt, "-n", gen, "-r", reps, *no_mmap, "-o", "json"]
    (b0, k0), t0 = cpu_times(), time.perf_counter()
    proc = sh(cmd, capture_output=True, text=True)
    (b1, k1), wall = cpu_times(), time.perf_counter() - t0
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    result = {"model_size": rows[0]["model_size"], "build_commit": rows[0].get("build_commit"),
              "cpu_info": rows[0].get("cpu_info"), "load": " ".join(no_mmap),
              "other_cpu_share": max(0.0, (b1 - b0) - (k1 - k0)) / wall / os.cpu_count()}
    for r in rows:
        kind = "prefill" if r["n_gen"] == 0 else "decode"
        result[f"{kind}_tokens_per_s"] = r["avg_ts"]
        result[f"{kind}_runs"] = r.get("samples_ts", [r["avg_ts"]])
    return result


def cpu_times() -> tuple[float, float]:
    """(all CPUs' busy seconds from /proc/stat, this process's children's CPU seconds)."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), kids.ru_utime + kids.ru_stime


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds`: other work skews every figure here."""
    (b0, _), _, (b1, _) = cpu_times(), time.sleep(seconds), cpu_times()
    return (b1 - b0) / seconds / os.cpu_count()


def wait_idle(limit_s: float = 600, threshold: float = 0.1) -> float:
    """Wait (up to limit_s) until the CPUs are idle, as a shared VM's other jobs skew the figures."""
    t0, busy = time.monotonic(), cpu_busy(2)
    if busy > threshold:
        print(f"CPUs {busy:.0%} busy (other processes); waiting up to {limit_s:.0f} s for them to go idle", flush=True)
    while busy > threshold and time.monotonic() - t0 < limit_s:
        time.sleep(10)
        busy = cpu_busy(2)
    if busy > threshold:
        print(f"warning: CPUs still {busy:.0%} busy; figures will be low and noisy", flush=True)
    return busy


def gguf_bytes_per_token(gguf: Path, llama: dict) -> tuple[float, dict[str, float]]:
    """Bytes of weights llama.cpp reads for one decoded token, from the GGUF's tensor table (read
    with the gguf-py package of the llama.cpp source it was built from): every tensor whole, except
    the routed experts' (`*_exps`: expert_used_count of expert_count) and the token embedding (one
    row). The file size x active/total parameters undercounts: it scales the output head, which
    every token reads whole, by the active fraction. Returns the total and a split by tensor kind."""
    sys.path.insert(0, str(Path(llama["src"]) / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(gguf))

    def field(suffix: str) -> int:
        for name, f in reader.fields.items():
            if name.endswith(suffix):
                return int(f.parts[f.data[0]][0])
        raise KeyError(f"{gguf.name}: no metadata key *{suffix}")

    used, experts = field(".expert_used_count"), field(".expert_count")
    split: dict[str, float] = {}
    for t in reader.tensors:
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.split(".")[0]
        nbytes = float(t.n_bytes)
        if "nextn" in t.name:  # an MTP block: llama-bench does not run it
            continue
        if kind.endswith("_exps"):
            nbytes *= used / experts
        elif kind == "token_embd":
            nbytes /= int(t.shape[-1])  # gguf shapes list the row length first: [n_embd, n_vocab]
        split[kind] = split.get(kind, 0.0) + nbytes
    return sum(split.values()), split


def active_fraction(checkpoint: Path) -> float:
    from dsexport.core.config import load_config, parameter_counts
    total, active = parameter_counts(load_config(checkpoint))
    return active / total


def run_llamacpp(checkpoint: Path, quants=("q8_0", "q4_0"), threads=2, prompt=128, gen=64, reps=3,
                 bandwidth: float | None = None, cache: Path = CACHE, version: str = VERSION) -> dict:
    """Build (or reuse) llama.cpp, convert, quantize and bench `checkpoint`.

    Returns {"llama_cpp": {version, commit, build_seconds}, "bandwidth": bytes/s,
    "active_fraction": ..., "quants": {quant: {decode_tokens_per_s, prefill_tokens_per_s, decode_runs,
    prefill_runs, gguf_bytes, bytes_per_token, roofline, ...}}}. Pass `bandwidth` to reuse a
    copy_bandwidth(threads) measured by the caller in the same run."""
    checkpoint = Path(checkpoint)
    llama = build_llamacpp(Path(cache), version)
    paths = convert(checkpoint, llama, quants, Path(cache))
    fraction = active_fraction(checkpoint)
    measured = []  # a copy before each bench, after waiting for idle CPUs; the best is the machine's
    results = {}
    for q, path in paths.items():
        busy = wait_idle()
        if bandwidth is None:
            measured.append(copy_bandwidth(threads))
        r = llama_bench(llama, path, threads, prompt, gen, reps)
        r.update(cpu_busy_before=busy, gguf_bytes=path.stat().st_size)
        r["bytes_per_token"] = gguf_bytes_per_token(path, llama)[0]
        results[q] = r
        if r["other_cpu_share"] > 0.05:
            print(f"warning: other processes used {r['other_cpu_share']:.0%} of the CPUs during {q}", flush=True)
    bandwidth = bandwidth or max(measured)
    print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s ({threads}-thread copy of 1 GiB, read + write, best of 5"
          + (f"; best of {', '.join(f'{b / 1e9:.1f}' for b in measured)})" if measured else ")"))
    for q, r in results.items():
        r["roofline"] = r["bytes_per_token"] * r["decode_tokens_per_s"] / bandwidth
        print(f"llama.cpp {q}: decode {r['decode_tokens_per_s']:.1f} tok/s "
              f"(runs {', '.join(f'{x:.1f}' for x in r['decode_runs'])}), prefill {r['prefill_tokens_per_s']:.1f} "
              f"tok/s for {prompt} tokens; roofline {r['bytes_per_token'] / 1e6:.0f} MB/token (GGUF tensor table) x {r['decode_tokens_per_s']:.1f} tok/s / "
              f"{bandwidth / 1e9:.1f} GB/s = {r['roofline']:.2f}", flush=True)
    info = {k: llama[k] for k in ("version", "commit", "build_seconds")}
    return {"llama_cpp": info, "bandwidth": bandwidth, "bandwidth_runs": measured, "active_fraction": fraction,
            "threads": threads, "prompt": prompt, "gen": gen, "reps": reps, "quants": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--quants", nargs="+", default=["q8_0", "q4_0"], help="llama-quantize types, or f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--version", default=VERSION, help="llama-cpp-python sdist version")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    res = run_llamacpp(args.checkpoint, tuple(args.quants), args.threads, args.prompt_tokens, args.new_tokens,
                       args.reps, cache=args.cache, version=args.version)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
