"""The exported graph's int8 candidate filter: its bounds hold, and the search stays exact.

The filter (``skpatchcore._onnx_filter``) ranks bank vectors by a lower bound
of the squared distance made from an int8 product, computes the best ones'
distances exactly and sends every patch it cannot certify to the float32
search. Here: the bound is below the float64 distance for every pair, on
vectors made to be hard (zero rows, one huge entry, a large common offset,
ties); it is tight enough to be useful; and exported models with the filter
score as the pipeline does, whether no patch, some or most need the float32
search.
"""

from __future__ import annotations

import numpy as np
import pytest

import skpatchcore._onnx_filter as filter_module
from skpatchcore import make_patchcore
from skpatchcore._export import _Nodes
from skpatchcore.runtime import UINT8_INPUT

from .test_export import SMALL, assert_same_results, export_and_load

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def hard_vectors(n, d, seed):
    """Gaussian rows with the cases a quantiser gets wrong: zeros, a spike, an offset, duplicates."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, d)) * rng.uniform(0.01, 10.0, size=(n, 1))
    rows[0] = 0.0
    rows[1, 3] = 1e4  # one entry dwarfs the rest: a coarse int8 step
    rows[2] += 50.0  # far from the others, every entry large
    rows[3] = rows[4]  # two equal rows
    rows[5] = np.abs(rows[5]) * 1e-3  # tiny
    return rows.astype(np.float32)


def run_lower_bounds(queries, bank):
    """The filter's bounds (float64) of ``queries`` against ``bank``, and the uint8 codes of the queries."""
    from onnx import TensorProto, helper

    search = filter_module.Int8Filter(bank, k=1)
    g = _Nodes("t/")
    divided, scale = search.lower_bounds(g, "x")
    bounds = g.op("Mul", [divided, scale])
    codes = next(o for node in g.nodes for o in node.output if "filter_query_codes" in o)
    graph = helper.make_graph(
        g.nodes,
        "bounds",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", bank.shape[1]])],
        [
            helper.make_tensor_value_info(bounds, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(codes, TensorProto.UINT8, None),
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    bounds, codes = session.run(None, {"x": queries})
    return bounds.astype(np.float64), codes, search.codes


@pytest.mark.parametrize("d", [512, 1024, 1536])
def test_the_bounds_never_exceed_the_float64_distances(d):
    bank = hard_vectors(300, d, seed=d)
    near = bank[20:40] + np.random.default_rng(d).normal(size=(20, d)).astype(np.float32) * 1e-3
    # others; the bank's first rows (distance 0) and rows a hair from them; rows
    # far larger and far smaller than the bank's
    queries = np.concatenate([hard_vectors(200, d, seed=d + 1), bank[:20], near, bank[40:50] * 1e3])
    queries = np.concatenate([queries, bank[50:60] * 1e-3])
    exact = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    bounds, query_codes, bank_codes = run_lower_bounds(queries, bank)
    assert bounds.shape == exact.shape
    assert bool((bounds <= exact).all()), float((bounds - exact).max())
    # Two products of uint8 x int8 codes never overflow int16 (CPUs without VNNI add
    # pairs of them with saturation): the patches' codes are at most 127, the bank's
    # within 127 in magnitude.
    assert query_codes.max() <= 127 and query_codes.min() >= 1
    assert np.abs(bank_codes.astype(np.int32)).max() <= 127
    # ... and useful: on typical rows (scales within 10x) a few percent below
    typical = slice(6, 200)
    gap = (exact - bounds)[typical, 6:] / exact[typical, 6:]
    assert np.median(gap) < 0.1


def failures(runtime, images) -> int:
    """How many patches of ``images`` the filter of an exported model did not certify."""
    model = onnx.load(runtime.path)
    name = next(o for node in model.graph.node for o in node.output if "filter_failed" in o)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.stack([np.asarray(image) for image in images]).astype(np.uint8)
    return int(session.run([name], {UINT8_INPUT: pixels})[0].sum())


@pytest.fixture(scope="module")
def reference_model(scoring_parts):
    # 1024 values per patch, 64 patches per image: a bank of 512 vectors
    return make_patchcore(ratio=1.0, aggregation="reference", **SMALL).fit(scoring_parts[0])


@pytest.mark.parametrize(
    "extra, some_fail", [(4, None), (0, True), (400, False)], ids=["default", "m=k", "m=k+400"]
)
def test_a_filtered_search_scores_as_the_pipeline(
    extra, some_fail, reference_model, scoring_parts, tmp_path, monkeypatch
):
    monkeypatch.setattr(filter_module, "FILTER_MIN_VECTORS", 100)  # 2,048 in real life
    monkeypatch.setattr(filter_module, "EXTRA_CANDIDATES", extra)
    runtime = export_and_load(reference_model, tmp_path)
    ops = [node.op_type for node in onnx.load(runtime.path).graph.node]
    assert "MatMulInteger" in ops and "Gemm" in ops  # the filter and its float32 fallback
    assert_same_results(runtime, reference_model, scoring_parts[1])
    n_failed = failures(runtime, scoring_parts[1])
    if some_fail is not None:
        assert (n_failed > 0) == some_fail


@pytest.mark.parametrize("extra", [4, 0])
def test_the_filter_keeps_k_neighbours_and_eq7(extra, scoring_parts, tmp_path, monkeypatch):
    model = make_patchcore(
        ratio=1.0, aggregation="reference", n_neighbors=3, reweight_neighbors=4, **SMALL
    ).fit(scoring_parts[0])
    monkeypatch.setattr(filter_module, "FILTER_MIN_VECTORS", 100)
    monkeypatch.setattr(filter_module, "EXTRA_CANDIDATES", extra)
    runtime = export_and_load(model, tmp_path)
    assert "MatMulInteger" in [node.op_type for node in onnx.load(runtime.path).graph.node]
    assert_same_results(runtime, model, scoring_parts[1])
    if extra == 0:  # m = k: the float32 search runs for some patches
        assert failures(runtime, scoring_parts[1]) > 0


def test_small_or_low_dimensional_banks_keep_the_float32_search(
    reference_model, scoring_parts, tmp_path, monkeypatch
):
    def ops(model):
        return [node.op_type for node in onnx.load(export_and_load(model, tmp_path).path).graph.node]

    assert "MatMulInteger" not in ops(reference_model)  # 512 x 1024: below 2,048 vectors
    monkeypatch.setattr(filter_module, "FILTER_MIN_VECTORS", 100)
    assert "MatMulInteger" in ops(reference_model)
    low = make_patchcore(ratio=1.0, **SMALL).fit(scoring_parts[0])  # 512 x 152: below 512 values
    assert "MatMulInteger" not in ops(low)
