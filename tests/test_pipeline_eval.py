"""Evaluation of real pipelines: SSIM (Wang et al. 2004) on known cases, and a compressed transformer inside the tiny
FLUX pipeline against the original, from `run` (recipe `eval.prompts`) and from `dicompress eval --pipeline`."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

import dicompress
from dicompress.cli import main
from dicompress.errors import RecipeError
from dicompress.eval.ssim import K1, K2, gaussian_window, ssim, ssim_map

# -- SSIM on plain tensors ----------------------------------------------------------------------------------------


def brute_force_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """The paper's definition, position by position with the 2-D window (no separable filtering): a single-channel
    [H, W] pair, the mean over every position where the 11x11 window fits."""
    w = torch.outer(gaussian_window(), gaussian_window())
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    x, y = x.double(), y.double()
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(torch.stack(vals).mean())


def test_window_is_the_papers():
    g = gaussian_window()
    assert g.shape == (11,) and math.isclose(float(g.sum()), 1.0) and int(g.argmax()) == 5
    assert math.isclose(float(g[6] / g[5]), math.exp(-1 / (2 * 1.5 ** 2)), rel_tol=1e-12)


def test_ssim_equals_the_definition_position_by_position():
    torch.manual_seed(0)
    x = torch.rand(15, 17)
    y = (x + 0.2 * torch.randn(15, 17)).clamp(0, 1)
    got = float(ssim(x[None], y[None]))
    assert math.isclose(got, brute_force_ssim(x, y), rel_tol=1e-10)
    assert 0 < got < 1


def test_ssim_known_cases():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(ssim(x, x.flip(0)), ssim(x.flip(0), x))               # symmetric
    # constant images: variances and covariance 0, so SSIM is the luminance term alone, (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    want = (2 * a * b + K1 ** 2) / (a * a + b * b + K1 ** 2)
    const = lambda v: torch.full((1, 12, 12), v, dtype=torch.float64)  # noqa: E731
    assert math.isclose(float(ssim(const(a), const(b))), want, rel_tol=1e-12)
    # y = x + c: equal variances, covariance = variance, so the structure term is 1 and only luminance drops
    shifted = ssim_map(x, x + 0.1)
    assert (shifted < 1).all() and (shifted > 0.9).all()
    # inverted contrast around the local mean: negative SSIM
    assert float(ssim(x[:1], 1 - x[:1])) < 0
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


# -- the tiny FLUX pipeline ---------------------------------------------------------------------------------------

STEPS, SIZE = 2, 64


@pytest.fixture(scope="module")
def evaluated(tiny_flux_pipeline_dir, tmp_path_factory):
    """An RTN W4 run on the tiny FLUX pipeline whose recipe's eval names prompts."""
    d = tmp_path_factory.mktemp("pipeline_eval")
    (d / "prompts.txt").write_text("a red cat\n# skipped\n\na blue dog on grass\n")
    recipe = d / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_flux_pipeline_dir), "output": str(d / "out"), "passes": [{"rtn": {"bits": 4}}],
        "eval": {"prompts": "prompts.txt", "steps": STEPS, "height": SIZE, "width": SIZE, "seed": 7}}))
    report = dicompress.run(recipe, progress=False, echo=lambda *a, **k: None)
    return {"dir": d, "recipe": recipe, "report": report, "src": tiny_flux_pipeline_dir}


def test_run_reports_psnr_ssim_latency_and_writes_the_grid(evaluated):
    m = evaluated["report"]["pipeline_eval"]
    assert m["prompts"] == 2 and m["steps"] == STEPS and (m["height"], m["width"]) == (SIZE, SIZE)
    assert 0 < m["ssim"] < 1 and m["ssim_min"] <= m["ssim"]          # 4-bit weights change the images, a little
    assert 20 < m["psnr_db"] < 120 and m["psnr_db_min"] <= m["psnr_db"] + 1e-9
    assert all(v > 0 for v in m["latency_ms_per_step"].values())
    assert [p["prompt"] for p in m["per_prompt"]] == ["a red cat", "a blue dog on grass"]
    art = evaluated["dir"] / "out" / "transformer"
    assert json.loads((art / "report.json").read_text())["pipeline_eval"]["ssim"] == m["ssim"]
    from PIL import Image
    with Image.open(art / "pipeline_eval.png") as grid:           # 2 rows of original | compressed
        assert grid.size[0] > 2 * SIZE and grid.size[1] > 2 * SIZE
    dicompress.verify_artifact(art, checksums=True)                 # the added files leave the artifact intact


def test_eval_command_measures_the_same_and_writes_json(evaluated, tmp_path):
    d = evaluated["dir"]
    r = CliRunner().invoke(main, ["eval", str(d / "out"), "--pipeline", str(evaluated["src"]), "--prompts",
                                  str(d / "prompts.txt"), "--steps", str(STEPS), "--height", str(SIZE), "--width",
                                  str(SIZE), "--seed", "7", "--grid", str(tmp_path / "g.png"), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)                                        # stdout holds the JSON alone
    run = evaluated["report"]["pipeline_eval"]
    assert (m["psnr_db"], m["ssim"]) == (run["psnr_db"], run["ssim"])   # same prompts, seeds, steps: same images
    assert (tmp_path / "g.png").stat().st_size > 0


def test_eval_without_a_metric_says_so_and_fails(evaluated):
    out = evaluated["dir"] / "out"
    r = CliRunner().invoke(main, ["eval", str(out)])
    assert r.exit_code == 2 and "no quality metric" in r.output and "--pipeline" in r.output
    assert str(evaluated["src"]) in r.output                        # the hint names the recorded source pipeline
    r = CliRunner().invoke(main, ["eval", str(out), "--pipeline", str(evaluated["src"])])
    assert r.exit_code == 2 and "--prompts FILE is missing" in r.output


def test_prompts_need_a_pipeline_before_any_work(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "zoo:tiny-flux-digits", "output": str(tmp_path / "o"),
                                      "passes": [{"rtn": {"bits": 4}}], "eval": {"prompts": str(tmp_path / "p.txt")}}))
    with pytest.raises(RecipeError, match="eval.pipeline.*transformer alone"):
        dicompress.run(recipe, progress=False)
    assert not (tmp_path / "o").exists()
    recipe.write_text(recipe.read_text().replace("p.txt", "missing.txt"))
    with pytest.raises(RecipeError, match="eval.prompts: file .* not found"):
        dicompress.load_recipe(recipe)
