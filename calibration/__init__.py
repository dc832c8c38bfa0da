"""Expert-routing calibration: which experts real text uses (see the calibration issue).

Runs text through dsexport.exporter.reference.DeepseekReference and records, per MoE layer and
expert, selection frequency, routed weight mass and output-norm contribution.
"""
