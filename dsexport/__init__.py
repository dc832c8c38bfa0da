"""dsexport: compile DeepSeek-style MoE models to ONNX Runtime bundles for edge devices.

Subpackages:
  dsexport.exporter     checkpoint loading, the PyTorch reference model, ONNX export (build machine)
  dsexport.runtime      torch-free inference over an exported bundle (edge device)
  dsexport.targets      device profiles and the per-target lowering registry
  dsexport.calibration  expert-routing statistics
"""

__version__ = "0.1.0"
