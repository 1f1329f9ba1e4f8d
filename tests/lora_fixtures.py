"""Test helper: small random LoRAs for the tiny SD pipelines, made with peft/diffusers' own APIs in-process, saved
as diffusers' ``save_lora_weights`` writes them, and the same layers rewritten in kohya/A1111's format."""
from __future__ import annotations

import json
from pathlib import Path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make_lora(source: Path, out: Path, *, seed: int, rank: int = 4, alpha: float = 8.0, text_encoder: bool = True,
              magnitude: float = 0.15, unet_targets=UNET_TARGETS) -> Path:
    """A random LoRA for the pipeline at ``source`` (UNet, and text encoder), written to the file ``out`` by
    diffusers' StableDiffusionPipeline.save_lora_weights (with PEFT's adapter metadata: rank and alpha)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    ucfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=list(unet_targets))
    unet.add_adapter(ucfg)
    _randomize(unet, magnitude)
    kw = dict(unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=ucfg.to_dict())
    if text_encoder:
        # peft's own injection: transformers 5's add_adapter insists on peft >= 0.22, which the registry lacks
        te = CLIPTextModel.from_pretrained(Path(source) / "text_encoder")
        tcfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=TEXT_TARGETS)
        te = inject_adapter_in_model(tcfg, te, adapter_name="default")
        _randomize(te, magnitude)
        layers = {k.replace(".default.", "."): v for k, v in te.state_dict().items() if "lora_" in k}
        kw.update(text_encoder_lora_layers=layers, text_encoder_lora_adapter_metadata=tcfg.to_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out.parent, weight_name=out.name, safe_serialization=True, **kw)
    return out


def _randomize(model, magnitude: float) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * magnitude)


def to_kohya(diffusers_file: Path, out: Path, *, alpha: float | None = None) -> Path:
    """The same layers as kohya/A1111 name them: lora_unet_<module with _>.lora_down/lora_up.weight plus a scalar
    .alpha per layer (from the file's PEFT metadata unless ``alpha`` is given); text encoder layers as lora_te_
    with transformers' text_model level, as kohya's sd-scripts write them."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    import numpy as np

    tensors, layers = {}, {}
    with safe_open(str(diffusers_file), "np") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        for key in f.keys():
            comp, _, rest = key.partition(".")
            module, _, role = rest.rpartition(".lora_")
            role = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[role]
            if comp == "unet":
                name = "lora_unet_" + module.replace(".", "_")
            else:
                name = "lora_te_text_model_" + module.replace(".", "_")
            tensors[f"{name}.{role}"] = f.get_tensor(key)
            layers[name] = meta.get(f"{comp}.lora_alpha", 1.0) if alpha is None else alpha
    for name, a in layers.items():
        tensors[f"{name}.alpha"] = np.array(a, dtype=np.float32)
    save_file(tensors, str(out), metadata={"ss_network_module": "networks.lora"})
    return out
