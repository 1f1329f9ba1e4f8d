"""Building TensorRT engines from a bundle: optimization profiles from the manifest (profiles.py, plain Python,
tested on CPU) and the builder (build.py, the only module here that imports ``tensorrt``). The engine cache, the
device description and the rebuild hint belong to the runtime, which loads what is built here:
``edgediff.backends.tensorrt``."""
