"""TensorRT engines from a bundle: optimization profiles from the manifest, a safe on-disk engine cache, and the
builder. Only ``build`` imports ``tensorrt``; profiles and cache are plain Python (tested on CPU)."""
