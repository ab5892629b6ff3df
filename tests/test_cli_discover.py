"""A CLI a user can discover and script: `passes` lists every pass and its keys from the configs, unknown keys and
passes name the valid ones and the nearest, `run --dry-run` checks everything a run checks before work without
loading weights (and, through the console script, without importing diffusers), `--json` on stdout."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dicompress.cli import main
from dicompress.errors import RecipeError
from dicompress.passes import PASSES
from dicompress.passes.catalog import config_keys
from dicompress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_recipe(tmp_path, **over) -> Path:
    data = {"model": "zoo:tiny-flux-digits", "calibration": {"source": "classes", "classes": [0, 3], "seeds": [0],
                                                             "steps": 2},
            "passes": [{"tlq": {"bits": 4, "gptq": True}}, {"act_quant": {"bits": 8}}],
            "output": str(tmp_path / "art")}
    data.update(over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_passes_lists_every_pass_with_every_key_from_its_config():
    r = invoke("passes", "--json")
    assert r.exit_code == 0, r.output
    listed = {d["name"]: d for d in json.loads(r.stdout)}
    assert set(listed) == set(PASSES)
    for name, cls in PASSES.items():
        keys = {k["name"]: k for k in listed[name]["keys"]}
        assert [k for k in keys if "." not in k] == list(cls.Config.model_fields), name
        assert listed[name]["doc"], name
        missing = [k for k, v in keys.items() if not v["description"]]
        assert not missing, f"{name}: keys without a description: {missing}"
    text = invoke("passes").output
    assert all(f"\n{n} " in "\n" + text for n in PASSES)


def test_one_pass_with_types_defaults_constraints():
    r = invoke("passes", "tlq")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    bits = next(line for line in lines if line.strip().startswith("bits "))
    assert "int" in bits and "required" in bits and ">= 2" in bits and "<= 8" in bits
    gran = next(line for line in lines if line.strip().startswith("granularity "))
    assert "'channel' | 'group'" in gran and 'default "channel"' in gran
    nested = [k.name for k in config_keys(PASSES["amber_depth"].Config) if "." in k.name]
    assert "distill.steps" in nested and all(f"\n  {k} " in invoke("passes", "amber_depth").output for k in nested)


def test_unknown_pass_suggests_the_nearest():
    r = invoke("passes", "tlk")
    assert r.exit_code == 2 and "did you mean 'tlq'" in r.output


def test_unknown_key_lists_valid_keys_and_the_nearest(tmp_path):
    path = write_recipe(tmp_path, passes=[{"tlq": {"bits": 4, "granularty": "group"}}])
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "passes[0].tlq.granularty" in msg and "did you mean 'granularity'" in msg
    assert "valid keys: bits, granularity, group_size" in msg
    with pytest.raises(RecipeError, match=r"calibration.sedes: unknown key \(did you mean 'seeds'\?\)"):
        load_recipe(write_recipe(tmp_path, calibration={"source": "classes", "sedes": [0]}))
    with pytest.raises(RecipeError, match=r"eval.step: unknown key \(did you mean 'steps'\?\); valid keys: enabled"):
        load_recipe(write_recipe(tmp_path, eval={"step": 2}))
    r = invoke("run", write_recipe(tmp_path, passes=[{"tql": {"bits": 4}}]), "--dry-run")
    assert r.exit_code == 2 and "did you mean 'tlq'" in r.output


def test_dry_run_plans_without_loading_or_writing(tmp_path):
    r = invoke("run", write_recipe(tmp_path), "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["model"]["class"] == "FluxTransformer2DModel" and plan["model"]["zoo"]
    cal = plan["calibration"]
    assert cal["source"] == "classes" and cal["samples"] == 2 and "block" in cal["holds"]   # GPTQ reads block inputs
    assert [p["name"] for p in plan["passes"]] == ["tlq", "act_quant"] and plan["passes"][0]["config"]["gptq"]
    assert plan["streaming"] is True and plan["eval"]["digits"] and not (tmp_path / "art").exists()
    text = invoke("run", write_recipe(tmp_path), "--dry-run").output
    assert "OK (dry run" in text and "passes[1]:   act_quant" in text
    # what the run would refuse, refused the same way
    (tmp_path / "art").mkdir()
    assert invoke("run", write_recipe(tmp_path), "--dry-run").exit_code == 3
    bad = write_recipe(tmp_path, output=str(tmp_path / "x"), calibration={"source": "classes", "classes": [0, 12],
                                                                          "seeds": [0]})
    r = invoke("run", bad, "--dry-run")
    assert r.exit_code == 2 and "calibration.classes" in r.output


def test_console_script_checks_recipes_without_diffusers(tmp_path):
    """Through the console script's entry (dicompress_cli): a recipe error, then a dry run, with diffusers and
    transformers never imported."""
    bad = write_recipe(tmp_path, passes=[{"tlq": {"bits": 4, "granularty": "group"}}])
    bad = bad.rename(tmp_path / "bad.yaml")
    good = write_recipe(tmp_path)
    script = textwrap.dedent("""
        import json, sys
        import dicompress_cli
        codes = []
        for args in (["run", sys.argv[1]], ["run", sys.argv[2], "--dry-run"], ["passes", "tlq"]):
            sys.argv = ["dicompress", *args]
            try:
                dicompress_cli.main()
            except SystemExit as e:
                codes.append(e.code)
        heavy = sorted(m for m in ("diffusers", "transformers") if m in sys.modules)
        print(json.dumps({"codes": codes, "heavy": heavy}))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(bad), str(good)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["codes"] == [2, 0, 0], r.stderr[-2000:]
    assert out["heavy"] == [], out
    assert "did you mean 'granularity'" in r.stderr and "OK (dry run" in r.stdout


def test_inspect_json_and_its_hint():
    r = invoke("inspect", "zoo:tiny-flux-digits", "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["kind"] == "model" and d["class"] == "FluxTransformer2DModel" and d["quantized_by_default"] > 0
    r = invoke("inspect", "/no/such/model")
    assert r.exit_code == 2 and "--model" not in r.output and "dicompress inspect" in r.output
