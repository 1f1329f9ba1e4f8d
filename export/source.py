"""Validate a diffusers pipeline folder before anything heavy is imported: one clear line per problem."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgediff.config import read_json
from edgediff.errors import ConfigError, ExportError

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline")  # FLUX.1 schnell/dev (components_flux.py)
# Latent Consistency Models distilled from SD 1.x: SD's folder layout, a UNet with time_cond_proj_dim (components_lcm.py)
LCM_PIPELINES = ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")
# the inpainting pipeline's folder is an SD one; its UNet may take 9 channels (latents + mask + masked image),
# which the exporter reads from the UNet config and the runtime from the graph's sample input
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                       *SDXL_PIPELINES, *LCM_PIPELINES, *FLUX_PIPELINES,
                       # an SD folder plus controlnet/ (components_controlnet.py exports it with the pipeline)
                       "StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline")
# component folder -> the classes we know how to export
EXPECTED = {
    "text_encoder": ("CLIPTextModel",),
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
# SDXL adds OpenCLIP-G with its projection; its refiner has no CLIP-L tower (text_encoder/tokenizer are null)
EXPECTED_SDXL = {
    **EXPECTED,
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
OPTIONAL_SDXL = ("text_encoder", "tokenizer")
# FLUX.1: CLIP ViT-L (pooled output), T5 v1.1 XXL, the flow transformer, a 16-channel VAE
EXPECTED_FLUX = {
    "text_encoder": ("CLIPTextModel",),
    "text_encoder_2": ("T5EncoderModel",),
    "transformer": ("FluxTransformer2DModel",),
    "vae": ("AutoencoderKL",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("T5TokenizerFast", "T5Tokenizer"),
}
WEIGHTED = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class Source:
    root: Path
    pipeline_class: str
    scheduler_class: str
    pickle_components: tuple[str, ...]  # components whose weights are pickle files (only with --allow-pickle)
    # the weighted component folders present: text_encoder[, text_encoder_2], unet, vae (SDXL's refiner: no text_encoder)
    modules: tuple[str, ...] = ("text_encoder", "unet", "vae")
    tokenizers: tuple[str, ...] = ("tokenizer",)  # tokenizer folders, in the order of their text encoders
    index: dict = field(default_factory=dict, compare=False)  # model_index.json (pipeline flags such as SDXL's)
    tiny_vae: Path | None = None  # an AutoencoderTiny folder to export too (--tiny-vae; components_tiny_vae.py)
    controlnets: tuple = ()  # (name, ControlNetModel folder) pairs to export too (--controlnet; components_controlnet.py)
    deepcache: tuple[int, ...] = ()  # DeepCache branch ids to export graphs for (--deepcache; components_deepcache.py)
    # source folder -> (library, class) to load it with, where the family's differ from plan.MODEL_CLASSES (SD3's
    # text_encoder_2 is a CLIPTextModelWithProjection as SDXL's, its transformer an SD3Transformer2DModel)
    classes: dict = field(default_factory=dict, compare=False)
    max_sequence_length: int | None = None  # T5's token length to export for (SD3: export --max-sequence-length)

    @property
    def sdxl(self) -> bool:
        return self.pipeline_class in SDXL_PIPELINES

    @property
    def flux(self) -> bool:
        return self.pipeline_class in FLUX_PIPELINES


def inspect_source(src: str | Path, *, allow_pickle: bool = False) -> Source:
    root = Path(src).expanduser()
    if not root.exists():
        raise ExportError(f"source not found: {root} does not exist")
    if root.is_file():
        raise ExportError(
            f"{root} is a single file; export needs a diffusers pipeline folder "
            "(convert single-file checkpoints with diffusers' from_single_file(...).save_pretrained(DIR))"
        )
    try:
        index = read_json(root / "model_index.json", what="model_index.json")
    except ConfigError:
        raise ExportError(
            f"{root} is not a diffusers pipeline: no readable model_index.json (save one with pipeline.save_pretrained)"
        ) from None
    cls = index.get("_class_name", "")
    if cls in ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"):  # its own folder layout
        from .components_sd3 import inspect_sd3

        return inspect_sd3(root, index, allow_pickle=allow_pickle)
    if cls not in SUPPORTED_PIPELINES:
        from .components_sd3 import SD3_PIPELINES  # (SD3 folders are inspected by components_sd3, above)

        raise ExportError(f"pipeline class {cls!r} is not supported; supported: "
                          f"{', '.join((*SUPPORTED_PIPELINES, *SD3_PIPELINES))}")
    sdxl = cls in SDXL_PIPELINES
    expected = EXPECTED_FLUX if cls in FLUX_PIPELINES else EXPECTED_SDXL if sdxl else EXPECTED
    absent = [c for c in OPTIONAL_SDXL if sdxl and _null(index.get(c))]
    if len(absent) == 1:
        raise ExportError(f"{root}/model_index.json has {absent[0]!r} null but not its partner; "
                          "text_encoder and tokenizer come together (a refiner has neither)")
    check_components(root, index, expected, absent)
    modules = tuple(c for c in WEIGHTED if c in expected and c not in absent)
    pickled = [comp for comp in modules if weights_pickled(root / comp, allow_pickle=allow_pickle)]
    sched = index.get("scheduler") or [None, ""]
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise ExportError(f"{root}/scheduler/scheduler_config.json is missing; the pipeline folder is incomplete")
    tokenizers = tuple(t for t in ("tokenizer", "tokenizer_2") if t in expected and t not in absent)
    # FLUX: load each model with the class model_index.json names (text_encoder_2 is T5, not CLIP-G)
    classes = {c: tuple(index[c]) for c in modules} if cls in FLUX_PIPELINES else {}
    return Source(root=root, pipeline_class=cls, scheduler_class=str(sched[1]), pickle_components=tuple(pickled),
                  modules=modules, tokenizers=tokenizers, index=index, classes=classes)


def _null(entry) -> bool:
    """A component model_index.json lists as absent: ``[null, null]`` (what save_pretrained writes for None)."""
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is None and entry[1] is None


def check_components(root: Path, index: dict, expected: dict, absent=()) -> None:
    """Every ``expected`` component (name -> allowed classes) but the ``absent`` ones is in model_index.json with
    an allowed class and has its folder; else one line naming the first that is not."""
    for comp, allowed in expected.items():
        if comp in absent:
            continue
        entry = index.get(comp)
        if not entry or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise ExportError(f"{root}/model_index.json has no {comp!r} component; the pipeline is incomplete")
        if entry[1] not in allowed:
            raise ExportError(f"{comp} class {entry[1]!r} is not supported; expected one of {list(allowed)}")
        if not (root / comp).is_dir():
            raise ExportError(f"{root}/{comp}/ is missing; the pipeline folder is incomplete")


def weights_pickled(folder: Path, *, allow_pickle: bool, what: str | None = None) -> bool:
    """Whether a model folder's weights are pickle files (False: safetensors). A folder with neither, or pickles
    without ``allow_pickle``, is refused in one line naming it (``what``, default the folder's path)."""
    what = what or str(folder)
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") for n in files):
        return False
    pickles = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise ExportError(f"{what} has no weights (*.safetensors)")
    if not allow_pickle:
        raise ExportError(f"{what}/{pickles[0]} is a pickle file, which can run arbitrary code when loaded; "
                          "convert it to safetensors, or pass --allow-pickle if you trust its source")
    return True
