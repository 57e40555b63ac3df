"""The files starfish reads and writes: its checkpoints (`formats.checkpoint`), the compressed
sparse-bitmask export (`formats.bitmask`) and ONNX for serving (`formats.onnx`)."""
