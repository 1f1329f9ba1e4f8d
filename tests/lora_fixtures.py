"""Test helper: small random LoRAs for the tiny SD pipelines, made with peft/diffusers' own APIs in-process, saved
as diffusers' ``save_lora_weights`` writes them, and the same layers rewritten in kohya/A1111's format."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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


# -- shared by tests/runtime/test_lora.py and tests/export/test_lora_export.py ----------------------------------
TOL = 1e-3  # images, pixels in [0, 1]
PROMPT = "a red circle on white"
LATENTS = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)


def example_loras(source: Path, d: Path) -> dict[str, Path]:
    """a: UNet + text encoder, rank 4, alpha 8 (diffusers format); b: UNet attention only, rank 2, alpha 1;
    a_kohya: a's layers in kohya's format."""
    a = make_lora(source, d / "a.safetensors", seed=1)
    b = make_lora(source, d / "b.safetensors", seed=2, rank=2, alpha=1.0, text_encoder=False, magnitude=0.6,
                  unet_targets=["to_q", "to_k", "to_v", "to_out.0"])
    return {"a": a, "b": b, "a_kohya": to_kohya(a, d / "a_kohya.safetensors")}


def reference(source, weighted: list) -> np.ndarray:
    """diffusers' images (StableDiffusionPipeline, Euler, 4 steps) with the LoRAs ``[(file, weight), ...]``
    loaded as adapters, weighted with set_adapters and fused."""
    import warnings

    import diffusers
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                                  requires_safety_checker=False, local_files_only=True)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        names = [f"l{i}" for i in range(len(weighted))]
        for name, (path, _) in zip(names, weighted):
            pipe.load_lora_weights(str(path), adapter_name=name)
        if names:
            pipe.set_adapters(names, adapter_weights=[w for _, w in weighted])
            pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, latents=torch.from_numpy(LATENTS),
                generator=torch.Generator().manual_seed(1), output_type="np").images


def ours(pipe) -> np.ndarray:
    """Our images for the same call (same latents, diffusers' noise stream)."""
    from streams import StreamFrom

    return np.stack(pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, latents=LATENTS, scheduler="euler",
                         rng=StreamFrom(1), output_type="np").images)


def compare(mine, theirs) -> None:
    err = float(np.max(np.abs(mine - theirs)))
    assert err <= TOL, f"max abs {err:.2e} > {TOL} at {np.unravel_index(np.argmax(np.abs(mine - theirs)), mine.shape)}"


def _lora_file(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return path


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def bad_files(d: Path) -> dict:
    """LoRA files each wrong in one way, and the message that refuses it."""
    r = np.random.default_rng(0)
    a, b = r.standard_normal((4, 32)), r.standard_normal((32, 4))
    extra = {f"unet.down_blocks.{i}.attentions.7.to_q.lora_{x}.weight": (a if x == "A" else b)
             for i in (4, 5, 6, 7) for x in "AB"}
    return {
        "unmatched": (_lora_file(d / "unmatched.safetensors", {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b,
                                                               **extra}),
                      r"4 of its 5 layers match no layer of this sd1 bundle \(first: 'unet\.down_blocks\.4"),
        "shape": (_lora_file(d / "shape.safetensors", {f"{Q}.lora_A.weight": r.standard_normal((4, 64)),
                                                       f"{Q}.lora_B.weight": b}),
                  r"is \(32, 64\) in the LoRA but \(32, 32\) in this sd1 bundle's unet"),
        "rank": (_lora_file(d / "rank.safetensors", {f"{Q}.lora_A.weight": a,
                                                     f"{Q}.lora_B.weight": r.standard_normal((32, 3))}),
                 "lora_down has rank 4 but lora_up rank 3"),
        "sdxl": (_lora_file(d / "sdxl.safetensors", {
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a,
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": b}),
            "has text_encoder_2 layers .*which this sd1 bundle does not have .*SDXL"),
        "loha": (_lora_file(d / "loha.safetensors", {
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": a,
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": b}), "is a LyCORIS LoHa"),
        "sgm": (_lora_file(d / "sgm.safetensors", {
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": a,
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": b}),
            "names UNet blocks the original SGM/LDM way .*fuse it at export"),
        "missing": (d / "nope.safetensors", "LoRA file not found"),
    }
