"""diffusers pipeline -> ONNX bundle. Needs the [export] extra (torch, diffusers, transformers)."""
