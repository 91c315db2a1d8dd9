"""PatchFeatureTransformer: faithful to DESIGN section 1 steps 1-5, and strict about its input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from sklearn.exceptions import NotFittedError

from benchmarks.plain import mean_features, reference_features
from skpatchcore import BackboneError, ImageReadError, PatchFeatureTransformer
from skpatchcore._aggregation import adaptive_pool_matrix, aggregate, build_stage_maps
from skpatchcore._backbones import (
    FeatureExtractor,
    _lite_model,
    build_backbone,
    fold_batch_norms,
)
from skpatchcore._efficientnet_lite import EfficientNetLite, SamePadConv2d
from skpatchcore.utils._geometry import Geometry

from .conftest import MPDD, textured_parts


def relative_error(fast: torch.Tensor, plain: torch.Tensor) -> float:
    """Largest relative error of a patch vector: max_i |fast_i - plain_i| / |plain_i|."""
    fast, plain = fast.double(), plain.double()
    return float(((fast - plain).norm(dim=-1) / plain.norm(dim=-1)).max())


@pytest.fixture(scope="module")
def real_stages():
    """efficientnet_lite0 activations of real photos (mpdd) or of textured parts when absent."""
    extractor = build_backbone("efficientnet_lite0")
    if MPDD.is_dir():
        paths = sorted((MPDD / "train" / "good").glob("*.png"))[:2]
        images = [Geometry(256, 224).apply(Image.open(p).convert("RGB")) for p in paths]
    else:
        images = [Geometry(256, 224).apply(Image.fromarray(im)) for im in textured_parts(2, size=256)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        return extractor(pixels)


@pytest.mark.parametrize("pretrain_dim, target_dim", [(1024, 1024), (384, 384), (1024, 512), (1000, 777)])
def test_reference_aggregation_equals_literal_unfold_and_pooling(real_stages, pretrain_dim, target_dim):
    channels = [stage.shape[1] for stage in real_stages]
    maps, dim = build_stage_maps(channels, "reference", 3, pretrain_dim, target_dim)
    with torch.inference_mode():
        fast = aggregate(real_stages, maps, dim).permute(0, 2, 3, 1)
        plain = reference_features([s.double() for s in real_stages], 3, pretrain_dim, target_dim)
    assert fast.shape == (2, 28, 28, target_dim)
    assert relative_error(fast, plain) <= 1e-5


@pytest.mark.parametrize("patch_size", [1, 3, 5])
@pytest.mark.parametrize("budget", [None, 200])
def test_banded_cpu_path_equals_dense_convolution(patch_size, budget, monkeypatch):
    if budget is not None:  # unfold one or two map rows at a time
        monkeypatch.setattr("skpatchcore._aggregation._UNFOLD_BUDGET", budget * patch_size**2)
    # Three stages, two at the first stage's resolution and one coarser, with
    # dims that make neighbouring stages share output rows.
    generator = torch.Generator().manual_seed(patch_size)
    shapes = [(3, 24, 12, 12), (3, 40, 12, 12), (3, 56, 6, 6)]
    stages = [torch.randn(shape, generator=generator) for shape in shapes]
    stages[0] = stages[0].contiguous(memory_format=torch.channels_last)
    maps, dim = build_stage_maps([s[1] for s in shapes], "reference", patch_size, 300, 500)
    assert any(a.rows.stop > b.rows.start for a, b in zip(maps, maps[1:]))
    with torch.inference_mode():
        fast = aggregate(stages, maps, dim)
        dense = torch.zeros(3, dim, 12, 12)
        for stage, stage_map in zip(stages, maps):
            part = torch.nn.functional.conv2d(stage, stage_map.weight, padding=patch_size // 2)
            part = torch.nn.functional.interpolate(part, size=(12, 12), mode="bilinear", align_corners=False)
            dense[:, stage_map.rows] += part
        plain = reference_features([s.double() for s in stages], patch_size, 300, 500)
    fast = fast.permute(0, 2, 3, 1)
    assert fast.is_contiguous()
    assert relative_error(fast, dense.permute(0, 2, 3, 1)) <= 1e-6
    assert relative_error(fast, plain) <= 1e-5


@pytest.mark.parametrize("target_dim", [None, 100])
def test_mean_aggregation_equals_literal_neighbourhood_mean(real_stages, target_dim):
    channels = [stage.shape[1] for stage in real_stages]
    maps, dim = build_stage_maps(channels, "mean", 3, 1024, target_dim or 10**6)
    with torch.inference_mode():
        fast = aggregate(real_stages, maps, dim).permute(0, 2, 3, 1)
        plain = mean_features([s.double() for s in real_stages], 3, target_dim)
    assert fast.shape == (2, 28, 28, target_dim or 152)
    assert relative_error(fast, plain) <= 1e-5


def test_adaptive_pool_matrix_matches_torch():
    x = torch.randn(3, 1, 360, dtype=torch.float64)
    for n_out in (1024, 100, 360):
        pooled = torch.nn.functional.adaptive_avg_pool1d(x, n_out).squeeze(1)
        via_matrix = x.squeeze(1) @ torch.from_numpy(adaptive_pool_matrix(360, n_out)).T
        assert torch.allclose(pooled, via_matrix, atol=1e-12)


def test_transform_gives_one_vector_per_stride8_location():
    images = textured_parts(3, size=256)
    features = PatchFeatureTransformer(backbone="efficientnet_lite0", device="cpu").fit_transform(images)
    # square images: a 320 px box; the mean of blocks.2 and blocks.4
    assert features.shape == (3, 40, 40, 40 + 112)
    reference = PatchFeatureTransformer(
        backbone="efficientnet_lite0",
        aggregation="reference",
        image_size=256,
        crop_size=224,
        resize_side="shorter",
        device="cpu",
    ).fit_transform(images)
    assert reference.shape == (3, 28, 28, 1024)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()


def test_paths_pil_and_uint8_arrays_give_identical_features(tmp_path, lite_features):
    images = textured_parts(3, size=80, seed=5)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"part{i}.png")
        Image.fromarray(image).save(paths[-1])
    from_arrays = lite_features.transform(images)
    from_list = lite_features.transform(list(images))
    from_paths = lite_features.transform([str(p) for p in paths])
    from_pil = lite_features.transform([Image.open(p) for p in paths])
    np.testing.assert_array_equal(from_arrays, from_paths)
    np.testing.assert_array_equal(from_list, from_paths)
    np.testing.assert_array_equal(from_pil, from_paths)


def test_float_images_equal_uint8_images_scaled_to_unit_range(lite_features):
    # At the model's input size no resampling happens, so only the scaling differs.
    images = textured_parts(2, size=64, seed=6)
    as_uint8 = lite_features.transform(images)
    as_float = lite_features.transform(images.astype(np.float32) / 255.0)
    np.testing.assert_allclose(as_float, as_uint8, rtol=0, atol=1e-5)


def test_batches_converted_at_once_equal_images_converted_one_by_one(lite_features):
    """8-bit images are converted per batch in torch; float arrays keep their own path."""
    from skpatchcore.utils._geometry import _center_crop, to_unit_float

    rng = np.random.default_rng(9)
    for size, mode, geometry in [
        ((90, 70, 3), "RGB", Geometry(64, 48)),
        ((90, 70), "L", Geometry(64, 48)),
        ((30, 50, 3), "RGB", Geometry(40, 64)),  # crop larger than the image: zero padding
        ((30, 80, 3), "RGB", Geometry(64, 64, resize_side="longer")),  # letterbox
    ]:
        image = Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), mode)
        # the per-image float conversion the batch conversion replaced
        height, width = geometry.resized_size(image.height, image.width)
        old = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
        old = _center_crop(old if old.ndim == 3 else old[:, :, None], geometry.crop_size)
        by_torch = to_unit_float(torch.from_numpy(np.array(geometry.apply_8bit(image)))).numpy()
        assert by_torch.shape == old.shape and by_torch.tobytes() == np.ascontiguousarray(old).tobytes()
    # every 8-bit value divides to the same float32 in numpy and torch
    levels = np.arange(256, dtype=np.uint8)
    assert to_unit_float(torch.from_numpy(levels)).numpy().tobytes() == to_unit_float(levels).tobytes()

    # At the model's input size nothing is resampled, so 8-bit images, float
    # images and a batch mixing both reach the network as the same bits.
    images = textured_parts(3, size=64, seed=10)
    floats = images.astype(np.float32) / 255.0
    lite_features.set_params(batch_size=3)
    try:
        mixed = lite_features.transform([images[0], floats[1], images[2]])
        np.testing.assert_array_equal(mixed, lite_features.transform(floats))
        np.testing.assert_array_equal(mixed, lite_features.transform(images))
    finally:
        lite_features.set_params(batch_size="auto")


def test_grayscale_images_are_fed_as_three_identical_channels():
    gray = textured_parts(2, size=64, seed=7)[..., 0]
    transformer = PatchFeatureTransformer(
        backbone="efficientnet_lite0", image_size=64, crop_size=None, device="cpu"
    )
    from_gray = transformer.fit(gray).transform(gray)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    from_rgb = transformer.fit(rgb).transform(rgb)
    np.testing.assert_allclose(from_gray, from_rgb, rtol=0, atol=1e-6)


def test_features_do_not_depend_on_batch_size(lite_features):
    images = textured_parts(5, size=64, seed=8)
    one = lite_features.set_params(batch_size=1).transform(images)
    three = lite_features.set_params(batch_size=3).transform(images)
    lite_features.set_params(batch_size="auto")
    assert relative_error(torch.from_numpy(one), torch.from_numpy(three)) < 1e-5


def test_batches_written_in_place_equal_the_streamed_batches(lite_features, monkeypatch):
    """transform() writes each CPU batch after the first straight into its output;
    the values are those of the batches the streaming path (predict_map) yields."""
    from skpatchcore import _features

    written_into = []
    real = _features.aggregate

    def spy(*args, out=None):
        written_into.append(out is not None)
        return real(*args, out=out)

    monkeypatch.setattr(_features, "aggregate", spy)
    images = textured_parts(7, size=64, seed=12)
    lite_features.set_params(batch_size=3)
    try:
        features = lite_features.transform(images)
        assert written_into == [False, True, True]  # batches of 3, 3 and 1
        batches, _, n_images, _ = lite_features._feature_batches(images)
        streamed = np.concatenate([batch.numpy() for _, batch in batches])
    finally:
        lite_features.set_params(batch_size="auto")
    assert n_images == 7 and features.tobytes() == streamed.tobytes()


def test_aggregate_checks_the_array_it_writes_into():
    stages = [torch.rand(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)]
    maps, dim = build_stage_maps([8], "mean", 3, 8, 8)
    out = torch.empty(2, 6, 6, dim)
    fused = aggregate(stages, maps, dim, out=out)
    assert fused.permute(0, 2, 3, 1).data_ptr() == out.data_ptr()
    assert torch.equal(fused, aggregate(stages, maps, dim))
    with pytest.raises(ValueError, match="contiguous"):
        aggregate(stages, maps, dim, out=torch.empty(2, 6, 6, dim + 1))


@pytest.mark.parametrize(
    "size, image_size, crop_size",
    [
        ((300, 200), 256, 224),
        ((200, 300), 256, 224),
        ((100, 90), 64, 80),
        ((257, 311), (128, 96), 64),
        ((50, 70), None, None),
    ],
)
def test_geometry_matches_torchvision_resize_and_center_crop(size, image_size, crop_size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    steps = []
    if image_size is not None:
        steps.append(T.Resize(image_size))
    if crop_size is not None:
        steps.append(T.CenterCrop(crop_size))
    expected = np.asarray(T.Compose(steps)(image) if steps else image, dtype=np.float32) / 255.0
    got = Geometry(image_size, crop_size).apply(image)
    np.testing.assert_array_equal(got, expected)
    assert Geometry(image_size, crop_size).output_size(*size) == expected.shape[:2]


@pytest.mark.parametrize(
    "size, resized", [((100, 250), (25, 64)), ((250, 100), (64, 25)), ((64, 64), (64, 64))]
)
def test_letterbox_fits_the_longer_side_and_pads_the_shorter(size, resized):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(1, 256, (*size, 3), dtype=np.uint8))
    geometry = Geometry(64, 64, resize_side="longer")
    assert geometry.resized_size(*size) == resized
    # torchvision: resize to that exact size, then a centre crop larger than the image pads it.
    expected = np.asarray(T.CenterCrop(64)(T.Resize(resized)(image)), dtype=np.float32) / 255.0
    got = geometry.apply(image)
    np.testing.assert_array_equal(got, expected)
    # Every pixel of the part is there (no zeros inside it); the rest is black padding.
    content = np.any(got > 0, axis=2)
    assert content.sum() == resized[0] * resized[1]
    # An exact (h, w) image_size ignores resize_side.
    assert Geometry((30, 40), None, resize_side="longer").resized_size(*size) == (30, 40)


def test_resize_side_is_checked():
    with pytest.raises(
        ValueError,
        match=r"'resize_side' parameter must be one of \['shorter', 'longer', 'fit'\]; got 'sideways'",
    ):
        Geometry(64, 64, resize_side="sideways")
    with pytest.raises(ValueError, match="resize_side"):
        PatchFeatureTransformer(backbone="efficientnet_lite0", resize_side="sideways").fit(textured_parts(1))


def test_letterboxed_images_of_different_aspect_ratios_share_one_grid():
    rng = np.random.default_rng(2)
    images = [
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in ((60, 150, 3), (150, 90, 3))
    ]
    transformer = PatchFeatureTransformer(
        backbone="efficientnet_lite0", image_size=64, crop_size=64, resize_side="longer", device="cpu"
    )
    features = transformer.fit_transform(images)
    assert features.shape == (2, 8, 8, 152)
    assert transformer.geometry_ == Geometry(64, 64, resize_side="longer")


def test_forward_stops_after_the_last_requested_layer():
    model = build_backbone("resnet18", layers=["layer1", "layer2"], weights=None).model
    ran = []
    model.layer3.register_forward_hook(lambda *args: ran.append("layer3"))
    model.fc.register_forward_hook(lambda *args: ran.append("fc"))
    extractor = build_backbone(model, layers=["layer1", "layer2"], weights=None)
    with torch.inference_mode():
        stages = extractor(torch.rand(1, 3, 64, 64))
    assert [s.shape[1] for s in stages] == [64, 128]
    assert ran == []


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_folded_batch_norms_give_the_same_activations(name):
    torch.manual_seed(0)
    if name == "resnet18":
        model, layers = torchvision.models.resnet18(), ["layer2", "layer3"]
        for module in model.modules():  # non-trivial statistics for random weights
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
    else:
        model, layers = _lite_model(name, "imagenet"), ["blocks.2", "blocks.4"]
    reference = FeatureExtractor(copy.deepcopy(model), layers, (0.5,) * 3, (0.5,) * 3)
    folded_model = copy.deepcopy(model)
    fold_batch_norms(folded_model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded_model.modules())
    folded = FeatureExtractor(folded_model, layers, (0.5,) * 3, (0.5,) * 3)
    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        for a, b in zip(folded(x), reference(x)):
            assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_architecture_is_timms_layer_for_layer(name):
    """Same state_dict keys, order and shapes as timm's tf_ model, and its exact outputs."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("tf_" + name, pretrained=False).eval()
    for module in reference.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    ours = EfficientNetLite(name).eval()
    expected = reference.state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in expected.items()
    ]
    ours.load_state_dict(expected, strict=True)
    # Layer names users may hook line up too (timm's pooling internals aside).
    names = {n for n, _ in reference.named_modules() if not n.startswith("global_pool.")}
    assert names <= {n for n, _ in ours.named_modules()}
    sizes = [(96, 96), (97, 50), (5, 3)] if name == "efficientnet_lite0" else [(64, 64)]
    with torch.inference_mode():
        for size in sizes:
            for channels_last in (False, True):
                x = torch.rand(2, 3, *size)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                assert torch.equal(ours(x), reference(x)), (size, channels_last)


@pytest.mark.parametrize("shape", [(2, 3, 97, 50), (1, 3, 64, 64), (3, 3, 224, 224)])
def test_fused_relu6_convolutions_give_the_unfused_bits(monkeypatch, shape):
    """oneDNN's conv + clamp in one call equals the convolution then ReLU6, bit for bit."""
    from skpatchcore import _efficientnet_lite as lite

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert lite._fused_relu6_available()
    monkeypatch.setattr(lite, "_SHARED_VERDICTS", {})  # no verdicts from earlier tests
    extractor = build_backbone("efficientnet_lite0")
    convs = [m for m in extractor.modules() if getattr(m, "relu6", False)]
    assert len(convs) == 22  # stem + every expansion and depthwise convolution up to blocks.4
    assert not any(isinstance(m, torch.nn.ReLU6) for m in extractor.modules())
    fused_calls = []
    real_fused, real_usable = lite.Conv2d._fused, lite._fused_relu6_usable
    monkeypatch.setattr(lite.Conv2d, "_fused", lambda self, *a: fused_calls.append(1) or real_fused(self, *a))
    x = torch.rand(*shape).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        first = extractor(x)  # each convolution checks fused against plain once for this shape
        assert lite._SHARED_VERDICTS and all(v is True for v in lite._SHARED_VERDICTS.values())
        fused_calls.clear()
        fused = extractor(x)
        assert len(fused_calls) == len(convs)  # now every one runs fused
        monkeypatch.setattr(lite, "_fused_relu6_usable", lambda x, w: False)
        unfused = extractor(x)  # the same modules: convolution, then hardtanh_
    for a, b, c in zip(fused, unfused, first):
        assert torch.equal(a, b) and torch.equal(b, c)
    # A second copy of the network reuses the verdicts: it runs fused from its first call.
    monkeypatch.setattr(lite, "_fused_relu6_usable", real_usable)
    second = build_backbone("efficientnet_lite0")
    fused_calls.clear()
    with torch.inference_mode():
        again = second(x)
    assert len(fused_calls) == len(convs)
    for a, b in zip(again, first):
        assert torch.equal(a, b)


def test_fusion_falls_back_where_torch_would_not_use_onednn(monkeypatch):
    """A shape whose fused result differs (or oneDNN switched off) runs unfused."""
    from skpatchcore import _efficientnet_lite as lite

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(lite, "_SHARED_VERDICTS", {})  # no verdicts from earlier tests
    torch.manual_seed(3)
    conv = lite.Conv2d(16, 96, 1, bias=True).requires_grad_(False)
    conv.relu6 = True

    def expected(x):
        return torch.nn.functional.conv2d(x, conv.weight, conv.bias).clamp(0.0, 6.0)

    with torch.inference_mode():
        for size in [(1, 16, 1, 2), (1, 16, 3, 3), (4, 16, 20, 20)]:
            x = torch.randn(*size).contiguous(memory_format=torch.channels_last)
            for _ in range(2):  # the checking call, then the decided one
                assert torch.equal(conv(x), expected(x))
        assert len(lite._SHARED_VERDICTS) == 3  # one per input shape
        # A fused result off by one rounding step is caught on the first call and never used.
        real_fused, fused_calls = lite.Conv2d._fused, []

        def off_by_rounding(self, *args):
            fused_calls.append(1)
            return torch.nextafter(real_fused(self, *args), torch.tensor(7.0))

        monkeypatch.setattr(lite.Conv2d, "_fused", off_by_rounding)
        x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
        for _ in range(3):
            assert torch.equal(conv(x), expected(x))
        assert (
            fused_calls == [1]
            and lite._SHARED_VERDICTS[conv._configuration((tuple(x.shape), (0, 0), torch.get_num_threads()))]
            is False
        )
        assert lite._fused_relu6_usable(x, conv.weight)
        enabled = torch.backends.mkldnn.enabled
        try:
            torch.backends.mkldnn.enabled = False
            assert not lite._fused_relu6_usable(x, conv.weight)
        finally:
            torch.backends.mkldnn.enabled = enabled


@pytest.mark.parametrize(
    "layers, tapped, clamped",
    [
        (["blocks.2", "blocks.3.0.conv_pw"], 1, False),  # last: the forward stops before its ReLU6
        (["blocks.1.0.conv_pw", "blocks.2"], 0, True),  # not last: its in-place ReLU6 ran on it
    ],
)
def test_a_tapped_convolution_keeps_its_unfused_output(layers, tapped, clamped):
    torch.manual_seed(2)
    model = EfficientNetLite("efficientnet_lite0").eval()
    folded = copy.deepcopy(model)
    fold_batch_norms(folded)
    fused = copy.deepcopy(folded)
    from skpatchcore._efficientnet_lite import fuse_relu6

    fuse_relu6(fused, keep=layers)
    assert not dict(fused.named_modules())[layers[tapped]].relu6
    assert sum(getattr(m, "relu6", False) for m in fused.modules()) > 20
    x = torch.rand(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        before = FeatureExtractor(folded, layers, (0.5,) * 3, (0.5,) * 3)(x)
        extractor = FeatureExtractor(fused, layers, (0.5,) * 3, (0.5,) * 3)
        for _ in range(2):
            after = extractor(x)
            assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert bool(after[tapped].min() >= 0) == clamped


@pytest.mark.parametrize("size", [(96, 96), (97, 50), (5, 3), (1, 2)])
def test_same_padding_is_bit_identical_to_timms_padded_convolution(size):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(1)
    for kernel, stride in ((3, 2), (5, 2), (3, 1)):
        reference = timm_layers.Conv2dSame(8, 8, kernel, stride, groups=8, bias=True)
        ours = SamePadConv2d(8, 8, kernel, stride, 0, groups=8, bias=True)
        ours.load_state_dict(reference.state_dict())
        x = torch.rand(2, 8, *size)
        with torch.inference_mode():
            assert torch.equal(ours(x), reference(x))
            x = x.contiguous(memory_format=torch.channels_last)
            assert torch.equal(ours(x), reference(x))


def test_offline_backbones_need_neither_timm_nor_torchvision():
    """Building and running EfficientNet-Lite imports neither (nor torch._dynamo)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from skpatchcore import PatchFeatureTransformer\n"
        "import numpy as np\n"
        "images = np.zeros((1, 64, 64, 3), dtype=np.uint8)\n"
        "transformer = PatchFeatureTransformer('efficientnet_lite0', image_size=64, crop_size=None)\n"
        "transformer.set_params(device='cpu').fit_transform(images)\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_lite_weights_load_strictly_with_imagenet_normalisation():
    extractor = build_backbone("efficientnet_lite0")
    assert extractor.layers == ("blocks.2", "blocks.4")
    assert torch.allclose(extractor.mean, torch.full((1, 3, 1, 1), 0.5))
    with torch.inference_mode():
        stages = extractor(torch.rand(1, 3, 224, 224))
    assert [tuple(s.shape[1:]) for s in stages] == [(40, 28, 28), (112, 14, 14)]


def test_local_state_dict_path_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    from_file = build_backbone("resnet18", weights=path)
    from_module = build_backbone(source, layers=["layer2", "layer3"], weights=None)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(from_file(x), from_module(x)):
            assert float((a - b).norm() / b.norm()) < 1e-5


def test_wrong_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(BackboneError, match="do not fit backbone 'resnet18'"):
        build_backbone("resnet18", weights=path)
    with pytest.raises(BackboneError, match="not a file"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")


def test_offline_default_backbone_says_what_to_do(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BackboneError) as error:
        PatchFeatureTransformer().fit(textured_parts(1))
    message = str(error.value)
    assert "wide_resnet50_2" in message and "weights=" in message and "efficientnet_lite0" in message
    assert "\n" not in message


def test_custom_module_backbone_is_copied_not_mutated():
    module = torchvision.models.resnet18()
    weight = module.conv1.weight.clone()
    transformer = PatchFeatureTransformer(
        backbone=module,
        layers=["layer2", "layer3"],
        weights=None,
        image_size=64,
        crop_size=None,
        device="cpu",
    )
    features = transformer.fit_transform(textured_parts(2))
    # Mean aggregation concatenates layer2 (128) and layer3 (256); target_dim=1024 would not shrink it.
    assert features.shape == (2, 8, 8, 128 + 256)
    assert transformer.backbone is module and torch.equal(module.conv1.weight, weight)
    assert module.conv1.weight.requires_grad


def test_torchvision_name_with_explicit_layers_works():
    transformer = PatchFeatureTransformer(
        backbone="mobilenet_v3_small",
        layers=["features.2", "features.4"],
        weights=None,
        image_size=64,
        crop_size=None,
        target_dim=64,
        device="cpu",
    )
    assert transformer.fit_transform(textured_parts(1)).shape == (1, 8, 8, 64)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"backbone": "no_such_net"}, "Unknown backbone 'no_such_net'"),
        ({"backbone": "efficientnet_lite0", "layers": ["blocks.9"]}, "Layer 'blocks.9' is not a module"),
        ({"backbone": "mobilenet_v3_small", "weights": None}, "has no default layers"),
        ({"backbone": "efficientnet_lite0", "patch_size": 4}, "'patch_size' parameter must be odd"),
        ({"backbone": "efficientnet_lite0", "image_size": (0, 3)}, "'image_size' parameter must be"),
        ({"backbone": "efficientnet_lite0", "aggregation": "max"}, "'aggregation' parameter"),
    ],
)
def test_bad_parameters_are_named_in_the_error(params, message):
    with pytest.raises((ValueError, BackboneError), match=message):
        PatchFeatureTransformer(device="cpu", **params).fit(textured_parts(1))


def _png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda tmp: [], "X is empty"),
        (lambda tmp: np.zeros((64, 64), dtype=np.uint8), r"\(n_images, H, W\)"),
        (lambda tmp: np.zeros((2, 8, 8, 3, 1), dtype=np.uint8), r"\(n_images, H, W\)"),
        (lambda tmp: np.full((1, 16, 16), np.nan, dtype=np.float32), "NaN or infinity"),
        (lambda tmp: np.full((1, 16, 16), 2.0, dtype=np.float32), r"must lie in \[0, 1\]"),
        (lambda tmp: np.zeros((1, 16, 16), dtype=np.int32), "integer dtype int32"),
        (lambda tmp: np.full((1, 16, 16), 5000, dtype=np.uint16), "beyond 4095 of bit_depth=12"),
        (lambda tmp: np.zeros((1, 16, 16, 4), dtype=np.uint8), "4 channels.*not fully opaque"),
        (lambda tmp: np.zeros((1, 16, 16, 5), dtype=np.uint8), "5 channels"),
        (lambda tmp: [str(tmp / "missing.png")], "no such file"),
        (lambda tmp: [str((tmp / "notes.txt").write_text("hi") and tmp / "notes.txt")], "not an image file"),
        (lambda tmp: [_png(tmp / "a.png", np.zeros((8, 8, 4), np.uint8))], "a.png.*transparent pixels"),
        (lambda tmp: [_png(tmp / "b.tif", np.zeros((8, 8), np.float32))], "b.tif.*32-bit float"),
        (lambda tmp: [_png(tmp / "c.png", np.full((8, 8), 4096, np.uint16))], "c.png.*bit_depth=12"),
        (lambda tmp: "image.png", "single str"),
    ],
)
def test_bad_images_get_a_clear_error(tmp_path, lite_features, make_input, message):
    transformer = copy.deepcopy(lite_features).set_params(bit_depth=12)
    with pytest.raises((ValueError, TypeError, ImageReadError), match=message):
        transformer.transform(make_input(tmp_path))


def test_truncated_file_error_names_the_file(tmp_path, lite_features):
    path = tmp_path / "cut.png"
    Image.fromarray(textured_parts(1, size=64)[0]).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cut.png"):
        lite_features.transform([str(path)])


def test_transform_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError):
        PatchFeatureTransformer(backbone="efficientnet_lite0").transform(textured_parts(1))


def test_a_grayscale_image_in_an_rgb_model_is_read_as_its_rgb_conversion(lite_features):
    gray = textured_parts(1, seed=7)[..., 0]
    as_rgb = np.repeat(gray[..., None], 3, axis=3)
    np.testing.assert_array_equal(lite_features.transform(gray), lite_features.transform(as_rgb))


def test_differing_aspect_ratios_without_crop_ask_for_crop_size(lite_features):
    images = [np.zeros((64, 64, 3), np.uint8), np.zeros((64, 96, 3), np.uint8)]
    with pytest.raises(ValueError, match="set crop_size"):
        lite_features.transform(images)


def test_parallel_decoding_gives_the_sequential_features(tmp_path, monkeypatch):
    import skpatchcore._features as features_module

    paths = []
    for i, image in enumerate(textured_parts(7, seed=11)):
        path = tmp_path / f"part{i}.png"
        Image.fromarray(image[:, :, 0]).save(path)
        paths.append(str(path))
    # A real PNG cut short: its header reads, so only decoding (in the pool) fails.
    whole = (tmp_path / "part0.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(whole[: len(whole) // 2])
    paths.insert(3, str(tmp_path / "broken.png"))
    transformer = PatchFeatureTransformer(
        backbone="efficientnet_lite0", image_size=64, crop_size=None, batch_size=3, device="cpu"
    ).fit(paths[:1])
    results = {}
    for workers in (1, 3):
        monkeypatch.setattr(features_module, "_decode_workers", lambda images, overlap, n=workers: n)
        batches, _, n_images, failed = transformer._feature_batches(paths, on_error="skip")
        rows, features = zip(*[(r, f.numpy().copy()) for r, f in batches])
        results[workers] = (np.concatenate(rows), np.concatenate(features), dict(failed))
    (rows_1, feats_1, failed_1), (rows_3, feats_3, failed_3) = results[1], results[3]
    assert list(failed_1) == list(failed_3) == [3]
    assert "truncated" in failed_3[3]
    assert np.array_equal(rows_1, rows_3) and rows_1.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert np.array_equal(feats_1, feats_3)
    # Without skipping, the pool hands the decoding error back unchanged.
    with pytest.raises(ImageReadError, match="X\\[3\\].*truncated"):
        transformer.transform(paths)


def test_lazy_pil_images_sharing_one_file_are_decoded_one_at_a_time(tmp_path):
    import io

    from skpatchcore._features import _decode_workers
    from skpatchcore.utils._images import check_images

    buffer = io.BytesIO()
    Image.fromarray(textured_parts(1)[0, :, :, 0]).save(buffer, format="PNG")
    shared = [Image.open(buffer) for _ in range(4)]
    assert _decode_workers(check_images(shared), overlap=False) == 1
    transformer = PatchFeatureTransformer(
        backbone="efficientnet_lite0", image_size=64, crop_size=None, device="cpu"
    ).fit([Image.open(buffer)])
    features = transformer.transform([Image.open(buffer) for _ in range(4)])
    assert np.array_equal(features[0], features[3])


def test_a_repeated_pil_image_is_decoded_by_one_thread():
    from skpatchcore._features import _decode_workers
    from skpatchcore.utils._images import check_images

    image = Image.fromarray(textured_parts(1)[0, :, :, 0])
    other = Image.fromarray(textured_parts(1, seed=5)[0, :, :, 0])
    assert _decode_workers(check_images([image, image]), overlap=False) == 1
    assert _decode_workers(check_images([image, other]), overlap=False) == min(8, torch.get_num_threads())


def test_empty_buffer_is_a_plain_writable_array():
    """Large buffers come from their own mapping; they behave as any float32 array."""
    import mmap
    import os
    import pickle

    from skpatchcore.utils._buffers import empty_buffer

    big = empty_buffer((3, 700, 1024))  # 8.6 MB: mapped
    assert big.shape == (3, 700, 1024) and big.dtype == np.float32
    assert big.flags.writeable and big.flags.c_contiguous
    owner = big
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(getattr(owner, "obj", owner), mmap.mmap)
    big[:] = np.arange(1024, dtype=np.float32)
    copy = pickle.loads(pickle.dumps(big))
    np.testing.assert_array_equal(copy, big)
    if hasattr(os, "fork"):  # private memory: a forked child's writes stay in the child
        pid = os.fork()
        if pid == 0:
            big[0, 0, 0] = 42.0
            os._exit(0)
        os.waitpid(pid, 0)
        assert big[0, 0, 0] == 0.0
    assert empty_buffer((2, 3)).shape == (2, 3)  # small: plain np.empty
    assert empty_buffer((0, 1024)).shape == (0, 1024)
    assert empty_buffer(5, dtype=np.int64).dtype == np.int64


def test_benchmark_stock_backbone_is_timms_network_with_the_same_weights():
    """benchmarks.plain.stock_backbone, the speed baseline, is timm's model, not the package's."""
    pytest.importorskip("timm")
    from benchmarks.plain import stock_backbone

    stock = stock_backbone("efficientnet_lite0")
    assert type(stock.model).__module__.startswith("timm.")
    ours = build_backbone("efficientnet_lite0")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(ours(x.contiguous(memory_format=torch.channels_last)), stock(x)):
            assert relative_error(a, b) < 1e-4  # folded batch norms: float rounding only
