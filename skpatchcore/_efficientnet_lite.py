"""EfficientNet-Lite0/1/2 in plain torch, laid out as timm's ``tf_efficientnet_lite*``.

The offline backbones only need this one small architecture. Building it here
instead of through timm avoids importing timm, which imports torchvision and,
through it, ``torch._dynamo``: on our test machine that import alone costs
about 190 MB of resident memory and 2-3 s, in every process that fits, loads
or runs a model.

Module names, parameter shapes and the order of operations follow timm's
model, so the same state_dict loads strictly, the backbone fingerprint is
unchanged and the activations are bit-for-bit timm's (tests compare both).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

# Per stage: depthwise kernel, stride. Every stage after the first expands 6x.
_STAGE_KERNELS = (3, 3, 5, 3, 5, 5, 3)
_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_EXPANSION = 6
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_BN_EPS = 1e-3  # the TensorFlow models' batch-norm epsilon

# Output channels and blocks per stage (width/depth multipliers already
# applied, rounded the way the original models were).
LITE_CHANNELS = {
    "efficientnet_lite0": (16, 24, 40, 80, 112, 192, 320),
    "efficientnet_lite1": (16, 24, 40, 80, 112, 192, 320),
    "efficientnet_lite2": (16, 24, 48, 88, 120, 208, 352),
}
LITE_STAGE_DEPTHS = {
    "efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
    "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
    "efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1),
}


# Fused-versus-plain verdicts by convolution configuration (see Conv2d): repeated
# blocks of a network, and every copy of a model, share them in this process
# (they hold for this machine and this torch only, so they are never pickled).
_SHARED_VERDICTS: dict[tuple, bool] = {}


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that can take over the ReLU6 that follows it.

    :func:`fuse_relu6` sets ``relu6`` once the batch norm between them is
    folded away. On the CPU, for channels-last float32 input with oneDNN
    enabled, the convolution then runs as one oneDNN call with the clamp
    applied to its output as it is written (one pass less over the largest
    activations, ~10% of the forward pass); otherwise it is the convolution
    followed by ``hardtanh_``.

    The two must give the same bits, but torch does not always run a plain
    convolution through oneDNN (e.g. 1x1 convolutions of one small image), and
    then its result can differ by float rounding. So the first call for each
    input shape (and thread count) runs both and compares them; only a shape
    whose results agree runs fused from then on. Which algorithm oneDNN picks
    depends on the call's shapes, not on the weights' values, so a verdict
    also holds for every convolution of the same configuration: repeated
    blocks and other copies of the network (clones, loaded models) reuse it.
    """

    relu6 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.padding)

    def _conv(self, x: torch.Tensor, padding) -> torch.Tensor:
        if self.relu6 and _fused_relu6_usable(x, self.weight):
            configuration = self._configuration((tuple(x.shape), tuple(padding), torch.get_num_threads()))
            verdict = _SHARED_VERDICTS.get(configuration)
            if verdict:
                return self._fused(x, padding)
            if verdict is None:
                plain = self._plain(x, padding)
                _SHARED_VERDICTS[configuration] = torch.equal(self._fused(x, padding), plain)
                return plain
        return self._plain(x, padding)

    def _configuration(self, key) -> tuple:
        """What oneDNN's choice of algorithm depends on: the call, not the weights' values."""
        layer = (tuple(self.weight.shape), self.stride, self.dilation, self.groups, self.bias is not None)
        return (*key, *layer)

    def _plain(self, x: torch.Tensor, padding) -> torch.Tensor:
        out = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return F.hardtanh(out, 0.0, 6.0, inplace=True) if self.relu6 else out

    def _fused(self, x: torch.Tensor, padding) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self.weight,
            self.bias,
            list(padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            "hardtanh",
            [0.0, 6.0],
            "",
        )


def _fused_relu6_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    # Channels-last only (the package's layout): on (N, C, H, W) input oneDNN
    # can pick another algorithm for the fused call, off by float rounding.
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    # torch.backends.mkldnn.enabled, read on every call: it can be switched off at any time.
    if not torch._C._get_mkldnn_enabled():
        return False
    return _fused_relu6_available()


@functools.cache
def _fused_relu6_available() -> bool:
    """Whether this torch has oneDNN's fused convolution and it runs."""
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 9, 9, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 1, 3, 3, generator=generator)
    bias = torch.randn(4, generator=generator)
    try:
        with torch.inference_mode():  # oneDNN is enabled here: _fused_relu6_usable checked it
            fused = op(x, weight, bias, [1, 1], [1, 1], [1, 1], 4, "hardtanh", [0.0, 6.0], "")
            plain = F.hardtanh(F.conv2d(x, weight, bias, 1, 1, 1, 4), 0.0, 6.0)
    except (RuntimeError, TypeError):  # the private op changed or is missing a kernel
        return False
    return torch.equal(fused, plain)


class SamePadConv2d(Conv2d):
    """A convolution with TensorFlow's "same" padding, padded without a full fill.

    TensorFlow pads a strided convolution so that the output has
    ``ceil(size / stride)`` rows, with the odd extra row at the bottom (right);
    torch's own ``padding`` is symmetric, so the input is padded explicitly.
    timm's ``Conv2dSame`` does it with ``F.pad``, which fills the whole padded
    copy with zeros before writing the input into it; here only the thin
    border is zeroed. The result is bit-for-bit the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h = _same_padding(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        top, left = pad_h // 2, pad_w // 2
        if pad_h == pad_w == 0:
            return self._conv(x, (0, 0))
        # Always an explicitly padded input, as timm does: the convolution's own
        # padding can round differently (seen on 1-2 px inputs).
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
        padded = torch.empty(
            (*x.shape[:2], height + pad_h, width + pad_w),
            dtype=x.dtype,
            device=x.device,
            memory_format=layout or torch.contiguous_format,
        )
        padded[..., :top, :].zero_()
        padded[..., top + height :, :].zero_()
        padded[..., top : top + height, :left].zero_()
        padded[..., top : top + height, left + width :].zero_()
        padded[..., top : top + height, left : left + width].copy_(x)
        return self._conv(padded, (0, 0))


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free convolution with "same" padding: static when unstrided, explicit otherwise."""
    if stride == 1:
        return Conv2d(in_channels, out_channels, kernel, 1, kernel // 2, groups=groups, bias=False)
    return SamePadConv2d(in_channels, out_channels, kernel, stride, 0, groups=groups, bias=False)


class NormAct(nn.BatchNorm2d):
    """Batch norm, then ReLU6 or nothing; named like timm's ``BatchNormAct2d``.

    The ``drop`` and ``act`` children are what :func:`fold_batch_norms` keeps
    when it folds the norm into the convolution before it.
    """

    def __init__(self, channels: int, activation: bool = True):
        super().__init__(channels, eps=_BN_EPS)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class _Block(nn.Module):
    """Common parts of the two block kinds: optional residual, unused timm slots."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.has_skip = stride == 1 and in_channels == out_channels
        # Present (as identities) in timm's blocks, so layer names line up.
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.drop_path = nn.Identity()

    def _residual(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return self.drop_path(x) + shortcut if self.has_skip else x


class DepthwiseSeparable(_Block):
    """First stage: depthwise convolution + ReLU6, then a 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__(in_channels, out_channels, stride)
        self.conv_dw = _conv(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = NormAct(in_channels)
        self.conv_pw = _conv(in_channels, out_channels, 1)
        self.bn2 = NormAct(out_channels, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))
        return self._residual(self.bn2(self.conv_pw(x)), shortcut)


class InvertedResidual(_Block):
    """MBConv without squeeze-excitation: 1x1 expansion, depthwise, 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__(in_channels, out_channels, stride)
        mid = in_channels * _EXPANSION
        self.conv_pw = _conv(in_channels, mid, 1)
        self.bn1 = NormAct(mid)
        self.conv_dw = _conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = NormAct(mid)
        self.conv_pwl = _conv(mid, out_channels, 1)
        self.bn3 = NormAct(out_channels, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.se(self.aa(self.bn2(self.conv_dw(x))))
        return self._residual(self.bn3(self.conv_pwl(x)), shortcut)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier (ImageNet, 1000 classes) with timm's module names.

    Parameters
    ----------
    name : {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
        The variant. Weights are left at torch's default initialisation;
        load a state_dict for pretrained ones.
    """

    def __init__(self, name: str, num_classes: int = 1000):
        super().__init__()
        if name not in LITE_CHANNELS:
            raise ValueError(
                f"Unknown EfficientNet-Lite variant {name!r}; use one of {sorted(LITE_CHANNELS)}."
            )
        self.conv_stem = _conv(3, _STEM_CHANNELS, 3, stride=2)
        self.bn1 = NormAct(_STEM_CHANNELS)
        stages, channels = [], _STEM_CHANNELS
        specs = zip(LITE_CHANNELS[name], LITE_STAGE_DEPTHS[name], _STAGE_KERNELS, _STAGE_STRIDES)
        for index, (out_channels, depth, kernel, stride) in enumerate(specs):
            kind = DepthwiseSeparable if index == 0 else InvertedResidual
            blocks = []
            for j in range(depth):
                blocks.append(kind(channels, out_channels, kernel, stride if j == 0 else 1))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(channels, _HEAD_CHANNELS, 1)
        self.bn2 = NormAct(_HEAD_CHANNELS)
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        x = self.bn2(self.conv_head(x))
        return self.classifier(self.global_pool(x))


def fuse_relu6(model: nn.Module, keep=()) -> None:
    """Let each :class:`Conv2d` apply the ReLU6 that follows it, in place.

    Run after :func:`~skpatchcore._backbones.fold_batch_norms`, which leaves
    each folded norm's activation (``Sequential(drop, ReLU6)``) right after its
    convolution; that activation becomes an identity and the convolution
    clamps its own output. Convolutions named in ``keep`` (tapped layers) stay
    as they are: when a tapped convolution is the last layer, the forward pass
    stops right after it and its ReLU6 never ran.
    """
    names = {module: name for name, module in model.named_modules()}
    for parent in list(model.modules()):
        children = [(n, c) for n, c in parent.named_children() if not isinstance(c, nn.Identity)]
        for (_, conv), (act_name, act) in zip(children, children[1:]):
            if not isinstance(conv, Conv2d) or conv.relu6 or names.get(conv) in keep:
                continue
            if not isinstance(act, nn.Sequential):
                continue
            inner = [m for m in act if not isinstance(m, nn.Identity)]
            if len(inner) == 1 and type(inner[0]) is nn.ReLU6:
                conv.relu6 = True
                setattr(parent, act_name, nn.Identity())


class StaticConv2d(nn.Module):
    """A :class:`Conv2d` for a fixed input size, in plain operations: for export.

    :class:`Conv2d` may run the private oneDNN fused call, and
    :class:`SamePadConv2d` works its padding out from the input's shape in
    ``forward``; both are eager-mode speed-ups that an exported graph should
    not carry (traced, the shape arithmetic and in-place border fills become
    hundreds of Shape, Range and Expand nodes). Here the padding is fixed when
    the module is made, for the one input size the graph will see, and the
    forward pass is a zero pad (folded into the convolution by the exporter),
    the convolution and the ReLU6 clamp when the convolution had taken it
    over. The values are the eager module's at that size.
    """

    def __init__(self, conv: Conv2d, padding: tuple[int, int, int, int]):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding = padding  # (left, right, top, bottom), as F.pad takes it
        self.relu6 = conv.relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = F.pad(x, self.padding)
        x = F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.hardtanh(x, 0.0, 6.0) if self.relu6 else x


def with_static_padding(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose :class:`Conv2d` modules are :class:`StaticConv2d`.

    ``probe`` is an input of the size the copy will be used at (its values do
    not matter): one forward pass records the input size of every
    convolution, from which the "same" padding is fixed. Modules other than
    the package's :class:`Conv2d` (e.g. a torchvision ResNet's) are copied as
    they are. Parameters are shared with ``model``, not copied.
    """
    sizes: dict[str, tuple[int, int]] = {}
    convs = {name: module for name, module in model.named_modules() if isinstance(module, Conv2d)}

    def recorder(name):
        def record(module, inputs):
            sizes[name] = tuple(inputs[0].shape[-2:])

        return record

    hooks = [module.register_forward_pre_hook(recorder(name)) for name, module in convs.items()]
    try:
        with torch.inference_mode():
            model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    memo = {id(p): p for p in model.parameters()} | {id(b): b for b in model.buffers()}
    copied = copy.deepcopy(model, memo)
    for name, conv in convs.items():
        if name not in sizes:  # never ran at this size (after the last tapped stage)
            continue
        height, width = sizes[name]
        if isinstance(conv, SamePadConv2d):
            pad_h = _same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
            pad_w = _same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
            padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        else:
            pad_h, pad_w = conv.padding
            padding = (pad_w, pad_w, pad_h, pad_h)
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, child, StaticConv2d(conv, padding))
    return copied
