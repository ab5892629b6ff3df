"""What `dicompress passes` shows: every registered pass with its keys (type, default, constraints, description),
read from the pass configs (pydantic models) themselves, so the listing cannot drift from what recipes accept.
A key whose value is itself a settings model (distill's `end_to_end` ...) is listed with its own keys, dotted."""
from __future__ import annotations

import difflib
import json
import re
import sys
import types
import typing
from dataclasses import asdict, dataclass

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .base import PASSES, Pass


@dataclass(frozen=True)
class Key:
    name: str                 # dotted for nested settings: end_to_end.steps
    type: str                 # int, bool, 'channel' | 'group', list[str] | null ...
    required: bool
    default: object           # the default value (JSON-like); None also when required
    constraints: str          # ">= 2, <= 8", or ""
    description: str


def type_name(annotation) -> str:
    """A recipe author's name for a field type: int, float, bool, str, 'a' | 'b', list[str], X | null."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:      # a constrained member of a union, e.g. bits: int (2..8) | 'auto'
        limits = _constraints(annotation.__metadata__)
        return type_name(args[0]) + (f" ({limits})" if limits else "")
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (tuple, list, set, frozenset):
        inner = [a for a in args if a is not Ellipsis]
        return f"list[{' | '.join(type_name(a) for a in inner) or 'any'}]"
    if origin is dict:
        return f"mapping[{', '.join(type_name(a) for a in args)}]" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(metadata) -> str:
    out = []
    # a FieldInfo inside Annotated (a constrained union member) holds its own Ge / Le metadata
    metadata = [c for m in metadata for c in (getattr(m, "metadata", None) or [m])]
    for m in metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length"),
                          ("max_length", "max length")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def _jsonable(v):
    if isinstance(v, BaseModel):
        return v.model_dump()
    if isinstance(v, tuple):
        return list(v)
    return v


def _nested_model(annotation) -> type[BaseModel] | None:
    """The settings model a field holds (`X` or `X | None`), if it holds one."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def config_keys(model: type[BaseModel], prefix: str = "") -> list[Key]:
    """Every key of a settings model, in declaration order; nested settings models expanded, dotted."""
    keys = []
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        default = None if f.is_required() else (f.default_factory() if f.default_factory else f.default)
        default = None if default is PydanticUndefined else default
        keys.append(Key(prefix + name, type_name(f.annotation), f.is_required(), _jsonable(default),
                        _constraints(f.metadata), " ".join((f.description or "").split())))
        nested = _nested_model(f.annotation)
        if nested is not None:
            keys += config_keys(nested, f"{prefix}{name}.")
    return keys


def pass_doc(cls: type[Pass]) -> str:
    """One line saying what the pass does: its docstring's first line, else its module's."""
    for doc in (cls.__doc__, getattr(sys.modules.get(cls.__module__), "__doc__", None)):
        if doc and doc.strip():
            return " ".join(doc.strip().split("\n\n")[0].split())
    return ""


_NEEDS = ("needs_calibration", "needs_block_inputs", "needs_model_inputs", "needs_teacher", "needs_sampling_loop")


def describe_pass(name: str) -> dict:
    """A pass as data (`dicompress passes --json`): name, doc, what it needs, keys."""
    cls = get_or_suggest(name)
    return {"name": cls.name, "doc": pass_doc(cls),
            "needs": [n.removeprefix("needs_") for n in _NEEDS if getattr(cls, n, False)],
            "streamable": bool(cls.streamable), "changes_structure": bool(cls.changes_structure),
            "keys": [asdict(k) for k in config_keys(cls.Config)]}


def catalog() -> list[dict]:
    return [describe_pass(n) for n in sorted(PASSES)]


def suggest(word: str, choices) -> str:
    """' (did you mean X?)' for the nearest of `choices` (difflib), or ''."""
    near = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def get_or_suggest(name: str) -> type[Pass]:
    if name not in PASSES:
        raise KeyError(f"unknown pass {name!r}{suggest(name, PASSES)}; available: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def _value(v) -> str:
    return json.dumps(v, default=str)


def format_pass(desc: dict) -> str:
    lines = [f"{desc['name']}: {desc['doc']}"]
    if desc["needs"]:
        lines.append(f"  needs: {', '.join(desc['needs'])}")
    width = max((len(k["name"]) for k in desc["keys"]), default=0)
    for k in desc["keys"]:
        default = "required" if k["required"] else f"default {_value(k['default'])}"
        extra = f"; {k['constraints']}" if k["constraints"] else ""
        lines.append(f"  {k['name']:<{width}}  {k['type']}  ({default}{extra})")
        if k["description"]:
            lines.append(f"  {'':<{width}}    {k['description']}")
    return "\n".join(lines)


def _first_sentence(doc: str, limit: int = 100) -> str:
    """The doc's first sentence, cut at a word boundary past `limit` characters."""
    head = re.split(r"(?<=[.;])\s", doc, maxsplit=1)[0]
    return head if len(head) <= limit else head[:limit].rsplit(" ", 1)[0] + " ..."


def format_catalog(descs: list[dict]) -> str:
    width = max(len(d["name"]) for d in descs)
    lines = []
    for d in descs:
        top = [k["name"] for k in d["keys"] if "." not in k["name"]]
        lines.append(f"{d['name']:<{width}}  {_first_sentence(d['doc'])}\n{'':<{width}}  keys: {', '.join(top)}")
    return "\n".join(lines) + ("\n\n`dicompress passes NAME`: a pass's keys (nested ones dotted) with types, defaults "
                               "and descriptions; `--json`: all of it as JSON.")
