"""`dicompress run | eval | inspect | verify | kernels`: parse, call the API, print. Errors print without a
traceback. An ARTIFACT may be a pipeline directory written in the pipeline layout: its transformer/ is the artifact."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import DicompressError
from .eval import format_summary
from .eval.artifact_eval import evaluate_artifact, inspect_path, verified_line
from .io import verify_artifact
from .io.verify import artifact_root, read_config
from .kernels.dispatch import describe
from .pipeline import run as run_recipe


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
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_friendly
def run(recipe, model, output, overwrite, overrides, quiet):
    """Compress a model as RECIPE (a YAML file) says and write the artifact."""
    report = run_recipe(recipe, progress=not quiet, overrides=overrides, model=model, output=output,
                        overwrite=overwrite)
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
    root = artifact_root(path)
    if root == Path(path):
        return path
    plain = "quantization_config" not in read_config(root, require_dicompress=False)
    return path if plain else str(root)


@main.command("eval")
@click.argument("artifact", type=click.Path())
@click.option("--samples-per-class", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--steps", default=None, type=click.IntRange(1, 1000), help="Sampling steps (default: the model's).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the metrics as JSON.")
@_friendly
def eval_cmd(artifact, samples_per_class, steps, json_out):
    """Evaluate an artifact against the model it was made from."""
    report = evaluate_artifact(_artifact_path(artifact), samples_per_class=samples_per_class, steps=steps)
    click.echo(format_summary(report))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2, default=str) + "\n")


@main.command()
@click.argument("path")
@click.option("--verify", is_flag=True, help="Also check every file of the artifact against its recorded SHA-256.")
@_friendly
def inspect(path, verify):
    """Describe an artifact (manifest, footprint, report) or a model (architecture, blocks, linears)."""
    click.echo(inspect_path(_artifact_path(path), verify=verify))


@main.command()
@click.argument("artifact", type=click.Path())
@_friendly
def verify(artifact):
    """Check an artifact: headers, manifest, and every file's SHA-256 against the one recorded when it was written
    (exit 3 naming the file that differs)."""
    click.echo(verified_line(verify_artifact(artifact, checksums=True)))


@main.command()
def kernels():
    """Say which implementation quantized linears run here (Triton on CUDA GPUs of 8.0+, else the reference)."""
    try:
        click.echo(describe())
    except ValueError as e:                   # a bad DICOMPRESS_KERNELS / DICOMPRESS_GEMM_MODE value
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
