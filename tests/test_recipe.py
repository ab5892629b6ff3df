from pathlib import Path

import pytest
import yaml

from dicompress.errors import RecipeError
from dicompress.recipe import load_recipe, parse_recipe

GOOD = {"model": "zoo:tiny-flux-digits", "passes": [{"tlq": {"bits": 4}}], "output": "out/x"}


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_good_recipe_parses(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert [p.name for p in r.pass_objects()] == ["tlq"]
    assert r.device == "auto" and r.eval.enabled


def test_shipped_recipes_validate():
    """Every recipe in recipes/ parses and passes the order rules (models that are not on disk are not opened)."""
    shipped = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))
    assert len(shipped) >= 20
    for path in shipped:
        assert load_recipe(path).pass_objects(), path
    act = next(p for p in load_recipe("recipes/tiny_flux_w4a4.yaml").pass_objects() if p.name == "act_quant")
    assert act.config.bits == 4 and act.config.zero_point is True     # the measured W4A4 grid (README)
    r = load_recipe("recipes/tiny_flux_w4.yaml")
    assert r.calibration.source == "classes" and r.calibration.seeds == [0, 1]


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "model: x\npasses: [tlq: {bits: 4}\noutput: o\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(p) in str(e.value) and "line" in str(e.value) and e.value.exit_code == 2


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, {**GOOD, "otput": "x"}))
    assert "otput" in str(e.value) and "unknown key" in str(e.value)


def test_unknown_pass_lists_available(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, {**GOOD, "passes": [{"tlq": {"bits": 4}}, {"quantize_all": {}}]}))
    assert "passes[1]" in str(e.value) and "quantize_all" in str(e.value) and "tlq" in str(e.value)


def test_bad_pass_param_names_key_path(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, {**GOOD, "passes": [{"tlq": {"bits": 4, "gropu_size": 64}}]}))
    assert "passes[0].tlq.gropu_size" in str(e.value)


def test_wrong_type_and_all_problems_reported(tmp_path):
    data = {**GOOD, "device": "tpu", "calibration": {"source": "classes", "steps": "many"}}
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    msg = str(e.value)
    assert "device" in msg and "calibration.steps" in msg


def test_prompts_source_needs_existing_file(tmp_path):
    data = {**GOOD, "calibration": {"source": "prompts", "prompts": "nope.txt"}}
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    assert "calibration.prompts" in str(e.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, {"model": "zoo:tiny-flux-digits", "passes": []}))
    assert "output" in str(e.value)


def test_pass_entry_shape(tmp_path):
    with pytest.raises(RecipeError) as e:
        parse_recipe({**GOOD, "passes": [{"tlq": {"bits": 4}, "rtn": {"bits": 4}}]}, "f.yaml")
    assert "passes[0]" in str(e.value) and "one key" in str(e.value)


def test_overrides_apply(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), output="elsewhere", model=None)
    assert r.output == "elsewhere" and r.model == GOOD["model"]


def test_order_rule_two_quantizers_on_same_layers(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, {**GOOD, "passes": [{"tlq": {"bits": 4}}, {"rtn": {"bits": 8}}]}))
    assert "passes[1].rtn" in str(e.value) and "passes[0].tlq" in str(e.value)
    ok = {**GOOD, "passes": [{"tlq": {"bits": 4, "include": ["transformer_blocks.*"]}},
                             {"rtn": {"bits": 8, "include": ["single_transformer_blocks.*"]}}]}
    assert len(load_recipe(write(tmp_path, ok)).pass_objects()) == 2


def test_pass_needing_calibration_without_calibration(tmp_path):
    from dicompress.passes import PASSES, Pass, register_pass

    @register_pass
    class NeedsCalib(Pass):
        name = "_test_needs_calib"
        needs_calibration = True
    try:
        with pytest.raises(RecipeError) as e:
            load_recipe(write(tmp_path, {**GOOD, "passes": [{"_test_needs_calib": {}}]}))
        assert "calibration" in str(e.value) and "passes[0]._test_needs_calib" in str(e.value)
    finally:
        PASSES.pop("_test_needs_calib")
