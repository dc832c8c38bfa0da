"""The dsexport runtime: load an exported bundle and generate text with ONNX Runtime (or TensorRT).

Importable without torch or transformers: an edge device installs numpy, onnxruntime,
tokenizers, safetensors, click and jinja2, nothing else.
"""

from .decode import GenerationConfig, TokenEvent
from .engine import Engine, Generation
from .sampling import SamplingParams

__all__ = ["Engine", "Generation", "GenerationConfig", "SamplingParams", "TokenEvent"]
