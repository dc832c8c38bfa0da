"""Generate text from an exported dsexport bundle. No torch.

    engine = Engine.load("dist/mymodel", threads=2)
    print(engine.generate("Once upon a time", max_new_tokens=32).text)
    for event in engine.stream("Once upon a time"):
        print(event.text, end="", flush=True)

The engine opens the bundle (runtime/bundle.py: checked manifest, listed and verified files),
picks its backend from the registry (runtime/backends.py), and generates through the one decode
loop (runtime/decode.py), drafting with the MTP graph when asked (runtime/speculative.py).

Threads: one generation runs at a time. A call from another thread waits for the running one
to finish; a call from the thread that holds an unfinished stream raises a clear error (it would
otherwise wait for itself). Every backend, paged included, is therefore used by one generation
at a time, and concurrent callers get the results they would get one at a time.
"""

from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dsexport.core.config import ModelConfig
from dsexport.core.errors import BundleError, ContextLengthError, EngineUnavailable, UserError
from dsexport.core.manifest import Manifest

from .backends import LoadOptions, load_backend
from .bundle import Bundle, read_bundle
from .decode import GenerationConfig, PlainStepper, RowState, TokenEvent, decode_loop, prefill, stop_position
from .sampling import SamplingParams
from .sessions import WEIGHT_MODES  # noqa: F401  (part of the API)
from .tokenizer import TOKENIZER_FILES, BundleTokenizer

DRAFT_MODES = ("mtp", "auto")
MAX_NEW_TOKENS = 1 << 20
__all__ = ["Engine", "Generation", "GenerationConfig", "TokenEvent", "SamplingParams"]


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]  # generated ids only
    text: str
    finish_reason: str  # "eos" | "stop" | "length" (max_new_tokens) | "context" (max context reached)
    ttft_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    draft_stats: object | None = None  # runtime/speculative.DraftStats, when drafting ran
    paging_stats: dict | None = None  # paged bundles: expert cache hits, bytes read, stalls (runtime/paging.py)


def load_drafter(backend, bundle: Bundle):
    """The MTP block: in the native decoder where it runs the bundle and its section locates the
    block, else the bundle's MTP graph in ONNX Runtime (docs/mtp.md)."""
    native = backend.drafter() if hasattr(backend, "drafter") else None
    if native is not None:
        return native
    from .speculative import MTPGraph

    return MTPGraph.load(bundle)


class Engine:
    def __init__(self, bundle: Bundle, backend, tokenizer: BundleTokenizer | None, max_context: int):
        self.bundle = bundle
        self.directory = bundle.directory
        self.manifest: Manifest = bundle.manifest
        self.config: ModelConfig = bundle.manifest.model
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.num_layers, self.latent_dim = self.config.num_hidden_layers, self.config.latent_dim
        # prompts longer than this run as several steps (bounds the prompt MoE lowering's activations)
        self.prefill_chunk = bundle.manifest.graphs.decoder.max_prompt_tokens
        self.eos_ids = set(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        self.pad_id = next(iter(sorted(self.eos_ids)), 0)
        self.drafter = None  # the MTP block (native or graph), with load(draft="mtp"), or "auto" where it pays
        self.draft_decision = None  # load(draft="auto"): runtime/draft_policy.DraftDecision
        self.last_draft_stats = None
        self.auto_drafts = [0, 0]  # draft="auto": drafted and accepted over this engine's generations
        self._lock = threading.Lock()
        self._owner: int | None = None

    @property
    def session(self):
        """The decoder graph's ONNX Runtime session (onnxruntime backend only)."""
        return self.backend.session

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, max_context: int | None = None,
             weights: str = "mmap", verify: bool = True, backend: str = "onnxruntime",
             draft: str | None = None, expert_cache_mb: float | None = None, prefetch: bool = True,
             cache_policy: str | None = None, decoder: str | None = None) -> "Engine":
        """Open a bundle.

        threads: ONNX Runtime intra-op threads (default: one per core).
        max_context: context limit in tokens (default and maximum: the model's).
        weights: "mmap" (default), "mlock" or "memory" (runtime/sessions.py).
        verify: check every file against the manifest's sha256 before loading (confinement and
          sizes are always checked).
        backend: "onnxruntime" (the bundle's ONNX graphs) or "tensorrt" (the engines that
          `dsexport engine` built on this device).
        draft: "mtp" drafts with the bundle's MTP block (in the native decoder where it runs the
          bundle, else the MTP graph) and verifies two tokens per decoder run (single prompts,
          onnxruntime backend); "auto" times a few plain and drafted decode steps here, drafts
          when that predicts a speedup, and stops when the acceptance generations get makes it a
          loss (runtime/draft_policy.py; engine.draft_decision says what it found); None
          (default) does not draft.
        expert_cache_mb, prefetch, cache_policy: paged bundles (docs/paging.md).
        decoder: on CPU bundles, None (default) or "native" runs the native decoder where it can
          (docs/native.md; ONNX Runtime otherwise, backend.native_unavailable says why),
          "onnxruntime" the ONNX graphs.
        """
        bundle = read_bundle(path, verify=verify)
        if (expert_cache_mb is not None or cache_policy is not None) and not bundle.manifest.is_paged:
            raise UserError(f"{bundle.directory} is not a paged bundle; expert cache settings need one (build --paged)")
        if draft is not None and draft not in DRAFT_MODES:
            raise UserError(f"draft must be one of {', '.join(DRAFT_MODES)} or None, got {draft!r}")
        if draft == "mtp" and backend != "onnxruntime":
            raise UserError(f"drafting runs on the onnxruntime backend, not {backend}")
        limit = _context_limit(bundle.manifest.model, max_context)
        tokenizer = _tokenizer(bundle)
        if decoder not in (None, "native", "onnxruntime"):
            raise UserError(f"decoder must be 'native', 'onnxruntime' or None, got {decoder!r}")
        options = LoadOptions(threads, weights, expert_cache_mb, prefetch, cache_policy, decoder)
        try:
            runner = load_backend(bundle, backend, options)
        except ImportError as e:  # no TensorRT / CUDA bindings on this machine
            raise EngineUnavailable(f"the {backend} backend cannot run on this machine ({e})") from None
        engine = cls(bundle, runner, tokenizer, limit)
        if draft == "mtp":
            engine.drafter = load_drafter(engine.backend, bundle)
        elif draft == "auto":
            from .draft_policy import DraftDecision, decide

            can = backend == "onnxruntime" and bundle.manifest.graphs.mtp is not None and not bundle.manifest.is_paged
            drafter = load_drafter(engine.backend, bundle) if can else None
            engine.draft_decision = decide(engine, drafter) if can else DraftDecision(
                False, "the bundle has no MTP graph" if bundle.manifest.graphs.mtp is None
                else "drafting runs on the fused onnxruntime backend only")
            engine.drafter = drafter if engine.draft_decision.draft else None
        return engine

    def close(self) -> None:
        if hasattr(self.backend, "close"):
            self.backend.close()

    # ---- text ---------------------------------------------------------------------------
    def _require_tokenizer(self) -> BundleTokenizer:
        if self.tokenizer is None:
            raise BundleError(f"{self.directory}: the bundle has no tokenizer.json; pass token ids")
        return self.tokenizer

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Text as tokens; special-token strings in it stay text unless parse_special."""
        return self._require_tokenizer().encode(text, parse_special)

    def decode(self, ids: Sequence[int]) -> str:
        return self._require_tokenizer().decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._require_tokenizer().apply_chat_template(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """A conversation as prompt tokens (the template's control tokens, content as text)."""
        return self._require_tokenizer().encode_chat(messages, add_generation_prompt)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's token ids, checked against the vocabulary."""
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            try:
                ids = [int(i) for i in prompt]
            except (TypeError, ValueError):
                raise UserError("a prompt is text or a sequence of token ids") from None
        if not ids:
            if self.config.bos_token_id is None:
                raise UserError("the prompt is empty and the model has no BOS token to start from")
            ids = [self.config.bos_token_id]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    # ---- one forward step ---------------------------------------------------------------
    def empty_cache(self, batch: int) -> list:
        return self.backend.empty_cache(batch)

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list) -> tuple[np.ndarray, list]:
        """Run the decoder once: logits [B, T, V] and the grown cache."""
        with self._exclusive():
            return self.backend.forward(input_ids, position_ids, attention_mask, cache)

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list) -> tuple[np.ndarray, list]:
        """forward() over a prompt, in chunks of the bundle's prefill limit where it has one."""
        with self._exclusive():
            return prefill(self.backend, input_ids, position_ids, attention_mask, cache, self.prefill_chunk)

    # ---- generation ---------------------------------------------------------------------
    @contextmanager
    def _exclusive(self):
        me = threading.get_ident()
        if self._owner == me:
            raise UserError("this engine is already generating in this thread (an unfinished stream); finish or "
                            "close it first")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _rows(self, prompts: list[list[int]], gen: GenerationConfig) -> list[RowState]:
        longest = max(len(p) for p in prompts)
        if longest >= self.max_context:
            raise ContextLengthError(f"the prompt has {longest} tokens; the context holds {self.max_context} "
                                     "(raise --max-context up to the model's limit, or shorten the prompt)")
        return [RowState(b, p, gen, self.tokenizer, self.eos_ids, self.max_context, longest)
                for b, p in enumerate(prompts)]

    def _run(self, prompts: list[list[int]], gen: GenerationConfig, timings: dict) -> Iterator[TokenEvent]:
        with self._exclusive():
            rows = self._rows(prompts, gen)
            if self.drafter is not None and len(rows) == 1:  # drafting is per sequence; batches decode plainly
                from .speculative import DraftStats, SpeculativeStepper

                stats = self.last_draft_stats = timings["draft_stats"] = DraftStats()
                stepper = SpeculativeStepper(self.backend, self.drafter, rows[0], stats, self._keep_drafting())
            else:
                stepper = PlainStepper(self.backend, rows, self.pad_id, self.prefill_chunk)
            yield from decode_loop(stepper, rows, timings)
            if "draft_stats" in timings:
                stats = timings["draft_stats"]
                stats.decode_s, stats.decode_tokens = timings["decode_s"], timings["decode_steps"]
                if self.draft_decision is not None and self.draft_decision.draft:  # auto: does it still pay?
                    from .draft_policy import recheck

                    self.auto_drafts[0] += stats.drafted
                    self.auto_drafts[1] += stats.accepted
                    self.draft_decision = recheck(self.draft_decision, *self.auto_drafts)
                    if not self.draft_decision.draft:
                        self.drafter = None

    def _keep_drafting(self):
        """draft="auto": the re-check asked after each verify step, this generation's drafts added to
        the engine's earlier ones (runtime/draft_policy.recheck); None: drafting as asked."""
        decision = self.draft_decision
        if decision is None or not decision.draft:
            return None
        from .draft_policy import recheck

        done = list(self.auto_drafts)
        return lambda stats: recheck(decision, done[0] + stats.drafted, done[1] + stats.accepted).draft

    def _config(self, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                repetition_penalty: float, seed: int | None, stop: str | Sequence[str] | None,
                ignore_eos: bool) -> GenerationConfig:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise UserError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) for s in stops):
            raise UserError("stop strings must be strings")
        return GenerationConfig(max_new_tokens, SamplingParams(temperature, top_k, top_p, repetition_penalty, seed),
                                stops, ignore_eos)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, ignore_eos: bool = False) -> Iterator[TokenEvent]:
        """Yield one TokenEvent per generated token of a single prompt."""
        gen = self._config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos)
        ids = self.prompt_ids(prompt)
        if hasattr(self.backend, "reset_stats"):
            self.backend.reset_stats()
        yield from self._run([ids], gen, {})

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Generation:
        return self.generate_batch([prompt], **kwargs)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 128,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       ignore_eos: bool = False) -> list[Generation]:
        if not prompts or isinstance(prompts, str):
            raise UserError("no prompts given (a list of prompts)")
        gen = self._config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos)
        prompt_ids = [self.prompt_ids(p) for p in prompts]
        outputs: list[list[int]] = [[] for _ in prompts]
        reasons: list[str] = [""] * len(prompts)
        timings: dict = {}
        if hasattr(self.backend, "reset_stats"):
            self.backend.reset_stats()
        for event in self._run(prompt_ids, gen, timings):
            outputs[event.row].append(event.token_id)
            if event.finish_reason:
                reasons[event.row] = event.finish_reason
        stats = self.backend.stats() if hasattr(self.backend, "stats") else None
        return [self._result(ids, out, reason, gen, timings, len(prompts), stats)
                for ids, out, reason in zip(prompt_ids, outputs, reasons)]

    def _result(self, ids, out, reason, gen, timings, batch, stats) -> Generation:
        text = self.decode(out) if self.tokenizer else ""
        if reason == "stop":
            text = text[: stop_position(text, gen.stop)]
        steps = timings["decode_steps"]
        return Generation(
            prompt_ids=ids, output_ids=out, text=text, finish_reason=reason, ttft_s=timings.get("ttft_s", 0.0),
            prefill_tokens_per_s=timings["prefill_tokens"] / max(timings["prefill_s"], 1e-9),
            decode_tokens_per_s=steps * batch / max(timings["decode_s"], 1e-9) if steps else 0.0,
            draft_stats=timings.get("draft_stats"), paging_stats=stats)


def _context_limit(cfg: ModelConfig, max_context: int | None) -> int:
    limit = cfg.max_position_embeddings
    if max_context is not None:
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
            raise UserError(f"max_context must be an integer of at least 2, got {max_context!r}")
        limit = min(limit, max_context)
    return limit


def _tokenizer(bundle: Bundle) -> BundleTokenizer | None:
    """The tokenizer from the files the manifest lists, and only those."""
    files = {name: bundle.path(name, "tokenizer.files") for name in bundle.manifest.tokenizer_files
             if name in TOKENIZER_FILES}
    if "tokenizer.json" not in files:
        return None
    return BundleTokenizer(files, str(bundle.directory))
