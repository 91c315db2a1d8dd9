"""Plain, literal implementations of PatchCore's steps, kept as yardsticks.

They follow DESIGN.md section 1 step by step, the way the reference code does
it, with no shortcuts. The test suite checks the package against them and the
benchmarks time the package against them. They are not part of the package.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


def stock_backbone(name: str = "efficientnet_lite0"):
    """The backbone as its library builds it, the way the reference code runs it.

    Same weights and stages as ``skpatchcore.build_backbone(name)``, but timm's
    own network (``tf_efficientnet_lite*``): batch norms as separate passes,
    timm's "same" padding, separate activations. Callers feed it contiguous
    (N, C, H, W) input, not channels-last.
    """
    import timm

    from skpatchcore._backbones import REGISTRY, FeatureExtractor, _lite_model

    entry = REGISTRY[name]
    if entry.source != "lite":
        raise ValueError(f"stock_backbone covers the EfficientNet-Lite entries; got {name!r}.")
    model = _lite_model(name, "imagenet", model=timm.create_model("tf_" + name, pretrained=False))
    return FeatureExtractor(model, entry.layers, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def reference_features(stages, patch_size=3, pretrain_dim=1024, target_dim=1024):
    """Reference aggregation: unfold -> resize unfolded deeper stages -> pool -> stack -> pool.

    ``stages`` are backbone activations (B, C_l, h_l, w_l); returns (B, h, w, target_dim).
    """
    p = patch_size
    unfolded = []
    for x in stages:
        batch, channels, height, width = x.shape
        u = F.unfold(x, kernel_size=p, padding=(p - 1) // 2, stride=1)
        unfolded.append(u.reshape(batch, channels, p, p, height, width))
    ref_h, ref_w = unfolded[0].shape[-2:]
    for i in range(1, len(unfolded)):
        u = unfolded[i]
        batch, channels, _, _, height, width = u.shape
        u = F.interpolate(
            u.reshape(-1, 1, height, width), size=(ref_h, ref_w), mode="bilinear", align_corners=False
        )
        unfolded[i] = u.reshape(batch, channels, p, p, ref_h, ref_w)
    per_stage = []
    for u in unfolded:
        batch, channels = u.shape[:2]
        vectors = u.permute(0, 4, 5, 1, 2, 3).reshape(-1, 1, channels * p * p)
        per_stage.append(F.adaptive_avg_pool1d(vectors, pretrain_dim).squeeze(1))
    stacked = torch.stack(per_stage, dim=1)
    fused = F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target_dim).squeeze(1)
    return fused.reshape(stages[0].shape[0], ref_h, ref_w, target_dim)


def mean_features(stages, patch_size=3, target_dim=None):
    """Per-channel neighbourhood mean, deeper stages resized, stages concatenated.

    Each location's ``p x p`` neighbourhood is unfolded and averaged literally
    (zeros outside the map counted); an optional final 1-D adaptive average
    pool to ``target_dim`` applies only when it shrinks the vector.
    """
    p = patch_size
    ref_h, ref_w = stages[0].shape[-2:]
    parts = []
    for x in stages:
        batch, channels, height, width = x.shape
        u = F.unfold(x, kernel_size=p, padding=(p - 1) // 2, stride=1)
        mean = u.reshape(batch, channels, p * p, height, width).mean(dim=2)
        if (height, width) != (ref_h, ref_w):
            mean = F.interpolate(mean, size=(ref_h, ref_w), mode="bilinear", align_corners=False)
        parts.append(mean)
    fused = torch.cat(parts, dim=1).permute(0, 2, 3, 1)
    if target_dim is not None and target_dim < fused.shape[-1]:
        batch = fused.shape[0]
        flat = fused.reshape(-1, 1, fused.shape[-1])
        fused = F.adaptive_avg_pool1d(flat, target_dim).reshape(batch, ref_h, ref_w, target_dim)
    return fused


def greedy_coreset(points, n_select, starts):
    """Plain greedy k-center loop: one distance pass over all points per selected point.

    ``points`` are the projected vectors, ``starts`` the random start indices.
    The running distance starts as the mean distance to the start points; each
    step takes the farthest point and lowers every distance with ``min``.
    """
    points = np.asarray(points, dtype=np.float32)

    def distances_to(center):
        diff = points - center
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))

    min_dist = np.stack([distances_to(points[s]) for s in starts], axis=1).mean(axis=1)
    selected = np.empty(n_select, dtype=np.int64)
    for step in range(n_select):
        chosen = int(np.argmax(min_dist))
        selected[step] = chosen
        min_dist = np.minimum(min_dist, distances_to(points[chosen]))
    return selected


def greedy_coreset_continued(points, n_select, centres):
    """The plain greedy loop continued from vectors already selected (``partial_fit``).

    ``centres`` are the selected vectors, projected as ``points`` are. Each
    point's running distance starts as its distance to the nearest centre;
    then each step takes the farthest point and lowers every distance with
    ``min``, as :func:`greedy_coreset`. Returns indices into ``points``.
    """
    points = np.asarray(points, dtype=np.float32)

    def distances_to(center):
        diff = points - center
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))

    min_dist = np.full(len(points), np.inf, dtype=np.float32)
    for center in np.asarray(centres, dtype=np.float32):
        min_dist = np.minimum(min_dist, distances_to(center))
    selected = np.empty(n_select, dtype=np.int64)
    for step in range(n_select):
        chosen = int(np.argmax(min_dist))
        selected[step] = chosen
        min_dist = np.minimum(min_dist, distances_to(points[chosen]))
    return selected


def greedy_coreset_torch(points, n_select, starts):
    """The reference code's loop in torch: distances by the norm expansion, concatenate, min."""
    features = torch.as_tensor(points, dtype=torch.float32)

    def batchwise(a, b):
        a_sq = a.unsqueeze(1).bmm(a.unsqueeze(2)).reshape(-1, 1)
        b_sq = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
        return (-2 * a.mm(b.T) + a_sq + b_sq).clamp(0, None).sqrt()

    with torch.no_grad():
        running = torch.mean(batchwise(features, features[list(starts)]), dim=-1).reshape(-1, 1)
        selected = []
        for _ in range(n_select):
            chosen = torch.argmax(running).item()
            selected.append(chosen)
            new = batchwise(features, features[chosen : chosen + 1])
            running = torch.min(torch.cat([running, new], dim=-1), dim=1).values.reshape(-1, 1)
    return np.array(selected)


def nearest_all_pairs(bank, queries, k):
    """k-nearest-neighbour search the plain way: every (query, bank vector) pair's
    squared distance with ``skpatchcore._search.pair_distances``, then the k
    smallest per query, ties by index. Returns (squared distances, indices)."""
    from skpatchcore._search import pair_distances

    vectors = torch.from_numpy(bank)
    squared = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    for row, query in enumerate(queries):
        distances = pair_distances(torch.from_numpy(query).expand(len(bank), -1), vectors).numpy()
        indices[row] = np.argsort(distances, kind="stable")[:k]
        squared[row] = distances[indices[row]]
    return squared, indices


def projected_points(vectors: np.ndarray, seed: int, projection_dim: int = 128, n_starts: int = 10):
    """The projected vectors and start points ``GreedyCoresetSampler(random_state=seed)`` draws."""
    from sklearn.utils import check_random_state

    from skpatchcore._coreset._selection import project

    rng = check_random_state(seed)
    projection = rng.standard_normal((vectors.shape[1], projection_dim)).astype(np.float32)
    projection /= np.sqrt(projection_dim)
    starts = rng.choice(len(vectors), size=min(n_starts, len(vectors)), replace=False)
    return project(vectors, projection), starts  # as the sampler projects


def plain_pipeline(
    train_paths,
    test_paths,
    ratio: float,
    seed: int,
    *,
    batch_size: int = 8,
    image_size: int = 256,
    crop_size: int = 224,
    sigma: float = 4.0,
    projection_dim: int = 128,
    n_starts: int = 10,
    on_step=None,
) -> dict:
    """PatchCore fit and predict put together from the plain steps, the way the reference code runs them.

    - Images: opened with PIL, converted to RGB, torchvision's ``Resize``
      (shorter side), ``CenterCrop`` and ``ToTensor``, batch by batch.
    - Features: :func:`stock_backbone` and :func:`reference_features`; each
      batch's array goes into a list, concatenated once all are done.
    - Coreset: :func:`projected_points` then :func:`greedy_coreset_torch`.
    - Index: faiss ``IndexFlatL2`` holding the bank (no threshold calibration).
    - Predict, batch by batch: features, faiss search (k = 1), the square root of
      the distance as the patch score, the largest patch score as the image
      score; maps upsampled bilinearly (``align_corners=False``) to the model
      input and smoothed by ``scipy.ndimage.gaussian_filter(sigma)`` one by one.

    ``on_step(name)``, when given, is called after the backbone is built
    (``"load"``) and after the fit (``"fit"``), e.g. to read the memory there.
    Returns the times (s; predict also per image), the bank size, the image
    scores (n_test,) and the maps (n_test, crop, crop).
    """
    import faiss
    import scipy.ndimage
    from PIL import Image
    from torchvision import transforms

    times = {}
    start = time.perf_counter()
    extractor = stock_backbone()
    times["load_s"] = time.perf_counter() - start
    if on_step is not None:
        on_step("load")
    to_input = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(crop_size), transforms.ToTensor()]
    )

    def batches(paths):
        for first in range(0, len(paths), batch_size):
            images = [to_input(Image.open(path).convert("RGB")) for path in paths[first : first + batch_size]]
            with torch.no_grad():
                yield reference_features(extractor(torch.stack(images)))

    start = time.perf_counter()
    features = np.concatenate([batch.numpy() for batch in batches(train_paths)])
    times["features_s"] = time.perf_counter() - start

    start = time.perf_counter()
    vectors = features.reshape(-1, features.shape[-1])
    points, starts = projected_points(vectors, seed, projection_dim, n_starts)
    selected = greedy_coreset_torch(points, max(1, int(len(vectors) * ratio)), starts)
    times["coreset_s"] = time.perf_counter() - start

    start = time.perf_counter()
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors[selected]))
    times["index_s"] = time.perf_counter() - start
    times["fit_s"] = times["features_s"] + times["coreset_s"] + times["index_s"]
    del features, vectors, points
    if on_step is not None:
        on_step("fit")

    start = time.perf_counter()
    scores, maps = [], []
    for batch in batches(test_paths):
        n, height, width, dim = batch.shape
        distances, _ = index.search(np.ascontiguousarray(batch.reshape(-1, dim).numpy()), 1)
        patch = torch.from_numpy(np.sqrt(distances[:, 0])).reshape(n, 1, height, width)
        scores.append(patch.reshape(n, -1).max(dim=1).values.numpy())
        upsampled = F.interpolate(patch, size=(crop_size, crop_size), mode="bilinear", align_corners=False)
        maps += [scipy.ndimage.gaussian_filter(m, sigma=sigma) for m in upsampled[:, 0].numpy()]
    times["predict_s"] = time.perf_counter() - start
    times["predict_ms_per_image"] = 1000.0 * times["predict_s"] / len(test_paths)
    return {
        "times": times,
        "bank_size": len(selected),
        "scores": np.concatenate(scores),
        "maps": np.stack(maps),
    }
