"""Bundle -> optimized / quantized ONNX -> TensorRT engines. No torch."""
