"""Wall time of the pure-torch reference's heavy pieces on CPU, to compare the reference across commits.

    python tools/bench_reference.py
    # another commit's code, the same measurement:
    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old python tools/bench_reference.py

Times (the mean of 3 calls after one warmup, on this machine's threads): decoding a 12288x3072 4-bit TLQ
weight (reference.decode_weight, what mode decode runs per call), the Hadamard rotation of 1024 tokens of 12288
channels (quant.hadamard.apply_hadamard) and the FWHT alone on [1024, 12, 1024]. Only names that exist in old
commits too are used, so the script runs against them unchanged.
"""
import time

import torch

from dicompress.kernels import reference
from dicompress.quant.hadamard import _fwht_unnormalised, apply_hadamard


def mean_ms(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    torch.manual_seed(0)
    n, k = 12288, 3072
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scales = (torch.rand(n, 1) * 0.05 + 0.01).half()
    grid = torch.tensor([-6.0, 0.8, -6.0, 0.8]).half().expand(n, 4).contiguous()
    eta = torch.tensor([0.01])
    decode = mean_ms(lambda: reference.decode_weight(qweight, k, "tlq", scales, grid, eta, 4, None, "decode"))
    print(f"decode_weight 12288x3072 4-bit: {decode:.0f} ms")
    x = torch.randn(1024, 12288)
    print(f"apply_hadamard 1024x12288: {mean_ms(lambda: apply_hadamard(x)):.0f} ms")
    y = torch.randn(1024, 12, 1024)
    print(f"fwht 1024x12x1024: {mean_ms(lambda: _fwht_unnormalised(y)):.0f} ms")


if __name__ == "__main__":
    main()
