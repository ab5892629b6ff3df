"""Recipes: YAML -> validated objects. Every error names the file and the key path; all problems in
a recipe are reported at once, before any work starts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from .calib.config import MAX_SEED, CalibrationConfig  # defined in the calibration leaf; re-exported here
from .config import StrictModel as _Strict
from .errors import RecipeError
from .passes import PASSES, Pass


class EvalConfig(_Strict):
    enabled: bool = True
    samples_per_class: int = Field(20, ge=1, le=10000)  # digits models: samples per class (PSNR, accuracy, Frechet)
    steps: int | None = Field(None, ge=1, le=1000)      # default: the model's default sampling steps
    seed: int = Field(1000, ge=0, le=MAX_SEED)          # first seed; disjoint from calibration seeds
    grid: bool = True                       # write samples.png (teacher | compressed)


class StreamingConfig(_Strict):
    """Block-by-block compression: one block's weights in memory at a time, read from the checkpoint's
    safetensors when it is that block's turn (models larger than memory)."""

    enabled: Literal["auto"] | bool = "auto"      # auto: stream when every pass can (one process)
    # the next block's calibration inputs: the original block's outputs (as a whole-model capture; the artifact
    # equals the in-memory run's) or the compressed block's (sequential, as llm-compressor's pipeline)
    propagate: Literal["original", "compressed"] = "original"


class Recipe(_Strict):
    model: str = Field(min_length=1)        # zoo:NAME, a local diffusers directory, or a hub id (already downloaded)
    calibration: CalibrationConfig | None = None
    passes: list[Any] = Field(min_length=1)  # at least one: a recipe without passes would write a plain copy
    output: str = Field(min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"   # auto: fp32 on CPU, bf16 on CUDA
    # the dtype of the artifact's kept (unquantized) parameters; auto: the checkpoint's own (bf16 for hub models)
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    overwrite: bool = False
    eval: EvalConfig = Field(default_factory=EvalConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    source_file: str | None = Field(default=None, exclude=True)

    def pass_objects(self) -> list[Pass]:
        return build_passes(self.passes, self.source_file)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _messages(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    res = []
    for e in err.errors():
        key = _loc(tuple(p for p in e["loc"]))
        key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        res.append((key, msg))
    return res


def build_passes(specs: list, file: str | None = None) -> list[Pass]:
    """`[{name: {params}}, ...]` -> pass objects; checks names, params and order rules."""
    problems: list[tuple[str, str]] = []
    objs: list[Pass] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Pass):
            objs.append(spec)
            continue
        if isinstance(spec, str):
            spec = {spec: {}}
        if not isinstance(spec, dict) or len(spec) != 1:
            problems.append((f"passes[{i}]", "each pass is a mapping with one key, the pass name "
                                             "(e.g. `- tlq: {bits: 4}`)"))
            continue
        (name, params), = spec.items()
        if name not in PASSES:
            problems.append((f"passes[{i}]", f"unknown pass {name!r}; available: {', '.join(sorted(PASSES))}"))
            continue
        if params is not None and not isinstance(params, dict):
            problems.append((f"passes[{i}].{name}", "parameters must be a mapping"))
            continue
        try:
            objs.append(PASSES[name](**(params or {})))
        except ValidationError as e:
            problems += _messages(e, f"passes[{i}].{name}")
    if not problems:
        for i, p in enumerate(objs):
            for key, msg in p.check(objs[:i]):
                problems.append((f"passes[{i}].{p.name}" + (f".{key}" if key else ""), msg))
    if problems:
        raise _recipe_error(problems, file)
    return objs


def _recipe_error(problems: list[tuple[str, str]], file: str | None) -> RecipeError:
    if len(problems) == 1:
        key, msg = problems[0]
        return RecipeError(msg, file=file, key=key)
    lines = "\n".join(f"  {file + ':' if file else ''}{k}: {m}" for k, m in problems)
    err = RecipeError(f"{len(problems)} problems in the recipe:\n{lines}")
    err.file, err.key = file, problems[0][0]
    return err


def resolve_path(value: str, file: str | None) -> Path:
    """A relative path in a recipe: as given (from the working directory) if it exists there, else
    relative to the recipe file's directory, else relative to that directory's parent (the repo root
    for recipes/*.yaml)."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or file is None:
        return p
    here = Path(file).resolve().parent
    for base in (here, here.parent):
        if (base / p).exists():
            return base / p
    return p


def read_text(path: Path, file: str | None) -> str:
    """A YAML file's text; a binary, non-UTF-8 or unreadable file is a RecipeError naming it."""
    what = "the file" if str(path) == file else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{what} is not a UTF-8 text file (byte {e.start}: {e.reason})", file=file,
                          hint="a recipe is a YAML text file; check the path") from None
    except OSError as e:
        raise RecipeError(f"cannot read {what}: {e.strerror or e}", file=file) from None


def _resolve_calibration(data: dict, file: str | None) -> None:
    """`calibration: FILE.yaml` includes a calibration set; data files named in it must exist."""
    cal = data.get("calibration")
    if isinstance(cal, str):
        path = resolve_path(cal, file)
        if not path.is_file():
            raise RecipeError(f"calibration set file {cal!r} not found", file=file, key="calibration")
        try:
            cal = yaml.safe_load(read_text(path, file))
        except yaml.YAMLError as e:
            raise RecipeError(f"malformed YAML in calibration set {path}: {e}", file=file, key="calibration") from None
        data["calibration"] = cal
    if isinstance(cal, dict):
        for key in ("prompts", "embeddings"):
            if isinstance(cal.get(key), str):
                path = resolve_path(cal[key], file)
                if not path.is_file():
                    raise RecipeError(f"file {cal[key]!r} not found", file=file, key=f"calibration.{key}")
                cal[key] = str(path)


def parse_recipe(data: Any, file: str | None = None) -> Recipe:
    """Validate a recipe mapping completely (schema, passes, order rules)."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping with keys model, passes, output ...", file=file)
    _resolve_calibration(data, file)
    try:
        recipe = Recipe(**data, source_file=file)
    except ValidationError as e:
        raise _recipe_error(_messages(e), file) from None
    passes = recipe.pass_objects()
    if recipe.calibration is None:
        for i, p in enumerate(passes):
            if p.needs_calibration or p.needs_block_inputs:
                raise RecipeError(f"pass {p.name!r} needs calibration data but the recipe has no "
                                  "`calibration` section", file=file, key=f"passes[{i}].{p.name}",
                                  hint="add e.g. `calibration: {source: classes, seeds: [0, 1]}`")
    elif recipe.calibration.source == "synthetic":
        for i, p in enumerate(passes):
            for key, cfg in (("", p.config), ("end_to_end.", getattr(p.config, "end_to_end", None))):
                if getattr(cfg, "student_trajectories", 0):
                    raise RecipeError("student_trajectories runs the calibration's sampling loop on the student; "
                                      "calibration source 'synthetic' has none", file=file,
                                      key=f"passes[{i}].{p.name}.{key}student_trajectories",
                                      hint="use source: classes, embeddings or prompts, or set it to 0")
    return recipe


def load_recipe(path: str | Path, **overrides) -> Recipe:
    """Read and validate a YAML recipe; `overrides` (e.g. model=..., output=...) replace keys first."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", file=file, hint="check the path; ready recipes are in recipes/")
    try:
        data = yaml.safe_load(read_text(path, file))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        raise RecipeError(f"malformed YAML: {getattr(e, 'problem', None) or e}", file=file, key=where) from None
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_recipe(data, file)
