"""bfloat16 products on the CPU: whether they can be used with proven error bounds.

The coreset's bound (:class:`skpatchcore._coreset._bounds.LowBound`) and the exact
search's candidate filter (:class:`skpatchcore._search._LowPrecisionFilter`)
run matrix products in bfloat16 where the CPU multiplies bfloat16 in hardware
(AMX or AVX512-BF16: 4 to 8 times the float32 rate on our 2-core Xeon). Their
margins rest on one model of such a product, checked here once per process.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._device import cpu_float32

UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2  # float32: 2^-24
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
# Largest absolute error of rounding a float32 below the normal range to
# bfloat16, or of flushing it (or a product, or a sum) to zero: 2^-126.
TINY = float(np.finfo(np.float32).tiny)


def bf16_bits_as_float32(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 numbers given by their bits (int16; exact)."""
    return (bits.astype(np.int32) << 16).view(np.float32)


@functools.cache
def bf16_hardware() -> bool:
    """The CPU multiplies bfloat16 in hardware, and torch's products sum in float32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:  # not Linux: float32 products
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags)) and bf16_sums_in_float32()


def bf16_sums_in_float32(product=torch.mm) -> bool:
    """Check the model the bfloat16 margins rest on: a bfloat16 product sums
    the exact products of its entries in float32, then rounds the sum to
    bfloat16 once, to nearest.

    A kernel that kept bfloat16 partial sums fails the first test (each addend
    sits below half a bfloat16 unit of the running sum, so such sums go wrong by
    far more than the model allows); the others compare random products with
    their float64 values, at the shapes and layouts the coreset and the search
    use (a row-major left side times a transposed row-major right side).
    """
    with cpu_float32():
        ones = torch.ones((1, 256), dtype=torch.bfloat16)
        steps = (1.0 + torch.arange(256, dtype=torch.float32) / 128).to(torch.bfloat16)
        exact = float(steps.double().sum())  # 512 + 255 / 2: a float32 sum of these is exact
        if float(product(ones, steps[:, None])) != float(torch.tensor(exact).to(torch.bfloat16)):
            return False
        generator = torch.Generator().manual_seed(0)
        # The coreset's shapes (odd widths), then the search's (widths padded to a
        # multiple of 32, which AMX kernels take another way; one query row).
        shapes = [(64, 16, 512), (64, 133, 512), (64, 1029, 512)]
        shapes += [(1, 64, 700), (200, 160, 1500), (64, 1056, 640)]
        for n_left, n_dims, n_right in shapes:
            left = torch.randn((n_left, n_dims), generator=generator).to(torch.bfloat16)
            right = (torch.randn((n_right, n_dims), generator=generator) * 8).to(torch.bfloat16)
            right[:, -1] = 1e4  # one large column, like the bound's offsets
            got = product(left, right.T).double()
            exact = left.double() @ right.double().T
            sizes = left.double().abs() @ right.double().abs().T
            terms = n_dims * UNIT_ROUNDOFF / (1 - n_dims * UNIT_ROUNDOFF)
            allowed = BF16_UNIT * exact.abs() * (1 + BF16_UNIT) + terms * sizes * (1 + BF16_UNIT)
            if not bool(((got - exact).abs() <= allowed).all()):
                return False
    return True
