"""An exact nearest-neighbour search for the ONNX graph whose candidates come from an int8 product.

onnxruntime's CPU kernels multiply uint8 by int8 (``MatMulInteger``) three to
four times as fast as float32 (VNNI), and have no bfloat16 product, so the
exported graph's analogue of the torch path's bfloat16 filter
(:mod:`skpatchcore._search`) is an int8 one. For every patch ``x`` (centred)
and bank vector ``y`` (centred) it computes a **proven lower bound** of the
squared distance ``|x - y|^2`` from the int8 product, keeps the ``m`` bank
vectors with the smallest bounds, computes their distances exactly and keeps
the ``k`` nearest of those. A patch is **certified** when the ``(m+1)``-th
smallest bound is at least its k-th exact distance (inflated by the float32
error of that sum): then no other bank vector can be nearer. The patches
that are not certified (about 5 % on MPDD at the reference settings) are
searched again with the full float32 product. The neighbours are the exact
search's: the same as the float32 product finds, up to float32 rounding of
near-ties.

The bound. Each bank row ``y`` is stored as ``s_y * Y`` with ``Y`` int8 and
``s_y = max|y| / 127`` (rounded once, in float64, at export; a zero row is
exact, with no error terms); each patch as ``s_x * X`` with ``X = round(x /
s_x)`` in ``[-63, 63]``, ``s_x = max|x| / 63``, fed to ``MatMulInteger`` as
``X + 64`` with zero point 64, so the int32 sum is ``X . Y`` exactly. Seven
bits, not eight: CPUs without VNNI multiply uint8 by int8 with an instruction
that adds two products into a saturating int16, and with ``X + 64 <= 127``
two products reach at most 2 x 127 x 127 = 32,258 < 32,767. With entrywise
rounding errors at most ``s_x / 2`` and ``s_y / 2``, ``|<x, y> - s_x s_y
X.Y| <= s_y |x|_1 / 2 + s_x |y|_1 / 2 + 3 d s_x s_y / 4``, so

    |x - y|^2 >= |x|^2 + |y|^2 - 2 s_x s_y X.Y
                 - (s_y |x|_1 + s_x |y|_1 + 1.5 d s_x s_y) (1 + 1e-3)
                 - eps (|x| + |y|)^2,      eps = 1e-5 + (d + 2) 2^-24,

the 1e-3 covering the float32 roundings of ``x / s_x`` and of ``|x|_1``,
``eps`` those of ``|x|^2`` (a float32 sum of d squares: up to d + 1 units of
2^-24) and of the bound's own arithmetic (about ten units of 2^-24 of
``(|x| + |y|)^2``). Everything but the int8 product is a rank-5 outer product
``U V`` (``U`` per patch, ``V`` per bank vector). The graph computes the bound
divided by ``s_x`` (a patch's ranking does not change, and its certificate
compares ``s_x`` times the threshold): ``-2 s_y X.Y + (U / s_x) V``: one int8
product, a cast, the column scales, one (N, 5) x (5, M) product and one sum.
"""

from __future__ import annotations

import numpy as np

# Dimensions and bank vectors from which the exported search uses the int8
# filter: below, the float32 product is cheap, and the m candidates' exact
# distances (a gather of m bank rows per patch) would cost more than it saves.
FILTER_MIN_DIMS = 512
FILTER_MIN_VECTORS = 2048
# Candidates per patch beyond k. On MPDD at the reference settings (10 %, k = 1)
# 4, 8 and 12 left 4.7 %, 0.5 % and 0.07 % of the patches uncertified, and 4 ran
# fastest (35 against 39 and 40 ms an image, interleaved): an uncertified patch
# costs one row of the float32 product, a candidate a gather of d values.
EXTRA_CANDIDATES = 4
_SLACK = 1.001  # on the quantisation error terms (float32 |x|_1, x / s_x)
# A patch's codes: [-63, 63], fed as uint8 [1, 127] (see the module docstring).
_QUERY_LEVELS = 63


def use_int8_filter(n_bank: int, n_dims: int, k: int) -> bool:
    """Whether the exported search filters with int8 products (see module docstring)."""
    return n_dims >= FILTER_MIN_DIMS and n_bank >= max(FILTER_MIN_VECTORS, k + EXTRA_CANDIDATES + 1)


class Int8Filter:
    """The int8 filter's constants for a centred float32 bank, and its nodes.

    Parameters
    ----------
    bank : ndarray of shape (n_bank, n_dims), float32
        The centred bank, as the graph stores it.
    k : int
        Neighbours per patch.
    """

    def __init__(self, bank: np.ndarray, k: int):
        self.k, self.m = k, k + EXTRA_CANDIDATES
        n_dims = bank.shape[1]
        values = bank.astype(np.float64)
        largest = np.abs(values).max(axis=1)
        # The scale as the graph stores it (float32; a zero row: 1, codes 0, exact).
        scale32 = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
        scale = scale32.astype(np.float64)
        codes = np.rint(values / scale[:, None])  # within 127 + 1e-5: never beyond 127
        self.codes = codes.astype(np.int8)
        # The bound rests on |y - s_y Y| <= s_y / 2 for every entry: checked.
        if not bool((np.abs(values - scale[:, None] * codes) <= scale[:, None] * 0.5000001).all()):
            raise RuntimeError("int8 codes of the bank are off by more than half a step.")
        norms = np.sqrt((values * values).sum(axis=1))
        l1 = np.abs(values).sum(axis=1)
        eps = 1e-5 + (n_dims + 2) * 2.0**-24  # float32 |x|^2 and the bound's arithmetic
        exact = largest == 0  # a zero row: Y = 0 = y, no quantisation error
        # V's rows, matched with U's columns in :meth:`lower_bounds`.
        self.right = np.stack(
            [
                (1.0 - eps) * norms**2,  # with U's constant column
                np.full_like(norms, 1.0 - eps),  # with |x|^2
                np.where(exact, 0.0, _SLACK * scale),  # with -|x|_1
                np.where(exact, 0.0, _SLACK * (l1 + 1.5 * n_dims * scale)),  # with -s_x
                2 * eps * norms,  # with -|x|
            ]
        ).astype(np.float32)
        self.scale_row = (-2.0 * scale32).reshape(1, -1)
        self.floor = np.float32(max(1e-6 * float(largest.max(initial=0.0)), 1e-30))

    def candidates(self, g, centred: str, bank: str, fallback) -> str:
        """Indices (N, k) of each patch's k nearest bank vectors, the exact search's.

        ``g``: the graph's :class:`~skpatchcore._export._Nodes`; ``centred``:
        the centred patches (N, d); ``bank``: the centred float32 bank (M, d);
        ``fallback(g, rows)``: the float32 search's candidate indices (n, k)
        of the patches ``rows`` (n, d), run on the patches not certified.
        """
        bounds, scale = self.lower_bounds(g, centred)
        values, indices = g.op(
            "TopK", [bounds, g.ints([self.m + 1])], "filter_topk", n_outputs=2, largest=0, sorted=1
        )
        chosen = g.op("Slice", [indices, g.ints([0]), g.ints([self.m]), g.ints([1])], "filter_chosen")
        threshold = g.op("Slice", [values, g.ints([self.m]), g.ints([self.m + 1]), g.ints([1])])
        threshold = g.op("Mul", [threshold, scale], "filter_threshold")  # the bound itself
        # Exact squared distances to the m chosen: sums of squared differences.
        rows = g.op("Gather", [bank, chosen], axis=0)  # (N, m, d)
        diff = g.op("Sub", [g.op("Unsqueeze", [centred, g.ints([1])]), rows])
        squared = g.op("ReduceSumSquare", [diff, g.ints([2])], keepdims=0)
        best, order = g.op(
            "TopK", [squared, g.ints([self.k])], "filter_best", n_outputs=2, largest=0, sorted=1
        )
        nearest = g.op("GatherElements", [chosen, order], "filter_nearest", axis=1)
        kth = g.op("Slice", [best, g.ints([self.k - 1]), g.ints([self.k]), g.ints([1])])
        # Certified: every other bank vector's bound reaches the k-th distance, which
        # a float32 sum of d squares may understate by d units of 2^-24 (twice over).
        n_dims = int(self.codes.shape[1])
        margin = np.float32(1.0 + 2 * n_dims * 2.0**-24 + 1e-6)
        certified = g.op("GreaterOrEqual", [threshold, g.op("Mul", [kth, g.const(margin)])])
        # NaN fails too, and takes the float32 path, as it would without the filter.
        failed = g.op("Not", [g.op("Squeeze", [certified, g.ints([1])])], "filter_failed")
        where = g.op("Transpose", [g.op("NonZero", [failed])], perm=[1, 0])  # (n, 1)
        again = fallback(g, g.op("GatherND", [centred, where]))  # (n, k) int64
        return g.op("ScatterND", [nearest, where, again], "filter_candidates")

    def lower_bounds(self, g, centred: str) -> tuple[str, str]:
        """Lower bounds (N, M) of the squared distances of the patches to the bank
        vectors, each row divided by its patch's scale; and the scales (N, 1)."""
        from onnx import TensorProto

        magnitude = g.op("Abs", [centred])
        largest = g.op("ReduceMax", [magnitude, g.ints([1])], keepdims=1)
        # At least 1e-6 of the bank's largest entry (a zero or tiny patch: codes 0,
        # still within half a step), so that the bounds divided by it stay finite.
        floor = g.const(self.floor)
        levels = np.float32(_QUERY_LEVELS)
        scale = g.op("Div", [g.op("Max", [largest, floor]), g.const(levels)], "filter_scale")
        codes = g.op("Round", [g.op("Div", [centred, scale])])  # in [-63, 63]
        shifted = g.op("Add", [codes, g.const(np.float32(_QUERY_LEVELS + 1))])  # in [1, 127]
        shifted = g.op("Cast", [shifted], "filter_query_codes", to=TensorProto.UINT8)
        zero_point = g.const(np.uint8(_QUERY_LEVELS + 1))
        bank_codes = g.const(np.ascontiguousarray(self.codes.T), "filter_codes")
        product = g.op("MatMulInteger", [shifted, bank_codes, zero_point], "filter_product")
        # (DequantizeLinear, per column, took longer than this Cast and Mul)
        product = g.op("Cast", [product], to=TensorProto.FLOAT)
        scaled = g.op("Mul", [product, g.const(self.scale_row, "filter_scales")])
        sq_norm = g.op("ReduceSum", [g.op("Mul", [centred, centred]), g.ints([1])], keepdims=1)
        norm = g.op("Sqrt", [sq_norm])
        l1 = g.op("ReduceSum", [magnitude, g.ints([1])], keepdims=1)
        minus = lambda name: g.op("Neg", [name])  # noqa: E731
        one = g.op("Div", [scale, scale])  # exactly 1: the scale is positive and finite
        left = g.op("Concat", [one, sq_norm, minus(l1), minus(scale), minus(norm)], "filter_left", axis=1)
        left = g.op("Div", [left, scale])
        # (a Gemm adding ``scaled`` as its C ran at a third of the speed of these two)
        rest = g.op("MatMul", [left, g.const(self.right, "filter_right")])
        bounds = g.op("Add", [scaled, rest], "filter_bounds")
        return bounds, scale
