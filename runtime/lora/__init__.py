"""LoRA without torch: read kohya/A1111 and diffusers/PEFT ``.safetensors`` files with numpy, find the weights they
change in a bundle's graphs (``<component>/weights_map.json``), and compute W + sum(weight * scale * B @ A) from
the base weights the bundle stores, for ONNX Runtime initializer overrides or a TensorRT refit (hot-swap). Fusing
at export (``edgediff export --lora``) is edgediff.export.lora."""
from .apply import AppliedLoras, LoraSpec, apply_loras, lora_specs, lora_weights, parse_lora_option

__all__ = ["AppliedLoras", "LoraSpec", "apply_loras", "lora_specs", "lora_weights", "parse_lora_option"]
