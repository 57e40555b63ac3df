"""File formats starfish writes besides its checkpoints: ONNX for serving (`formats.onnx`)."""
