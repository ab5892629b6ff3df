"""Dense bit-packing of b-bit codes (b = 1..8).

Each row is cut into runs of 8 codes (the row is zero-padded to a multiple of 8); a run of 8 b-bit
codes is one 8*b-bit little-endian integer (code i at bits [i*b, (i+1)*b)), stored as b bytes. For
b = 4 this is the usual layout (code 2j in the low nibble of byte j, code 2j+1 in the high nibble);
for b = 3, 8 codes take 3 bytes with no waste.
"""
from __future__ import annotations

import torch


def packed_bytes(n_codes: int, bits: int) -> int:
    """Bytes per row of `n_codes` b-bit codes."""
    _check_bits(bits)
    return (n_codes + 7) // 8 * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] integers in [0, 2^bits) -> uint8 [..., packed_bytes(n, bits)]."""
    _check_bits(bits)
    *lead, n = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(*lead, -1, 8)
    if bits == 8:  # one code per byte (a 64-bit run word would overflow int64)
        return c.to(torch.uint8).reshape(*lead, -1)
    word = (c << (torch.arange(8, device=c.device) * bits)).sum(-1)          # [..., runs] < 2^(8b) <= 2^56
    shifts = torch.arange(bits, device=c.device) * 8
    out = (word[..., None] >> shifts) & 0xFF                                  # [..., runs, bits]
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """uint8 [..., packed_bytes(n, bits)] -> int64 codes [..., n]."""
    _check_bits(bits)
    *lead, nb = packed.shape
    if nb != packed_bytes(n_codes, bits):
        raise ValueError(f"packed row has {nb} bytes, expected {packed_bytes(n_codes, bits)} for {n_codes} "
                         f"{bits}-bit codes")
    if bits == 8:
        return packed.to(torch.int64)[..., :n_codes]
    if 8 % bits == 0:
        # 1, 2, 4 bits: a code never straddles a byte, so split the bytes in uint8 (code j of a byte at bits
        # [j·b, (j+1)·b), low first, as the run word says) and widen once; ~4x faster than the run words
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.to(torch.uint8)[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, nb * per)[..., :n_codes].to(torch.int64)
    b = packed.to(torch.int64).view(*lead, -1, bits)
    word = (b << (torch.arange(bits, device=b.device) * 8)).sum(-1)           # [..., runs]
    codes = (word[..., None] >> (torch.arange(8, device=b.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n_codes]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
