"""GreedyCoresetSampler: the plain greedy loop's indices, fast, inside a Pipeline contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.plain import greedy_coreset, greedy_coreset_continued
from skpatchcore import GreedyCoresetSampler
from skpatchcore._coreset import _bounds, _exact, _nearest, _plain, _running
from skpatchcore._coreset import _tuning as tuning
from skpatchcore._coreset._exact import greedy_indices_cpu
from skpatchcore._coreset._plain import greedy_indices_torch
from skpatchcore._coreset._selection import project
from skpatchcore.utils._bf16 import UNIT_ROUNDOFF, bf16_hardware, bf16_sums_in_float32

from ._precision import bfloat16_settings
from .conftest import textured_parts


def clustered_points(n=3000, dims=32, seed=0):
    """Points around a few centres in a low-dimensional subspace, plus noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(6, dims))
    centres = rng.normal(scale=4.0, size=(12, 6))
    labels = rng.integers(0, 12, n)
    latent = centres[labels] + rng.normal(size=(n, 6))
    return (latent @ basis + 0.3 * rng.normal(size=(n, dims))).astype(np.float32)


@pytest.fixture(params=["float32", "bfloat16"])
def products(request, monkeypatch):
    """The bound's products in float32, then in bfloat16 (float32 sums): the
    package picks bfloat16 where the CPU has it; forced here, so both are tested
    on any machine (without the hardware, bfloat16 is only slower)."""

    if request.param == "bfloat16" and not bf16_sums_in_float32():
        pytest.skip("torch's bfloat16 products here do not sum in float32")
    monkeypatch.setattr(tuning, "LOW_PRECISION", request.param == "bfloat16")
    return request.param


@pytest.fixture(params=["kept", "streamed"])
def rows_storage(request, monkeypatch):
    """The bound's rows kept whole (small data), then made from the points a few
    rows at a time whenever read (as for large data: here blocks of a few dozen
    rows, so block edges fall everywhere)."""

    if request.param == "streamed":
        monkeypatch.setattr(tuning, "KEEP_ROWS_BYTES", 0)
        monkeypatch.setattr(tuning, "STREAM_BYTES", 5000)
    return request.param


@pytest.mark.parametrize(
    "points",
    [
        np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32),
        clustered_points(),
        # exact duplicates and ties: whole groups of identical points
        np.repeat(np.random.default_rng(1).normal(size=(150, 8)).astype(np.float32), 7, axis=0),
        # a grid: many equal distances
        np.stack(np.meshgrid(np.arange(30), np.arange(30)), axis=-1).reshape(-1, 2).astype(np.float32),
    ],
    ids=["gaussian", "clustered", "duplicates", "grid"],
)
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_fast_loop_selects_exactly_the_plain_loops_indices(points, fraction, products, rows_storage):
    n_select = max(1, int(len(points) * fraction))
    starts = np.random.default_rng(2).choice(len(points), 10, replace=False)
    fast = greedy_indices_cpu(points, n_select, starts)
    np.testing.assert_array_equal(fast, greedy_coreset(points, n_select, starts))


@pytest.mark.parametrize(
    "width,block_rows,product_floats", [(3, 1, 50), (16, 5, 300), (200, 64, 2**22), (200, 512, 5000)]
)
def test_narrow_batches_and_small_blocks_give_the_same_indices(
    monkeypatch, width, block_rows, product_floats, products, rows_storage
):
    """Batch edges (tau and its ties), bound rows split over blocks and points split
    over ranges (of a few dozen points) change nothing."""

    monkeypatch.setattr(tuning, "BATCH_WIDTH", width)
    monkeypatch.setattr(tuning, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(tuning, "PRODUCT_FLOATS", product_floats)
    grid = np.stack(np.meshgrid(np.arange(25), np.arange(25)), axis=-1).reshape(-1, 2).astype(np.float32)
    duplicates = np.repeat(np.random.default_rng(6).normal(size=(90, 8)).astype(np.float32), 5, axis=0)
    for points in (grid, duplicates, clustered_points(1200, 16, seed=9)):
        starts = np.random.default_rng(7).choice(len(points), 10, replace=False)
        for n_select in (1, 37, len(points) // 4):
            np.testing.assert_array_equal(
                greedy_indices_cpu(points, n_select, starts), greedy_coreset(points, n_select, starts)
            )


@pytest.mark.parametrize("offset, dims", [(1e3, 16), (1e4, 16), (1e4, 1024)])
def test_far_apart_clusters_need_and_get_the_rounding_margin(offset, dims, products):
    """Two tight clusters far from their common mean: the bound's float32 rounding is
    large next to the distances inside a cluster, and without the margin (gamma = 0)
    points that do get closer are missed and the indices change (seen at 16 dims).
    The margin grows with the dimension (1024: unprojected wide_resnet50_2 features)."""
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(3000, dims))
    points = (noise + np.where(np.arange(3000) < 1500, offset, -offset)[:, None]).astype(np.float32)
    starts = rng.choice(len(points), 10, replace=False)
    fast = greedy_indices_cpu(points, 300, starts)
    np.testing.assert_array_equal(fast, greedy_coreset(points, 300, starts))


@pytest.mark.parametrize("offset", [3.0, 1e3])
def test_bfloat16_products_need_and_get_their_wider_margin(monkeypatch, offset):
    """With the float32 products' margin, bfloat16 products miss points that do get
    closer and the indices change; with their own margin they are the plain loop's."""

    monkeypatch.setattr(tuning, "LOW_PRECISION", True)
    rng = np.random.default_rng(0)
    side = np.where(np.arange(3000) < 1500, offset, -offset)[:, None]
    points = (rng.normal(size=(3000, 16)) + side).astype(np.float32)
    starts = rng.choice(len(points), 10, replace=False)
    plain = greedy_coreset(points, 300, starts)
    np.testing.assert_array_equal(greedy_indices_cpu(points, 300, starts), plain)
    margins = _bounds.LowBound.margins

    def float32_gamma(n_dims):
        _, slack, beta_s, beta_c = margins(n_dims)
        return max(tuning.GAMMA, 4 * (n_dims + 2) * UNIT_ROUNDOFF), slack, beta_s, beta_c

    monkeypatch.setattr(_bounds.LowBound, "margins", staticmethod(float32_gamma))
    assert not np.array_equal(greedy_indices_cpu(points, 300, starts), plain)


@pytest.mark.parametrize("mode", [True, None])
def test_very_wide_vectors_fall_back_to_float32_products(monkeypatch, mode):
    """From ~83,500 dimensions the bfloat16 margins' analysis no longer holds: the
    selection uses float32 products there, forced or not, rather than fail."""

    monkeypatch.setattr(tuning, "LOW_PRECISION", mode)
    points = np.random.default_rng(1).normal(size=(20, 90_000)).astype(np.float32)
    starts = np.arange(10)
    assert _bounds.LowBound.margins(90_000)[0] > tuning.LOW_MOST_GAMMA
    np.testing.assert_array_equal(greedy_indices_cpu(points, 8, starts), greedy_coreset(points, 8, starts))


def _summed_in_float32(left, right):
    return (left.float() @ right.float()).to(torch.bfloat16)


def _bfloat16_partial_sums(left, right):
    total = None
    for start in range(0, left.shape[1], 32):
        part = left[:, start : start + 32].float() @ right[start : start + 32].float()
        total = (part if total is None else total.float() + part).to(torch.bfloat16)
    return total


def _truncated(left, right):
    exact = left.float() @ right.float()
    return (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize(
    "product, accepted",
    [(_summed_in_float32, True), (_bfloat16_partial_sums, False), (_truncated, False)],
    ids=["float32-sums", "bfloat16-partial-sums", "truncated"],
)
def test_bfloat16_products_are_checked_before_use(product, accepted):
    """The bfloat16 margins assume exact products summed in float32 and rounded once to
    nearest; a kernel that keeps bfloat16 partial sums, or truncates, fails the check."""
    assert bf16_sums_in_float32(product) is accepted


def test_torch_bfloat16_products_pass_the_check_where_they_are_used():
    assert not bf16_hardware() or bf16_sums_in_float32()


def test_batches_switching_between_the_bounds_give_the_same_indices(monkeypatch, rows_storage):
    """Lowering batch by batch with either bound (as the timed choice may) changes nothing."""

    picks = []

    def alternate(self, n_rows, spread, n_done):
        picks.append(len(picks) % 2)
        return picks[-1]

    monkeypatch.setattr(_exact, "_low_precision", lambda: "measured")
    monkeypatch.setattr(_exact._Chooser, "pick", alternate)
    monkeypatch.setattr(tuning, "BATCH_WIDTH", 40)
    for points in (clustered_points(2000, 16, seed=2), np.random.default_rng(3).normal(size=(2000, 8))):
        points = points.astype(np.float32)
        starts = np.random.default_rng(4).choice(len(points), 10, replace=False)
        picks.clear()
        np.testing.assert_array_equal(
            greedy_indices_cpu(points, 300, starts), greedy_coreset(points, 300, starts)
        )
        assert picks.count(1) >= 3


def test_the_faster_bound_is_taken_and_the_other_tried_less_often(monkeypatch):

    monkeypatch.setattr(tuning, "PROBE_EVERY", 2)
    chooser = _exact._Chooser(2)
    big, ok = tuning.LOW_MIN_ROWS, 0.01
    after = tuning.LOW_AFTER
    # small batches, wide margins and the first picks stay in float32, untimed
    for args in ((big - 1, ok, after), (big, 10 * tuning.LOW_MAX_SPREAD, after), (big, ok, after - 1)):
        assert chooser.pick(*args) == 0
        chooser.record(0, big, 0.0, 1.0)
    assert chooser.costs == [None, None]
    taken = []
    for _ in range(20):
        which = chooser.pick(big, ok, after)
        taken.append(which)
        chooser.record(which, big, 0.0, 3.0 if which else 1.0)  # bfloat16 costs more here
    assert taken[:2] == [0, 1]  # each timed once
    tries = [at for at, which in enumerate(taken) if which == 1]
    assert np.all(np.diff(tries) > 1) and np.diff(tries)[-1] > np.diff(tries)[0]  # tried ever less often
    chooser.costs = [1.0, 0.5]  # now cheaper: taken
    assert chooser.pick(big, ok, after) == 1


@pytest.mark.parametrize("setting", bfloat16_settings(), ids=lambda s: s[0])
def test_bfloat16_precision_settings_change_no_index(setting, clean_precision):
    """A process-wide bfloat16 setting (set for another model) must not reach the bound's
    products: two far-apart clusters, where a bfloat16 product is off by far more than the
    bound's margin, keep the plain loop's indices, projected or not."""
    rng = np.random.default_rng(0)
    side = np.where(np.arange(3000) < 1500, 1e3, -1e3)[:, None]
    points = (rng.normal(size=(3000, 16)) + side).astype(np.float32)
    starts = rng.choice(len(points), 10, replace=False)
    X = clustered_points(2000, 256, seed=5)
    sampler = GreedyCoresetSampler(ratio=0.05, projection_dim=128, random_state=3, device="cpu")
    expected = sampler.fit(X).sample_indices_
    setting[1]()
    fast = greedy_indices_cpu(points, 300, starts)
    np.testing.assert_array_equal(fast, greedy_coreset(points, 300, starts))
    np.testing.assert_array_equal(sampler.fit(X).sample_indices_, expected)


def _one_far_point(scale):
    points = np.random.default_rng(4).normal(size=(2000, 16)).astype(np.float32)
    points[5, 0] = scale
    return points


@pytest.mark.parametrize(
    "points",
    [
        _one_far_point(3e19),  # squares of raw values would overflow float32
        np.concatenate([np.full((500, 8), 2e19), np.full((500, 8), -2e19)]).astype(np.float32)
        + np.random.default_rng(5).normal(size=(1000, 8)).astype(np.float32) * 1e15,
        (np.random.default_rng(6).normal(size=(2000, 16)) * 1e-22).astype(np.float32),  # subnormal squares
        np.full((300, 4), 3e38, dtype=np.float32),  # differences overflow: the plain loop runs
        (np.random.default_rng(8).normal(size=(500, 8)) * 1e-33).astype(np.float32),  # plain loop too
    ],
    ids=["one-far-point", "far-clusters", "tiny", "near-float-max", "below-2^-100"],
)
def test_extreme_magnitudes_give_the_plain_loops_indices(points, products, rows_storage):
    starts = np.random.default_rng(7).choice(len(points), 10, replace=False)
    n_select = len(points) // 10
    with np.errstate(over="ignore", invalid="ignore"):
        fast = greedy_indices_cpu(points, n_select, starts)
        plain = greedy_coreset(points, n_select, starts)
    np.testing.assert_array_equal(fast, plain)


def test_blocked_distances_are_bit_identical_to_one_pass(monkeypatch):
    """Rows split into blocks over threads give the same bits as one pass."""
    from concurrent.futures import ThreadPoolExecutor

    points = clustered_points(2500, 24, seed=7)
    starts = np.random.default_rng(3).choice(len(points), 10, replace=False)
    monkeypatch.setattr(tuning, "ROW_BLOCK", 97)  # uneven blocks, a short last one
    monkeypatch.setattr(tuning, "PAIR_BLOCK", 37)  # exact pair distances: uneven pieces
    monkeypatch.setattr(tuning, "PAIR_CHUNK", 101)  # candidate pairs bounded a few at a time
    with ThreadPoolExecutor(max_workers=3) as pool:
        blocked = _plain.initial_distances(points, starts, pool)
        rows = np.random.default_rng(4).permutation(len(points))[:1000]
        blocked_rows = _plain.distances_to(points[rows], points[5], pool)
    assert blocked.tobytes() == _plain.initial_distances(points, starts).tobytes()
    assert blocked_rows.tobytes() == _plain.row_distances(points[rows], points[5]).tobytes()
    # start distances of a few rows alone, as the lazy start works them out
    for some in (rows[:1], rows[:7], np.sort(rows)):
        alone = _plain.mean_start_distances(points[some], points[starts])
        assert alone.tobytes() == blocked[some].tobytes()
    for fraction in (0.01, 0.2):  # the whole loop, with every exact pass in blocks
        n_select = int(len(points) * fraction)
        np.testing.assert_array_equal(
            greedy_indices_cpu(points, n_select, starts), greedy_coreset(points, n_select, starts)
        )


@pytest.fixture
def flush_denormals():
    """Subnormal float results flushed to zero (FTZ/DAZ) while the test runs, as
    ``torch.set_flush_denormal(True)`` or a library built with -ffast-math sets them.

    The setting holds for this thread: NumPy's arithmetic here (the plain loop's and
    the exact distances') flushes; torch's worker threads, once started, may not."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal numbers")
    try:
        assert np.float32(1e-20) * np.float32(1e-20) == 0.0  # flushed here, in NumPy too
        yield
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("magnitude", [1e-18, 1e-19])
@pytest.mark.parametrize("dims", [2, 32, 128])
def test_flushed_subnormals_give_the_plain_loops_indices(
    flush_denormals, magnitude, dims, products, rows_storage
):
    """With subnormals flushed, the plain loop's squares of tiny differences become 0,
    not a subnormal: the bounds' absolute floors allow for that (they once allowed only
    for gradual underflow, and such data crashed the batch selection or changed indices)."""
    rng = np.random.default_rng(int(-np.log10(magnitude)) * 1000 + dims)
    points = (rng.normal(size=(1200, dims)) * magnitude).astype(np.float32)
    points[:600, : max(1, dims // 2)] += np.float32(5 * magnitude)
    starts = rng.choice(len(points), 10, replace=False)
    for n_select in (30, 120):
        np.testing.assert_array_equal(
            greedy_indices_cpu(points, n_select, starts), greedy_coreset(points, n_select, starts)
        )


@pytest.mark.parametrize("dense_fraction", [0.0, 0.01, 0.05, 1.0])
def test_centres_checked_against_every_point_give_the_same_indices(monkeypatch, dense_fraction, products):
    """A centre whose candidate list would be long checks all points instead; same result."""

    monkeypatch.setattr(tuning, "DENSE_FRACTION", dense_fraction)
    monkeypatch.setattr(tuning, "PRODUCT_FLOATS", 20000)  # several ranges of points per block
    seen = []
    real = _exact.candidates

    def candidates(rows, bound, work, dense):
        for found in real(rows, bound, work, dense):
            # no pairs of a centre already found dense (it is checked against every point)
            assert not np.isin(found[1], rows[dense]).any()
            yield found
        seen.append(dense.copy())

    monkeypatch.setattr(_exact, "candidates", candidates)
    points = clustered_points(3000, 16, seed=8)
    starts = np.random.default_rng(5).choice(len(points), 10, replace=False)
    for n_select in (30, 300):
        np.testing.assert_array_equal(
            greedy_indices_cpu(points, n_select, starts), greedy_coreset(points, n_select, starts)
        )
    n_dense = sum(int(dense.sum()) for dense in seen)
    n_listed = sum(int((~dense).sum()) for dense in seen)
    if dense_fraction == 0.0:
        assert n_listed == 0
    elif dense_fraction == 1.0:
        assert n_dense == 0
    else:
        assert n_dense > 0 and n_listed > 0


# Data for the interval tests (start distances and candidate pairs): ordinary,
# clustered, far from the origin, and of tiny and huge magnitude (scaled).
INTERVAL_CASES = [
    pytest.param(np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32), id="gaussian"),
    pytest.param(clustered_points(3000, 32, seed=3), id="clustered"),
    pytest.param((np.random.default_rng(1).normal(size=(2000, 8)) + 1e4).astype(np.float32), id="offset-1e4"),
    pytest.param(
        (np.random.default_rng(2).normal(size=(2000, 8)) * 1e-12).astype(np.float32), id="scale-1e-12"
    ),
    pytest.param(
        (np.random.default_rng(3).normal(size=(2000, 8)) * 1e14).astype(np.float32), id="scale-1e14"
    ),
]


def _recorded_start_intervals(monkeypatch, points, starts):

    seen = []
    real = _running.Running.bound

    def record(self, *args):
        real(self, *args)
        seen.append((self.start_lo.copy(), self.min_dist.copy()))

    monkeypatch.setattr(_running.Running, "bound", record)
    greedy_indices_cpu(points, 1, starts)
    return seen


@pytest.mark.parametrize(
    "points",
    [
        *INTERVAL_CASES,
        pytest.param(
            np.repeat(np.random.default_rng(4).normal(size=(100, 8)).astype(np.float32), 10, axis=0),
            id="duplicates",
        ),
        pytest.param(np.random.default_rng(5).normal(size=(1500, 1024)).astype(np.float32), id="1024-dims"),
    ],
)
def test_start_distance_intervals_hold_the_plain_loops_values(monkeypatch, points, rows_storage):
    """The lazy start's [lo, hi] holds each point's exact start distance, and is narrow."""

    starts = np.random.default_rng(6).choice(len(points), 10, replace=False)
    ((lo, hi),) = _recorded_start_intervals(monkeypatch, points, starts)
    exact = _plain.initial_distances(points, starts).astype(np.float32)
    assert lo.dtype == hi.dtype == np.float32
    assert np.all(lo <= exact) and np.all(exact <= hi)
    # (~4e-4 wide at 128 dims, 1.2e-3 at 1024: the margins grow with the dimension)
    assert np.median((hi - lo) / exact) < 3e-3  # else most start distances get worked out anyway


def test_extreme_magnitudes_work_out_every_start_distance_first(monkeypatch):
    for points in (np.full((50, 4), 1e30, np.float32) + np.arange(4, dtype=np.float32), _one_far_point(3e19)):
        starts = np.arange(10)
        with np.errstate(over="ignore", invalid="ignore"):
            assert _recorded_start_intervals(monkeypatch, points, starts) == []


@pytest.mark.parametrize("widen", ["loose", "exact", "zero-low"])
def test_start_intervals_of_any_width_give_the_same_indices(monkeypatch, widen):
    """Exact start distances are worked out wherever an interval cannot decide: wide intervals
    (most points settled on the way), zero-width ones and a low end of 0 all keep the indices."""

    real = _running.Running.bounds
    settled, exact = [], {}

    def bounds(*args):
        lo, hi = real(*args)
        if widen == "loose":
            return lo * np.float32(0.7), hi * np.float32(1.5)
        if widen == "zero-low":
            return np.zeros_like(lo), hi
        return exact["starts"], exact["starts"].copy()  # zero width, on the exact value

    monkeypatch.setattr(_running.Running, "bounds", staticmethod(bounds))
    real_settle = _running.Running.settle
    monkeypatch.setattr(
        _running.Running, "settle", lambda self, rows: settled.append(len(rows)) or real_settle(self, rows)
    )
    for points in (
        clustered_points(2500, 16, seed=12),
        np.random.default_rng(9).normal(size=(2000, 32)).astype(np.float32),
    ):
        starts = np.random.default_rng(10).choice(len(points), 10, replace=False)
        exact["starts"] = _plain.initial_distances(points, starts).astype(np.float32)
        for n_select in (1, 25, 400):
            np.testing.assert_array_equal(
                greedy_indices_cpu(points, n_select, starts), greedy_coreset(points, n_select, starts)
            )
    if widen == "loose":
        assert sum(settled) > 2000  # many points needed their exact start distance


def _exact_pair_distances(points, rows, centres):
    """The plain loop's distance of each pair, one pair at a time."""
    return np.array(
        [_plain.row_distances(points[r : r + 1], points[c])[0] for r, c in zip(rows, centres)], np.float32
    )


def test_running_distances_give_the_running_minimum_once_settled(monkeypatch):
    """Whatever arrives (pairs with repeated rows and wide, zero-width or open-ended
    intervals; all points' exact distances at once; settling along the way), a point's
    value is exact as soon as it is marked so, its interval always holds the plain
    running minimum, and settling gives that minimum bit for bit."""

    points = clustered_points(600, 8, seed=13)
    starts = np.arange(10)
    start = _plain.initial_distances(points, starts).astype(np.float32)
    wide = (start * np.float32(0.9), start * np.float32(1.1))
    monkeypatch.setattr(
        _running.Running, "bounds", staticmethod(lambda *args: (wide[0].copy(), wide[1].copy()))
    )
    running = _running.Running(points, starts)
    running.bound(None, None, None, None, None, None)
    truth = start.copy()
    rng = np.random.default_rng(14)
    for step in range(16):
        centre = int(rng.integers(len(points)))
        if step == 6:  # every point at once, as a centre checked densely
            distances = _plain.row_distances(points, points[centre])
            np.minimum(truth, distances, out=truth)
            running.lower_exact(distances)
        else:
            rows = rng.integers(0, len(points), 80)  # repeats included
            centres = np.where(rng.random(80) < 0.5, centre, rng.integers(0, len(points), 80))
            distances = _exact_pair_distances(points, rows, centres)
            np.minimum.at(truth, rows, distances)
            lows = distances * rng.uniform(0.8, 1.0, 80).astype(np.float32)
            highs = distances * rng.uniform(1.0, 1.2, 80).astype(np.float32)
            lows[:10] = highs[:10] = distances[:10]  # zero width
            lows[10:20] = 0.0  # no lower end
            running.lower_pairs(rows, centres, lows, highs)
        if step % 5 == 4:  # some inexact points made exact on the way, as before a batch
            inexact = np.flatnonzero(~running.exact)
            running.settle(rng.choice(inexact, min(len(inexact), 50), replace=False))
        done = running.exact
        assert running.min_dist[done].tobytes() == truth[done].tobytes()
        assert np.all(running.lo <= truth) and np.all(truth <= running.min_dist)
        assert running.n_inexact == np.count_nonzero(~done)
    running.settle(np.flatnonzero(~running.exact))
    assert running.min_dist.tobytes() == truth.tobytes()


def _recorded_pair_intervals(monkeypatch, points, starts, n_select):

    seen = []

    def recorder(real):
        def record(self, values, rows, centres):
            lo, hi = real(self, values, rows, centres)
            seen.append((rows.copy(), centres.copy(), lo, hi))
            return lo, hi

        return record

    for bound in (_bounds.Bound, _bounds.LowBound):
        monkeypatch.setattr(bound, "intervals", recorder(bound.intervals))
    indices = greedy_indices_cpu(points, n_select, starts)
    return indices, [np.concatenate(part) for part in zip(*seen)]


@pytest.mark.parametrize(
    "points",
    [
        *INTERVAL_CASES,
        pytest.param(  # many equal distances
            np.random.default_rng(4).integers(0, 4, size=(2000, 6)).astype(np.float32), id="small-integers"
        ),
        pytest.param(
            np.random.default_rng(5).normal(size=(1500, 300)).astype(np.float32) + 50.0, id="300-dims"
        ),
    ],
)
def test_pair_intervals_hold_the_plain_loops_distances(monkeypatch, points, products, rows_storage):
    """Each candidate pair's [lo, hi], read off the bound's product, holds the plain loop's
    float32 distance, and is narrow (else most pairs get worked out anyway)."""
    starts = np.random.default_rng(6).choice(len(points), 10, replace=False)
    n_select = len(points) // 10
    indices, (rows, centres, lo, hi) = _recorded_pair_intervals(monkeypatch, points, starts, n_select)
    np.testing.assert_array_equal(indices, greedy_coreset(points, n_select, starts))
    exact = _exact_pair_distances(points, rows, centres)
    assert len(exact) > 1000 and lo.dtype == hi.dtype == np.float32
    assert np.all(lo <= exact) and np.all(exact <= hi)
    positive = exact > 0
    # float32: ~2e-4 at 16 dims, ~5e-4 at 300; bfloat16 products: 2e-2 to 4e-2, but
    # 6e-2 on small integers and 0.24 on the clusters (small distances, large norms)
    widths = (hi - lo)[positive] / exact[positive]
    assert np.median(widths) < (2e-3 if products == "float32" else 0.3)


@pytest.mark.parametrize("widen", ["loose", "exact", "zero-low"])
def test_pair_intervals_of_any_width_give_the_same_indices(monkeypatch, widen, products):
    """Pairs' exact distances are worked out wherever an interval cannot decide: wide
    intervals (many worked out), zero-width ones and a low end of 0 all keep the indices."""

    worked_out = []
    real_pairs = _running.pair_distances

    def pair_distances(points, rows, centres):
        worked_out.append(len(rows))
        return real_pairs(points, rows, centres)

    def intervals(self, values, rows, centres):
        exact = _exact_pair_distances(current["points"], rows, centres)
        if widen == "loose":
            return exact * np.float32(0.7), exact * np.float32(1.5)
        if widen == "zero-low":
            return np.zeros_like(exact), exact
        return exact, exact.copy()

    current = {}
    monkeypatch.setattr(_running, "pair_distances", pair_distances)
    monkeypatch.setattr(_bounds.Bound, "intervals", intervals)
    monkeypatch.setattr(_bounds.LowBound, "intervals", intervals)
    counts = []
    for points in (
        clustered_points(2000, 16, seed=12),
        np.random.default_rng(9).normal(size=(1500, 32)).astype(np.float32),
    ):
        current["points"] = points
        starts = np.random.default_rng(10).choice(len(points), 10, replace=False)
        for n_select in (1, 25, 300):
            worked_out.clear()
            np.testing.assert_array_equal(
                greedy_indices_cpu(points, n_select, starts), greedy_coreset(points, n_select, starts)
            )
            counts.append(sum(worked_out))
    if widen == "loose":
        assert max(counts) > 1000  # many pairs needed their exact distance


def test_waiting_distances_are_worked_out_when_the_log_grows(monkeypatch, products):
    """Far outliers widen every interval, so many distances wait; past a size the
    log is worked out at once, with the same indices."""

    flushes, lowering = [], []
    real_settle, real_lower = _running.Running.settle, _running.Running.lower_pairs

    def settle(self, rows):
        if lowering and len(rows):  # worked out from inside lower_pairs: the log was full
            flushes.append(len(rows))
        real_settle(self, rows)

    def lower_pairs(self, *args):
        lowering.append(True)
        try:
            real_lower(self, *args)
        finally:
            lowering.pop()

    monkeypatch.setattr(_running.Running, "settle", settle)
    monkeypatch.setattr(_running.Running, "lower_pairs", lower_pairs)
    monkeypatch.setattr(tuning, "LOG_POINTS", 1)
    monkeypatch.setattr(tuning, "PAIR_CHUNK", 50)
    rng = np.random.default_rng(15)
    points = rng.normal(size=(3000, 4)).astype(np.float32)
    points[:5] *= 1e4  # a few far outliers: the bound's centre and margins move
    starts = rng.choice(len(points), 10, replace=False)
    for n_select in (30, 600):
        np.testing.assert_array_equal(
            greedy_indices_cpu(points, n_select, starts), greedy_coreset(points, n_select, starts)
        )
    assert flushes  # the log did reach its limit


def test_selections_in_threads_side_by_side_give_the_plain_loops_indices():
    """Selections running at once (each needs a product buffer; one is kept between
    selections) do not share their working memory."""
    from concurrent.futures import ThreadPoolExecutor

    data = [clustered_points(5000, 16, seed=seed) for seed in range(4)]
    starts = [np.random.default_rng(seed).choice(5000, 10, replace=False) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        fast = list(pool.map(lambda k: greedy_indices_cpu(data[k], 200, starts[k]), range(4)))
    for k in range(4):
        np.testing.assert_array_equal(fast[k], greedy_coreset(data[k], 200, starts[k]))


def test_zero_dimensional_points_give_the_plain_loops_indices():
    points = np.zeros((5, 0), dtype=np.float32)
    starts = np.array([0, 1])
    np.testing.assert_array_equal(greedy_indices_cpu(points, 3, starts), greedy_coreset(points, 3, starts))


def test_fast_loop_matches_plain_loop_on_real_patch_features(lite_features, products, rows_storage):
    images = textured_parts(8, seed=11)
    vectors = lite_features.transform(images).reshape(-1, 1024)
    rng = np.random.RandomState(0)
    projected = vectors @ (rng.standard_normal((1024, 128)).astype(np.float32) / np.sqrt(128))
    starts = rng.choice(len(projected), 10, replace=False)
    for n_select in (5, 51, 256):
        np.testing.assert_array_equal(
            greedy_indices_cpu(projected, n_select, starts), greedy_coreset(projected, n_select, starts)
        )


# --------------------------------------------------------------------------
# A selection continued from fixed centres (what partial_fit runs)
# --------------------------------------------------------------------------


def _split_cases():
    """(centres, new points) pairs: ordinary, clustered, duplicates of the centres, a grid,
    far from the origin and of extreme magnitudes."""
    rng = np.random.default_rng(20)
    gaussian = rng.normal(size=(3000, 16)).astype(np.float32)
    clustered = clustered_points(3000, 32, seed=21)
    repeated = np.repeat(rng.normal(size=(200, 8)).astype(np.float32), 6, axis=0)[rng.permutation(1200)]
    grid = np.stack(np.meshgrid(np.arange(30), np.arange(30)), axis=-1).reshape(-1, 2).astype(np.float32)
    offset = (rng.normal(size=(2000, 8)) + 1e4).astype(np.float32)
    tiny = (rng.normal(size=(2000, 8)) * 1e-12).astype(np.float32)
    huge = (rng.normal(size=(2000, 8)) * 1e14).astype(np.float32)
    return {
        "gaussian": (gaussian[:400], gaussian[400:]),
        "clustered": (clustered[:300], clustered[300:]),
        # every new point equals some centre: all start at 0, ties everywhere
        "duplicates-of-centres": (repeated[:600], repeated[600:]),
        "grid": (grid[::3], grid),
        "offset-1e4": (offset[:500], offset[500:]),
        "scale-1e-12": (tiny[:500], tiny[500:]),
        "scale-1e14": (huge[:500], huge[500:]),
    }


SPLIT_CASES = _split_cases()


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_nearest_centre_distances_are_the_plain_minimum_bit_for_bit(case, monkeypatch):
    """The continued selection's start: each point's distance to the nearest centre,
    bounded by products and worked out where the bound cannot decide, equals the
    minimum of the plain loop's float32 distances exactly (in blocks of any size)."""
    centres, points = SPLIT_CASES[case]
    plain = np.min([_plain.row_distances(points, centre) for centre in centres], axis=0)
    assert _nearest.nearest_distances(points, centres).tobytes() == plain.tobytes()
    monkeypatch.setattr(tuning, "NEAREST_CENTRES", 37)
    monkeypatch.setattr(tuning, "NEAREST_POINTS", 53)
    monkeypatch.setattr(tuning, "PAIR_BLOCK", 11)
    assert _nearest.nearest_distances(points, centres).tobytes() == plain.tobytes()


def test_nearest_centre_distances_work_out_few_pairs():
    """On ordinary data the bound leaves a handful of exact pairs per point, not every pair."""
    centres, points = SPLIT_CASES["clustered"]
    worked_out = []
    real = _nearest._pair_distances

    def counted(*args):
        worked_out.append(len(args[1]))
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_nearest, "_pair_distances", counted)
        _nearest.nearest_distances(points, centres)
    assert 0 < sum(worked_out) < 5 * len(points)


@pytest.mark.parametrize("case", list(SPLIT_CASES))
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_a_selection_continued_from_centres_gives_the_plain_loops_indices(case, fraction, products):
    centres, points = SPLIT_CASES[case]
    n_select = max(1, int(len(points) * fraction))
    with np.errstate(over="ignore", invalid="ignore"):
        fast = greedy_indices_cpu(points, n_select, None, centres=centres)
    np.testing.assert_array_equal(fast, greedy_coreset_continued(points, n_select, centres))


def test_continued_selections_with_extreme_or_no_centres_run_the_plain_loop():
    points = np.random.default_rng(22).normal(size=(400, 4)).astype(np.float32)
    for centres in (np.full((30, 4), 3e38, np.float32), np.empty((0, 4), np.float32), points[:5]):
        with np.errstate(over="ignore", invalid="ignore"):
            fast = greedy_indices_cpu(points, 40, None, centres=centres)
            np.testing.assert_array_equal(fast, greedy_coreset_continued(points, 40, centres))


def test_torch_loop_continued_from_centres_agrees_with_numpy_loop(monkeypatch):
    centres, points = SPLIT_CASES["clustered"]
    monkeypatch.setattr(tuning, "NEAREST_CENTRES", 64)  # several blocks of centres
    numpy_indices = greedy_indices_cpu(points, 80, None, centres=centres)
    torch_indices = greedy_indices_torch(
        torch.from_numpy(points), 80, None, centres=torch.from_numpy(centres)
    )
    np.testing.assert_array_equal(torch_indices, numpy_indices)


def test_torch_loop_agrees_with_numpy_loop():
    points = clustered_points(1500, 16, seed=4)
    starts = np.arange(10)
    numpy_indices = greedy_indices_cpu(points, 60, starts)
    torch_indices = greedy_indices_torch(torch.from_numpy(points), 60, torch.from_numpy(starts))
    np.testing.assert_array_equal(torch_indices, numpy_indices)


def test_sampler_projects_and_seeds_without_global_state():
    X = clustered_points(2000, 256, seed=5)

    def sampled(seed):
        sampler = GreedyCoresetSampler(ratio=0.05, projection_dim=128, random_state=seed, device="cpu")
        return sampler.fit(X).sample_indices_

    np.random.seed(0)  # noqa: NPY002 - the global RNG must not matter
    first = sampled(3)
    np.random.seed(12345)  # noqa: NPY002
    second, other = sampled(3), sampled(4)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    # the same selection, spelled out: project with the seeded Gaussian map, then the plain loop
    rng = np.random.RandomState(3)
    projection = (rng.standard_normal((256, 128)) / np.sqrt(128)).astype(np.float32)
    starts = rng.choice(len(X), 10, replace=False)
    projected = project(X, projection)
    np.testing.assert_allclose(projected, X.astype(np.float64) @ projection, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(first, greedy_coreset(projected, 100, starts))


def test_sampler_keeps_int_of_ratio_times_patches_and_at_least_one():
    X = clustered_points(1000, 8)
    assert len(GreedyCoresetSampler(ratio=0.1, random_state=0).fit(X).sample_indices_) == 100
    assert len(GreedyCoresetSampler(ratio=0.0001, random_state=0).fit(X).sample_indices_) == 1
    everything = GreedyCoresetSampler(ratio=1.0).fit(X).sample_indices_
    np.testing.assert_array_equal(np.sort(everything), np.arange(1000))


def test_small_features_skip_the_projection():
    X = clustered_points(800, 16)
    sampler = GreedyCoresetSampler(ratio=0.05, projection_dim=128, random_state=0, device="cpu").fit(X)
    starts = np.random.RandomState(0).choice(800, 10, replace=False)
    np.testing.assert_array_equal(sampler.sample_indices_, greedy_coreset(X, 40, starts))


def test_image_features_and_their_flattened_vectors_give_the_same_coreset():
    X = clustered_points(6 * 5 * 4, 32).reshape(6, 5, 4, 32)
    on_images = GreedyCoresetSampler(ratio=0.2, random_state=0).fit(X).sample_indices_
    on_vectors = GreedyCoresetSampler(ratio=0.2, random_state=0).fit(X.reshape(-1, 32)).sample_indices_
    np.testing.assert_array_equal(on_images, on_vectors)


def test_fit_transform_masks_the_patches_not_kept_and_keeps_the_shape():
    X = clustered_points(4 * 3 * 3, 16).reshape(4, 3, 3, 16)
    sampler = GreedyCoresetSampler(ratio=0.25, random_state=0)
    masked = sampler.fit_transform(X)
    assert isinstance(masked, np.ma.MaskedArray) and masked.shape == X.shape
    np.testing.assert_array_equal(masked.data, X)
    kept = ~np.ma.getmaskarray(masked)[..., 0].reshape(-1)
    assert set(np.flatnonzero(kept)) == set(sampler.sample_indices_)
    assert (np.ma.getmaskarray(masked) == ~kept.reshape(4, 3, 3, 1)).all()


def test_transform_passes_test_features_through_untouched():
    X = clustered_points(200, 16)
    sampler = GreedyCoresetSampler(ratio=0.1, random_state=0).fit(X)
    out = sampler.transform(X[:7])
    assert not isinstance(out, np.ma.MaskedArray)
    np.testing.assert_array_equal(out, X[:7])


def test_labels_keep_defective_images_out_of_the_coreset():
    X = clustered_points(6 * 16, 16).reshape(6, 4, 4, 16)
    y = np.array([1, -1, 1, 1, -1, 1])
    sampler = GreedyCoresetSampler(ratio=0.5, random_state=0)
    masked = sampler.fit_transform(X, y)
    image_of = sampler.sample_indices_ // 16
    assert set(image_of) <= {0, 2, 3, 5}
    assert len(sampler.sample_indices_) == 32  # half of the 4 good images' 64 patches
    assert np.ma.getmaskarray(masked)[[1, 4]].all()


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, "half"])
def test_ratio_out_of_range_is_rejected_by_name(ratio):
    with pytest.raises((ValueError, TypeError), match="'ratio' parameter"):
        GreedyCoresetSampler(ratio=ratio).fit(clustered_points(50, 4))


@pytest.mark.parametrize(
    "y, message",
    [
        (np.array([0, 1, 1]), "outlier labels"),
        (np.array([-1, -1, -1]), "every image as defective"),
        (np.ones(2), "3 images"),
    ],
)
def test_bad_labels_are_explained(y, message):
    with pytest.raises(ValueError, match=message):
        GreedyCoresetSampler().fit(clustered_points(3 * 4, 4).reshape(3, 2, 2, 4), y)


def test_progress_bar_reports_every_selected_point(capsys):
    GreedyCoresetSampler(ratio=0.1, random_state=0, verbose=1).fit(clustered_points(300, 8))
    assert "30/30" in capsys.readouterr().err
