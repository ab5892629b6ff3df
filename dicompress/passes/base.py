"""The pass API: a pass is a validated config plus one `apply(state)`, registered by name."""
from __future__ import annotations

from typing import Any, ClassVar

from ..config import PassConfig  # defined in the leaf dicompress.config; re-exported here
from ..errors import CalibrationError, RecipeError
from ..nn.surgery import iter_linears

PASSES: dict[str, type["Pass"]] = {}


class Pass:
    """Subclass with `name`, `Config` and `apply`; declare what the pass needs so recipes are checked
    before any work starts."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    needs_calibration: ClassVar[bool] = False   # needs the calibration store (per-linear input statistics)
    needs_block_inputs: ClassVar[bool] = False  # ... and the captured per-block inputs (layer-wise work, GPTQ)
    # ... and the transformer's own inputs at every captured call, nothing per block (end-to-end distillation,
    # trajectory masks, Taylor scores): captured alone when no pass reading the same store needs block inputs,
    # a small fraction of their size (every block's inputs are far larger than the model's)
    needs_model_inputs: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False       # needs the uncompressed model alongside
    needs_sampling_loop: ClassVar[bool] = False  # reads whole sampling trajectories (not `synthetic` calibration)
    changes_depth: ClassVar[bool] = False       # removes / converts blocks (one such pass per recipe)
    # changes the model's structure (depth, width, experts, attention): the passes after it read calibration
    # captured again on the model as it now is (runner.CalibrationStages)
    changes_structure: ClassVar[bool] = False
    reads_block_data: ClassVar[bool] = True     # its calibration data is per block / per linear of the captured model
    # works block by block on `state.scope` (touches nothing outside it and reads only that block's calibration):
    # the streaming pipeline may run it one block at a time; such a pass implements `summarize`
    streamable: ClassVar[bool] = False

    def __init__(self, config: PassConfig | dict | None = None, **kwargs: Any):
        if config is None:
            config = self.Config(**kwargs)
        elif isinstance(config, dict):
            config = self.Config(**config, **kwargs)
        self.config = config

    def check(self, previous: list["Pass"]) -> list[tuple[str, str]]:
        """Order rules: return [(key, message)] problems given the passes that run before this one."""
        return []

    def check_later(self, later: list["Pass"]) -> list[tuple[str, str]]:
        """Rules on the passes that run after this one (what this pass was configured for must follow):
        [(key, message)], checked by build_passes on the whole list."""
        return []

    def check_calibration(self, calibration) -> list[tuple[str, str]]:
        """Problems with this pass against the recipe's calibration set (a CalibrationConfig), before any capture:
        [(key, message)], checked by load_recipe."""
        return []

    def check_model(self, model, adapter) -> list[tuple[str, str]]:
        """Problems with the model itself, before any work: [(key, message)]. `model` may be on the meta device."""
        return []

    def checks_model(self) -> bool:
        """Whether check_model has anything to check with this config (the dry run then builds the model's module
        tree, which needs diffusers)."""
        return type(self).check_model is not Pass.check_model

    def apply(self, state) -> None:  # state: pipeline.CompressionState
        raise NotImplementedError

    def summarize(self, rows: list[dict]) -> dict:
        """The pass's report summary from its per-layer rows (streamable passes: the streaming pipeline merges
        the rows of every block, then summarises once, as the in-memory run does)."""
        raise NotImplementedError(f"{self.name} does not summarise per-layer rows")

    def calibration(self, state):
        """The calibration store, or a CalibrationError naming this pass (for direct `apply` calls;
        recipes and `compress` check earlier)."""
        if state.calibration is None:
            raise CalibrationError(f"the {self.name} pass needs calibration statistics",
                                   hint="add a `calibration` section to the recipe, or pass calibration=...")
        return state.calibration

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items())
        return f"{type(self).__name__}({args})"


def select_layers(state, pass_name: str, include, keep, finder=None) -> list:
    """The `(name, module)` pairs a pass works on: its `include` / `keep` patterns (null = the
    architecture's defaults) through `finder` (default: `iter_linears`); none at all is a recipe error."""
    include = include if include is not None else state.adapter.quant_include
    keep = keep if keep is not None else state.adapter.quant_keep
    targets = [(n, m) for n, m in (finder or iter_linears)(state.model, include, keep) if state.in_scope(n)]
    if not targets and state.scope is None:
        raise RecipeError(f"no linear matches include {list(include)} minus keep {list(keep)}",
                          key=f"{pass_name}.include",
                          hint=f"check the `include` / `keep` patterns of `{pass_name}` (fnmatch over full dotted "
                               "module names, e.g. 'transformer_blocks.*')")
    return targets


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make the pass available in recipes under `cls.name`."""
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} is already registered by {PASSES[cls.name].__name__}")
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    try:
        return PASSES[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; available: {', '.join(sorted(PASSES))}") from None


# passes that leave plain nn.Linear modules behind: besides the structural passes, the analysis and end-to-end
# distillation. Quantization, smoothing, rotation and activation quantization rewrite them.
KEEPS_LINEARS = ("depth_analysis", "distill")


def recipe_problems(check, *args) -> list[tuple[str, str]]:
    """`check(*args)` raises a RecipeError naming its key (`pass.key`) for what does not fit; Pass.check_model's
    (key, message) list for it, the key relative to the pass (the runner adds the key path itself)."""
    try:
        check(*args)
    except RecipeError as e:
        key, msg = e.key or "", str(e.args[0])
        if msg.startswith(f"{key}: "):
            msg = msg[len(key) + 2:]
        return [(key.rpartition(".")[2] if "." in key else "", msg)]
    return []


def last_named(previous: list[Pass], name: str) -> tuple[int, Pass] | None:
    """The last earlier pass called `name`, with its index in the recipe."""
    return next(((i, p) for i, p in reversed(list(enumerate(previous))) if p.name == name), None)


def first_rewrite(previous: list[Pass]) -> tuple[int, Pass] | None:
    """The first earlier pass that rewrites linears (a pass surgering plain linears must come before it)."""
    return next(((i, p) for i, p in enumerate(previous)
                 if not (getattr(p, "changes_structure", False) or p.name in KEEPS_LINEARS)), None)
