"""``edgediff optimize``: graph clean-up and fusions for one target, optionally with static shapes.

Targets:
- ``cpu`` / ``cuda``: ONNX Runtime's transformer optimizer (attention -> MultiHeadAttention/Attention, LayerNorm,
  RMSNorm, GELU and bias fusions; recipe ``mmdit`` for the SD3/FLUX transformers; on cuda also GroupNorm,
  BiasSplitGelu, BiasAdd, NHWC convolutions, which have CUDA kernels only), then ONNX Runtime's own graph
  optimizations (level "extended") saved to disk. The runtime opens such a graph with optimizations off, so
  session creation skips the 10-40 s ONNX Runtime spends re-optimizing an SD-1.5 UNet at every start. The saved
  graph holds provider-specific fused ops: it is marked ``optimized_for`` and refused by other providers.
- ``tensorrt``: portable clean-up only (constant folding, redundant-node elimination: ONNX Runtime level "basic",
  standard ONNX ops), because TensorRT fuses by itself and must be able to parse every node.

``--static NxHxW`` fixes the image batch N and the size HxW (pixels) in the denoiser and VAE graphs; with
classifier-free guidance (the default) the denoiser's batch is 2N. The text encoders keep a dynamic batch (their
sequence is the tokenizer's fixed length), since prompts x images-per-prompt need not equal N. Which dims are fixed comes
from the manifest's I/O specs by the rule TensorRT profiles use, so inputs a family adds follow the batch too
(SDXL's ``text_embeds`` (2N, 1280) and ``time_ids`` (2N, 6), or 5 for the refiner).
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgediff.bundle.reader import Bundle
from edgediff.bundle.schema import CONTROLNET_PREFIX, DEEPCACHE_COMPONENTS, RESIDUAL_UNET
from edgediff.errors import BackendUnavailable, EngineError, InputError

from .derive import Result, begin, derive
from .graphs import load_model, save_graph_beside, save_model, set_static_dims
from .isolate import run_isolated
from .probe import capture, vae_encoder_feeds
from .scratch import temp_files_in
from .tensorrt.profiles import ALIASES, T5_ENCODER, dim_values, input_shape, text_sequence

TARGETS = ("cpu", "cuda", "tensorrt")
SAVE_LEVEL = {"cpu": "extended", "cuda": "extended", "tensorrt": "basic"}
# onnxruntime.transformers model types per component. "mmdit" (SD3/3.5 and FLUX transformers) fuses SD3's joint
# attention into one MultiHeadAttention node in place of MatMul-Softmax-MatMul, whose score matrix goes through
# memory (354 MB per attention at 512x512 with guidance); measured effect in docs/engines.md and the README.
MODEL_TYPE = {"unet": "unet", "transformer": "mmdit", "text_encoder": "clip", "text_encoder_2": "clip",
              "vae_decoder": "vae", "vae_encoder": "vae",
              # DeepCache's full and shallow graphs are UNets (export --deepcache): fused as the unet is, so a
              # cached step keeps the fused attention the plain step has (the 64x64 attentions are most of a
              # shallow step at 512x512)
              **{name: "unet" for name in DEEPCACHE_COMPONENTS}}
# a family's T5 encoder (profiles.T5_ENCODER: FLUX's text_encoder_2, SD3's text_encoder_3) takes no recipe: none of
# ONNX Runtime's fits a T5 encoder alone, so it gets ONNX Runtime's own optimizations only
PARITY_PROMPTS = ("a photo of a red apple on a wooden table",)
# components whose batch --static leaves dynamic: prompts x images-per-prompt, with or without a negative prompt
DYNAMIC_BATCH = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Static:
    images: int  # N: images per call
    height: int
    width: int
    cfg: bool = True  # classifier-free guidance doubles the denoiser batch

    @property
    def denoiser_batch(self) -> int:
        return 2 * self.images if self.cfg else self.images

    def __str__(self) -> str:
        return f"{self.images}x{self.height}x{self.width}"


def parse_static(text: str, *, cfg: bool = True) -> Static:
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", text or "")
    if not m:
        raise InputError(f"--static {text!r}; expected IMAGESxHEIGHTxWIDTH, e.g. 1x512x512")
    n, h, w = (int(g) for g in m.groups())
    if n < 1 or h < 8 or w < 8:
        raise InputError(f"--static {text!r}: images must be >= 1 and height/width >= 8")
    return Static(n, h, w, cfg)


def optimize_bundle(src: str | Path, out: str | Path, *, target: str = "cpu", static: Static | None = None,
                    overwrite: bool = False, tolerance: float | None = None, height: int | None = None,
                    width: int | None = None, progress: Callable[[str], None] = lambda msg: None) -> Path:
    """``height``/``width``: the image size the parity check runs at (default: the model's native size, or the
    static size); the graphs stay dynamic. A transformer checked at 1024x1024 runs for tens of minutes on a CPU."""
    if target not in TARGETS:
        raise InputError(f"--target {target!r}; expected one of {list(TARGETS)}")
    if static is not None and (height or width):
        raise InputError(f"--size with --static {static}: the static size is the size the check runs at; drop --size")
    parent = begin(src, out, overwrite=overwrite, tolerance=tolerance)
    m = parent.manifest
    for name, comp in m.components.items():
        if comp.optimized_for:
            raise EngineError(f"{parent.root}: {name} is already optimized for {comp.optimized_for!r}; optimize the "
                              "original (exported) bundle instead")
    if target == "cuda":
        _require_cuda()
    if static is not None:
        nets = [n for n in m.components if n == RESIDUAL_UNET or n.startswith(CONTROLNET_PREFIX)]
        if nets:  # their batch follows guess mode and their residuals' sizes each block's downsampling
            raise InputError(f"--static does not fix the ControlNet graphs ({', '.join(nets)}): optimize this bundle "
                             "without --static, or export one without --controlnet for a static bundle")
        multiple = parent.size_multiple
        if static.height % multiple or static.width % multiple:
            raise InputError(f"--static {static}: height and width must be multiples of {multiple} for this model")

    progress("capturing real inputs for the parity check")
    h = static.height if static else height
    w = static.width if static else width
    prompts = list(PARITY_PROMPTS) if static is None else _in_window(parent, PARITY_PROMPTS) * static.images
    # Each memory-hungry step runs in its own process (engines.isolate): what a step's sessions and graph copies
    # leave in this process's heap (glibc keeps freed memory) would otherwise add up across steps. An SD-1.5
    # UNet at 512x512 needs ~7 GiB to capture, 13.7 GiB (dynamic) / 17.3 GiB (static) to fuse and save, and ~5 GiB
    # to check: in one process, static 512x512 was killed by the OOM killer on a 23 GiB machine.
    got = run_isolated(capture, parent.root, prompts, steps=3, height=h, width=w,
                       images_per_call=static.images if static else 1,
                       guidance_scale=7.5 if (static is None or static.cfg) else 1.0,
                       what="capturing real inputs for the parity check")
    feeds = {name: got.feeds.get(name, []) for name in m.components}
    if "vae_encoder" in m.components:
        feeds["vae_encoder"] = vae_encoder_feeds(got)
    # the tiny autoencoder (export --tiny-vae) does not run in the capture; it takes what the VAE takes
    for tiny, full in (("vae_decoder_tiny", "vae_decoder"), ("vae_encoder_tiny", "vae_encoder")):
        if tiny in feeds and not feeds[tiny]:
            feeds[tiny] = feeds.get(full, [])

    def transform(name: str, graph: Path, bundle: Bundle, work: Path):
        result = Result(precision=m.components[name].precision,
                        optimized_for=target if target in ("cpu", "cuda") else "",
                        provider="cuda" if target == "cuda" else "cpu")
        lean = ""
        if target in ("cpu", "cuda") and name in LEAN_FUSION:
            if m.components[name].precision in QDQ_PRECISIONS:
                # ONNX Runtime's attention fusion matches float projections; behind Q/DQ it finds none
                lean = "qdq"
                progress(f"{name}: Q/DQ graph; fusing attention from the graph's structure")
            elif _too_big_to_fuse(graph):
                lean = "memory"
                progress(f"{name}: {_gib(_graph_bytes(graph))} of weights is too much for ONNX Runtime's optimizer "
                         "in this machine's memory; fusing attention from the graph's structure alone")
        done = run_isolated(_transform_graph, graph, work, name=name, target=target, static=static,
                            bundle_root=bundle.root, lean=lean, what=f"{name}: optimize --target {target}")
        return done, result  # a file: derive moves it (and its weights) into place without loading it

    step = f"optimize --target {target}" + (f" --static {static}" + ("" if static.cfg else " --no-cfg") if static else "")
    if h and not static:
        step += f" --size {w}x{h}"
    return derive(parent, out, step=step, transform=transform, components=list(m.components), parity_feeds=feeds,
                  overwrite=overwrite, tolerance=tolerance, progress=progress)


def _transform_graph(graph: Path, work: Path, *, name: str, target: str, static: Static | None,
                     bundle_root: Path, lean: str = "") -> Path:
    """Fix the static dims, fuse and let ONNX Runtime optimize ``graph``; the result is saved under ``work`` and its
    path returned. Runs in a child process (see optimize_bundle), whose temporary files go to ``work`` too.
    ``lean``, why attention is fused without loading the weights (engines.attention_fusion) instead of through ONNX
    Runtime's transformer optimizer: "memory" (the optimizer would not fit; finding nothing to fuse is an error)
    or "qdq" (a quantized graph, which the optimizer cannot fuse; nothing to fuse leaves it as it is)."""
    with temp_files_in(work):
        return _transform_in(graph, work, name=name, target=target, static=static, bundle_root=bundle_root,
                             lean=lean)


def _transform_in(graph: Path, work: Path, *, name: str, target: str, static: Static | None,
                  bundle_root: Path, lean: str = "") -> Path:
    done = work / "done" / "model.onnx"
    if static is None and target == "tensorrt":
        return _ort_offline(graph, target, name, done)
    model = load_model(graph, weights=not lean)
    bundle = Bundle.open(bundle_root)
    if static is not None:
        set_static_dims(model, _static_dims(name, static, bundle))
    raw = work / "raw" / "model.onnx"
    raw.parent.mkdir()
    if lean:
        from .attention_fusion import fuse_attention

        if not fuse_attention(model) and lean == "memory":
            raise EngineError(f"{name}: no attention of the exported pattern found to fuse without loading the "
                              "weights, which do not fit ONNX Runtime's optimizer here; run optimize on a machine "
                              "with about four times the weights' size in memory")
        if lean == "qdq" and target == "cpu":  # every INT8 projection to ONNX Runtime's integer kernels (see module)
            from .qdq_uint8 import activations_to_uint8

            activations_to_uint8(model)
        save_graph_beside(model, raw, graph)
    else:
        if target in ("cpu", "cuda"):
            model = _fuse(model, name, target, bundle.manifest.family)
        save_model(model, raw)
    del model  # one copy of the weights at a time: an SD-1.5 UNet is 3.4 GB
    return _ort_offline(raw, target, name, done)


# denoisers whose attention engines.attention_fusion knows (the UNets' exported pattern and SD3's joint attention;
# FLUX's heads are sized at run time, so its attention is not found there and a FLUX transformer too big for ONNX
# Runtime's optimizer is refused in one line); a graph too big for the optimizer but not listed here keeps the full
# path and may run out of memory, which isolate reports
LEAN_FUSION = ("unet", "transformer", *DEEPCACHE_COMPONENTS)
# precisions whose graphs take that path whatever their size: Q/DQ around the projections hides attention from
# ONNX Runtime's fusion (docs/engines.md), not from engines.attention_fusion, which starts after the projections
QDQ_PRECISIONS = ("int8-qdq", "fp8-qdq")
# what ONNX Runtime's transformer optimizer holds at once, in multiples of the weights: the loaded model, symbolic
# shape inference's copy, the fused model and its serialization (an SDXL UNet of 10.3 GB could not be optimized
# in 23 GiB)
OPTIMIZER_MEMORY = 4


def _in_window(bundle: Bundle, prompts) -> list[str]:
    """``prompts``, each cut word by word to the text encoder's window. A static UNet's text axis is that window
    (runtime/families/sd.takes_long_prompts), while the exported parent the parity inputs are captured from splits a
    longer prompt into chunks: on the built-in model (24 tokens) the parity prompt made a 48-token input that the
    static graph refused. Families without a CLIP tokenizer folder keep their prompts."""
    from edgediff.bundle.layout import TOKENIZER_DIR
    from edgediff.tokenizer import ClipTokenizer

    files = bundle.tokenizer_files(TOKENIZER_DIR)
    if not bundle.has("unet") or not files:
        return list(prompts)
    tok = ClipTokenizer.from_files(files, max_length=bundle.manifest.text_max_length, where=bundle.root / TOKENIZER_DIR)
    out = []
    for prompt in prompts:
        words = prompt.split()
        while len(words) > 1 and len(tok.token_ids([" ".join(words)])[0]) > tok.max_length - 2:  # BOS and EOS
            words.pop()
        out.append(" ".join(words))
    return out


def _too_big_to_fuse(graph: Path) -> bool:
    from edgediff.validation import available_memory

    free = available_memory()
    return free is not None and OPTIMIZER_MEMORY * _graph_bytes(graph) > free


def _graph_bytes(graph: Path) -> int:
    from .graphs import EXTERNAL_DATA_NAME

    data = Path(graph).parent / EXTERNAL_DATA_NAME
    return Path(graph).stat().st_size + (data.stat().st_size if data.exists() else 0)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _static_dims(name: str, s: Static, bundle: Bundle) -> dict[str, dict[int, int]]:
    """The axes of ``name``'s inputs to fix for ``s``, from the manifest's I/O specs by the rule TensorRT profiles
    use (engines.tensorrt.profiles): every input with a batch dim follows the batch -- SDXL's ``text_embeds`` and
    ``time_ids`` as well as ``sample`` -- so a static denoiser has no dynamic input left."""
    if name in DYNAMIC_BATCH:
        return {}  # text encoders: sequence length is fixed already; batch stays dynamic (see module doc)
    values = dim_values(name, bundle.manifest, s.images, s.height, s.width, s.cfg)
    # a T5 sequence (SD3/FLUX) is chosen per call (max_sequence_length): it stays dynamic
    varying = {"sequence"} if len(set(text_sequence(name, bundle.manifest))) > 1 else set()
    dims = {}
    for spec in bundle.component(name).inputs:
        shape = input_shape(name, spec, values, hint="--static cannot fix it; re-export the bundle with edgediff "
                                                      "export")
        axes = {axis: v for axis, (d, v) in enumerate(zip(spec.shape, shape))
                if not isinstance(d, int) and ALIASES.get(d, d) not in varying}
        if axes:
            dims[spec.name] = axes
    return dims


def _fuse(model, name: str, target: str, family: str):
    """ONNX Runtime's transformer fusions that have kernels on ``target``."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = None if name == T5_ENCODER.get(family) else MODEL_TYPE.get(name)
    if model_type is None:  # a component no fusion recipe knows: ONNX Runtime's own optimizations only
        return model
    opts = FusionOptions(model_type)
    if target == "cpu":  # these fused ops exist for CUDA only
        for flag in ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
                     "enable_nhwc_conv", "enable_packed_qkv", "enable_packed_kv"):
            if hasattr(opts, flag):
                setattr(opts, flag, False)
    if model_type == "vae":
        # onnxruntime's VAE self-attention fusion reads the head count with int() of a 1-element array, which
        # NumPy >= 2.3 refuses (TypeError). The VAE's one mid-block attention is < 2 % of its time: skip it.
        opts.enable_attention = False
    with _quiet_optimizer():
        fused = optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0, optimization_options=opts,
                               opt_level=0, use_gpu=target == "cuda")
    return fused.model


@contextmanager
def _quiet_optimizer():
    """Keep ONNX Runtime's optimizer from printing progress bars and warnings meant for its developers (symbolic
    shape inference's "Cannot determine if ... < 0" per slice, "use onnxruntime-gpu>=1.21" on a CPU target): the
    parity check after the transform is what tells the user whether it worked. Runs in engines.isolate's child."""
    old_env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        if old_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_env


def _ort_offline(src: Path, target: str, name: str, done: Path) -> Path:
    """Let ONNX Runtime optimize the graph file ``src`` for ``target`` (what it would otherwise redo at every session
    start) and save the result as ``done``, weights beside it when ``src`` keeps them outside. Returns ``done``."""
    import onnxruntime as ort

    from edgediff.backends.ort import OrtOptions

    from .graphs import EXTERNAL_DATA_NAME

    done.parent.mkdir(parents=True, exist_ok=True)
    extra = {"session.optimized_model_external_initializers_file_name": done.name + "_data",
             "session.optimized_model_external_initializers_min_size_in_bytes": "1024"} \
        if (Path(src).parent / EXTERNAL_DATA_NAME).exists() else {}
    options = OrtOptions(graph_optimization_level=SAVE_LEVEL[target], optimized_model_filepath=str(done),
                         extra_session_config=extra)
    provider = "cuda" if target == "cuda" else "cpu"
    try:
        session = ort.InferenceSession(str(src), options.session_options(), providers=options.providers(provider))
        del session
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"{name}: ONNX Runtime could not optimize the graph for {target}: {text}") from None
    return done


def _require_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable("--target cuda optimizes for, and verifies on, ONNX Runtime's CUDA provider, which "
                                 "this machine lacks; run it on the target GPU machine with edgediff[gpu] installed")
