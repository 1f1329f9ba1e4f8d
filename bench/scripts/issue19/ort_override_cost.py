"""How long ONNX Runtime takes to build a session whose initializers are replaced (add_external_initializers, as
LoRA hot-swap does) against a plain session of the same graph: the dominant part of a swap (issue 19).
Usage: python bench/scripts/issue19/ort_override_cost.py DIR/sd15-onnx/unet/model.onnx [N]  (N largest-first float
initializers replaced by copies of themselves; default 280)."""
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from edgediff.lora.onnx_weights import GraphWeights


def options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 280
    t = time.perf_counter()
    ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
    print(f"plain session        {time.perf_counter() - t:6.2f} s")
    model = onnx.load(path, load_external_data=False)
    ext = [t for t in model.graph.initializer
           if t.data_location == TensorProto.EXTERNAL and t.data_type == TensorProto.FLOAT]
    names = [t.name for t in sorted(ext, key=lambda t: -int(np.prod(t.dims)))[:n]]
    graph = GraphWeights(path)
    arrays = [graph.read_copy(name) for name in names]
    so = options()
    so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    t = time.perf_counter()
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    print(f"{len(names)} replaced ({sum(a.nbytes for a in arrays) / 2**30:.2f} GiB) {time.perf_counter() - t:6.2f} s")
    t = time.perf_counter()
    ort.InferenceSession(path, options(), providers=["CPUExecutionProvider"])
    print(f"plain session again  {time.perf_counter() - t:6.2f} s")


if __name__ == "__main__":
    main()
