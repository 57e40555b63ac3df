"""File formats starfish writes besides its checkpoints: the compressed sparse-bitmask export
(`formats.bitmask`) and ONNX for serving (`formats.onnx`)."""
