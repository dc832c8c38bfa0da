"""dsexport: compile DeepSeek-style MoE models to ONNX Runtime bundles for edge devices.

Subpackages:
  dsexport.exporter     checkpoint loading, the PyTorch reference model, ONNX export (build machine)
  dsexport.runtime      torch-free inference over an exported bundle (edge device)
  dsexport.targets      device profiles and the per-target lowering registry
  dsexport.calibration  expert-routing statistics
"""

from pathlib import Path

__version__ = "0.1.0"

# The small trained DeepSeek-V3-style model that ships with dsexport (training/train.py):
# what `dsexport build` uses when no --model is given.
EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "deepseek-tiny"
