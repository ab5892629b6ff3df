"""`dicompress run | eval | inspect | verify | passes | kernels`: parse, call the API, print. Errors print without a
traceback. An ARTIFACT may be a pipeline directory written in the pipeline layout: its transformer/ is the artifact.

The console script (dicompress_cli) starts this module before the package's __init__ has run: `passes`, recipe
errors and `run --dry-run` then answer from the recipe modules alone (torch and pydantic, not diffusers, which
`import dicompress` loads to register its quantizer). Commands that load models call `_package()` first, which
runs the package's __init__; imported any other way (`python -m dicompress.cli`, tests), it has already run."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import DicompressError


def _package() -> None:
    """Complete `import dicompress` where the console script deferred it (registers the diffusers quantizer)."""
    root = sys.modules[__package__]
    if "__all__" not in vars(root):            # __init__ defines __all__ last: it has not run yet
        root.__spec__.loader.exec_module(root)


def _friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DicompressError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no artifact was written (outputs are renamed into place only when complete)",
                       err=True)
            sys.exit(130)
        except OSError as e:   # the library maps the paths it knows (output: 3, cache: 2); anything else: 1
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}\n  hint: check that the path exists and that you may read "
                       "and write it (disk full? read-only file system?)", err=True)
            sys.exit(1)
    return wrapper


def _json_option(what: str):
    """`--json` alone: the result as JSON on stdout (nothing else there); `--json=FILE` (or `--json FILE`): also
    written to FILE, the text printed as usual."""
    return click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
                        help=f"{what} as JSON: on stdout (alone, for scripts) or, with a value, to FILE.")


def _emit(data, text: str, json_out: str | None) -> None:
    if json_out == "-":
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(text)
    if json_out:
        Path(json_out).write_text(json.dumps(data, indent=2, default=str) + "\n")


@click.group()
@click.version_option(package_name="dicompress")
def main():
    """Post-training compression for Diffusion Transformers."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--model", help="Override the recipe's model: a local diffusers directory or zoo:NAME.")
@click.option("--output", help="Override the recipe's output directory.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Set a recipe key before validation (repeatable): KEY a dotted path with 0-based list indices "
                   "(passes[0].tlq.bits), VALUE a YAML value (3, true, '[0, 1]'). A key --model, --output or "
                   "--overwrite also sets is refused.")
@click.option("--dry-run", is_flag=True, help="Check the recipe, the model, the calibration and the output, say what "
                                               "the run would do, and stop: no weight is loaded, nothing is written.")
@_json_option("The dry run's plan")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_friendly
def run(recipe, model, output, overwrite, overrides, dry_run, json_out, quiet):
    """Compress a model as RECIPE (a YAML file) says and write the artifact."""
    from .recipe import load_recipe
    parsed = load_recipe(recipe, overrides, model=model, output=output, overwrite=overwrite)   # errors: before work
    if dry_run:
        from .dry_run import format_plan, plan
        p = plan(parsed)
        _emit(p, format_plan(p), json_out)
        return
    if json_out:
        raise click.UsageError("--json applies to --dry-run (a run's report is the artifact's report.json)")
    _package()
    from .eval.summary import format_summary
    from .pipeline import run as run_recipe
    report = run_recipe(parsed, progress=not quiet)
    if report.get("rank", 0) == 0:   # under torchrun, rank 0 alone reports
        click.echo(format_summary(report))
        if report.get("pipeline_output"):
            click.echo(_pipeline_line(report))


def _pipeline_line(report: dict) -> str:
    p = report["pipeline_output"]
    how = "copied" if p["mode"] == "copy" else "hard-linked" + (f", {p['copied']} copied" if p["copied"] else "")
    return (f"pipeline: {report.get('output')} loads with DiffusionPipeline.from_pretrained (after import "
            f"dicompress); transformer/ is the artifact, {', '.join(p['components'])} from {p['source']} "
            f"({p['linked'] + p['copied']} files, {p['bytes'] / 1e6:.1f} MB, {how})")


def _artifact_path(path: str) -> str:
    """A pipeline directory's transformer/ when that is a dicompress artifact (or an unfinished write, which the
    reader then refuses); any other path as given."""
    from .io.verify import artifact_root, read_config
    root = artifact_root(path)
    if root == Path(path):
        return path
    plain = "quantization_config" not in read_config(root, require_dicompress=False)
    return path if plain else str(root)


@main.command("eval")
@click.argument("artifact", type=click.Path())
@click.option("--pipeline", "pipeline_dir", type=click.Path(file_okay=False),
              help="The original diffusers pipeline directory: generate with it and with the artifact as its "
                   "transformer (PSNR / SSIM of the images, latency per step, a side-by-side grid).")
@click.option("--prompts", type=click.Path(dir_okay=False, exists=True),
              help="With --pipeline: a prompt file, one prompt per line (prompt i uses seed SEED + i).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2 ** 63 - 1),
              help="With --pipeline: the first prompt's seed.")
@click.option("--height", type=click.IntRange(16, 4096), help="With --pipeline: image height (default 256).")
@click.option("--width", type=click.IntRange(16, 4096), help="With --pipeline: image width (default 256).")
@click.option("--grid", type=click.Path(dir_okay=False),
              help="With --pipeline: where the side-by-side PNG goes (default: pipeline_eval.png in the current "
                   "directory).")
@click.option("--samples-per-class", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--steps", default=None, type=click.IntRange(1, 1000),
              help="Sampling steps (default: the model's; with --pipeline 4).")
@_json_option("The metrics")
@_friendly
def eval_cmd(artifact, pipeline_dir, prompts, seed, height, width, grid, samples_per_class, steps, json_out):
    """Evaluate an artifact against the model it was made from: digits metrics for the embedded model; for a real
    model, its images inside the original pipeline (--pipeline DIR --prompts FILE)."""
    _package()
    if pipeline_dir or prompts:
        from .eval.pipeline_cli import evaluate_with_pipeline
        metrics, text = evaluate_with_pipeline(_artifact_path(artifact), pipeline_dir, prompts, seed=seed,
                                               steps=steps, height=height, width=width, grid=grid)
        _emit(metrics, text, json_out)
        return
    from .eval.artifact_eval import evaluate_artifact
    from .eval.summary import format_summary
    report = evaluate_artifact(_artifact_path(artifact), samples_per_class=samples_per_class, steps=steps,
                               progress=json_out != "-")
    _emit(report, format_summary(report), json_out)


@main.command()
@click.argument("path")
@click.option("--verify", is_flag=True, help="Also check every file of the artifact against its recorded SHA-256.")
@_json_option("The description")
@_friendly
def inspect(path, verify, json_out):
    """Describe an artifact (manifest, footprint, report) or a model (architecture, blocks, linears)."""
    _package()
    from .eval.artifact_eval import describe_path, format_description
    desc = describe_path(_artifact_path(path), verify=verify)
    _emit(desc, format_description(desc), json_out)


@main.command()
@click.argument("artifact", type=click.Path())
@_friendly
def verify(artifact):
    """Check an artifact: headers, manifest, and every file's SHA-256 against the one recorded when it was written
    (exit 3 naming the file that differs)."""
    _package()
    from .eval.artifact_eval import verified_line
    from .io import verify_artifact
    click.echo(verified_line(verify_artifact(artifact, checksums=True)))


@main.command()
@click.argument("name", required=False)
@_json_option("The passes")
def passes(name, json_out):
    """List every pass with its keys; `passes NAME`: one pass's keys with types, defaults and descriptions."""
    from .passes.catalog import catalog, describe_pass, format_catalog, format_pass
    if name is None:
        descs = catalog()
        _emit(descs, format_catalog(descs), json_out)
        return
    try:
        desc = describe_pass(name)
    except KeyError as e:
        click.echo(f"error: {e.args[0]}", err=True)
        sys.exit(2)
    _emit(desc, format_pass(desc), json_out)


@main.command()
def kernels():
    """Say which implementation quantized linears run here (Triton on CUDA GPUs of 8.0+, else the reference)."""
    from .kernels.dispatch import describe
    try:
        click.echo(describe())
    except ValueError as e:                   # a bad DICOMPRESS_KERNELS / DICOMPRESS_GEMM_MODE value
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
