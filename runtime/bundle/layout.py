"""Names of the files in a bundle (optimum's ONNX Stable Diffusion layout, plus edgediff.json)."""
from __future__ import annotations

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"
TOKENIZER_3_DIR = "tokenizer_3"  # SD3's T5 tokenizer (tokenizer.json, run by the `tokenizers` library)
# The files a tokenizer folder may hold that edgediff's tokenizer reads (runtime/tokenizer.py); nothing else in the
# folder is read, and each of these must be pinned by the manifest to be read from a bundle.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
GRAPH_FILE = "model.onnx"  # per component folder
# The components a denoising step can run, in the order a bundle's own is looked for: the UNet of SD 1/2/XL, the
# diffusion transformer (MMDiT) of SD3 and FLUX. A bundle has one; Bundle.denoiser names it.
DENOISERS = ("unet", "transformer")


def graph_path(component: str) -> str:
    return f"{component}/{GRAPH_FILE}"


def config_path(component: str) -> str:
    return f"{component}/config.json"
