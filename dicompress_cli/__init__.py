"""The `dicompress` console script.

`import dicompress` registers the dicompress quantizer with diffusers, which imports diffusers' quantizer registry
and with it transformers and every quantization backend: about 8 s of CPU here, before a command could even read its
arguments. This starts the CLI (dicompress.cli) on the package *before* its __init__ runs, so `dicompress passes`,
`dicompress run --dry-run` and every recipe error answer from the recipe modules alone (torch and pydantic); the
commands that load models run the package's __init__ first (dicompress.cli._package). The package itself is the one
installed: nothing is imported twice."""
from __future__ import annotations

import importlib.util
import sys


def main():
    if "dicompress" not in sys.modules:
        spec = importlib.util.find_spec("dicompress")
        sys.modules["dicompress"] = importlib.util.module_from_spec(spec)   # __path__ and __spec__, __init__ not run
    from dicompress.cli import main as cli
    return cli()
