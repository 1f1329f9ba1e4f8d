"""The ``edgediff`` command line. Subcommands import heavy modules inside their functions so that
``edgediff --help`` stays instant; every ``EdgediffError`` becomes one red line and a non-zero exit."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ._version import __version__
from .cli_types import SIZE, STEPS
from .errors import EdgediffError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgediffError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError:  # `edgediff inspect B | head`: the reader left; nothing to report
            sys.stderr.close()
            sys.exit(141)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="red", err=True)
            sys.exit(130)
        except MemoryError:
            click.secho("error: out of memory; try --low-memory, a smaller --size or fewer images", fg="red", err=True)
            sys.exit(1)
        except click.UsageError as exc:  # a bad option value: one line too, with where to look
            where = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "edgediff --help"
            click.secho(f"error: {exc.format_message()} (see {where})", fg="red", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug of ours: one line, the traceback only on request
            if os.environ.get("EDGEDIFF_DEBUG"):
                raise
            click.secho(f"internal error: {type(exc).__name__}: {exc} (set EDGEDIFF_DEBUG=1 for the traceback)",
                        fg="red", err=True)
            sys.exit(70)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgediff")
def main() -> None:
    """Run Stable Diffusion-family text-to-image models without PyTorch."""


# -- export -----------------------------------------------------------------------------------------------------
@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--opset", default=17, show_default=True, help="ONNX opset (17 or newer).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an existing bundle.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle (.bin/.ckpt) weights. Only for sources you trust.")
@click.option("--default-steps", type=int, default=None,
              help="Record the step count this model should run with when a call names none.")
@click.option("--default-guidance", type=float, default=None,
              help="Record the guidance scale this model should run with when a call names none.")
@click.option("--tiny-vae", type=click.Path(path_type=Path), default=None,
              help="A diffusers AutoencoderTiny folder (TAESD): also export it, for generate --decoder tiny.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:WEIGHT]",
              help="Fuse a LoRA .safetensors into the models before export, weight default 1 (repeatable).")
@click.option("--max-sequence-length", "max_sequence_length", type=int, default=None,
              help="SD3/FLUX: the longest T5 prompt (tokens) the bundle takes, 1-512 (default SD3 256, FLUX 512).")
@click.option("--controlnet", "controlnets", multiple=True, metavar="DIR[:NAME]",
              help="A diffusers ControlNetModel folder to export too, named NAME (default: the folder's name); "
                   "repeatable. Adds the UNet that takes ControlNet residuals (generate --control-image).")
@click.option("--deepcache", default=None, metavar="B[,B]",
              help="Also export DeepCache's full and shallow UNet graphs for these branch ids (0: fastest), for "
                   "generate --cache-interval N --cache-branch B.")
def export(src: Path, out: Path, opset: int, overwrite: bool, allow_pickle: bool, default_steps, default_guidance,
           tiny_vae, loras, controlnets, deepcache, max_sequence_length) -> None:
    """Export a diffusers pipeline folder SRC to an ONNX bundle OUT (needs the [export] extra)."""
    from .bundle.manifest import GenerationDefaults
    from .errors import BundleError, InputError

    try:
        defaults = GenerationDefaults(steps=default_steps, guidance_scale=default_guidance)
    except BundleError as exc:  # checked before minutes of export
        raise InputError(str(exc).replace("defaults.steps", "--default-steps")
                         .replace("defaults.guidance_scale", "--default-guidance")) from None
    try:
        from .export.pipeline_export import export_pipeline
    except ImportError as exc:  # edgediff.export is installed with the package; torch may not be
        from .errors import missing

        raise missing(exc.name or "torch", "export", "edgediff export") from None

    def progress(stage: str, component: str, seconds: float) -> None:
        click.echo(f"  {stage:<7} {component:<13} {seconds:7.2f} s", err=True)

    from .lora import parse_lora_option

    click.echo(f"exporting {src} -> {out}", err=True)
    export_pipeline(src, out, opset=opset, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress,
                    defaults=defaults, tiny_vae=tiny_vae, loras=[parse_lora_option(t) for t in loras],
                    controlnets=[_controlnet_option(t) for t in controlnets], deepcache=deepcache,
                    max_sequence_length=max_sequence_length)
    click.echo(f"wrote {out}")


# -- inspect ----------------------------------------------------------------------------------------------------
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check every file's size and sha256 against the manifest.")
def inspect(bundle: Path, verify: bool) -> None:
    """Show a bundle's components, I/O signatures, precisions, sizes and parity receipts."""
    from .bundle.reader import Bundle
    from .bundle.summary import summary_lines
    from .errors import BundleIntegrityError

    b = Bundle.open(bundle)
    for line in summary_lines(b):
        click.echo(line)
    if verify:
        problems = b.verify()
        click.echo("")
        if problems:
            for p in problems:
                click.secho(f"FAIL {p}", fg="red", err=True)
            raise BundleIntegrityError(f"{len(problems)} file(s) of {b.root} do not match the manifest: {problems[0]}")
        n = len(b.manifest.all_files())
        click.secho(f"verified: all {n} files match their sha256", fg="green")

# -- optimize / quantize ----------------------------------------------------------------------------------------
def _engine_progress(msg: str) -> None:
    click.echo(f"  {msg}", err=True)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True, help="cpu, cuda or tensorrt.")
@click.option("--static", "static", default=None, help="IMAGESxHEIGHTxWIDTH, e.g. 1x512x512: fix shapes.")
@click.option("--no-cfg", is_flag=True, help="With --static: the denoiser batch is IMAGES, not 2 x IMAGES.")
@click.option("--size", type=SIZE, default=None,
              help="WIDTHxHEIGHT to check parity at (default: the model's native size); graphs stay dynamic.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an existing bundle.")
def optimize(bundle: Path, out: Path, target: str, static: str | None, no_cfg: bool, size, overwrite: bool) -> None:
    """Fuse and pre-optimize BUNDLE's graphs for a target (and optionally fix shapes) into a new bundle OUT."""
    from .engines.optimize import optimize_bundle, parse_static

    spec = parse_static(static, cfg=not no_cfg) if static is not None else None
    height, width = size or (None, None)
    click.echo(f"optimizing {bundle} -> {out} (target {target}{', static ' + str(spec) if spec else ''})", err=True)
    optimize_bundle(bundle, out, target=target, static=spec, overwrite=overwrite, height=height, width=width,
                    progress=_engine_progress)
    click.echo(f"wrote {out}")


def _one_precision(ctx: click.Context, param: click.Parameter, value):
    """Each precision flag has its own name and this callback fills the command's ``mode``: flags sharing one
    name are a click feature switch, which silently keeps the last one given (`--int8 --fp16` made fp16)."""
    first = ctx.meta.get("edgediff.precision_flag")
    if value is not None and first is not None and first != param.opts[0]:
        from .errors import InputError

        raise InputError(f"{first} and {param.opts[0]} are exclusive: a bundle has one precision; choose one")
    if value is not None:
        ctx.meta["edgediff.precision_flag"] = param.opts[0]
        ctx.params["mode"] = value
    else:
        ctx.params.setdefault("mode", None)
    return value


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--fp16", "fp16_flag", flag_value="fp16", expose_value=False,
              callback=_one_precision, help="Mixed fp16 (overflowing nodes stay fp32).")
@click.option("--int8", "int8_flag", flag_value="int8", expose_value=False,
              callback=_one_precision, help="Static INT8 Q/DQ (TensorRT layout), calibrated.")
@click.option("--int8-weights", "int8_weights_flag", flag_value="int8-weights", expose_value=False,
              callback=_one_precision, help="Dynamic INT8 (weights only stored INT8).")
@click.option("--fp8", "fp8_flag", flag_value="fp8", expose_value=False,
              callback=_one_precision, help="FP8 E4M3 Q/DQ for Ada/Hopper TensorRT, calibrated.")
@click.option("--int4-weights", "int4_weights_flag", flag_value="int4-weights", expose_value=False,
              callback=_one_precision, help="Block-wise INT4 MatMul weights.")
@click.option("--int8-storage", "int8_storage_flag", flag_value="int8-storage", expose_value=False,
              callback=_one_precision,
              help="Weights stored INT8, dequantized per node at run time (fp32 math; low memory; after optimize).")
@click.option("--components", default=None,
              help="Comma-separated (default: the denoiser and any DeepCache graphs; every component for --fp16).")
@click.option("--calib-prompts", type=click.Path(path_type=Path), default=None, help="Prompt file, one per line.")
@click.option("--calib-size", type=int, default=None, help="Number of calibration prompts (default: all given).")
@click.option("--steps", type=int, default=None, help="Step count to calibrate for (default: the bundle's).")
@click.option("--size", type=SIZE, default=None, help="WIDTHxHEIGHT to calibrate at (default: the model's native size).")
@click.option("--tolerance", type=float, default=None, help="Accept a larger parity error than the precision's default.")
@click.option("--target", default="tensorrt", show_default=True,
              help="--int8 for tensorrt, or cpu: attention projections stay float so optimize --target cpu fuses them.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an existing bundle.")
def quantize(bundle: Path, out: Path, mode: str | None, components: str | None, calib_prompts: Path | None,
             calib_size: int | None, steps: int | None, size: str | None, tolerance: float | None, target: str,
             overwrite: bool) -> None:
    """Write a reduced-precision copy of BUNDLE to OUT; calibrated on real pipeline runs, parity-checked."""
    from .engines.quantize import MODES, quantize_bundle
    from .errors import InputError

    if mode is None:
        raise InputError(f"choose a precision: {' | '.join('--' + m for m in MODES)}")
    height, width = size or (None, None)
    names = [c.strip() for c in components.split(",") if c.strip()] if components else None
    click.echo(f"quantizing {bundle} -> {out} ({mode})", err=True)
    quantize_bundle(bundle, out, mode=mode, components=names, calib_prompts=calib_prompts, calib_size=calib_size,
                    steps=steps, height=height, width=width, overwrite=overwrite, tolerance=tolerance,
                    target=target, progress=_engine_progress)
    click.echo(f"wrote {out}")


# -- build / doctor -------------------------------------------------------------------------------------------
@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--engine-dir", type=click.Path(path_type=Path), default=None,
              help="Where engines are cached (default: ~/.cache/edgediff/engines/<bundle digest>).")
@click.option("--static", "static", default=None, help="IMAGESxHEIGHTxWIDTH: one fixed shape (enables CUDA graphs).")
@click.option("--profile", default=None, help="images=1:1:4,height=256:512:768,width=256:512:768 (min:opt:max).")
@click.option("--no-cfg", is_flag=True, help="The denoiser never runs with classifier-free guidance.")
@click.option("--opt-level", type=int, default=3, show_default=True, help="TensorRT builder optimization level 0-5.")
@click.option("--workspace", type=float, default=None, help="Builder workspace limit in GB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="Timing cache file to reuse.")
@click.option("--refit", is_flag=True, help="Build refittable engines.")
@click.option("--version-compatible", is_flag=True, help="Engines that load on later TensorRT versions.")
@click.option("--components", default=None,
              help="Comma-separated (default: the text encoders, the denoiser, vae_decoder and any DeepCache graphs).")
@click.option("--force", is_flag=True, help="Rebuild even when a valid engine is cached.")
def build(bundle, engine_dir, static, profile, no_cfg, opt_level, workspace, timing_cache, refit, version_compatible,
          components, force) -> None:
    """Build TensorRT engines for BUNDLE on this GPU (needs TensorRT and an NVIDIA GPU)."""
    from .bundle.reader import Bundle
    from .engines.tensorrt.build import BuildOptions, build_engines
    from .engines.tensorrt.profiles import shape_range_for

    shape_range = shape_range_for(Bundle.open(bundle), static=static, profile=profile, cfg=not no_cfg)
    options = BuildOptions(shape_range=shape_range, opt_level=opt_level, workspace_gb=workspace,
                           timing_cache=timing_cache, refit=refit, version_compatible=version_compatible)
    names = [c.strip() for c in components.split(",") if c.strip()] if components else None
    built = build_engines(bundle, options, engine_dir=engine_dir, components=names, force=force,
                          progress=_engine_progress)
    for name, path in built.items():
        click.echo(f"{name:<13} {path}")


@main.command()
@click.option("--engine-dir", "engine_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Engine cache folder(s) to check (default: every folder under ~/.cache/edgediff/engines).")
def doctor(engine_dirs) -> None:
    """What this machine can run: Python, ONNX Runtime providers, TensorRT, CUDA, GPU, cached engines."""
    from .engines.doctor import report
    from .backends.tensorrt.cache import default_engine_dir

    dirs = list(engine_dirs)
    if not dirs:
        root = default_engine_dir("0" * 16).parent
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for item, finding, ok in report(dirs):
        click.echo(f"{'ok ' if ok else '-- '} {item:<22} {finding}")


# -- generate ---------------------------------------------------------------------------------------------------
@main.command()
@click.argument("prompt")
@click.option("-m", "--model", "model", type=click.Path(path_type=Path), default=None,
              help="Bundle folder (default: the built-in model).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True,
              help="PNG path; several images are written as NAME-0.png, NAME-1.png, ...")
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--steps", type=int, default=None,
              help="Denoising steps (default: the bundle's recommended count, else 25).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale; <= 1 turns it off (default: the bundle's, else 7.5).")
@click.option("--scheduler", default=None, help="pndm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm, unipc; "
              "flow_euler, flow_heun for SD3/FLUX bundles.")
@click.option("--seed", type=int, default=None, help="Seed of the first image (image k uses seed+k).")
@click.option("--size", type=SIZE, default=None, help="WIDTHxHEIGHT (default: the model's native size).")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--init-image", type=click.Path(path_type=Path), default=None, help="img2img: the image to start from.")
@click.option("--strength", type=float, default=None,
              help="img2img/inpainting: how much to change it, (0, 1] (default 0.8, FLUX 0.6; with --mask 1.0, "
                   "SDXL 0.9999).")
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="Inpainting: with --init-image, an image of its size; white is repainted, black kept.")
@click.option("--padding-mask-crop", type=int, default=None,
              help="Inpainting: work on the mask's box grown by this many pixels, then paste it back.")
@click.option("--backend", default="cpu", show_default=True, help="cpu, cuda or tensorrt (ONNX Runtime providers).")
@click.option("--rng", default="numpy", show_default=True, help="numpy, or torch to reproduce diffusers' CPU-generator latents.")
@click.option("--low-memory", is_flag=True, help="Keep one component loaded at a time.")
@click.option("--lora", "lora", multiple=True, metavar="FILE[:WEIGHT]",
              help="A LoRA .safetensors applied without re-export, weight default 1 (repeatable; to the base model).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--prompt-2", default=None,
              help="SDXL: the prompt for the second text encoder; FLUX: for T5 (default: PROMPT).")
@click.option("--negative-2", default=None, help="SDXL: the negative prompt for the second text encoder.")
@click.option("--prompt-3", default=None, help="SD3: the prompt for T5 (text_encoder_3; default: PROMPT).")
@click.option("--negative-3", default=None, help="SD3: the negative prompt for T5.")
@click.option("--max-sequence-length", type=int, default=None,
              help="SD3/FLUX: T5's token count (default SD3: the bundle's limit; FLUX: schnell 256, dev 512).")
@click.option("--refiner", type=click.Path(path_type=Path), default=None,
              help="SDXL: a refiner bundle that finishes the schedule from --refiner-start (ensemble of experts).")
@click.option("--refiner-start", type=float, default=0.8, show_default=True,
              help="With --refiner: the fraction of the schedule the base runs before handing on.")
@click.option("--cfg-cutoff", type=float, default=None,
              help="Stop classifier-free guidance after this fraction of the steps, [0, 1] (faster; default: never).")
@click.option("--decoder", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="tiny: the bundle's tiny autoencoder (export --tiny-vae), much faster, lower quality.")
@click.option("--vae-tiling/--no-vae-tiling", default=None,
              help="Decode (and encode) the VAE in overlapping tiles (default: only when it would not fit in memory).")
@click.option("--vae-tile-size", type=int, default=None, metavar="PIXELS",
              help="Tiled VAE's tile side in pixels, a multiple of the VAE factor (default: the VAE's sample_size, "
                   "as diffusers); smaller tiles need less memory, e.g. 256 for SD 1.5 at 1024x1024.")
@click.option("--preset", default=None, metavar="NAME",
              help="Set scheduler, steps and guidance together; --scheduler/--steps/--guidance still override. "
                   "lcm: scheduler lcm on the bundle's training schedule, 4 steps, guidance 1.0 (no CFG branch), "
                   "for an SD 1.5/SDXL bundle with an LCM-LoRA (e.g. --lora lcm-lora.safetensors --preset lcm).")
@click.option("--control-image", "control_images", multiple=True, type=click.Path(path_type=Path),
              help="ControlNet: the control image (edges, pose, depth...), one per --controlnet (repeatable).")
@click.option("--controlnet", "controlnet_names", multiple=True, metavar="NAME",
              help="ControlNet: which of the bundle's ControlNets (export --controlnet) takes the control image at "
                   "the same position (repeatable; default: the bundle's only one).")
@click.option("--control-scale", "control_scales", multiple=True, type=float,
              help="ControlNet: conditioning scale, one for all or one per ControlNet (default 1.0).")
@click.option("--control-start", "control_starts", multiple=True, type=float,
              help="ControlNet: fraction of the steps where it starts acting, [0, 1) (default 0).")
@click.option("--control-end", "control_ends", multiple=True, type=float,
              help="ControlNet: fraction of the steps where it stops acting, (0, 1] (default 1).")
@click.option("--guess-mode", is_flag=True, default=None,
              help="ControlNet guess mode: control on the conditional branch only, residuals scaled 0.1 -> 1.")
@click.option("--cache-interval", type=int, default=None,
              help="DeepCache: run the full UNet every N-th step and the cheaper shallow one between (N >= 1; the "
                   "bundle needs export --deepcache).")
@click.option("--cache-branch", type=int, default=None,
              help="DeepCache: which exported branch's feature is cached (default 0, the fastest).")
@click.option("--cache-schedule", default=None, metavar="uniform|quadratic",
              help="DeepCache: where the full steps go: uniform (every N-th, default) or quadratic (the paper's "
                   "non-uniform one: as many full steps, crowded around --cache-center by the power --cache-pow).")
@click.option("--cache-center", type=int, default=None,
              help="DeepCache quadratic schedule: the step the full steps crowd around (default floor(0.3 x steps)).")
@click.option("--cache-pow", type=float, default=None,
              help="DeepCache quadratic schedule: the power law's exponent, > 1 (default 1.2, the reference's).")
def generate(prompt, model, output, negative, steps, guidance, scheduler, seed, size, num_images, init_image, strength,
             backend, rng, low_memory, lora, overwrite, prompt_2, negative_2, prompt_3, negative_3, max_sequence_length,
             refiner, refiner_start, cfg_cutoff, decoder, vae_tiling, vae_tile_size, mask, padding_mask_crop, preset, control_images, controlnet_names, control_scales,
             control_starts, control_ends, guess_mode, cache_interval, cache_branch, cache_schedule, cache_center,
             cache_pow) -> None:
    """Generate images from PROMPT."""
    from .outputs import check_writable, image_paths, png_bytes, write_all
    from .pipeline import Pipeline

    height, width = size or (None, None)
    if preset is not None and refiner is not None:  # the refiner would run its own scheduler and guidance
        from .errors import InputError

        raise InputError("--preset does not combine with --refiner; give --scheduler/--steps/--guidance instead")
    paths = image_paths(output, num_images)  # the count is bounded before anything else
    check_writable(paths, overwrite)
    from .lora import parse_lora_option

    pipe = Pipeline.load(model if model is not None else _default_bundle(), backend=backend, scheduler=scheduler,
                         low_memory=low_memory, loras=[parse_lora_option(t) for t in lora])
    family = {k: v for k, v in (("prompt_2", prompt_2), ("negative_prompt_2", negative_2), ("prompt_3", prompt_3),
                                ("negative_prompt_3", negative_3), ("max_sequence_length", max_sequence_length))
              if v is not None}
    handoff = dict(denoising_end=refiner_start, output_type="latent") if refiner is not None else {}
    decode = dict(decoder=decoder, vae_tiling=vae_tiling, vae_tile_size=vae_tile_size)  # applies to the model that decodes (the refiner, if any)
    request = pipe.request(prompt, negative, num_inference_steps=steps, guidance_scale=guidance, height=height,
                           width=width, num_images_per_prompt=num_images, seed=seed, rng=rng, image=init_image,
                           mask_image=mask, padding_mask_crop=padding_mask_crop, strength=strength,
                           cfg_cutoff=cfg_cutoff, preset=preset, scheduler=scheduler, cache_interval=cache_interval,
                           cache_branch=cache_branch, cache_schedule=cache_schedule, cache_center=cache_center,
                           cache_pow=cache_pow, **({} if refiner is not None else decode), **handoff,
                           **family, **_control_options(control_images, controlnet_names, control_scales,
                                                        control_starts, control_ends, guess_mode))
    second = None
    if refiner is not None:  # the refiner's half of the call is checked whole before the base runs
        import numpy as np

        m = pipe.bundle.manifest
        second = Pipeline.load(refiner, backend=backend, scheduler=scheduler, low_memory=low_memory)
        latents = np.zeros((1, m.latent_channels, request.height // m.vae_scale_factor,
                            request.width // m.vae_scale_factor), np.float32)  # the shape the base will hand on
        second.request(prompt, negative, num_inference_steps=request.steps, guidance_scale=guidance,
                       num_images_per_prompt=num_images, image=latents, denoising_start=refiner_start,
                       cfg_cutoff=cfg_cutoff, **decode)
    # an uncompressed RGB image bounds its PNG: refuse a disk without room for all of them before the work
    check_writable(paths, overwrite, expected_bytes=request.height * request.width * 3 + 65536)
    with click.progressbar(length=request.steps, label="denoising", file=sys.stderr) as bar:
        def on_step(i: int, total: int, t: float, latents) -> None:
            bar.length = total
            bar.update(1)

        result = pipe.generate(request, callback=on_step)
        if second is not None:
            # the refiner continues the same schedule (steps, seeds) from the base's latents
            result = second(prompt, negative, num_inference_steps=request.steps, guidance_scale=guidance,
                            num_images_per_prompt=num_images, seed=list(result.seeds), rng=rng,
                            image=result.latents, denoising_start=refiner_start, callback=on_step,
                            cfg_cutoff=cfg_cutoff, **decode)
    datas = [png_bytes(image, result.image_parameters(k, prompt=prompt, rng=rng, backend=backend))
             for k, image in enumerate(result.images)]
    write_all(paths, datas, overwrite=overwrite)
    for k, path in enumerate(paths):
        click.echo(f"wrote {path}  (seed {result.seeds[k]})")
    t = result.timings
    click.echo(f"{t.get('total', 0):.2f} s  (text {t.get('text_encoder', 0):.2f} s, denoise {t.get('step', 0):.2f} s, "
               f"decode {t.get('vae_decode', 0):.2f} s)", err=True)


def _controlnet_option(text: str):
    from .export.components_controlnet import parse_option

    return parse_option(text)


def _control_options(images, names, scales, starts, ends, guess_mode) -> dict:
    """generate's ControlNet options as Pipeline keywords (only those given: a stray one is refused there)."""
    def one_or_list(values):
        return None if not values else (values[0] if len(values) == 1 else list(values))

    out = dict(control_image=one_or_list(images), controlnets=list(names) or None,
               controlnet_conditioning_scale=one_or_list(scales), control_guidance_start=one_or_list(starts),
               control_guidance_end=one_or_list(ends), guess_mode=guess_mode)
    return {k: v for k, v in out.items() if v is not None}


def _default_bundle() -> Path:
    from .builtin_model import default_bundle

    return default_bundle()

# -- bench ------------------------------------------------------------------------------------------------------
class _LazyCommand(click.Command):
    """A command defined elsewhere (``module:attribute``), imported only when it runs or its help is asked for:
    ``edgediff --help`` stays instant and the core imports no bench module until then."""

    def __init__(self, name: str, target: str, short_help: str):
        super().__init__(name, help=short_help, short_help=short_help)
        self.target = target

    def make_context(self, info_name, args, parent=None, **extra):
        import importlib

        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr).make_context(info_name, args, parent=parent, **extra)


main.add_command(_LazyCommand("bench", "edgediff.bench.cli:bench",
                              "Benchmark bundles: bench [BUNDLE], sweep, cold-start, memory-modes, ..."))
main.add_command(_LazyCommand("serve", "edgediff.serve.cli:serve",
                              "Serve models over HTTP: OpenAI Images API, A1111 shim, continuous batching."))

# -- eval-default -----------------------------------------------------------------------------------------------
@main.command("eval-default")
@click.option("-m", "--model", "model", type=click.Path(path_type=Path), default=None,
              help="A shapes bundle (default: the built-in model).")
@click.option("--n", type=int, default=200, show_default=True, help="Prompts per split.")
@click.option("--split", type=click.Choice(["heldout", "train", "both"]), default="both", show_default=True)
@click.option("--steps", type=STEPS, default=None, help="Default: the bundle's recommended count, else 25.")
@click.option("--guidance", type=float, default=None, help="Default: the bundle's recommended scale, else 5.0.")
@click.option("--scheduler", default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", default="cpu", show_default=True)
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Another bundle (e.g. the fp32 parent): also report mean PSNR against its images, same seeds.")
@click.option("--autoencode", is_flag=True,
              help="Judge the VAE round trip of the ground-truth images of the same scenes instead of generations: "
                   "the ceiling of any denoiser through this bundle's VAE (PSNR is against the ground truth).")
@click.option("--decoder", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="Speed option to judge: tiny = the bundle's tiny decoder (--reference MODEL: PSNR vs the plain run).")
@click.option("--cfg-cutoff", type=float, default=None, help="Speed option to judge: stop guidance after this fraction.")
@click.option("--vae-tiling", is_flag=True, help="Speed option to judge: tiled VAE decode.")
@click.option("--cache-interval", type=click.IntRange(min=1), default=None,
              help="Speed option to judge: DeepCache, the full UNet every N-th step.")
@click.option("--cache-branch", type=click.IntRange(min=0), default=None, help="DeepCache's cached block.")
@click.option("--cache-schedule", default=None, metavar="uniform|quadratic",
              help="DeepCache's full steps: uniform (default) or quadratic (the paper's non-uniform one).")
@click.option("--cache-center", type=int, default=None, help="DeepCache quadratic: the centre step.")
@click.option("--cache-pow", type=float, default=None, help="DeepCache quadratic: the exponent (> 1).")
def eval_default(model, n, split, steps, guidance, scheduler, seed, backend, reference, autoencode, decoder,
                 cfg_cutoff, vae_tiling, cache_interval, cache_branch, cache_schedule, cache_center, cache_pow) -> None:
    """Prompt adherence of the built-in shapes model, judged from pixels: per-attribute and all-correct accuracy.
    With a speed option (--decoder tiny, --cfg-cutoff, --vae-tiling, --cache-interval) every image is made with it;
    the adherence it loses is this table's all-correct column against a run without it (same seeds)."""
    from .bench.shapes.evaluate import EvalSettings, check_options, report_lines
    from .errors import InputError
    from .pipeline import Pipeline

    if n < 1:
        raise InputError(f"--n {n}; must be at least 1")
    if autoencode and reference is not None:
        raise InputError("--autoencode compares with the ground truth; drop --reference")
    options = tuple((k, v) for k, v in (("decoder", decoder), ("cfg_cutoff", cfg_cutoff),
                                        ("vae_tiling", vae_tiling or None), ("cache_interval", cache_interval),
                                        ("cache_branch", cache_branch), ("cache_schedule", cache_schedule),
                                        ("cache_center", cache_center), ("cache_pow", cache_pow))
                    if v is not None and v != "full")
    if autoencode and options:
        raise InputError("--autoencode judges the VAE round trip of ground-truth images; drop the speed options")
    pipe = Pipeline.load(model if model is not None else _default_bundle(), backend=backend)
    recommended = pipe.bundle.manifest.defaults
    settings = EvalSettings(n=n, steps=steps if steps is not None else pipe.default_steps, guidance=(
        guidance if guidance is not None else recommended.guidance_scale if recommended.guidance_scale is not None
        else EvalSettings.guidance), scheduler=scheduler, seed=seed, options=options)
    check_options(pipe, settings)  # a bad option is one line before the table starts
    ref = Pipeline.load(reference, backend=backend) if reference is not None else None
    for line in report_lines(pipe, ["train", "heldout"] if split == "both" else [split], settings, reference=ref,
                             autoencode=autoencode):
        click.echo(line)


if __name__ == "__main__":
    main()
