"""Find the layers of a denoiser that see only the conditioning (timestep, text), never the latent image.

A UNet's cost is in the layers applied at every latent position; the layers fed only by the timestep embedding
(time_embedding, each ResNet's time_emb_proj) or by the text states (the cross-attention K and V projections) run
on a handful of vectors, yet every latent position depends on them: an error there shifts the whole image. So they
are worth nothing to quantize for speed and most to keep exact. Found from the graph's structure: a weight
Conv/MatMul/Gemm whose data input does not depend on the latent input.

Being structural, the rule covers what a family adds without a list of names: SDXL's add_embedding (linear_1 and
linear_2, fed by the pooled ``text_embeds`` concatenated with the sinusoidal projection of ``time_ids``, and summed
into the time embedding) is found on the SDXL UNets like time_embedding (tests/engines/test_sdxl_engines.py).
"""
from __future__ import annotations

from .graphs import constant_names

WEIGHT_OPS = frozenset({"Conv", "MatMul", "Gemm"})
SHAPE_OPS = frozenset({"Shape", "Size"})


def conditioning_only(model, latent_input: str = "sample") -> set[str]:
    """Names of the weight Conv/MatMul/Gemm nodes whose data input does not depend on graph input
    ``latent_input``. Empty when the graph has no such input (e.g. a text encoder)."""
    graph = model.graph
    if latent_input not in {i.name for i in graph.input}:
        return set()
    constants = constant_names(graph)
    spatial = {latent_input}
    for n in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        # Shape/Size read only the metadata: the timestep is expanded to the latent batch through Shape(sample)
        if n.op_type not in SHAPE_OPS and any(i in spatial for i in n.input):
            spatial.update(o for o in n.output if o)
    return {n.name for n in graph.node
            if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in constants and n.input[0] not in spatial}
