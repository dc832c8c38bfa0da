"""Expert-routing calibration and pruning (docs/pruning.md).

  data.py     calibration text: plain text, JSONL "text", chat JSONL "messages"
  profile.py  per layer and expert: selections, routed weight mass, REAP contribution
  heatmap.py  layers x experts PNG maps
  pruning.py  which experts to remove: criterion, scope, routing kept well defined
"""
