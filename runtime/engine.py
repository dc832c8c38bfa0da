"""Generate text from an exported dsexport model with ONNX Runtime. No torch.

    engine = Engine.load("dist/mymodel", threads=2)
    print(engine.generate("Once upon a time", max_new_tokens=32).text)
    for event in engine.stream("Once upon a time"):
        print(event.text, end="", flush=True)

Batches of prompts of different lengths are left-padded; the attention mask hides the padding
and position ids count only real tokens, so each row decodes as it would alone. The KV cache is
the per-layer latent the graph returns, handed back to the next step as ONNX Runtime values
without a round trip through numpy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from dsexport.errors import BundleError, ContextLengthError, EngineUnavailable, UserError

from .bundle import read_bundle
from .memory import lock_mapped_file
from .sampling import SamplingParams, sample_token
from .tokenizer import BundleTokenizer, StreamDecoder

if TYPE_CHECKING:
    from .speculative import DraftStats, SpeculativeDecoder

WEIGHT_MODES = ("mmap", "mlock", "memory")


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]  # generated ids only
    text: str
    finish_reason: str  # "eos" | "stop" | "length" (max_new_tokens) | "context" (max context reached)
    ttft_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    draft_stats: "DraftStats | None" = None  # MTP drafting, when it ran (runtime/speculative.py)
    paging_stats: dict | None = None  # paged bundles: expert cache hits, bytes read, stalls (runtime/paging.py)


@dataclasses.dataclass
class TokenEvent:
    row: int  # which prompt of the batch
    token_id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    finish_reason: str | None = None  # set on the row's last event


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def _stop_position(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """Length of the prefix of text that no continuation can make part of a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return len(text) - hold


def choose_providers(manifest: dict, available: list[str], directory: Path) -> list:
    """ONNX Runtime execution providers for a bundle: the target's, where this onnxruntime has
    them (onnxruntime-gpu: TensorRT then CUDA for TensorRT targets), then the CPU. The TensorRT
    EP caches its engines in the bundle's engines/ort-trt directory and runs at the bundle's
    precision; the graph is the same standard-op graph `dsexport engine` builds from."""
    chosen: list = []
    for name in manifest["target"].get("execution_providers", []):
        if name not in available or name == "CPUExecutionProvider":
            continue
        if name == "TensorrtExecutionProvider":
            chosen.append((name, {"trt_engine_cache_enable": "True",
                                  "trt_engine_cache_path": str(directory / "engines" / "ort-trt"),
                                  "trt_fp16_enable": "True" if manifest.get("precision") == "fp16" else "False"}))
        else:
            chosen.append(name)
    return chosen + ["CPUExecutionProvider"]


def session_options(manifest: dict, threads: int | None) -> ort.SessionOptions:
    """ONNX Runtime options for a bundle's graphs: all optimizations, `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if manifest.get("quantization", {}).get("lowering") == "qdq":
        # TensorRT-bound int8/int4 weights (DequantizeLinear + MatMul): ONNX Runtime fuses them into
        # MatMulNBits, by default quantizing activations to int8; TensorRT computes weight-only, so do that
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        # On a CPU these graphs dequantize whole expert stacks every step (TensorRT reads them
        # in place): without the arena those multi-GB transients go back to the OS. V2-Lite int4,
        # one decode step: peak RSS 13.0 GB and flat, against 15.8 GB after one step and 18.1 GB
        # after two with it (67 s against 40 s per step).
        options.enable_cpu_mem_arena = False
    if threads:
        if threads < 1:
            raise UserError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


class OrtBackend:
    """An ONNX Runtime session over the bundle's decoder graph (.onnx with external data, or .ort).
    The cache is a list of OrtValues handed from step to step without a copy through numpy."""

    def __init__(self, session: ort.InferenceSession, num_layers: int, latent_dim: int):
        self.session = session
        self.num_layers, self.latent_dim = num_layers, latent_dim
        self._outputs = ["logits"] + [f"present_latent.{i}" for i in range(num_layers)]

    @classmethod
    def load(cls, directory: Path, manifest: dict, threads: int | None, weights: str) -> "OrtBackend":
        options = session_options(manifest, threads)
        graph = manifest["graphs"]["decoder"]
        model_path = directory / graph["file"]
        data_path = directory / graph["data"] if graph.get("data") else None
        for needed in (model_path, data_path):
            if needed is not None and not needed.is_file():
                raise BundleError(f"{needed}: missing from the bundle")
        buffer = None
        if weights == "memory" and data_path is not None:
            buffer = np.fromfile(data_path, dtype=np.uint8)
            options.add_external_initializers_from_files_in_memory([data_path.name], [buffer], [buffer.size])
        try:
            providers = choose_providers(manifest, ort.get_available_providers(), directory)
            session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as e:  # ORT raises its own types for unreadable graphs or external data
            raise BundleError(f"{model_path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        del buffer  # ONNX Runtime copied what it keeps
        if weights == "mlock" and data_path is not None:
            lock_mapped_file(data_path)
        num_layers = int(manifest["model"]["num_hidden_layers"])
        latent_dim = int(manifest["model"]["kv_lora_rank"]) + int(manifest["model"]["qk_rope_head_dim"])
        return cls(session, num_layers, latent_dim)

    def empty_cache(self, batch: int) -> list[ort.OrtValue]:
        zeros = np.zeros((batch, 0, self.latent_dim), np.float32)
        return [ort.OrtValue.ortvalue_from_numpy(zeros) for _ in range(self.num_layers)]

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        feed = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(input_ids, np.int64)),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(position_ids, np.int64)),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(attention_mask, np.int64)),
        }
        for i, value in enumerate(cache):
            feed[f"past_latent.{i}"] = value
        out = self.session.run_with_ort_values(self._outputs, feed)
        return out[0].numpy(), list(out[1:])


BACKENDS = ("onnxruntime", "tensorrt")


class Engine:
    drafter: "SpeculativeDecoder | None" = None  # set by load(draft="mtp")

    def __init__(self, directory: Path, manifest: dict, backend, tokenizer: BundleTokenizer | None, max_context: int):
        self.directory = directory
        self.manifest = manifest
        self.config = manifest["model"]
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.num_layers = int(self.config["num_hidden_layers"])
        self.latent_dim = int(self.config["kv_lora_rank"]) + int(self.config["qk_rope_head_dim"])
        # prompts longer than this run as several steps (bounds the prompt MoE lowering's activations)
        self.prefill_chunk = int(manifest["graphs"]["decoder"].get("max_prompt_tokens") or 0) or None
        self.eos_ids = set(self.config.get("eos_token_ids") or [])
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        self.pad_id = next(iter(sorted(self.eos_ids)), 0)

    @property
    def session(self) -> ort.InferenceSession:
        """The decoder graph's ONNX Runtime session (onnxruntime backend only)."""
        return self.backend.session

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, max_context: int | None = None,
             weights: str = "mmap", verify: bool = True, backend: str = "onnxruntime",
             draft: str | None = None, expert_cache_mb: float | None = None, prefetch: bool = True,
             cache_policy: str | None = None) -> "Engine":
        """Open a bundle.

        threads: ONNX Runtime intra-op threads (default: one per core).
        max_context: context limit in tokens (default and maximum: the model's).
        weights: "mmap" (default) lets ONNX Runtime map the weight file: least memory, pages load
          on first use and the OS may evict them; "mlock" maps and then locks the mapped weights in
          RAM (as llama.cpp --mlock; needs a memory-lock limit that large); "memory" reads the file
          into ordinary memory (as llama.cpp --no-mmap; briefly twice the weights while loading).
        verify: check every file against the manifest's sha256 before loading.
        backend: "onnxruntime" (the bundle's ONNX graphs) or "tensorrt" (the engines that
          `dsexport engine` built on this device; runtime/tensorrt_backend.py).
        draft: "mtp" drafts with the bundle's MTP graph and verifies two tokens per decoder run
          (runtime/speculative.py; single prompts, onnxruntime backend); None (default) does not:
          on CPUs it does not pay (docs/mtp.md).
        expert_cache_mb, prefetch, cache_policy: paged bundles (docs/paging.md): the budget of
          resident routed experts in MiB (default: the bundle's, else all of them), whether the
          next layer's predicted experts load in the background, and the eviction policy
          ("lfu" default, "lru").
        """
        bundle = read_bundle(path, verify=verify)
        directory = bundle.directory
        if weights not in WEIGHT_MODES:
            raise UserError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
        paged = bool(bundle.manifest["graphs"]["decoder"].get("paged"))
        if (expert_cache_mb is not None or cache_policy is not None) and not paged:
            raise UserError(f"{directory} is not a paged bundle; expert cache settings need one (build --paged)")
        if backend == "onnxruntime" and paged:
            from .paged_backend import PagedBackend

            runner = PagedBackend.load(directory, bundle.manifest, threads, weights, expert_cache_mb, prefetch,
                                       cache_policy)
        elif backend == "onnxruntime":
            runner = OrtBackend.load(directory, bundle.manifest, threads, weights)
        elif backend == "tensorrt":
            try:
                from .tensorrt_backend import TensorRTBackend

                runner = TensorRTBackend.load(bundle)
            except ImportError as e:  # no TensorRT / CUDA bindings on this machine
                raise EngineUnavailable(f"the tensorrt backend cannot run on this machine ({e}); "
                                        "it needs the device's TensorRT and `dsexport engine` first") from None
        else:
            raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        tokenizer = BundleTokenizer(directory) if (directory / "tokenizer.json").is_file() else None
        limit = int(bundle.model["max_position_embeddings"])
        if max_context is not None:
            if max_context < 2:
                raise UserError(f"max_context must be at least 2, got {max_context}")
            limit = min(limit, int(max_context))
        engine = cls(directory, bundle.manifest, runner, tokenizer, limit)
        if draft is not None:
            from .speculative import DRAFT_MODES, MTPGraph, SpeculativeDecoder

            if draft not in DRAFT_MODES:
                raise UserError(f"draft must be one of {', '.join(DRAFT_MODES)} or None, got {draft!r}")
            if backend != "onnxruntime":
                raise UserError(f"drafting runs on the onnxruntime backend, not {backend}")
            engine.drafter = SpeculativeDecoder(engine, MTPGraph.load(directory, bundle.manifest))
        return engine

    # ---- text ---------------------------------------------------------------------------
    def _require_tokenizer(self) -> BundleTokenizer:
        if self.tokenizer is None:
            raise BundleError(f"{self.directory}: the bundle has no tokenizer.json; pass token ids")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._require_tokenizer().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._require_tokenizer().decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._require_tokenizer().apply_chat_template(messages, add_generation_prompt)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            bos = self.config.get("bos_token_id")
            if bos is None:
                raise UserError("the prompt is empty and the model has no BOS token to start from")
            ids = [int(bos)]
        vocab = int(self.config["vocab_size"])
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    # ---- one forward step ---------------------------------------------------------------
    def empty_cache(self, batch: int) -> list:
        return self.backend.empty_cache(batch)

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list) -> tuple[np.ndarray, list]:
        """Run the decoder once: logits [B, T, V] and the grown cache."""
        return self.backend.forward(input_ids, position_ids, attention_mask, cache)

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list) -> tuple[np.ndarray, list]:
        """forward() over a prompt, in chunks of the bundle's prefill limit where it has one;
        logits of the last chunk only."""
        T, P = input_ids.shape[1], attention_mask.shape[1] - input_ids.shape[1]
        step = self.prefill_chunk or T
        for start in range(0, T, step):
            end = min(T, start + step)
            logits, cache = self.forward(input_ids[:, start:end], position_ids[:, start:end],
                                         attention_mask[:, :P + end], cache)
        return logits, cache

    # ---- generation ---------------------------------------------------------------------
    def _run(self, prompts: list[list[int]], gen: GenerationConfig, timings: dict) -> Iterator[TokenEvent]:
        if self.drafter is not None and len(prompts) == 1:  # drafting is per sequence; batches decode plainly
            yield from self.drafter.run(prompts[0], gen, timings)
            return
        B = len(prompts)
        longest = max(len(p) for p in prompts)
        if longest >= self.max_context:
            raise ContextLengthError(f"the prompt has {longest} tokens; the context holds {self.max_context} "
                                     "(raise --max-context up to the model's limit, or shorten the prompt)")
        # Left padding: real tokens end at the same column, so every row decodes in lockstep.
        ids = np.full((B, longest), self.pad_id, np.int64)
        mask = np.zeros((B, longest), np.int64)
        for b, p in enumerate(prompts):
            ids[b, longest - len(p):] = p
            mask[b, longest - len(p):] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        rngs = [np.random.default_rng(gen.sampling.seed) for _ in range(B)]
        seen = [list(p) for p in prompts]
        decoders = [StreamDecoder(self.tokenizer) if self.tokenizer else None for _ in range(B)]
        produced = [0] * B
        emitted = [0] * B  # characters of each row's text already yielded
        done = [False] * B

        start = time.perf_counter()
        logits, cache = self.prefill(ids, positions, mask, self.empty_cache(B))
        timings["prefill_s"] = time.perf_counter() - start
        timings["prefill_tokens"] = int(mask.sum())
        next_pos = positions[:, -1] + 1
        total = longest
        decode_start = None
        while True:
            step = np.full(B, self.pad_id, np.int64)
            for b in range(B):
                if done[b]:
                    continue
                history = np.asarray(seen[b]) if gen.sampling.repetition_penalty != 1.0 else None
                token = sample_token(logits[b, -1], gen.sampling, rngs[b], history)
                step[b] = token
                seen[b].append(token)
                produced[b] += 1
                text = ""
                if decoders[b]:
                    decoders[b].push(token)
                    text = decoders[b].text
                reason = None
                cut = _stop_position(text, gen.stop)
                if token in self.eos_ids and not gen.ignore_eos:
                    reason = "eos"
                elif cut is not None:
                    reason = "stop"
                elif produced[b] >= gen.max_new_tokens:
                    reason = "length"
                elif total + 1 >= self.max_context:  # the sequence now fills the context
                    reason = "context"
                done[b] = reason is not None
                if done[b] and reason != "stop" and decoders[b]:
                    text = decoders[b].final_text  # flush a held-back partial character
                # Emit text only once it cannot turn out to be the start of a stop string.
                end = cut if cut is not None else len(text) if done[b] else _safe_end(text, gen.stop)
                delta = text[emitted[b]:end] if end > emitted[b] else ""
                emitted[b] = max(emitted[b], end)
                yield TokenEvent(b, token, delta, reason)
            if decode_start is None:
                decode_start = time.perf_counter()
                timings["ttft_s"] = decode_start - start
            if all(done):
                break
            mask = np.concatenate([mask, (~np.asarray(done))[:, None].astype(np.int64)], axis=1)
            logits, cache = self.forward(step[:, None], next_pos[:, None], mask, cache)
            next_pos = next_pos + 1
            total += 1
        timings["decode_s"] = time.perf_counter() - decode_start
        timings["decode_steps"] = max(produced) - 1

    def _config(self, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                repetition_penalty: float, seed: int | None, stop: str | Sequence[str] | None,
                ignore_eos: bool) -> GenerationConfig:
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return GenerationConfig(max_new_tokens, SamplingParams(temperature, top_k, top_p, repetition_penalty, seed),
                                stops, ignore_eos)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, ignore_eos: bool = False) -> Iterator[TokenEvent]:
        """Yield one TokenEvent per generated token of a single prompt."""
        gen = self._config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos)
        yield from self._run([self._prompt_ids(prompt)], gen, {})

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Generation:
        return self.generate_batch([prompt], **kwargs)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 128,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       ignore_eos: bool = False) -> list[Generation]:
        if not prompts:
            raise UserError("no prompts given")
        gen = self._config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos)
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        reasons: list[str] = [""] * len(prompts)
        timings: dict = {}
        if hasattr(self.backend, "paging_stats"):
            self.backend.reset_stats()
        for event in self._run(prompt_ids, gen, timings):
            outputs[event.row].append(event.token_id)
            if event.finish_reason:
                reasons[event.row] = event.finish_reason
        results = []
        for ids, out, reason in zip(prompt_ids, outputs, reasons):
            text = self.decode(out) if self.tokenizer else ""
            if reason == "stop":
                text = text[: _stop_position(text, gen.stop)]
            results.append(Generation(
                prompt_ids=ids, output_ids=out, text=text, finish_reason=reason,
                ttft_s=timings.get("ttft_s", 0.0),
                prefill_tokens_per_s=timings["prefill_tokens"] / max(timings["prefill_s"], 1e-9),
                decode_tokens_per_s=timings["decode_steps"] * len(prompts) / max(timings["decode_s"], 1e-9)
                if timings["decode_steps"] else 0.0,
                draft_stats=timings.get("draft_stats"),
                paging_stats=self.backend.paging_stats() if hasattr(self.backend, "paging_stats") else None,
            ))
        return results
