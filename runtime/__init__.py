"""The dsexport runtime: load an exported bundle and generate text with ONNX Runtime.

Importable without torch or transformers: an edge device installs numpy, onnxruntime,
tokenizers and safetensors, nothing else.
"""

from .engine import Engine, Generation, GenerationConfig, TokenEvent
from .sampling import SamplingParams

__all__ = ["Engine", "Generation", "GenerationConfig", "SamplingParams", "TokenEvent"]
