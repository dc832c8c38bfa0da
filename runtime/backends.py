"""Runtime backends: what runs a bundle's decoder, chosen by name from a registry.

    onnxruntime         the decoder graph in ONNX Runtime (.onnx with external data, or .ort)   runtime/ort_backend.py
    onnxruntime-paged   segment graphs in ONNX Runtime, routed experts from the store          runtime/paged_backend.py
    native              a CPU bundle's whole step in C (the kernel library), when it can run  runtime/native_backend.py
    tensorrt            the engines `dsexport engine` built on this device                     runtime/tensorrt_backend.py

Every backend has the same small interface, which the one decode loop (runtime/decode.py) drives:

    backend.empty_cache(batch) -> cache              one opaque value per layer
    backend.forward(ids, positions, mask, cache) -> (logits [B, T, V] float32 numpy, cache)
    backend.close()

and, where it can, `forward_hidden` (also returns the final-normed hidden states the MTP graph
reads), `truncate(cache, length)` (drops trailing positions: a rejected draft) and
`stats()` / `reset_stats()` (expert paging). The decoder's feed is built here, from the
contract's names (core/contract.py), for every backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Protocol

import numpy as np

from dsexport.core.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, past_name
from dsexport.core.errors import UserError

from .bundle import Bundle

USER_BACKENDS = ("onnxruntime", "tensorrt")  # what Engine.load(backend=...) and --backend take
DECODER_ENV = "DSEXPORT_DECODER"  # CPU bundles: "native" (default where it can run) or "onnxruntime" (the graphs)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    threads: int | None = None
    weights: str = "mmap"
    expert_cache_mb: float | None = None  # paged bundles (docs/paging.md)
    prefetch: bool = True
    cache_policy: str | None = None
    decoder: str | None = None  # "onnxruntime": the graphs even where the native decoder could run


class Backend(Protocol):
    name: str
    num_layers: int
    latent_dim: int

    def empty_cache(self, batch: int) -> list: ...

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list) -> tuple[np.ndarray, list]: ...

    def close(self) -> None: ...


_REGISTRY: dict[str, tuple[str, str]] = {  # name -> (module, class); imported when chosen
    "onnxruntime": ("dsexport.runtime.ort_backend", "OrtBackend"),
    "onnxruntime-paged": ("dsexport.runtime.paged_backend", "PagedBackend"),
    "native": ("dsexport.runtime.native_backend", "NativeBackend"),
    "tensorrt": ("dsexport.runtime.tensorrt_backend", "TensorRTBackend"),
}


def register(name: str, module: str, cls: str) -> None:
    _REGISTRY[name] = (module, cls)


def backend_name(bundle: Bundle, requested: str) -> str:
    """The registry entry for a bundle and the user's --backend."""
    if requested not in USER_BACKENDS:
        raise UserError(f"backend must be one of {', '.join(USER_BACKENDS)}, got {requested!r}")
    if requested == "onnxruntime" and bundle.manifest.is_paged:
        return "onnxruntime-paged"
    return requested


def native_unavailable(bundle: Bundle, options: LoadOptions) -> str | None:
    """Why a CPU bundle runs on ONNX Runtime (the segments, or the fused graph) rather than the
    native decoder, or None."""
    from .memory import available_bytes
    from .native import load as load_native, status as native_status
    from .paging import make_policy

    manifest = bundle.manifest
    if options.cache_policy is not None:
        make_policy(options.cache_policy)  # a bad name is the user's error, whichever decoder runs
    if os.environ.get(DECODER_ENV, "native") == "onnxruntime":
        return f"{DECODER_ENV}=onnxruntime"
    if options.decoder == "onnxruntime":
        return "ONNX Runtime was asked for (decoder='onnxruntime')"
    if manifest.native is None:
        return "the bundle has no native section (built before it existed, or a layout the decoder does not read)"
    if load_native() is None:
        return f"the kernel library is not available: {native_status().get('reason')}"
    cfg, paging = manifest.model, manifest.paging
    if paging is not None:
        mb = options.expert_cache_mb if options.expert_cache_mb is not None else paging.default_cache_mb
        if mb is not None and mb * 2**20 < paging.routed_expert_bytes:
            return f"an expert cache of {mb:g} MB does not hold every expert (the native decoder does not page)"
    experts = [cfg.num_experts(i) for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    if experts and cfg.num_experts_per_tok > min(experts):
        return "a layer holds fewer experts than the router picks"
    # the native decoder reads every weight into memory; ONNX Runtime can map a fused graph's
    # weights from the file and let the kernel page them, so a model larger than memory still runs
    need, free = native_resident_bytes(manifest), available_bytes()
    if free is not None and need > NATIVE_MEMORY_FRACTION * free:
        return (f"its weights ({need / 1e9:.2f} GB) do not fit the memory available ({free / 1e9:.2f} GB); "
                "ONNX Runtime maps them instead")
    return None


NATIVE_MEMORY_FRACTION = 0.9  # of MemAvailable: room for the cache, activations and the rest of the process


def native_resident_bytes(manifest) -> int:
    """Bytes the native decoder reads into memory: the native section's tensors, and a paged
    bundle's routed experts (an fp32 weight shared with the router counts once)."""
    total = sum({(ref.file, ref.offset): ref.bytes for ref in manifest.native.refs()}.values())
    if manifest.paging is not None:
        total += manifest.paging.routed_expert_bytes
    return total


def load_backend(bundle: Bundle, requested: str, options: LoadOptions) -> Backend:
    name = backend_name(bundle, requested)
    why_not = None
    onnxruntime = name
    if name in ("onnxruntime", "onnxruntime-paged"):  # the native decoder runs a CPU bundle's step where it can
        why_not = native_unavailable(bundle, options)
        name = "native" if why_not is None else name
    from .native import LibraryMismatch

    module, cls = _REGISTRY[name]
    loader: Callable = getattr(importlib.import_module(module), cls).load
    try:
        backend = loader(bundle, options)
    except LibraryMismatch as exc:  # a stale build of the library: ONNX Runtime runs, and says why
        why_not = str(exc)
        module, cls = _REGISTRY[onnxruntime]
        backend = getattr(importlib.import_module(module), cls).load(bundle, options)
    if why_not is not None:
        backend.native_unavailable = why_not  # run --stats says why the segments ran
    return backend


def token_feed(input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
               dtype=np.int64) -> dict[str, np.ndarray]:
    """The decoder's token inputs as contiguous arrays (int64, or the engine's int32)."""
    return {INPUT_IDS: np.ascontiguousarray(input_ids, dtype), POSITION_IDS: np.ascontiguousarray(position_ids, dtype),
            ATTENTION_MASK: np.ascontiguousarray(attention_mask, dtype)}


def cache_feed(cache: list) -> dict:
    return {past_name(i): value for i, value in enumerate(cache)}
