import pytest
import torch

from dicompress.quant.packing import pack_codes, packed_bytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 13, 64, 127])
def test_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_and_leading_dims(bits):
    top = (1 << bits) - 1
    codes = torch.tensor([[0, top] * 5, [top] * 10]).view(2, 1, 10)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 10), codes)


def test_packed_bytes_is_dense():
    assert packed_bytes(8, 3) == 3          # 8 three-bit codes in 3 bytes, no waste
    assert packed_bytes(9, 3) == 6          # a partial run of 8 still takes a full run
    assert packed_bytes(128, 4) == 64
    assert packed_bytes(5, 8) == 8


def test_4bit_nibble_order():
    # code 2j in the low nibble of byte j, code 2j+1 in the high nibble
    packed = pack_codes(torch.tensor([[1, 2, 3, 4, 0xF, 0, 0, 0]]), 4)
    assert packed.tolist() == [[0x21, 0x43, 0x0F, 0x00]]


def test_3bit_little_endian_run():
    # 8 codes -> one 24-bit little-endian word, code i at bits [3i, 3i+3)
    packed = pack_codes(torch.tensor([[7, 0, 0, 0, 0, 0, 0, 1]]), 3)
    assert packed.tolist() == [[0x07, 0x00, 0x20]]


def test_8bit_is_identity_bytes():
    codes = torch.tensor([[0, 255, 17]])
    assert pack_codes(codes, 8)[:, :3].tolist() == [[0, 255, 17]]


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        packed_bytes(4, bad)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 8, dtype=torch.long), bad)


@pytest.mark.parametrize("codes", [[[16, 0]], [[-1, 0]]])
def test_out_of_range_codes(codes):
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor(codes), 4)


def test_wrong_packed_length():
    packed = pack_codes(torch.zeros(2, 10, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(packed, 4, 20)
