"""GreedyCoresetSampler grown with partial_fit and fitted by streaming: each against its
plain definition (identical indices), plus sizes, parameters and old models."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from benchmarks.plain import greedy_coreset, greedy_coreset_continued
from skpatchcore import GreedyCoresetSampler
from skpatchcore._coreset import _sampler, _stream
from skpatchcore._coreset._selection import project

from .test_coreset import clustered_points


def bank_size(ratio, n):
    return min(ratio, n) if isinstance(ratio, int) else max(1, int(n * ratio))


def grown_by_definition(sampler, X, ratio, chunk_rows, projection=None):
    """partial_fit's definition on vectors (one row per image), spelled out with the plain
    loop: chunk by chunk, continue from every vector kept so far, up to the bank size of
    all candidates seen. Returns (new sample indices, the grown coreset)."""
    centres = [row for row in sampler.coreset_]
    seen, offset, picked = sampler.n_patches_seen_, sampler.n_vectors_seen_, []
    for start in range(0, len(X), chunk_rows):
        chunk = X[start : start + chunk_rows]
        seen += len(chunk)
        n_select = min(len(chunk), bank_size(ratio, seen) - len(centres))
        if n_select <= 0:
            continue
        points, known = chunk, np.array(centres)
        if projection is not None:
            points, known = project(chunk, projection), project(known, projection)
        picks = greedy_coreset_continued(points, n_select, known)
        picked.extend(offset + start + picks)
        centres.extend(chunk[np.sort(picks)])
    return np.array(picked, dtype=np.int64), np.array(centres)


@pytest.mark.parametrize("ratio", [0.1, 0.02, 150])
@pytest.mark.parametrize("chunk_rows", [500, 10_000])
def test_partial_fit_continues_the_plain_loop_from_the_bank(ratio, chunk_rows):
    data = clustered_points(4000, 16, seed=30)
    first, later = data[:1500], data[1500:]
    sampler = GreedyCoresetSampler(ratio=ratio, random_state=0, chunk_size=chunk_rows).fit(first)
    before = sampler.sample_indices_.copy()
    expected_new, expected_coreset = grown_by_definition(sampler, later, ratio, chunk_rows)
    sampler.partial_fit(later)
    np.testing.assert_array_equal(sampler.sample_indices_, np.concatenate([before, expected_new]))
    np.testing.assert_array_equal(sampler.coreset_, expected_coreset)
    np.testing.assert_array_equal(sampler.coreset_, data[np.sort(sampler.sample_indices_)])
    assert len(sampler.coreset_) == bank_size(ratio, 4000)
    assert sampler.n_patches_seen_ == sampler.n_vectors_seen_ == 4000


def test_partial_fit_projects_with_the_first_fits_map_and_skips_defective_images():
    images = clustered_points(30 * 16, 64, seed=31).reshape(30, 4, 4, 64)
    y_first, y_later = np.ones(12, dtype=int), np.where(np.arange(18) % 5 == 0, -1, 1)
    sampler = GreedyCoresetSampler(ratio=0.1, projection_dim=16, random_state=3, chunk_size=70)
    sampler.fit(images[:12], y_first)
    assert sampler.projection_.shape == (64, 16)
    good = images[12:][y_later == 1].reshape(-1, 64)  # the candidates, in order
    new, coreset = grown_by_definition(sampler, good, 0.1, 64, sampler.projection_)  # 70 -> 4 images
    # the definition numbers the good images' vectors; partial_fit numbers all of X
    good_positions = np.flatnonzero(np.repeat(y_later == 1, 16)) + 12 * 16
    expected = good_positions[new - 12 * 16]
    sampler.partial_fit(images[12:], y_later)
    np.testing.assert_array_equal(sampler.sample_indices_[-len(expected) :], expected)
    np.testing.assert_array_equal(sampler.coreset_, coreset)
    assert sampler.n_patches_seen_ == (12 + 14) * 16 and sampler.n_vectors_seen_ == 30 * 16
    assert len(sampler.coreset_) == int(0.1 * 26 * 16)
    assert not np.isin(sampler.sample_indices_ // 16, 12 + np.flatnonzero(y_later == -1)).any()


def test_partial_fit_on_an_unfitted_sampler_is_fit():
    X = clustered_points(1200, 8, seed=32)
    fitted = GreedyCoresetSampler(ratio=0.05, random_state=1).fit(X)
    grown = GreedyCoresetSampler(ratio=0.05, random_state=1).partial_fit(X)
    np.testing.assert_array_equal(grown.sample_indices_, fitted.sample_indices_)
    np.testing.assert_array_equal(grown.coreset_, fitted.coreset_)


def test_an_int_bank_size_is_a_cap_that_can_be_raised():
    X = clustered_points(3000, 8, seed=33)
    sampler = GreedyCoresetSampler(ratio=100, random_state=0).fit(X[:1000])
    assert len(sampler.coreset_) == 100
    sampler.partial_fit(X[1000:2000])
    assert len(sampler.coreset_) == 100 and sampler.n_patches_seen_ == 2000
    sampler.set_params(ratio=160).partial_fit(X[2000:])
    assert len(sampler.coreset_) == 160 and (sampler.sample_indices_[100:] >= 2000).all()
    small = GreedyCoresetSampler(ratio=5000).fit(X[:40])  # more than there is: all of it
    np.testing.assert_array_equal(np.sort(small.sample_indices_), np.arange(40))


def test_partial_fit_refuses_vectors_of_another_length():
    sampler = GreedyCoresetSampler(ratio=0.1, random_state=0).fit(clustered_points(300, 8))
    with pytest.raises(ValueError, match="X has 6 features, but GreedyCoresetSampler is expecting 8"):
        sampler.partial_fit(clustered_points(100, 6))
    images = clustered_points(4 * 9, 8).reshape(4, 3, 3, 8)
    sampler.fit(images)
    with pytest.raises(
        ValueError, match="X has 5 features per patch, but GreedyCoresetSampler was fitted with 8"
    ):
        sampler.partial_fit(clustered_points(4 * 9, 5).reshape(4, 3, 3, 5))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"chunk_size": 0}, "'chunk_size' parameter of GreedyCoresetSampler must be an int in the range"),
        ({"chunk_size": 2.5}, "'chunk_size' parameter"),
        ({"strategy": "fast"}, "'strategy' parameter of GreedyCoresetSampler must be a str among"),
        ({"ratio": 0}, "'ratio' parameter"),
    ],
)
def test_bad_parameters_are_named_with_what_is_accepted(params, message):
    for method in ("fit", "partial_fit"):
        with pytest.raises(ValueError, match=message):
            getattr(GreedyCoresetSampler(**params), method)(clustered_points(50, 4))


# --------------------------------------------------------------------------
# Streaming (merge and reduce)
# --------------------------------------------------------------------------


def streamed_by_definition(X, ratio, chunk_rows, seed, n_starts=10):
    """The streamed fit of vectors (one row per image), spelled out with the plain loop."""
    rng = np.random.RandomState(seed)
    entropy = rng.randint(2**31 - 1)  # (no projection for these vectors: the first draw)

    def plain_select(vectors, n_select, stage, index):
        if n_select >= len(vectors):
            return np.arange(len(vectors))
        key = np.random.SeedSequence(entropy, spawn_key=(stage, index)).generate_state(1)[0]
        starts = np.random.RandomState(key).choice(len(vectors), min(n_starts, len(vectors)), replace=False)
        return greedy_coreset(vectors, n_select, starts)

    total = bank_size(ratio, len(X))

    def shares(n):
        if n >= len(X):
            return total
        return total * n // len(X) if isinstance(ratio, int) else int(n * ratio)

    pool, kept, n_pools = [], [], 0
    for index, start in enumerate(range(0, len(X), chunk_rows)):
        stop = min(start + chunk_rows, len(X))
        share = shares(stop) - shares(start)
        picks = plain_select(X[start:stop], min(stop - start, max(1, 4 * share)), 0, index)
        pool.extend(start + picks)
        last = stop == len(X)
        if len(pool) >= chunk_rows or last:
            n_select = (total if last else shares(stop)) - len(kept)
            chosen = plain_select(X[pool], n_select, 1, n_pools)
            kept.extend(np.array(pool)[chosen])
            pool, n_pools = [], n_pools + 1
    return np.array(kept)


@pytest.mark.parametrize("ratio, chunk_rows", [(0.1, 400), (0.02, 700), (0.5, 300), (60, 250), (0.1, 5000)])
def test_a_streamed_fit_is_merge_and_reduce_of_plain_greedy_selections(ratio, chunk_rows):
    X = clustered_points(3000, 16, seed=34)
    sampler = GreedyCoresetSampler(ratio=ratio, strategy="stream", chunk_size=chunk_rows, random_state=5)
    sampler.fit(X)
    np.testing.assert_array_equal(sampler.sample_indices_, streamed_by_definition(X, ratio, chunk_rows, 5))
    assert len(sampler.coreset_) == bank_size(ratio, 3000)
    np.testing.assert_array_equal(sampler.coreset_, X[np.sort(sampler.sample_indices_)])


def test_streamed_chunks_are_whole_images_and_skip_defective_ones():
    images = clustered_points(20 * 9, 8, seed=35).reshape(20, 3, 3, 8)
    y = np.where(np.arange(20) % 4 == 1, -1, 1)
    sampler = GreedyCoresetSampler(ratio=0.2, strategy="stream", chunk_size=40, random_state=2)
    masked = sampler.fit_transform(images, y)
    good = images[y == 1].reshape(-1, 8)
    by_definition = streamed_by_definition(good, 0.2, 36, 2)  # 40 vectors -> 4 images of 9
    good_positions = np.flatnonzero(np.repeat(y == 1, 9))
    np.testing.assert_array_equal(sampler.sample_indices_, good_positions[by_definition])
    assert np.ma.getmaskarray(masked)[y == -1].all()


def test_auto_streams_only_beyond_its_size(monkeypatch):
    X = clustered_points(2000, 8, seed=36)
    exact = GreedyCoresetSampler(ratio=0.1, random_state=0, strategy="exact").fit(X).sample_indices_
    streamed = GreedyCoresetSampler(ratio=0.1, random_state=0, strategy="stream", chunk_size=500).fit(X)
    auto = GreedyCoresetSampler(ratio=0.1, random_state=0, chunk_size=500)
    np.testing.assert_array_equal(auto.fit(X).sample_indices_, exact)
    monkeypatch.setattr(_sampler, "AUTO_EXACT_PATCHES", 1999)
    np.testing.assert_array_equal(auto.fit(X).sample_indices_, streamed.sample_indices_)


def test_a_streamed_bank_covers_the_data_about_as_well_as_the_exact_one():
    """Merge and reduce is an approximation: the distance from a training vector to its
    nearest bank vector stays close to the exact greedy's, on average (here +2%) and at
    the worst (the k-center radius, +34%: the greedy itself only promises twice the best)."""
    X = clustered_points(6000, 16, seed=37)

    def distances(sampler):
        bank = sampler.fit(X).coreset_
        squared = (X**2).sum(1)[:, None] - 2 * X @ bank.T + (bank**2).sum(1)[None, :]
        return np.sqrt(np.maximum(squared.min(axis=1), 0))

    exact = distances(GreedyCoresetSampler(ratio=0.02, random_state=0, strategy="exact"))
    streamed = distances(GreedyCoresetSampler(ratio=0.02, random_state=0, strategy="stream", chunk_size=1000))
    assert streamed.mean() < 1.05 * exact.mean()
    assert exact.max() <= streamed.max() < 1.5 * exact.max()


def test_the_stream_holds_the_bank_and_less_than_two_chunks():
    shares = _stream.Shares(0.1, 10_000)
    stream = _stream.MergeReduce(shares, 1000, 4, lambda v, n, key: np.arange(n))
    assert stream.bank.shape == (1000, 4) and stream._pool.shape == (2000, 4)
    assert [shares(n) for n in (0, 9, 10, 5000, 10_000)] == [0, 0, 1, 500, 1000]
    capped = _stream.Shares(300, 10_000)
    assert [capped(n) for n in (0, 5000, 9999, 10_000)] == [0, 150, 299, 300]


# --------------------------------------------------------------------------
# Models pickled before partial_fit existed
# --------------------------------------------------------------------------


def test_a_pickle_from_before_the_coreset_package_loads_and_explains_partial_fit(monkeypatch):
    """Earlier pickles name skpatchcore._coreset.GreedyCoresetSampler and lack the new
    parameters and fitted attributes: they load, transform, and partial_fit says why it
    cannot continue."""
    X = clustered_points(400, 8, seed=38)
    sampler = GreedyCoresetSampler(ratio=0.1, random_state=0).fit(X)
    state = sampler.__getstate__()
    for name in ("strategy", "chunk_size", "coreset_", "projection_", "n_vectors_seen_"):
        del state[name]
    state["_skpatchcore_version"] = "0.0.9"
    old = object.__new__(GreedyCoresetSampler)
    monkeypatch.setattr(GreedyCoresetSampler, "__module__", "skpatchcore._coreset")
    monkeypatch.setattr(GreedyCoresetSampler, "__getstate__", lambda self: dict(state))
    data = pickle.dumps(old)
    monkeypatch.undo()
    assert b"skpatchcore._coreset" in data
    with pytest.warns(UserWarning, match="0.0.9"):
        loaded = pickle.loads(data)
    assert type(loaded) is GreedyCoresetSampler
    assert loaded.get_params()["strategy"] == "auto" and loaded.n_vectors_seen_ == 400
    np.testing.assert_array_equal(loaded.transform(X), X)
    with pytest.raises(AttributeError, match="did not keep the coreset's vectors"):
        loaded.partial_fit(X)
