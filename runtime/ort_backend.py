"""The onnxruntime backend: one session over the bundle's decoder graph (.onnx with external data,
or .ort on phones). The cache is a list of OrtValues handed from step to step without a copy
through numpy; with the graph's `hidden_states` output (bundles with an MTP graph) it also
serves the drafter (runtime/speculative.py).
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from dsexport.core.contract import HIDDEN_STATES, LOGITS, present_name
from dsexport.core.errors import BundleError

from .backends import LoadOptions, cache_feed, token_feed
from .bundle import Bundle
from .sessions import choose_providers, open_session, session_options


def ort_value(array: np.ndarray) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(array)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, num_layers: int, latent_dim: int, hidden_states: bool):
        self.session = session
        self.num_layers, self.latent_dim = num_layers, latent_dim
        self.has_hidden_states = hidden_states
        self._outputs = [LOGITS] + [present_name(i) for i in range(num_layers)]
        self.profile: dict | None = None  # seconds per part of a step, when a benchmark asks (benchmarks/decode.py)

    @classmethod
    def load(cls, bundle: Bundle, options: LoadOptions) -> "OrtBackend":
        manifest, graph = bundle.manifest, bundle.manifest.graphs.decoder
        model_path = bundle.path(graph.file, "graphs.decoder.file")
        data_path = bundle.path(graph.data, "graphs.decoder.data") if graph.data else None
        providers = choose_providers(manifest, ort.get_available_providers(), bundle.directory)
        session = open_session(model_path, session_options(manifest, options.threads), providers, options.weights,
                               data_path)
        cfg = manifest.model
        return cls(session, cfg.num_hidden_layers, cfg.latent_dim, graph.contract.has_hidden_states)

    def empty_cache(self, batch: int) -> list[ort.OrtValue]:
        zeros = np.zeros((batch, 0, self.latent_dim), np.float32)
        return [ort_value(zeros) for _ in range(self.num_layers)]

    def _feed(self, input_ids, position_ids, attention_mask, cache) -> dict:
        feed = {name: ort_value(a) for name, a in token_feed(input_ids, position_ids, attention_mask).items()}
        feed.update(cache_feed(cache))
        return feed

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                cache: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        feed = self._feed(input_ids, position_ids, attention_mask, cache)
        t0 = time.perf_counter()
        out = self.session.run_with_ort_values(self._outputs, feed)
        if self.profile is not None:
            self.profile["onnxruntime"] = self.profile.get("onnxruntime", 0.0) + time.perf_counter() - t0
        return out[0].numpy(), list(out[1:])

    def forward_hidden(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
                       cache: list) -> tuple[np.ndarray, np.ndarray, list]:
        """logits [B, T, V], the final-normed hidden states [B, T, D] the MTP graph reads, and the cache."""
        if not self.has_hidden_states:
            raise BundleError("the decoder graph has no hidden_states output (the bundle has no MTP graph)")
        names = [LOGITS, HIDDEN_STATES] + self._outputs[1:]
        out = self.session.run_with_ort_values(names, self._feed(input_ids, position_ids, attention_mask, cache))
        return out[0].numpy(), out[1].numpy(), list(out[2:])

    def cache_to_host(self, cache: list) -> list[np.ndarray]:
        return [value.numpy() for value in cache]

    def cache_from_host(self, arrays: list[np.ndarray]) -> list[ort.OrtValue]:
        return [ort_value(np.ascontiguousarray(a, np.float32)) for a in arrays]

    def truncate(self, cache: list, length: int) -> list:
        """Each layer's cache [B, S, L] cut to its first `length` positions."""
        return [ort_value(np.ascontiguousarray(value.numpy()[:, :length])) for value in cache]

    def close(self) -> None:
        self.session = None
