"""4-bit formats: packing round-trips, INT4/NVFP4 quantizers, integer-exact group products, the top-r SVD."""

from __future__ import annotations

import pytest
import torch

from pipelines.quant import formats
from pipelines.quant.quantizer import top_r

E2M1 = torch.tensor(formats.E2M1_VALUES)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_int4_packing_round_trips_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # every code, in both nibble positions
    codes = torch.cat([codes, codes.flip(-1)])
    packed = formats.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 16)
    assert torch.equal(formats.unpack_int4(packed), codes)
    # two per byte, low nibble first (two's complement): (-8, 7) -> 0x78, (1, -1) -> 0xF1
    assert formats.pack_int4(torch.tensor([[-8, 7, 1, -1]], dtype=torch.int8)).tolist() == [[0x78, 0xF1]]
    random = torch.randint(-8, 8, (5, 7, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    assert torch.equal(formats.unpack_int4(formats.pack_int4(random)), random)
    with pytest.raises(ValueError, match="even"):
        formats.pack_int4(torch.zeros(3, 5, dtype=torch.int8))


def test_nvfp4_codes_round_trip_and_packing():
    values = torch.cat([E2M1, -E2M1[1:], torch.zeros(1)])[None]  # every E2M1 value, one block of 16
    codes, block, global_scale = formats.quantize_nvfp4(values, 16, global_scale=torch.tensor(0.25))
    assert block.item() == 4.0  # max 6 / (6 · 0.25): the step is exactly 1
    assert torch.equal(formats.nvfp4_operand(codes) / 2, values)
    packed = formats.pack_int4(codes.to(torch.int8))
    assert torch.equal(formats.unpack_nibbles(packed), codes)
    # the operand is 2·e2m1: integers in [-12, 12]
    all_codes = torch.arange(16, dtype=torch.uint8)
    operand = formats.nvfp4_operand(all_codes)
    assert operand.tolist() == [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]


def test_nvfp4_rounds_to_nearest_grid_value_and_fp8_scales():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=gen) * torch.logspace(-2, 2, 64)
    codes, block, g = formats.quantize_nvfp4(x, 16)
    assert torch.equal(block.to(torch.float8_e4m3fn).float(), block)  # block scales are FP8 E4M3 values
    step = (block * g).repeat_interleave(16, dim=-1)
    deq = formats.nvfp4_operand(codes) / 2 * step
    # nearest: no other grid value (times the same step) is closer
    candidates = torch.cat([E2M1, -E2M1])[None, None, :] * step[..., None]
    best = (candidates - x[..., None]).abs().min(-1).values
    assert torch.allclose((deq - x).abs(), best, atol=1e-6, rtol=1e-6)


def test_int4_quantizer_error_bound_and_scale_bits():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 128, generator=gen) * 3
    x[:, 5] = 0  # zero column; and an all-zero group
    x[0, :64] = 0
    codes, scale = formats.quantize_int4(x, 64)
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(formats.from_bits(formats.to_bits(scale, torch.float16)), scale)
    deq = (codes.float().reshape(16, 2, 64) * scale[..., None]).reshape(16, 128)
    assert ((deq - x).abs() <= scale.repeat_interleave(64, dim=-1) / 2 + 1e-6).all()
    assert torch.equal(deq[0, :64], torch.zeros(64))


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_group_products_are_integer_exact(fmt):
    """The float32 group GEMM equals an int64 reference bit for bit, including the worst case."""
    gen = torch.Generator().manual_seed(3)
    group = 64 if fmt == "int4" else 16
    if fmt == "int4":
        a = torch.randint(-8, 8, (33, 256), generator=gen).float()
        b = torch.randint(-8, 8, (17, 256), generator=gen).float()
        a[0], b[0] = -8, -8  # every product 64, group sum 4096
    else:
        a = formats.nvfp4_operand(torch.randint(0, 16, (33, 256), generator=gen, dtype=torch.uint8))
        b = formats.nvfp4_operand(torch.randint(0, 16, (17, 256), generator=gen, dtype=torch.uint8))
        a[0], b[0] = -12, -12  # 144 per product, 2304 per block
    groups = 256 // group
    ones_a, ones_b = torch.ones(33, groups), torch.ones(17, groups)
    for g in range(groups):  # one group at a time: the float path must equal exact integers
        sl = slice(g * group, (g + 1) * group)
        sa, sb = torch.zeros(33, groups), torch.zeros(17, groups)
        sa[:, g], sb[:, g] = 1, 1
        exact = a[:, sl].long() @ b[:, sl].long().T
        assert torch.equal(formats.group_matmul(a, sa, b, sb, group), exact.float())
    assert formats.group_matmul(a, ones_a, b, ones_b, group)[0, 0].item() == groups * (4096 if fmt == "int4" else 2304)
    # chunking over groups does not change the result
    full = formats.group_matmul(a, ones_a * 0.5, b, ones_b * 3.0, group)
    chunked = formats.group_matmul(a, ones_a * 0.5, b, ones_b * 3.0, group, chunk_elements=33 * 17)
    assert torch.equal(full, chunked)


def test_top_r_equals_truncated_svd():
    gen = torch.Generator().manual_seed(4)
    for shape in [(48, 160), (160, 48), (40, 40)]:
        m = torch.randn(*shape, generator=gen, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        up, down = top_r(m, 12)
        torch.testing.assert_close(up @ down, (u[:, :12] * s[:12]) @ vh[:12], atol=1e-10, rtol=0)
        torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1))  # singular values split evenly
