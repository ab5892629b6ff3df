"""The README's "Writing a pass" example runs as it stands: a real pass, saved and loaded through diffusers."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    text = README.read_text()
    section = text.split("## Writing a pass", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_pass_example_runs(tmp_path):
    script = tmp_path / "lowrank_pass.py"
    script.write_text(example())
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'layers': 8" in out.stdout                   # the 8 single blocks' proj_mlp of the embedded model
    assert (tmp_path / "out" / "lowrank_example" / "config.json").exists()
