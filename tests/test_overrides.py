"""`--set KEY=VALUE`: the pure mapping edit, its errors, validation naming the command line as the origin, the
recipe hash following the effective recipe, and a real run whose report and manifest show the overrides."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dicompress.cli import main
from dicompress.errors import RecipeError
from dicompress.job import recipe_hash
from dicompress.recipe import apply_overrides, build_passes, load_recipe, override_recipe
from dicompress.runlock import lock_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_flux_w4.yaml"     # its calibration is an included file (calibration/*.yaml)
DATA = {"model": "zoo:tiny-flux-digits", "calibration": {"seeds": [0], "steps": 4},
        "passes": [{"smooth": {"alpha": 0.5}}, "rtn", {"tlq": None}, {"tlq": {"bits": 4}}], "output": "out/x"}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def nothing_written(out: Path) -> bool:
    return not any(p.exists() for p in (out, out.with_name(out.name + ".work"), lock_path(out)))


# --- the pure function --------------------------------------------------------------------------------------

def test_values_are_yaml_and_the_input_is_not_changed():
    before = json.dumps(DATA)
    out = apply_overrides(DATA, ["calibration.steps=2", "calibration.seeds=[0, 1]", "model=zoo:other",
                                 "output=/tmp/a b", "passes[3].tlq.bits=3", "passes[3].tlq.gptq=true",
                                 "passes[0]={rtn: {bits: 8}}", "calibration.cache_dir=null"])
    assert out["calibration"] == {"seeds": [0, 1], "steps": 2, "cache_dir": None}
    assert out["model"] == "zoo:other" and out["output"] == "/tmp/a b"
    assert out["passes"][3] == {"tlq": {"bits": 3, "gptq": True}} and out["passes"][0] == {"rtn": {"bits": 8}}
    assert json.dumps(DATA) == before


def test_pass_keys_address_every_way_a_pass_is_written():
    out = apply_overrides(DATA, ["passes[1].rtn.bits=8", "passes[2].tlq.bits=2"])
    assert out["passes"][1] == {"rtn": {"bits": 8}}        # `- rtn` (name alone) is `{rtn: {}}`
    assert out["passes"][2] == {"tlq": {"bits": 2}}        # `- tlq:` (no parameters)
    assert build_passes([out["passes"][1]])[0].config.bits == 8 and build_passes([out["passes"][2]])[0].config.bits == 2


def test_new_keys_and_sections_are_set_and_a_later_override_wins():
    out = apply_overrides(DATA, ["calibration.height=256", "streaming.enabled=false", "eval.steps=2",
                                 "eval.steps=3", "seed=7"])
    assert out["calibration"]["height"] == 256 and out["streaming"] == {"enabled": False}
    assert out["eval"] == {"steps": 3} and out["seed"] == 7


@pytest.mark.parametrize("text, needle", [
    ("passes[4].tlq.bits=3", "passes[4] is past the end of passes: indices are 0-based and the last is passes[3]"),
    ("calibration[0]=1", "calibration is a mapping, not a list"),
    ("calibration.seeds[1]=3", "calibration.seeds[1] is past the end"),
    ("model.name=x", 'model is the value "zoo:tiny-flux-digits", not a mapping'),
    ("passes[0].smooth.alpha.x=1", "passes[0].smooth.alpha is the value 0.5, not a mapping"),
    ("calibration.steps", "no `=`"),
    ("=3", "the key before `=` is empty"),
    (" =3", "the key before `=` is empty"),
    ("passes[-1].tlq.bits=3", "is not a key path"),
    ("passes..tlq=3", "is not a key path"),
    ("[0]=3", "is not a key path"),
    ("calibration.seeds=[0, 1", "the value is not valid YAML"),
    ("eval[0]=1", "eval is not set, so it has no index [0]"),
])
def test_bad_overrides_name_the_override(text, needle):
    with pytest.raises(RecipeError) as e:
        apply_overrides(DATA, [text], "r.yaml")
    msg = str(e.value)
    assert e.value.exit_code == 2 and f"--set {text}" in msg and needle in msg and msg.startswith("r.yaml: ")
    assert "0-based" in msg                                # the hint says how keys are written


# --- validation and the effective recipe --------------------------------------------------------------------

def test_shipped_recipe_with_overrides_inside_its_included_calibration():
    r = load_recipe(TINY, ["calibration.steps=2", "calibration.seeds=[0]", "passes[0].tlq.bits=3"])
    assert r.calibration.steps == 2 and r.calibration.seeds == [0] and r.calibration.source == "classes"
    assert r.pass_objects()[0].config.bits == 3
    assert r.overrides == ("calibration.steps=2", "calibration.seeds=[0]", "passes[0].tlq.bits=3")
    assert load_recipe(TINY).overrides == ()


def test_recipe_hash_follows_the_effective_recipe():
    """The resume and cache key: different --set values of the model, calibration or passes never share work;
    an override that changes nothing (or only the output) keeps the file's key, as an edited file would."""
    base = recipe_hash(load_recipe(TINY))
    changed = {recipe_hash(load_recipe(TINY, [o])) for o in
               ("calibration.steps=2", "passes[0].tlq.bits=3", "passes[0].tlq.gptq=false", "model=zoo:other")}
    assert base not in changed and len(changed) == 4
    assert recipe_hash(load_recipe(TINY, ["calibration.steps=16", "output=elsewhere"])) == base


@pytest.mark.parametrize("sets, needles", [
    (["passes[0].tlq.bits=9"],
     ["tiny_flux_w4.yaml:passes[0].tlq.bits: ", "(set on the command line: --set passes[0].tlq.bits=9)"]),
    (["passes[0].tlq.colour=red"], ["passes[0].tlq.colour: unknown key; valid keys: bits, granularity",
                                    "(set on the command line: --set passes[0].tlq.colour=red)"]),
    (["calibration.steps=0", "device=tpu"], ["2 problems", "calibration.steps: ", "--set calibration.steps=0)",
                                             "device: ", "--set device=tpu)"]),
    (["calibration.source=prompts"], ["calibration: ", "needs the key 'prompts'",
                                      "(set on the command line: --set calibration.source=prompts)"]),
    (["passes[0]=quantize_all"], ["passes[0]: unknown pass 'quantize_all'", "--set passes[0]=quantize_all)"]),
])
def test_validation_errors_say_the_value_came_from_set(sets, needles):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, sets)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_errors_the_file_made_are_not_blamed_on_set(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**DATA, "device": "tpu"}))
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["calibration.steps=2"])
    assert "device" in str(e.value) and "command line" not in str(e.value)


def test_an_option_and_a_set_of_the_same_key_are_refused():
    with pytest.raises(RecipeError, match="`model` is given twice: by --model and by --set model=zoo:x"):
        load_recipe(TINY, ["model=zoo:x"], model="zoo:y")
    assert load_recipe(TINY, ["model=zoo:x"], output="o", model=None).model == "zoo:x"


def test_override_recipe_on_a_recipe_object():
    """`dicompress.run(Recipe, overrides=...)`: the same edit, validated again, the overrides recorded."""
    first = load_recipe(TINY, ["calibration.steps=2"])
    r = override_recipe(first, ["passes[0].tlq.bits=3", "eval.enabled=false"], output="elsewhere")
    assert r.calibration.steps == 2 and r.pass_objects()[0].config.bits == 3 and not r.eval.enabled
    assert r.output == "elsewhere" and r.overrides == ("calibration.steps=2", "passes[0].tlq.bits=3",
                                                       "eval.enabled=false")
    with pytest.raises(RecipeError, match=r"set on the command line: --set passes\[0\].tlq.bits=1"):
        override_recipe(first, ["passes[0].tlq.bits=1"])


# --- the command line ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("passes[3].tlq.bits=3", "past the end"), ("calibration", "no `=`"), ("=1", "key before `=` is empty"),
    ("model.x=1", "not a mapping"), ("passes[0].tlq.bits=9", "(set on the command line: --set passes[0].tlq.bits=9)"),
    ("output=x", "`output` is given twice"),
])
def test_cli_broken_override_exit_2_nothing_written(tmp_path, text, needle):
    out = tmp_path / "art"
    r = invoke("run", TINY, "--quiet", "--output", out, "--set", "calibration.steps=2", "--set", text)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and "Traceback" not in r.output and needle in r.output, r.output
    assert nothing_written(out) and not list(tmp_path.iterdir())


def test_cli_run_with_set_takes_effect(tmp_path):
    """The shipped recipe made cheap from the command line; the artifact is 3-bit and the report shows why."""
    out = tmp_path / "art"
    sets = ["calibration.steps=2", "calibration.seeds=[0]", "calibration.classes=[0, 3]", "calibration.batch_size=2",
            "passes[0].tlq.bits=3", "passes[0].tlq.gptq=false", "eval.enabled=false"]
    r = invoke("run", TINY, "--quiet", "--output", out, *[a for s in sets for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["overrides"] == sets and report["recipe"] == str(TINY) and "metrics" not in report
    assert report["calibration"]["steps"] == 2 and report["calibration"]["seeds"] == [0]
    assert report["passes"][0]["config"]["bits"] == 3 and report["passes"][0]["config"]["gptq"] is False
    manifest = json.loads((out / "config.json").read_text())["quantization_config"]["manifest"]
    assert manifest and {e["bits"] for e in manifest if e["op"] == "quantize"} == {3}
