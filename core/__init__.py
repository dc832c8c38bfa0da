"""The torch-free core every part of dsexport shares: numpy and the standard library only, and
nothing else of dsexport.

  errors     the exception types (user input vs dsexport's own bugs) and their exit codes
  jsonio     strict JSON: no NaN/Infinity, bounded size, fields read with types and ranges checked
  files      sha256, names confined to a directory, atomic writes
  config     ModelConfig: a Hugging Face config.json read and validated
  quant      QuantSpec: presets, weight layouts, bytes per weight, whether activations are rounded
  contract   the graphs' input and output names and shapes
  manifest   the bundle manifest as typed, versioned dataclasses (schema 2; schema 1 migrated)
  safetensors  safetensors headers read and validated without torch
"""
