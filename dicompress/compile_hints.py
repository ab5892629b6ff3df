"""torch.compile hints that cost nothing when dicompress is imported.

`torch.compiler.assume_constant_result` imports torch._dynamo (1-5 s here) at the decoration, that is when the
module defining the function loads; every `import dicompress` and every recipe check would pay it. The decorator
only marks the function (torch._dynamo.decorators.assume_constant_result sets `_dynamo_marked_constant`), so
this sets the same mark; tests/test_training.py checks that torch's decorator still sets it and that
torch.compile treats a marked function as a constant."""
from __future__ import annotations

MARK = "_dynamo_marked_constant"


def assume_constant_result(fn):
    """Mark `fn` as returning a constant for torch.compile: traced code calls it once at trace time and keeps
    the result (a tensor becomes a graph constant), instead of tracing into it."""
    setattr(fn, MARK, True)
    return fn
