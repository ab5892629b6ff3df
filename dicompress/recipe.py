"""Recipes: YAML -> validated objects. Every error names the file and the key path; all problems in
a recipe are reported at once, before any work starts."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError

from .calib.config import MAX_SEED, CalibrationConfig  # defined in the calibration leaf; re-exported here
from .config import StrictModel as _Strict
from .errors import RecipeError
from .passes import PASSES, Pass
from .passes.catalog import _nested_model, suggest


class EvalConfig(_Strict):
    enabled: bool = Field(True, description="evaluate the result against the uncompressed model at the end of the run")
    samples_per_class: int = Field(20, ge=1, le=10000, description="digits models: samples per class (PSNR, "
                                                                   "class accuracy, Frechet distance)")
    steps: int | None = Field(None, ge=1, le=1000, description="sampling steps; null = the model's default (digits) "
                                                               "or 4 (pipeline eval)")
    seed: int = Field(1000, ge=0, le=MAX_SEED, description="first seed (sample i uses seed + i); disjoint from the "
                                                           "calibration seeds")
    grid: bool = Field(True, description="write the side-by-side image grid (samples.png / pipeline_eval.png)")
    prompts: str | None = Field(None, description="pipeline eval: a prompt file (one per line); the original and the "
                                                  "compressed pipeline generate from each with the same seed, scored "
                                                  "by PSNR and SSIM of the decoded images")
    pipeline: str | None = Field(None, description="pipeline eval: the original pipeline directory; null = the "
                                                   "recipe's model, when it is a pipeline directory")
    height: int | None = Field(None, ge=16, le=4096, description="pipeline eval: image height; null = 256")
    width: int | None = Field(None, ge=16, le=4096, description="pipeline eval: image width; null = 256")
    guidance_scale: float | None = Field(None, ge=0, description="pipeline eval: guidance scale; null = the "
                                                                 "pipeline's default")


class StreamingConfig(_Strict):
    """Block-by-block compression: one block's weights in memory at a time, read from the checkpoint's
    safetensors when it is that block's turn (models larger than memory)."""

    enabled: Literal["auto"] | bool = Field("auto", description="auto: stream when every pass can (one process)")
    propagate: Literal["original", "compressed"] = Field(
        "original", description="the next block's calibration inputs: the original block's outputs (as a whole-model "
                                "capture; the artifact equals the in-memory run's) or the compressed block's "
                                "(sequential, as llm-compressor's pipeline)")


class Recipe(_Strict):
    model: str = Field(min_length=1, description="zoo:NAME, a local diffusers directory (transformer or pipeline), "
                                                 "or a hub id already downloaded")
    calibration: CalibrationConfig | None = Field(None, description="the calibration set (or a YAML file holding "
                                                                    "one); needed by passes that read activations")
    passes: list[Any] = Field(min_length=1, description="the passes in order, each `- NAME: {keys}` "
                                                        "(`dicompress passes` lists them)")
    output: str = Field(min_length=1, description="the output directory")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto: fp32 on CPU, bf16 on CUDA")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the artifact's kept (unquantized) parameters; auto: the checkpoint's own")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the run's random choices")
    overwrite: bool = Field(False, description="replace an existing output directory")
    output_layout: Literal["auto", "pipeline", "transformer"] = Field(
        "auto", description="pipeline: a complete pipeline directory (the artifact as transformer/, the model's "
                            "other components beside it); transformer: the artifact alone; auto: pipeline when the "
                            "model is a pipeline directory")
    copy_components: bool = Field(False, description="pipeline layout: copy the other components instead of "
                                                     "hard-linking them")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation at the end of the run")
    streaming: StreamingConfig = Field(default_factory=StreamingConfig, description="block-by-block compression")
    source_file: str | None = Field(default=None, exclude=True)
    # the `--set KEY=VALUE` texts applied to the file's mapping (private: a recipe file cannot claim any)
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    @property
    def overrides(self) -> tuple[str, ...]:
        return self._overrides

    def pass_objects(self) -> list[Pass]:
        return build_passes(self.passes, self.source_file)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _keys_at(model: type | None, loc: tuple) -> list[str]:
    """The keys of the settings model that holds the last part of `loc` (walking nested models from `model`)."""
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        model = _nested_model(field.annotation) if field is not None else None
    return [k for k, f in getattr(model, "model_fields", {}).items() if not f.exclude] if model else []


def _unknown_key(name, valid: list[str]) -> str:
    """'unknown key' with the valid ones and the nearest (granularty -> granularity)."""
    if not valid:
        return "unknown key"
    return f"unknown key{suggest(name, valid)}; valid keys: {', '.join(valid)}"


def _messages(err: ValidationError, prefix: str = "", model: type | None = None) -> list[tuple[str, str]]:
    res = []
    for e in err.errors():
        key = _loc(tuple(p for p in e["loc"]))
        key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        msg = _unknown_key(e["loc"][-1], _keys_at(model, e["loc"])) if e["type"] == "extra_forbidden" else e["msg"]
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
            problems.append((f"passes[{i}]", f"unknown pass {name!r}{suggest(name, PASSES)}; available: "
                                             f"{', '.join(sorted(PASSES))} (`dicompress passes` lists their keys)"))
            continue
        if params is not None and not isinstance(params, dict):
            problems.append((f"passes[{i}].{name}", "parameters must be a mapping"))
            continue
        try:
            objs.append(PASSES[name](**(params or {})))
        except ValidationError as e:
            problems += _messages(e, f"passes[{i}].{name}", PASSES[name].Config)
    if not problems:
        for i, p in enumerate(objs):
            for key, msg in p.check(objs[:i]) + p.check_later(objs[i + 1:]):
                problems.append((f"passes[{i}].{p.name}" + (f".{key}" if key else ""), msg))
    if problems:
        raise _recipe_error(problems, file)
    return objs


def _recipe_error(problems: list[tuple[str, str]], file: str | None, hint: str | None = None) -> RecipeError:
    if len(problems) == 1:
        key, msg = problems[0]
        err = RecipeError(msg, file=file, key=key, hint=hint)
    else:
        lines = "\n".join(f"  {file + ':' if file else ''}{k}: {m}" for k, m in problems)
        err = RecipeError(f"{len(problems)} problems in the recipe:\n{lines}", hint=hint)
        err.file, err.key = file, problems[0][0]
    err.problems = problems          # (key, message) pairs: `_with_origin` annotates them one by one
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


def _resolve_eval_files(data: dict, file: str | None) -> None:
    """`eval.prompts` must name an existing file and `eval.pipeline` a directory (relative to the recipe, as
    calibration files)."""
    ev = data.get("eval")
    if not isinstance(ev, dict):
        return
    for key, isit, what in (("prompts", Path.is_file, "file"), ("pipeline", Path.is_dir, "directory")):
        if isinstance(ev.get(key), str):
            path = resolve_path(ev[key], file)
            if not isit(path):
                raise RecipeError(f"{what} {ev[key]!r} not found", file=file, key=f"eval.{key}")
            ev[key] = str(path)


def parse_recipe(data: Any, file: str | None = None) -> Recipe:
    """Validate a recipe mapping completely (schema, passes, order rules)."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping with keys model, passes, output ...", file=file)
    _resolve_calibration(data, file)
    _resolve_eval_files(data, file)
    try:
        recipe = Recipe(**data, source_file=file)
    except ValidationError as e:
        raise _recipe_error(_messages(e, model=Recipe), file) from None
    if recipe.copy_components and recipe.output_layout == "transformer":
        raise RecipeError("copy_components applies to the pipeline layout, but output_layout is transformer "
                          "(the artifact alone, no components to copy)", file=file, key="copy_components",
                          hint="drop copy_components, or set output_layout: auto or pipeline")
    passes = recipe.pass_objects()
    if recipe.calibration is not None:
        problems = [(f"passes[{i}].{p.name}" + (f".{k}" if k else ""), msg) for i, p in enumerate(passes)
                    for k, msg in p.check_calibration(recipe.calibration)]
        if problems:
            raise _recipe_error(problems, file)
    if recipe.calibration is None:
        for i, p in enumerate(passes):
            if p.needs_calibration or p.needs_block_inputs or p.needs_model_inputs:
                raise RecipeError(f"pass {p.name!r} needs calibration data but the recipe has no "
                                  "`calibration` section", file=file, key=f"passes[{i}].{p.name}",
                                  hint="add e.g. `calibration: {source: classes, seeds: [0, 1]}`")
    elif recipe.calibration.source == "synthetic":
        for i, p in enumerate(passes):
            if p.needs_sampling_loop:
                raise RecipeError(f"{p.name} trains on whole sampling trajectories; calibration source 'synthetic' "
                                  "holds random inputs at a spread of timesteps, no trajectory", file=file,
                                  key=f"passes[{i}].{p.name}", hint="use calibration source: classes, embeddings "
                                                                    "or prompts")
            for key, cfg in (("", p.config), ("end_to_end.", getattr(p.config, "end_to_end", None))):
                if getattr(cfg, "student_trajectories", 0):
                    raise RecipeError("student_trajectories runs the calibration's sampling loop on the student; "
                                      "calibration source 'synthetic' has none", file=file,
                                      key=f"passes[{i}].{p.name}.{key}student_trajectories",
                                      hint="use source: classes, embeddings or prompts, or set it to 0")
    return recipe


# --- `--set KEY=VALUE`: keys of the recipe's mapping replaced before validation --------------------------

SET_HINT = ("KEY is a dotted path with 0-based list indices and VALUE a YAML value, e.g. "
            "--set passes[0].tlq.bits=3 --set 'calibration.seeds=[0, 1]' (README, Overriding recipe keys)")
_KEY = re.compile(r"[^.\[\]\s]+(?:\.[^.\[\]\s]+|\[\d+\])*")
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_key(key: str) -> list[str | int] | None:
    """`passes[2].tlq.bits` -> ["passes", 2, "tlq", "bits"]; None when it is not such a path."""
    if not _KEY.fullmatch(key):
        return None
    return [name if name else int(index) for name, index in _PART.findall(key)]


def _set_error(text: str, what: str, file: str | None, key: str | None = None) -> RecipeError:
    err = RecipeError(f"--set {text}: {what}", file=file, hint=SET_HINT)
    err.key = key
    return err


def parse_override(text: str, file: str | None = None) -> tuple[list[str | int], Any]:
    """`KEY=VALUE` -> (key path, value); VALUE is read as YAML (`256`, `true`, `[0, 1]`, `{bits: 3}`, `null`)."""
    key, eq, value = text.partition("=")
    if not eq:
        raise _set_error(text, "no `=`: write KEY=VALUE", file)
    key = key.strip()
    if not key:
        raise _set_error(text, "the key before `=` is empty", file)
    path = parse_key(key)
    if path is None:
        raise _set_error(text, f"{key!r} is not a key path: names joined by `.`, list indices 0-based in "
                               "brackets ([0], [1] ...)", file)
    try:
        return path, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise _set_error(text, f"the value is not valid YAML ({getattr(e, 'problem', None) or e})", file,
                         _loc(tuple(path))) from None


def _what(node) -> str:
    if isinstance(node, dict):
        return "a mapping"
    if isinstance(node, list):
        return f"a list ({len(node)} entries)"
    return f"the value {json.dumps(node, default=str)}"


def _set(root: dict, path: list[str | int], value, text: str, file: str | None) -> None:
    node = root
    for depth, part in enumerate(path):
        here, where = _loc(tuple(path[:depth])), _loc(tuple(path[:depth + 1]))
        if isinstance(part, int):
            if not isinstance(node, list):
                raise _set_error(text, f"{here} is {_what(node)}, not a list: it has no index [{part}]", file, where)
            if part >= len(node):
                last = f"the last is {here}[{len(node) - 1}]" if node else "it is empty"
                raise _set_error(text, f"{where} is past the end of {here}: indices are 0-based and {last}",
                                 file, where)
        elif not isinstance(node, dict):
            raise _set_error(text, f"{here} is {_what(node)}, not a mapping: it has no key {part!r}", file, where)
        if depth == len(path) - 1:
            node[part] = value
            return
        child = node[part] if isinstance(part, int) else node.get(part)
        nxt = path[depth + 1]
        if child is None and isinstance(nxt, str):
            child = node[part] = {}               # a section the file leaves out (or empty, as `- tlq:`)
        elif isinstance(node, list) and child == nxt:
            child = node[part] = {nxt: {}}        # a pass by its name alone (`- tlq`) is `{tlq: {}}`
        elif child is None:
            raise _set_error(text, f"{where} is not set, so it has no index [{nxt}]", file, where)
        node = child


def apply_overrides(data: dict, overrides: Iterable[str], file: str | None = None) -> dict:
    """A copy of the recipe mapping `data` with each `KEY=VALUE` of `overrides` set in turn (a later one wins).

    KEY addresses the mapping as the file writes it: `calibration.height`, `passes[2].tlq.bits` (indices are
    0-based; a pass is a one-key mapping `{tlq: {...}}`). A new key inside a mapping (and a section the file
    leaves out) may be set: validation then says whether it is a known key. Indexing past a list's end,
    indexing a non-list and descending into a value are RecipeErrors naming the override; `file` is named
    in them."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping with keys model, passes, output ...", file=file)
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text, file)
        _set(out, path, value, text, file)
    return out


def _related(a: list, b: list) -> bool:
    """Whether one key path lies inside the other (`calibration` and `calibration.source`)."""
    n = min(len(a), len(b))
    return n > 0 and a[:n] == b[:n]


def _with_origin(err: RecipeError, overrides: list[str], file: str | None) -> RecipeError:
    """`err` with each problem whose key an override set (or lies inside, or holds) saying so: the value
    came from the command line, not from `file`."""
    problems = getattr(err, "problems", None)
    if problems is None:                # a single error raised directly: its message without "file:key: "
        where = ":".join(p for p in (file, err.key) if p)
        msg = str(err.args[0])
        problems = [(err.key, msg[len(where) + 2:] if where and msg.startswith(where + ": ") else msg)]
    paths = [(_override_path(t), t) for t in overrides]
    out, changed = [], False
    for key, msg in problems:
        keyp = parse_key(key) if key else None
        texts = [t for p, t in paths if keyp and p and _related(keyp, p)]
        if texts:
            msg, changed = f"{msg} (set on the command line: {', '.join('--set ' + t for t in texts)})", True
        out.append((key, msg))
    return _recipe_error(out, file, err.hint) if changed else err


def _override_path(text: str) -> list[str | int]:
    return parse_key(text.partition("=")[0].strip()) or []


def _check_options(options: dict, overrides: list[str], file: str | None) -> None:
    """--model/--output/--overwrite and a --set of the same key: refused rather than one silently winning."""
    for text in overrides:
        path = _override_path(text)
        if path and options.get(path[0]) is not None:
            raise RecipeError(f"`{path[0]}` is given twice: by --{path[0]} and by --set {text}", file=file,
                              hint=f"give it once: --{path[0]} VALUE or --set {path[0]}=VALUE")


def load_recipe(path: str | Path, overrides: Iterable[str] = (), **options) -> Recipe:
    """Read and validate a YAML recipe. `options` (e.g. model=..., output=...; None: not given) replace
    top-level keys; then `overrides` (`KEY=VALUE` texts, as `--set`) set keys anywhere (`apply_overrides`).
    The recipe records them (`Recipe.overrides`); errors in values they set say so."""
    path = Path(path)
    file = str(path)
    overrides = list(overrides or ())
    if not path.is_file():
        raise RecipeError("recipe file not found", file=file, hint="check the path; ready recipes are in recipes/")
    try:
        data = yaml.safe_load(read_text(path, file))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        raise RecipeError(f"malformed YAML: {getattr(e, 'problem', None) or e}", file=file, key=where) from None
    if isinstance(data, dict):
        data.update({k: v for k, v in options.items() if v is not None})
        if overrides:
            _check_options(options, overrides, file)
            if any(len(p) > 1 and p[0] == "calibration" for p in map(_override_path, overrides)):
                _resolve_calibration(data, file)    # `calibration: FILE.yaml`: set keys inside what it includes
            data = apply_overrides(data, overrides, file)
    try:
        recipe = parse_recipe(data, file)
    except RecipeError as e:
        if not overrides:
            raise
        raise _with_origin(e, overrides, file) from None
    recipe._overrides = tuple(overrides)
    return recipe


def override_recipe(recipe: Recipe, overrides: Iterable[str], **options) -> Recipe:
    """`recipe` (validated, e.g. built in Python) with `options` and then `overrides` applied as `load_recipe`
    applies them, and validated again."""
    overrides, file = list(overrides), recipe.source_file
    data = recipe.model_dump(exclude_unset=True)
    data.update({k: v for k, v in options.items() if v is not None})
    _check_options(options, overrides, file)
    try:
        new = parse_recipe(apply_overrides(data, overrides, file), file)
    except RecipeError as e:
        raise _with_origin(e, overrides, file) from None
    new._overrides = recipe.overrides + tuple(overrides)
    return new
