"""The paged backend: the bundle's segment graphs in ONNX Runtime, routed experts from the store.

One forward step runs segment 0, then for each MoE layer i: the routed experts of layer i
(numpy, from the expert cache) added to the segment's residual output, fed as `hidden` to the
next segment; the last segment returns the logits (exporter/paged.py, docs/paging.md).

Prefetch (Eliseev & Mazur 2023, "Fast Inference of Mixture-of-Experts Language Models with
Offloading"): as soon as segment i has produced layer i's expert input h, the next MoE layer's
router is applied to h (router and correction bias are resident: E x D floats per layer) and
its top-k experts start loading on a background thread, while layer i's experts and the next
segment's attention run.

Results never depend on the cache: experts are applied in ascending slot order whatever is
resident, and a read returns the same bytes as a hit, so every budget, policy and prefetch
setting gives the same tokens and the same logits.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dsexport.errors import BundleError, UserError

from .engine import session_options
from .paging import DEFAULT_POLICY, ExpertCache, ExpertStore, PagingStats, quantize_activations


_BLAS_THREAD_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_",
                        "scipy_openblas_set_num_threads", "MKL_Set_Num_Threads")


def single_threaded_blas() -> bool:
    """Set numpy's BLAS to one thread (as threadpoolctl does, without the dependency). The experts'
    matmuls are matrix-vector products at decode: OpenBLAS's own threads cost ~8 ms per call to
    wake on a busy 2-core machine (measured), against 0.06 ms for a 4 MB expert matrix on one
    thread, so the backend runs experts on its own threads instead. Process-wide."""
    if not os.path.exists("/proc/self/maps"):
        return False
    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "blas" in line.lower() or "mkl_rt" in line.lower()}
    done = False
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_THREAD_SETTERS:
            if hasattr(lib, name):
                getattr(lib, name)(1)
                done = True
    return done


class PagedBackend:
    def __init__(self, sessions: list, segments: list[dict], cache: ExpertCache, cfg: dict, num_layers: int,
                 latent_dim: int, threads: int | None = None):
        self.sessions, self.segments, self.cache = sessions, segments, cache
        self.stats = cache.stats
        self.num_layers, self.latent_dim = num_layers, latent_dim
        self.k = int(cfg["num_experts_per_tok"])
        self.scoring = cfg.get("scoring_func", "softmax")
        self._inputs = [[i.name for i in s.get_inputs()] for s in sessions]
        self._outputs = [[o.name for o in s.get_outputs()] for s in sessions]
        moe = [s["moe_layer"] for s in segments if s["moe_layer"] is not None]
        self.next_moe = dict(zip(moe, moe[1:]))  # layer -> the MoE layer after it
        self.routers = {i: cache.store.router(i) for i in moe[1:]}  # resident: the prefetcher's predictors
        single_threaded_blas()
        self._workers = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1,
                                           thread_name_prefix="dsexport-experts")

    @classmethod
    def load(cls, directory: Path, manifest: dict, threads: int | None, weights: str, expert_cache_mb: float | None,
             prefetch: bool, cache_policy: str | None) -> "PagedBackend":
        from .engine import choose_providers
        from .memory import lock_mapped_file

        paging = manifest.get("paging")
        if not paging:
            raise BundleError(f"{directory}: the manifest marks the decoder paged but has no paging section")
        options = session_options(manifest, threads)
        # ONNX Runtime's threads would spin after each segment, taking the cores the experts'
        # numpy matmuls (and the prefetch reads) run on next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        store = ExpertStore(directory / paging["file"], paging)
        largest = max(store.expert_bytes(i) for i in store.layers)
        k = int(manifest["model"]["num_experts_per_tok"])
        # what every expert takes in the cache (the store's bytes unless it holds them dequantized)
        total = sum(store.expert_bytes(i) * int(e["experts"]) for i, e in store.layers.items())
        mb = expert_cache_mb if expert_cache_mb is not None else paging.get("default_cache_mb")
        budget = total if mb is None else int(float(mb) * 2**20)
        if budget < k * largest:
            store.close()
            raise UserError(f"expert cache of {float(mb):g} MB is too small: one token needs {k} experts of a "
                            f"layer at once ({k * largest / 2**20:.1f} MB); the routed experts total "
                            f"{total / 2**20:.0f} MB")
        segments = manifest["graphs"]["decoder"]["segments"]
        providers = choose_providers(manifest, ort.get_available_providers(), directory)
        sessions = []
        for seg in segments:
            model_path, data_path = directory / seg["file"], directory / seg["data"]
            for needed in (model_path, data_path):
                if not needed.is_file():
                    raise BundleError(f"{needed}: missing from the bundle")
            seg_options = options
            buffer = None
            if weights == "memory":
                seg_options = ort.SessionOptions()
                seg_options.graph_optimization_level = options.graph_optimization_level
                seg_options.intra_op_num_threads = options.intra_op_num_threads
                seg_options.inter_op_num_threads = options.inter_op_num_threads
                seg_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                buffer = np.fromfile(data_path, dtype=np.uint8)
                seg_options.add_external_initializers_from_files_in_memory([data_path.name], [buffer], [buffer.size])
            try:
                sessions.append(ort.InferenceSession(str(model_path), seg_options, providers=providers))
            except Exception as e:
                raise BundleError(f"{model_path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
            del buffer
            if weights == "mlock":
                lock_mapped_file(data_path)
        cfg = manifest["model"]
        layers = sorted(store.layers)
        stats = PagingStats(layers, {i: store.layers[i]["experts"] for i in layers})
        cache = ExpertCache(store, budget, cache_policy or DEFAULT_POLICY, prefetch, stats)
        latent = int(cfg["kv_lora_rank"]) + int(cfg["qk_rope_head_dim"])
        return cls(sessions, segments, cache, cfg, int(cfg["num_hidden_layers"]), latent, threads)

    # ---- the engine's backend interface ---------------------------------------------------
    def empty_cache(self, batch: int) -> list[ort.OrtValue]:
        zeros = np.zeros((batch, 0, self.latent_dim), np.float32)
        return [ort.OrtValue.ortvalue_from_numpy(zeros) for _ in range(self.num_layers)]

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        B, T = input_ids.shape
        self.cache.phase = "prefill" if T > 1 else "decode"
        self.cache.step += 1
        phase = self.stats.phase[self.cache.phase]
        phase["tokens"] += B * T
        phase["steps"] += 1
        common = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(input_ids, np.int64)),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(position_ids, np.int64)),
            "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(attention_mask, np.int64)),
        }
        present = list(cache)
        hidden = None
        for session, seg, inputs, outputs in zip(self.sessions, self.segments, self._inputs, self._outputs):
            feed = {}
            for name in inputs:
                if name == "hidden":
                    feed[name] = ort.OrtValue.ortvalue_from_numpy(hidden)
                elif name.startswith("past_latent."):
                    feed[name] = cache[int(name.split(".")[1])]
                else:
                    feed[name] = common[name]
            out = dict(zip(outputs, session.run_with_ort_values(outputs, feed)))
            for i in seg["layers"]:
                present[i] = out[f"present_latent.{i}"]
            i = seg["moe_layer"]
            if i is None:
                return out["logits"].numpy(), present
            h = out[f"moe_input.{i}"].numpy()  # [N, D]
            ids = out[f"router_ids.{i}"].numpy()  # [N, k]
            weights = out[f"router_weights.{i}"].numpy()  # [N, k]
            residual = out[f"residual.{i}"].numpy()  # [B, T, D]
            hidden = residual + self.routed(i, h, ids, weights).reshape(residual.shape)
        raise BundleError("the paged decoder has no final segment")

    # ---- routed experts -----------------------------------------------------------------
    def routed(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """sum_j weights[:, j] * expert_{ids[:, j]}(h) [N, D], experts applied in ascending slot order."""
        slots = np.unique(ids)
        self.cache.begin_layer(layer, slots.tolist())
        nxt = self.next_moe.get(layer)
        if nxt is not None and self.cache.prefetch_enabled:
            self.cache.prefetch(nxt, self.predict(nxt, h))
        out = np.zeros_like(h)
        try:
            # the main thread reads (or finds) each expert in turn; workers compute them meanwhile
            parts = []
            for slot in slots:
                rows, col = np.nonzero(ids == slot)  # tokens routed to it, and where in their top-k
                expert = self.cache.get(layer, int(slot))
                parts.append((rows, self._workers.submit(_expert_output, expert, h[rows], weights[rows, col],
                                                         self.cache.store.activation_block)))
            for rows, part in parts:  # summed in slot order, whatever finished first
                out[rows] += part.result()
        finally:
            self.cache.end_layer()
        return out

    def predict(self, layer: int, h: np.ndarray) -> list[int]:
        """The experts layer's router would pick for h: its top-k of score + bias per token (group
        limits ignored: a prediction only), the most-voted first, at most 2k for a prompt."""
        router, bias = self.routers[layer]
        logits = h @ router.T  # [N, E]
        if self.scoring == "sigmoid":
            choice = 1.0 / (1.0 + np.exp(-logits))
        else:
            choice = np.exp(logits - logits.max(-1, keepdims=True))
            choice /= choice.sum(-1, keepdims=True)
        if bias is not None:
            choice = choice + bias
        k = min(self.k, choice.shape[1])
        top = np.argpartition(-choice, k - 1, axis=1)[:, :k]  # [N, k]
        slots, votes = np.unique(top, return_counts=True)
        return slots[np.argsort(-votes, kind="stable")][:2 * self.k].tolist()

    def paging_stats(self) -> dict:
        self.cache.drain()
        return self.stats.to_json(self.cache)

    def reset_stats(self) -> None:
        self.cache.drain()
        self.stats.reset()

    def close(self) -> None:
        self._workers.shutdown()
        self.cache.close()


def _expert_output(expert, x: np.ndarray, weight: np.ndarray, activation_block: int | None = None) -> np.ndarray:
    """weight * w_down(SiLU(gate(x)) * up(x)) for the n tokens x [n, D] routed to one expert: [n, D].
    activation_block: quantize x and the SwiGLU output to int8 per block, as the fused QMoE does."""
    w_gate_up, w_down = expert.weights()  # [2I, D], [D, I]; a quantized expert: dequantized into scratch
    if activation_block:
        x = quantize_activations(x, activation_block)
    gate_up = x @ w_gate_up.T  # [n, 2I]
    inter = gate_up.shape[1] // 2
    gate = gate_up[:, :inter]
    act = gate / (1.0 + np.exp(-gate)) * gate_up[:, inter:]  # [n, I]
    if activation_block:
        act = quantize_activations(act, activation_block)
    return (act @ w_down.T) * weight[:, None]
