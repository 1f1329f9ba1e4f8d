"""``edgediff bench``: a click group, parsing and printing only. ``edgediff bench [BUNDLE]`` measures one
configuration (the ``run`` command); ``sweep``, ``cold-start``, ``memory-modes`` and ``session-levels`` are its other
commands. Every option is parsed by the CLI's shared types (``edgediff.cli_types``); the measuring modules are
imported inside the commands, so that ``edgediff bench --help`` stays quick."""
from __future__ import annotations

from pathlib import Path

import click

from edgediff.cli_types import NAMES, POSITIVE_INT, SIZE, STEPS, ListType

from .memory_modes import MODES  # a table (stdlib imports only): the --modes choices

COMPARE_ORDERS = ("auto", "alternate", "sequential")  # --compare-order: how bench/compare.py runs ours and theirs

DEFAULT_COMMAND = "run"


class BenchGroup(click.Group):
    """A group whose first argument may be a bundle instead of a command: ``edgediff bench [BUNDLE] [OPTIONS]`` is
    ``edgediff bench run [BUNDLE] [OPTIONS]`` (a bundle folder named like a command is given as ``./NAME``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


class One(click.ParamType):
    """A single value of ``item``. A comma list is refused with the command that takes lists, instead of being
    read as something else."""

    def __init__(self, item: click.ParamType):
        self.item = item
        self.name = item.name

    def convert(self, value, param, ctx):
        if isinstance(value, str) and "," in value:
            self.fail(f"{value!r} is a list; use `edgediff bench sweep` for a cartesian product", param, ctx)
        return self.item.convert(value, param, ctx)


@click.group(cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    """Measure bundles: latency per stage, throughput, memory, with the environment they ran in.

    `edgediff bench [BUNDLE] [OPTIONS]` measures one configuration (the `run` command; default bundle: the built-in
    model). `edgediff bench COMMAND --help` describes each command.
    """


def _measurement_options(f):
    """Options shared by `run` and `sweep`: how each configuration is measured and where the reports go."""
    options = [
        click.option("--guidance", type=float, default=None,
                     help="CFG scale (> 1: two UNet batches); default: the bundle's recommended one (Turbo: 0)."),
        click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
                     help="Generations before the timed ones (the first image counts as one)."),
        click.option("--runs", type=POSITIVE_INT, default=3, show_default=True, help="Timed generations."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--low-memory", is_flag=True),
        click.option("--compare", type=click.Choice(["diffusers"]), default=None,
                     help="Also run diffusers/PyTorch (separate process) and print ours/theirs ratios."),
        click.option("--reference", type=click.Path(path_type=Path), default=None,
                     help="diffusers folder for --compare (default: the source the bundle records)."),
        click.option("--compare-order", type=click.Choice(COMPARE_ORDERS), default="auto", show_default=True,
                     help="alternate ours/theirs run by run (both in memory), or sequential (ours, closed, then "
                          "theirs); auto alternates when both fit in available memory."),
        click.option("--profile-ops", type=click.IntRange(min=0), default=0,
                     help="Top-N denoiser operators from the backend's profiler."),
        click.option("--cold-start", "cold", is_flag=True,
                     help="Also measure a fresh process per configuration: imports, load, first image."),
        click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
                     help="Results as JSON (bench/schema.json)."),
        click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None),
        click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
                     help="Latency by stage as a PNG (needs the [bench] extra)."),
        click.option("--trace", "trace_path", type=click.Path(path_type=Path), default=None,
                     help="Chrome/Perfetto trace of the last generation."),
        click.option("--overwrite", is_flag=True, help="Replace report files that exist."),
        click.option("--control-image", type=click.Path(path_type=Path), default=None,
                     help="Measure with ControlNet: this control image, for the bundle's ControlNet (export "
                          "--controlnet); each step then runs the ControlNet and unet_controlnet."),
        click.option("--controlnet", "controlnets", multiple=True, metavar="NAME",
                     help="With --control-image: which ControlNet (default: the bundle's only one)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@bench.command("run")
@click.argument("bundles", nargs=-1, metavar="[BUNDLE]", type=click.Path(path_type=Path))
@click.option("--backend", type=One(click.STRING), default="cpu", show_default=True)
@click.option("--steps", type=One(STEPS), default=None, help="Default: the bundle's recommended step count.")
@click.option("--size", type=One(SIZE), default=None, help="WIDTHxHEIGHT; default: the model's native size.")
@click.option("--batch", type=One(POSITIVE_INT), default=1, show_default=True, help="Images per prompt.")
@click.option("--scheduler", type=One(click.STRING), default=None, help="Default: the bundle's scheduler.")
@_measurement_options
def run(bundles, backend, steps, size, batch, scheduler, **options) -> None:
    """Measure one configuration of BUNDLE (default: the built-in model)."""
    from edgediff.errors import InputError

    if len(bundles) > 1:
        raise InputError(f"expected at most one BUNDLE, got {len(bundles)}; compare bundles with "
                         "`edgediff bench sweep B1 B2 ...`")
    from .sweep import Axes

    _measure(bundles, Axes(backend=[backend], steps=[steps], size=[size], batch=[batch], scheduler=[scheduler]),
             **options)


@bench.command("sweep")
@click.argument("bundles", nargs=-1, metavar="[BUNDLE]...", type=click.Path(path_type=Path))
@click.option("--backend", type=NAMES, default="cpu", show_default=True, help="Backends, comma-separated.")
@click.option("--steps", type=ListType(STEPS), default=None,
              help="Step counts, e.g. 4,20; default: each bundle's recommended count.")
@click.option("--size", type=ListType(SIZE), default=None,
              help="WIDTHxHEIGHT list, e.g. 512x512,768x768; default: the model's native size.")
@click.option("--batch", type=ListType(POSITIVE_INT), default="1", show_default=True, help="Images per prompt.")
@click.option("--scheduler", type=NAMES, default=None, help="Schedulers; default: the bundle's.")
@click.option("--decoder", type=ListType(click.Choice(["full", "tiny"])), default=None,
              help="Speed lever: tiny = the bundle's tiny autoencoder (export --tiny-vae), against the full VAE.")
@click.option("--cfg-cutoff", type=ListType(click.FloatRange(0.0, 1.0)), default=None,
              help="Speed lever: stop guidance after these fractions of the steps, e.g. 0.3,0.5.")
@click.option("--vae-tiling", is_flag=True, help="Speed lever: tiled VAE decode, against the untiled one.")
@click.option("--vae-tile-size", type=ListType(POSITIVE_INT), default=None,
              help="With --vae-tiling: tile sides in pixels to measure, e.g. 256,512 (default: the VAE's own).")
@click.option("--cache-interval", type=ListType(POSITIVE_INT), default=None,
              help="Speed lever: DeepCache, the full UNet every N-th step, e.g. 2,3 (a bundle with the shallow UNet).")
@click.option("--cache-branch", type=click.IntRange(min=0), default=None,
              help="DeepCache's cached block for --cache-interval (default: the pipeline's).")
@click.option("--cache-schedule", type=click.Choice(["uniform", "quadratic"]), default=None,
              help="DeepCache's full steps for --cache-interval: uniform (default) or quadratic, the paper's "
                   "non-uniform schedule (as many full steps, crowded around --cache-center).")
@click.option("--cache-center", type=click.IntRange(min=0), default=None,
              help="With --cache-schedule quadratic: the centre step (default floor(0.3 x steps)).")
@click.option("--cache-pow", type=float, default=None,
              help="With --cache-schedule quadratic: the exponent, > 1 (default 1.2).")
@_measurement_options
def sweep(bundles, backend, steps, size, batch, scheduler, decoder, cfg_cutoff, vae_tiling, vae_tile_size,
          cache_interval, cache_branch, cache_schedule, cache_center, cache_pow, **options) -> None:
    """Measure every BUNDLE (default: the built-in model) over the cartesian product of the lists; with several
    bundles, also the ratios of each to the first.

    Speed levers (--decoder tiny, --cfg-cutoff, --vae-tiling, --cache-interval) are each measured against the plain
    run of every configuration, interleaved in the same run with the same seeds: time per image, ratios to the plain
    run, and PSNR/SSIM of each image against the plain image of its seed (docs/bench.md)."""
    from .quality import levers
    from .sweep import Axes

    lever_list = levers(decoder=decoder or (), cfg_cutoff=cfg_cutoff or (), vae_tiling=vae_tiling,
                        vae_tile_size=vae_tile_size or (), cache_interval=cache_interval or (),
                        cache_branch=cache_branch, cache_schedule=cache_schedule, cache_center=cache_center,
                        cache_pow=cache_pow)
    _measure(bundles, Axes(backend=backend, steps=steps or [None], size=size or [None], batch=batch,
                           scheduler=scheduler or [None], levers=lever_list), **options)


def _measure(bundles, axes, *, json_path, csv_path, plot_path, trace_path, overwrite, **settings) -> None:
    from . import report
    from .sweep import Settings, run as run_sweep

    if settings.get("control_image") is not None and settings.get("compare"):
        from edgediff.errors import InputError

        raise InputError("--compare does not pass --control-image to diffusers; measure the ControlNet step "
                         "cost against the plain run of the same bundle instead (docs/bench.md)")
    outputs = {"--json": json_path, "--csv": csv_path, "--plot": plot_path, "--trace": trace_path}
    report.check_writable(outputs, overwrite=overwrite)  # before the bench, which may take an hour, not after it
    result = run_sweep(_bundles_or_builtin(bundles), axes, Settings(**settings))
    if json_path:
        report.write_json(json_path, report.document(result.rows, result.environment), overwrite=overwrite)
    if csv_path:
        report.write_csv(csv_path, result.rows, overwrite=overwrite)
    if plot_path:
        report.write_plot(plot_path, result.rows, overwrite=overwrite)
    if trace_path:
        from .trace import write_trace

        write_trace(trace_path, result.spans, overwrite=overwrite)
    env = result.environment
    from .quality import table as levers_table

    click.echo(report.table(result.rows) + report.variants_table(result.rows) + levers_table(result.rows) +
               f"\nenvironment: {env['cpu']} ({env['cores']} cores), onnxruntime {env['packages']['onnxruntime']}, "
               f"bundle {env['bundle'][:16]}\nnot measured: {'; '.join(env['not_measured'])}")


@bench.command("cold-start")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--backend", default="cpu", show_default=True)
@click.option("--steps", type=STEPS, default=None, help="Default: the bundle's recommended step count.")
@click.option("--size", type=SIZE, default=None, help="WIDTHxHEIGHT; default: the model's native size.")
@click.option("--batch", type=POSITIVE_INT, default=1, show_default=True)
@click.option("--guidance", type=float, default=None, help="Default: the bundle's recommended guidance.")
@click.option("--scheduler", default=None)
@click.option("--runs", type=POSITIVE_INT, default=3, show_default=True, help="Fresh processes, one after another.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--low-memory", is_flag=True)
def cold_start(bundle, backend, steps, size, batch, guidance, scheduler, runs, seed, low_memory) -> None:
    """Time a fresh process from start to first image of BUNDLE (default: the built-in model): interpreter and
    imports, pipeline load, first image, each RUNS times."""
    from dataclasses import asdict

    from edgediff.bundle.reader import Bundle

    from . import report
    from .runner import BenchConfig, cold_start as one_cold_start
    from .sweep import check_backends

    check_backends([backend])
    b = Bundle.open(_bundles_or_builtin([bundle] if bundle else [])[0])
    height, width = size if size else (None, None)
    cfg = BenchConfig(bundle=str(b.root), backend=backend, steps=steps if steps is not None else b.default_steps,
                      height=height, width=width, batch=batch,
                      guidance=guidance if guidance is not None else b.default_guidance, scheduler=scheduler, warmup=0,
                      runs=runs, seed=seed, low_memory=low_memory)
    click.echo(report.cold_start_table(asdict(cfg), [one_cold_start(cfg) for _ in range(runs)]))


@bench.command("memory-modes")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--size", type=SIZE, default=None, help="WIDTHxHEIGHT; default: the model's native size.")
@click.option("--steps", type=STEPS, default=2, show_default=True, help="Enough for the peak: every step is alike.")
@click.option("--modes", type=ListType(click.Choice(list(MODES))), default=",".join(MODES),
              help="Comma-separated, run in this order (repeats allowed); default: all.")
def memory_modes(bundle, size, steps, modes) -> None:
    """Peak host memory and UNet step time of BUNDLE under each ONNX Runtime session setting, each in a fresh
    process (peak RSS is a per-process high-water mark)."""
    from edgediff.bundle.reader import Bundle
    from edgediff.errors import BackendError

    from . import memory_modes as mm

    root = str(Bundle.open(bundle).root)  # a bad bundle is one line here, not one failed process per mode
    height, width = size if size else (None, None)
    failed = 0
    for mode in modes:
        row = mm.measure(root, mode, height, width, steps)
        failed += "error" in row
        click.echo(mm.line(row))
    if failed:
        raise BackendError(f"{failed} of {len(modes)} modes failed (their errors are above)")


@bench.command("session-levels")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--component", default="unet", show_default=True)
@click.option("--size", type=SIZE, default="256x256", show_default=True, help="WIDTHxHEIGHT of the feeds.")
@click.option("--repeat", type=POSITIVE_INT, default=2, show_default=True, help="Rounds; the median is reported.")
def session_levels(bundles, component, size, repeat) -> None:
    """Session creation and one run of a component's graph under ONNX Runtime's optimization levels, for each BUNDLE
    side by side (ratios to the first configuration)."""
    from . import session_levels as sl

    height, width = size
    click.echo(sl.table(sl.measure(bundles, component, height, width, repeat)))


def _bundles_or_builtin(bundles) -> list:
    if bundles:
        return list(bundles)
    from edgediff.builtin_model import default_bundle

    return [default_bundle()]


def _attach_serve_load_test() -> None:
    """`edgediff bench serve URL`: the load tester of a running `edgediff serve` (serve/loadtest.py, stdlib only)."""
    from edgediff.serve.loadtest import bench_serve

    bench.add_command(bench_serve)


_attach_serve_load_test()
