"""ONNX Runtime sessions over a bundle's graphs: options, execution providers and weight residency,
set up in one place for the decoder, the paged segments and the MTP graph.

Weights (`weights=`): "mmap" lets ONNX Runtime map the external-data file (least memory; pages
load on first use and the OS may evict them); "mlock" maps and then locks the mapped weights in
RAM (as llama.cpp --mlock); "memory" reads the file into ordinary memory (as llama.cpp --no-mmap).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from dsexport.core.errors import BundleError, UserError
from dsexport.core.manifest import Manifest

from .memory import lock_mapped_file

WEIGHT_MODES = ("mmap", "mlock", "memory")


def choose_providers(manifest: Manifest, available: list[str], directory: Path) -> list:
    """ONNX Runtime execution providers for a bundle: the target's, where this onnxruntime has
    them (onnxruntime-gpu: TensorRT then CUDA for TensorRT targets), then the CPU. The TensorRT
    EP caches its engines in the bundle's engines/ort-trt directory and runs at the bundle's
    precision; the graph is the same standard-op graph `dsexport engine` builds from."""
    chosen: list = []
    for name in manifest.target.execution_providers:
        if name not in available or name == "CPUExecutionProvider":
            continue
        if name == "TensorrtExecutionProvider":
            chosen.append((name, {"trt_engine_cache_enable": "True",
                                  "trt_engine_cache_path": str(directory / "engines" / "ort-trt"),
                                  "trt_fp16_enable": "True" if manifest.precision == "fp16" else "False"}))
        else:
            chosen.append(name)
    return chosen + ["CPUExecutionProvider"]


def session_options(manifest: Manifest, threads: int | None, spinning: bool = True,
                    single_thread: bool = False) -> ort.SessionOptions:
    """All optimizations, `threads` intra-op threads (single_thread: the calling thread alone)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if manifest.quantization is not None and manifest.quantization.lowering == "qdq":
        # TensorRT-bound int8/int4 weights (DequantizeLinear + MatMul): ONNX Runtime fuses them into
        # MatMulNBits, by default quantizing activations to int8; TensorRT computes weight-only, so do that
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        # On a CPU these graphs dequantize whole expert stacks every step (TensorRT reads them
        # in place): without the arena those multi-GB transients go back to the OS. V2-Lite int4,
        # one decode step: peak RSS 13.0 GB and flat, against 15.8 GB after one step and 18.1 GB
        # after two with it (67 s against 40 s per step).
        options.enable_cpu_mem_arena = False
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
            raise UserError(f"threads must be an integer between 1 and 1024, got {threads!r}")
    if single_thread:
        threads = 1
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(model_path: Path, options: ort.SessionOptions, providers: list, weights: str = "mmap",
                 data_path: Path | None = None) -> ort.InferenceSession:
    """A session over a graph (.onnx with external data at data_path, or .ort), weights held as asked."""
    if weights not in WEIGHT_MODES:
        raise UserError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    buffer = None
    if weights == "memory" and data_path is not None:
        buffer = np.fromfile(data_path, dtype=np.uint8)
        options.add_external_initializers_from_files_in_memory([data_path.name], [buffer], [buffer.size])
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as e:  # ORT raises its own types for unreadable graphs or external data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{model_path.name}: ONNX Runtime cannot load it ({first[:300]})") from None
    del buffer  # ONNX Runtime copied what it keeps
    if weights == "mlock" and data_path is not None:
        lock_mapped_file(data_path)
    return session
