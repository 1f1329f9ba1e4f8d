"""Stage 3 (optional) of the built-in model: its tiny decoder, distilled from its VAE decoder, added to the bundle as
``vae_decoder_tiny`` so that ``decoder="tiny"`` (``generate --decoder tiny``, step previews) works on it.

    python -m edgediff.export.recipes.shapes.tiny_decoder --out /tmp/shapes-taesd --seed 0 \\
        --bundle-out /tmp/shapes-with-tiny      # or runtime/models/shapes --overwrite to ship it

The student is a diffusers ``AutoencoderTiny`` (TAESD's architecture, Ollin Boer Bohan, github.com/madebyollin/taesd:
conv + ReLU blocks, nearest upsampling, no normalisation or attention) scaled to this model: 4 latent channels, two
2x upsamplings for its 4 pixels per latent cell, 32 channels, (2, 2, 0) blocks per stage by default (the last stage
is the output conv alone). Only its decoder is trained and exported; the encoder in the saved folder is
AutoencoderTiny's untrained one and is not exported (nothing in the runtime encodes with the tiny autoencoder).

Teacher data, all from the shipped bundle through ONNX Runtime (no training source needed):
- the VAE encoder's posterior means of ``--scenes`` training-split scenes (``dataset.make_dataset``, seed
  ``seed + 30``), times the bundle's scaling_factor: the latents the UNet was trained to produce;
- the model's own final latents for ``--generated`` training-split prompts and ``--generated-heldout`` prompts of
  held-out colour/shape pairs (20 DPM-Solver++ steps, guidance 5, seeds from 100000 and 200000 on, so none is an
  eval-default seed; ``GENERATED`` says why both);
- the teacher's pixels for every latent: the bundle's ``vae_decoder`` of latents / scaling_factor, in [-1, 1].
The student reads the denoiser's latents / ``LATENT_SCALE`` (its config's scaling_factor; TAESD's is 1.0, but this
model's latents overrun the student's input clamp, see ``LATENT_SCALE``) and is trained on the teacher's pixels with
stage 1b's class balance (small shapes count as much as large ones; the shape found against the image's median
colour: ``teacher_shape_weight``; computed on the whole image), plus ``--outline-weight`` on the shape's outline
as the adherence judge finds it (``teacher_outline``), on an L1 + MSE loss, on whole latents by default
(``--crop`` cells for crops, one offset per batch; ``CROP`` says why whole), the generated latents
``--generated-repeat`` times in the pool, AdamW with warm-up and cosine decay, a fixed number of steps from a
generator seeded with ``seed + 3``: the weights depend only on the seed and torch's and ONNX Runtime's CPU kernels
(and thread counts).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

CHANNELS = 32  # 16 (the teacher's own width at 64x64) lost 28 / 35 points of all-correct adherence, 32 lost 24 / 27
# (both at latent scale 1; README, stage 3)
DECODER_BLOCKS = (2, 2, 0)  # AutoencoderTinyBlocks per stage; the stages are 16x16, 32x32, 64x64 for a 64x64 image
# Whole latents (16 cells a side), 8 per batch: the same pixels per step as 32 crops of 8x8 cells, which were used
# before. The student's receptive field is ~7 latent cells (2 blocks of 3 convs at 16x16, plus its input conv), so on
# an 8-cell crop almost every output pixel saw zero padding where the image has latents -- trained on borders it
# never meets at run time. Whole latents: validation all-correct 82.8 / 67.2 % -> 89.1 / 81.2 % (with 640
# generated latents below; export/recipes/shapes/README.md, stage 3).
CROP = 16
BATCH = 8
# The model's own final latents are what the student decodes at run time; 32 of them (the earlier default) against
# 1024 encoder latents left their distribution barely sampled. Those of training-split prompts alone never show the
# student a held-out pair (a purple cross): it drew 3.5 % of held-out images in another colour that the VAE decoder
# drew right, so the model's latents for held-out pairs' prompts are in the pool too (targets: the VAE decoder's
# pixels; no ground-truth image of a held-out pair). Held-out all-correct loss 10.0 -> 3.5 points (README, stage 3).
GENERATED = 640
GENERATED_HELDOUT = 640
GENERATED_REPEAT = 1  # (2 with training prompts only: half the pool generated, as 640 + 640 make it now)
# teacher_outline: the judge reads the shape's type from its outline. Weight 1 (over none): validation +3.1 points;
# 2 with STEPS 12000 (over 1 with 12000): validation 93.8 / 85.4 -> 95.8 / 87.5 % (README, stage 3)
OUTLINE_WEIGHT = 2.0
# 8000 steps left small crosses with their arms filled in (judged circles): 3.5 points lost on held-out pairs
STEPS = 12000
# The student reads latents / LATENT_SCALE (its config's scaling_factor; the runtime divides, as diffusers' pipelines
# do). AutoencoderTiny's decoder starts with the soft clamp tanh(x / 3) * 3, made for SD latents within about +-3;
# this model's latents reach +-20 exactly where the shape is (54 % of the latent cells under a shape hold a value
# beyond +-3, 0.9 % of background cells), so at scale 1 the clamp flattened the shape's values together.
LATENT_SCALE = 4.0
GENERATED_SEED = 100_000  # the first seed of the model's own latents: far from eval-default's 0..n-1
HELDOUT_SEED = 200_000  # ... and of those for held-out-pair prompts


def teacher_data(bundle: Path, seed: int, scenes: int, generated: int, log: dict,
                 threads: int = 0, generated_heldout: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(latents (N, 4, 16, 16), pixels (N, 3, 64, 64)) float32: denoiser-space latents and the VAE decoder's image
    of each (module docstring), in this order: the scenes' encoder latents, ``generated`` latents of training-split
    prompts, ``generated_heldout`` of held-out-pair prompts. ``threads``: ONNX Runtime's intra-op threads (0: one
    per core); the values do not depend on it beyond float rounding."""
    from edgediff import Pipeline
    from edgediff.backends.ort import OrtOptions
    from edgediff.stages import run_component

    from .dataset import canonical_caption, make_dataset, sample_scenes

    t0 = time.time()
    with Pipeline.load(bundle, options=OrtOptions(intra_op_num_threads=threads)) as pipe:
        m = pipe.bundle.manifest
        images, _, _ = make_dataset(seed + 30, scenes, "train")  # (S, 64, 64, 3) uint8
        latents = []
        with pipe.components.use("vae_encoder") as enc:
            for i in range(0, scenes, 64):
                x = np.ascontiguousarray((images[i:i + 64].astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2))
                out = run_component(enc, {"sample": x})[0]
                latents.append(out[:, :m.latent_channels] * np.float32(m.scaling_factor))  # posterior mean, scaled
        for split, count, offset, first_seed in (("train", generated, 31, GENERATED_SEED),
                                                 ("heldout", generated_heldout, 32, HELDOUT_SEED)):
            rng = np.random.default_rng(seed + offset)
            prompts = [canonical_caption(s) for s in sample_scenes(rng, count, split)]
            for i in range(0, count, 16):
                batch = prompts[i:i + 16]
                res = pipe(batch, seed=[first_seed + i + k for k in range(len(batch))], output_type="latent")
                latents.append(res.latents)
        z = np.concatenate(latents).astype(np.float32)  # (N, 4, 16, 16)
        pixels = []
        with pipe.components.use("vae_decoder") as dec:
            for i in range(0, len(z), 64):
                feed = np.ascontiguousarray(z[i:i + 64] / np.float32(m.scaling_factor))
                pixels.append(run_component(dec, {"latent_sample": feed})[0])
    log["teacher"] = {"scenes": scenes, "generated": generated, "generated_heldout": generated_heldout,
                      "minutes": (time.time() - t0) / 60}
    return z, np.concatenate(pixels).astype(np.float32)


def teacher_shape_weight(x, threshold: float = 0.25):
    """Per-pixel loss weight (N, 1, H, W) for teacher images ``x`` (N, 3, H, W) in [-1, 1]: stage 1b's class balance
    (each image's shape and background carry half of its loss; ``train.shape_balanced_weight``), with the shape found
    as the pixels more than ``threshold`` from the image's median colour in some channel. The stage 1b rule (any
    difference over 0.02 from the corner pixel) is for clean ground truth: the teacher's backgrounds vary by more
    than that (up to ~0.1 on black ones), so it took whole backgrounds for shape and weighted them to ~0 -- a first
    run never learned black backgrounds. The shape fraction is capped at one half, so no pixel weighs below 1."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None]  # (N, 3, 1, 1): the background colour
    fg = ((x - bg).abs().amax(1, keepdim=True) > threshold).float()  # (N, 1, H, W)
    frac = fg.mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3, max=0.5)
    return 1 + fg * ((1 - frac) / frac - 1)


def teacher_outline(x):
    """(N, 1, H, W) 1.0 on the pixels of teacher images ``x`` (N, 3, H, W) in [-1, 1] whose 3x3 neighbourhood holds
    both sides of their shape's outline as the adherence judge draws it (edgediff.bench.shapes.judge: distance from
    the border pixels' median colour above half its peak): a ring on either side of it; 0 elsewhere. The judge reads the
    shape's type from that outline's corners, so a student that draws it a pixel off turns squares and crosses into
    circles: ``distil(outline_weight=...)`` adds weight there."""
    import torch
    import torch.nn.functional as F

    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (N, 3, 4W)
    bg = border.median(dim=2).values[:, :, None, None]  # (N, 3, 1, 1)
    dist = (x - bg).square().sum(1, keepdim=True).sqrt()  # (N, 1, H, W)
    mask = (dist > 0.5 * dist.amax(dim=(2, 3), keepdim=True)).float()
    grown = F.max_pool2d(mask, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-mask, 3, stride=1, padding=1)
    return grown - shrunk  # 1 where a 3x3 neighbourhood holds both sides of the outline


def build_student(channels: int = CHANNELS, blocks: tuple[int, ...] = DECODER_BLOCKS,
                  latent_scale: float = LATENT_SCALE):
    from diffusers import AutoencoderTiny

    n = len(blocks)
    return AutoencoderTiny(encoder_block_out_channels=(channels,) * n, decoder_block_out_channels=(channels,) * n,
                           num_encoder_blocks=(1,) * n, num_decoder_blocks=tuple(blocks), latent_channels=4,
                           scaling_factor=latent_scale)


def distil(z: np.ndarray, pixels: np.ndarray, *, steps: int, batch: int, seed: int, log: dict, lr: float = 3e-3,
           channels: int = CHANNELS, blocks: tuple[int, ...] = DECODER_BLOCKS, crop: int = CROP,
           latent_scale: float = LATENT_SCALE, outline_weight: float = 0.0, progress=None):
    """The student trained on (latent, teacher pixels) pairs (module docstring); returns it in eval mode. ``crop``:
    latent cells per side of a training crop, at most the latent's side (the whole latent). ``progress(step,
    student)``, if given, is called every 1000 steps (e.g. to judge a held-out sample as training goes)."""
    import torch

    from .train import warmup_cosine

    torch.manual_seed(seed + 3)  # the student's initial weights
    g = torch.Generator().manual_seed(seed + 3)  # its batches
    student = build_student(channels, blocks, latent_scale)
    dec = student.decoder
    crop = min(crop, z.shape[2])
    zt, xt = torch.from_numpy(z / np.float32(latent_scale)), torch.from_numpy(pixels)  # what the runtime feeds it
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warm_max=100, floor=0.05))
    dec.train()
    t0, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, len(zt), (batch,), generator=g)
        oy, ox = (int(v) for v in torch.randint(0, zt.shape[2] - crop + 1, (2,), generator=g))
        f = xt.shape[2] // zt.shape[2]  # pixels per latent cell
        target = xt[idx]
        w = teacher_shape_weight(target)  # (B, 1, H, W)
        if outline_weight:
            w = w + outline_weight * w.amax(dim=(2, 3), keepdim=True) * teacher_outline(target)
        w = w[:, :, f * oy:f * (oy + crop), f * ox:f * (ox + crop)]  # (B, 1, 4c, 4c)
        target = target[:, :, f * oy:f * (oy + crop), f * ox:f * (ox + crop)]
        err = dec(zt[idx][:, :, oy:oy + crop, ox:ox + crop]) - target
        loss = (w * (err.abs() + err.square())).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 200 == 0 or step == steps - 1:
            print(f"tiny decoder step {step}: loss {np.mean(losses[-200:]):.4f} ({time.time() - t0:.0f} s)", flush=True)
        if progress is not None and (step + 1) % 1000 == 0:
            dec.eval()
            progress(step + 1, student)
            dec.train()
    student.eval().requires_grad_(False)
    log["distil"] = {"steps": steps, "batch": batch, "lr": lr, "crop": crop, "pool": len(z),
                     "outline_weight": outline_weight, "seconds": time.time() - t0,
                     "loss": [float(np.mean(losses[i:i + 200])) for i in range(0, steps, 200)]}
    return student


def add_to_bundle(bundle: Path, taesd: Path, out: Path, *, overwrite: bool = False, opset: int | None = None) -> Path:
    """A copy of ``bundle`` with ``taesd``'s decoder exported as ``vae_decoder_tiny`` (its graph, config and parity
    receipt against diffusers' AutoencoderTiny.decode), every other file and manifest entry as they were; the
    manifest's transforms record the step. ``out`` may be ``bundle`` itself with ``overwrite`` (staged, then
    swapped in)."""
    import diffusers
    import torch
    from diffusers import AutoencoderTiny

    from edgediff.bundle import layout
    from edgediff.bundle.describe import component_entry, other_files
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import staged_bundle, write_manifest
    from edgediff.errors import ExportError, ParityError
    from edgediff.export.components import Geometry
    from edgediff.export.components_tiny_vae import TINY_FOLDER, tiny_factors, tiny_vae_rows
    from edgediff.export.parity import receipt_for, reference_outputs
    from edgediff.export.pipeline_export import MIN_OPSET, _export_graph, _jsonable
    from edgediff.tiny_vae import TINY_DECODER

    src = Bundle.open(bundle)
    old = src.manifest
    model = AutoencoderTiny.from_pretrained(taesd, local_files_only=True, torch_dtype=torch.float32).eval()
    model.requires_grad_(False)
    cfg = dict(model.config)
    if cfg["latent_channels"] != old.latent_channels or tiny_factors(cfg)[0] != old.vae_scale_factor:
        raise ExportError(f"{taesd} does not fit {bundle}: {cfg['latent_channels']} latent channels and "
                          f"{tiny_factors(cfg)[0]} pixels per cell, the bundle {old.latent_channels} and "
                          f"{old.vae_scale_factor}")
    spec = tiny_vae_rows()[TINY_DECODER]
    loaded = {TINY_FOLDER: model}
    h, w = old.default_height // old.vae_scale_factor, old.default_width // old.vae_scale_factor
    trace, check = Geometry(2, h, w, old.text_max_length), Geometry(1, h, max(1, w - 4), old.text_max_length)
    with staged_bundle(Path(out), overwrite) as tmp:
        shutil.copytree(src.root, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        shutil.rmtree(tmp / TINY_DECODER, ignore_errors=True)
        (tmp / TINY_DECODER).mkdir()
        module = spec.wrap(loaded).eval()
        path = tmp / layout.graph_path(TINY_DECODER)
        _export_graph(module, spec.inputs(loaded, trace, torch.Generator().manual_seed(0)), spec, path,
                      opset or MIN_OPSET)
        check_inputs = spec.inputs(loaded, check, torch.Generator().manual_seed(1))
        receipt = receipt_for(path, reference_outputs(module, check_inputs), check_inputs, spec.input_names,
                              reference=f"torch {torch.__version__} / diffusers {diffusers.__version__} "
                                        "AutoencoderTiny")
        if not receipt.passed:
            raise ParityError(f"{TINY_DECODER}: ONNX Runtime differs from PyTorch by max_rel {receipt.max_rel:.2e}; "
                              "nothing was written")
        (tmp / layout.config_path(TINY_DECODER)).write_text(
            json.dumps(_jsonable(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        comps = {**old.components, TINY_DECODER: component_entry(tmp, TINY_DECODER, parity=receipt)}
        step = f"vae_decoder_tiny distilled from vae_decoder (export/recipes/shapes/tiny_decoder.py, {taesd.name})"
        transforms = tuple(t for t in old.provenance.transforms if not t.startswith("vae_decoder_tiny")) + (step,)
        manifest = dataclasses.replace(old, components=comps, files=other_files(tmp, comps),
                                       provenance=dataclasses.replace(old.provenance, transforms=transforms))
        write_manifest(tmp, manifest)
    problems = Bundle.open(out).verify()
    if problems:
        raise ExportError(f"{out}: {problems[0]}")
    return Path(out)


def _blocks(text: str) -> tuple[int, ...]:
    """``--blocks 2,2,0`` -> (2, 2, 0): one count per stage, at least 2 stages (one upsampling each but the last)."""
    try:
        blocks = tuple(int(v) for v in text.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) < 2 or min(blocks) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected counts >= 0 per stage, e.g. 2,2,0")
    return blocks


def main(argv=None) -> None:
    from edgediff.builtin_model import default_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="The shapes bundle (default: the built-in model).")
    ap.add_argument("--out", type=Path, required=True, help="Where the AutoencoderTiny folder is saved.")
    ap.add_argument("--bundle-out", type=Path, default=None, help="Also write the bundle with vae_decoder_tiny here.")
    ap.add_argument("--overwrite", action="store_true", help="Replace --bundle-out if it exists.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=STEPS, help="distillation steps (fixed: never a time budget)")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    ap.add_argument("--channels", type=int, default=CHANNELS, help="the student's width (every stage)")
    ap.add_argument("--blocks", type=_blocks, default=DECODER_BLOCKS,
                    help="AutoencoderTinyBlocks per decoder stage, comma-separated (default %(default)s)")
    ap.add_argument("--latent-scale", type=float, default=LATENT_SCALE,
                    help="the student reads latents / this (its scaling_factor; see LATENT_SCALE)")
    ap.add_argument("--crop", type=int, default=CROP, help="latent cells per side of a training crop (16: whole)")
    ap.add_argument("--outline-weight", type=float, default=OUTLINE_WEIGHT,
                    help="extra loss weight on the shape's outline, times the image's shape weight (0: none)")
    ap.add_argument("--scenes", type=int, default=1024, help="ground-truth scenes whose encoder latents are used")
    ap.add_argument("--generated", type=int, default=GENERATED, help="the model's own generated latents")
    ap.add_argument("--generated-heldout", type=int, default=GENERATED_HELDOUT,
                    help="the model's own generated latents for held-out colour/shape pairs' prompts")
    ap.add_argument("--generated-repeat", type=int, default=GENERATED_REPEAT,
                    help="how many times each generated latent is in the pool batches are drawn from")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads, and ONNX Runtime's unless --teacher-threads (the weights depend on "
                         "both). 1 by default: on this machine's 2 shared cores a 2-thread step took 1.5-2.3 s "
                         "against 0.1-0.26 s with 1")
    ap.add_argument("--teacher-threads", type=int, default=None,
                    help="ONNX Runtime's threads for the teacher data (default: --threads)")
    a = ap.parse_args(argv)
    if a.latent_scale <= 0 or a.crop < 1 or a.generated_repeat < 1 or a.outline_weight < 0 or a.generated_heldout < 0:
        ap.error(f"--latent-scale {a.latent_scale}, --crop {a.crop} and --generated-repeat {a.generated_repeat} "
                 f"must be positive, --outline-weight {a.outline_weight} and --generated-heldout "
                 f"{a.generated_heldout} at least 0")
    if a.threads < 1 or (a.teacher_threads is not None and a.teacher_threads < 0):
        ap.error(f"--threads {a.threads} must be at least 1, --teacher-threads {a.teacher_threads} at least 0 "
                 "(0: ONNX Runtime's own choice)")
    import torch

    torch.set_num_threads(a.threads)
    bundle = a.bundle or default_bundle()
    teacher_threads = a.threads if a.teacher_threads is None else a.teacher_threads
    log: dict = {"seed": a.seed, "threads": a.threads, "teacher_threads": teacher_threads, "channels": a.channels,
                 "decoder_blocks": list(a.blocks), "latent_scale": a.latent_scale,
                 "generated_repeat": a.generated_repeat, "outline_weight": a.outline_weight}
    t0 = time.time()
    z, pixels = teacher_data(bundle, a.seed, a.scenes, a.generated, log, threads=teacher_threads,
                             generated_heldout=a.generated_heldout)
    # the generated latents (after the scenes' in teacher_data's order) repeated: they are what the student decodes
    z = np.concatenate([z] + [z[a.scenes:]] * (a.generated_repeat - 1))
    pixels = np.concatenate([pixels] + [pixels[a.scenes:]] * (a.generated_repeat - 1))
    student = distil(z, pixels, steps=a.steps, batch=a.batch, seed=a.seed, log=log, lr=a.lr, channels=a.channels,
                     blocks=a.blocks, crop=a.crop, latent_scale=a.latent_scale, outline_weight=a.outline_weight)
    shutil.rmtree(a.out, ignore_errors=True)
    student.save_pretrained(a.out, safe_serialization=True)
    log["minutes_total"] = (time.time() - t0) / 60
    (a.out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"saved {a.out} after {log['minutes_total']:.1f} min", flush=True)
    if a.bundle_out is not None:
        add_to_bundle(bundle, a.out, a.bundle_out, overwrite=a.overwrite)
        print(f"wrote {a.bundle_out} with vae_decoder_tiny", flush=True)


if __name__ == "__main__":
    main()
