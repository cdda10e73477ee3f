"""Darknet networks built from ``.cfg`` text, and Darknet's binary ``.weights`` format.

CPGAN detects the top-36 objects of every image with a pretrained YOLOv3 (§3.2.1, memory
construction) and parses generated images with the same detector (§3.3, OAIE). To load the
official ``yolov3.weights`` bit for bit, the network is built from the official ``.cfg`` text
rather than from hand-written modules: layer ``i`` here is Darknet's layer ``i`` (the section
index after ``[net]``), so "layer 74 of yolov3.cfg" means the same tensor in both worlds, and the
``.weights`` stream maps onto the convolutions in cfg order.

Only what yolov3.cfg, yolov3-tiny.cfg and the project's toy cfg use is supported:
``[net]``, ``[convolutional]``, ``[shortcut]``, ``[route]``, ``[upsample]``, ``[maxpool]`` and
``[yolo]``. Anything that would change the computation and is not honoured (an unknown section
or key, ``groups=2``, a ``scale_x_y`` other than 1, ...) is refused with a one-line
:class:`~cpgan.errors.CpganError` naming the cfg file and line, instead of building a network
that silently differs from Darknet's. Keys that only steer Darknet's training or augmentation
(``jitter``, ``ignore_thresh``, everything in ``[net]`` except the input shape) are accepted
and ignored.

Numerical conventions, chosen to match Darknet's GPU (cuDNN) inference path:

* batch norm is ``(x - mean) / sqrt(var + 1e-5)`` (PyTorch's ``BatchNorm2d``); Darknet's CPU
  path divides by ``sqrt(var) + 1e-6`` instead, a difference far below float noise for
  trained statistics;
* ``leaky`` is LeakyReLU with slope 0.1;
* ``[maxpool]`` pads the window with -inf (Darknet treats out-of-image cells as ``-FLT_MAX``),
  starting ``padding // 2`` cells before the input, with Darknet's output size
  ``(w + padding - size) // stride + 1`` and ``padding`` defaulting to ``size - 1``. For the
  stride-1 size-2 pool of yolov3-tiny this keeps the size and takes the max over the valid
  cells only; the common PyTorch ports' ``ZeroPad2d((0, 1, 0, 1))`` would instead clamp
  negative (leaky) activations on the last row/column to 0, which Darknet does not do;
* ``[upsample]`` is nearest-neighbour.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cpgan.errors import CpganError
from cpgan.pipeline.artifacts import atomic_write

SECTION_ALIASES = {
    "net": "net",
    "network": "net",
    "convolutional": "convolutional",
    "conv": "convolutional",
    "shortcut": "shortcut",
    "route": "route",
    "upsample": "upsample",
    "maxpool": "maxpool",
    "max": "maxpool",
    "yolo": "yolo",
}

LEAKY_SLOPE = 0.1
BN_EPS = 1e-5  # inside the square root, as cuDNN (Darknet's GPU inference path)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "leaky": lambda: nn.LeakyReLU(LEAKY_SLOPE),
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "logistic": nn.Sigmoid,
}

# Keys read by the builder, per section kind; anything else is refused unless listed in
# IGNORED_KEYS (training-only settings that do not change inference).
HONOURED_KEYS = {
    "net": {"width", "height", "channels"},
    "convolutional": {
        "batch_normalize", "filters", "size", "stride", "pad", "padding", "activation",
        "groups", "dilation",
    },
    "shortcut": {"from", "activation", "alpha", "beta"},
    "route": {"layers", "groups", "group_id"},
    "upsample": {"stride", "scale"},
    "maxpool": {"size", "stride", "padding"},
    "yolo": {"mask", "anchors", "classes", "num", "scale_x_y", "new_coords"},
}
IGNORED_KEYS = {
    "convolutional": {"stopbackward", "dontload", "dontloadscales", "learning_rate"},
    "yolo": {
        "jitter", "ignore_thresh", "truth_thresh", "random", "max", "iou_normalizer",
        "cls_normalizer", "obj_normalizer", "iou_loss", "iou_thresh", "nms_kind", "beta_nms",
        "max_delta", "label_smooth_eps", "counters_per_class", "resize", "focal_loss",
    },
}


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class CfgSection:
    """One ``[section]`` of a cfg: its canonical kind, raw options and where they were written."""

    kind: str
    options: dict[str, str]
    line: int
    option_lines: dict[str, int]
    source: str

    def where(self, key: str | None = None) -> str:
        """``file:line`` of the key (or of the section header) for error messages."""
        line = self.option_lines.get(key, self.line) if key else self.line
        return f"{self.source}:{line}"

    def error(self, problem: str, key: str | None = None) -> CpganError:
        return CpganError(f"{self.where(key)}: [{self.kind}] {problem}")

    def get_int(self, key: str, default: int | None = None) -> int:
        """Integer option; Darknet reads ints with ``atoi``, we refuse what is not an integer."""
        if key not in self.options:
            if default is None:
                raise self.error(f"missing required key '{key}'")
            return default
        try:
            return int(self.options[key])
        except ValueError:
            raise self.error(f"{key}={self.options[key]!r} is not an integer", key) from None

    def get_float(self, key: str, default: float) -> float:
        if key not in self.options:
            return default
        try:
            return float(self.options[key])
        except ValueError:
            raise self.error(f"{key}={self.options[key]!r} is not a number", key) from None

    def get_list(self, key: str, kind: type) -> list:
        """Comma-separated list (``layers = -1, 61``; ``anchors = 10,13, 16,30``)."""
        raw = self.options[key]
        try:
            return [kind(part) for part in raw.split(",") if part != ""]
        except ValueError:
            raise self.error(f"{key}={raw!r} is not a list of numbers", key) from None


def parse_cfg(text: str, source: str = "<cfg>") -> list[CfgSection]:
    """Parse Darknet cfg text into sections, with Darknet's lexical rules.

    As Darknet's ``read_cfg``, every whitespace character is removed from a line before it is
    read, and lines starting with ``#`` or ``;`` are comments. Unknown sections, options
    outside a section, lines that are not ``key=value`` and repeated keys are refused (Darknet
    would print a warning and use the first value: a silent surprise).
    """
    sections: list[CfgSection] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            name = line[1:-1] if line.endswith("]") else None
            if name not in SECTION_ALIASES:
                raise CpganError(f"{source}:{number}: unknown or malformed section {raw.strip()!r}")
            sections.append(CfgSection(SECTION_ALIASES[name], {}, number, {}, source))
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise CpganError(f"{source}:{number}: expected key=value, found {raw.strip()!r}")
        if not sections:
            raise CpganError(f"{source}:{number}: option {key!r} before the first [section]")
        section = sections[-1]
        if key in section.options:
            raise CpganError(f"{source}:{number}: key {key!r} repeated in [{section.kind}]")
        section.options[key] = value
        section.option_lines[key] = number
    if not sections or sections[0].kind != "net":
        raise CpganError(f"{source}:1: a Darknet cfg must start with a [net] section")
    if any(s.kind == "net" for s in sections[1:]):
        extra = next(s for s in sections[1:] if s.kind == "net")
        raise CpganError(f"{extra.where()}: [net] may appear only once, as the first section")
    return sections


def read_cfg(path: str | os.PathLike) -> list[CfgSection]:
    """Read and parse a ``.cfg`` file; a missing or unreadable file is a :class:`CpganError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CpganError(f"{path}: cannot read Darknet cfg ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise CpganError(f"{path}: Darknet cfg is not UTF-8 text") from None
    return parse_cfg(text, str(path))


def _check_keys(section: CfgSection) -> None:
    if section.kind == "net":
        return  # every other [net] key is a training / augmentation hyper-parameter
    allowed = HONOURED_KEYS[section.kind] | IGNORED_KEYS.get(section.kind, set())
    for key in section.options:
        if key not in allowed:
            raise section.error(f"key '{key}' is not supported", key)


def _require(section: CfgSection, key: str, ok: bool, what: str) -> None:
    if not ok:
        raise section.error(f"{key}={section.options.get(key)} cannot be honoured: {what}", key)


# --------------------------------------------------------------------------------------------
# Shape planning: channels, stride and stored floats of every layer, without building modules


@dataclass(frozen=True)
class YoloSpec:
    """One YOLO head: its layer index, anchors in network-input pixels (masked), classes, stride."""

    layer: int
    anchors: tuple[tuple[float, float], ...]
    mask: tuple[int, ...]
    num_classes: int
    stride: int

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)


@dataclass(frozen=True)
class LayerInfo:
    """What one Darknet layer computes: output channels and stride, and its weight-file floats."""

    index: int
    kind: str
    channels: int
    stride: int
    weight_floats: int = 0
    trainable_params: int = 0
    sources: tuple[int, ...] = ()
    options: dict[str, int | float | str | tuple] = field(default_factory=dict)


def _absolute(section: CfgSection, key: str, index: int, offset: int) -> int:
    """Darknet's layer reference: negative is relative to the current layer."""
    target = index + offset if offset < 0 else offset
    _require(section, key, 0 <= target < index, f"layer {target} is not an earlier layer")
    return target


def _plan_conv(s: CfgSection, i: int, prev: LayerInfo) -> LayerInfo:
    bn = s.get_int("batch_normalize", 0)
    filters, size = s.get_int("filters", 1), s.get_int("size", 1)
    stride = s.get_int("stride", 1)
    padding = size // 2 if s.get_int("pad", 0) else s.get_int("padding", 0)
    activation = s.options.get("activation", "logistic")
    _require(s, "batch_normalize", bn in (0, 1), "must be 0 or 1")
    _require(s, "filters", filters > 0, "must be positive")
    _require(s, "size", size > 0, "must be positive")
    _require(s, "stride", stride > 0, "must be positive")
    _require(s, "groups", s.get_int("groups", 1) == 1, "grouped convolution is not supported")
    _require(s, "dilation", s.get_int("dilation", 1) == 1, "dilation is not supported")
    _require(s, "activation", activation in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}")
    # Output = input / stride for inputs divisible by the stride (what route/shortcut rely on).
    _require(s, "padding", -stride <= 2 * padding - size <= -1,
             f"size {size} with padding {padding} does not give input/stride outputs")
    weights = filters * prev.channels * size * size
    floats = weights + (4 * filters if bn else filters)
    trainable = weights + (2 * filters if bn else filters)
    options = {"bn": bn, "filters": filters, "size": size, "stride": stride,
               "padding": padding, "activation": activation}
    return LayerInfo(i, "convolutional", filters, prev.stride * stride, floats, trainable,
                     (), options)


def _plan_maxpool(s: CfgSection, i: int, prev: LayerInfo) -> LayerInfo:
    stride = s.get_int("stride", 1)
    size = s.get_int("size", stride)
    padding = s.get_int("padding", size - 1)
    _require(s, "stride", stride > 0, "must be positive")
    _require(s, "size", size > 0, "must be positive")
    _require(s, "padding", size - stride <= padding <= size - 1,
             f"size {size} with padding {padding} does not give input/stride outputs")
    options = {"size": size, "stride": stride, "padding": padding}
    return LayerInfo(i, "maxpool", prev.channels, prev.stride * stride, options=options)


def _plan_upsample(s: CfgSection, i: int, prev: LayerInfo) -> LayerInfo:
    stride = s.get_int("stride", 2)
    _require(s, "stride", stride > 0, "downsampling upsample layers are not supported")
    _require(s, "scale", s.get_float("scale", 1.0) == 1.0, "output scaling is not supported")
    _require(s, "stride", prev.stride % stride == 0, "would upsample beyond the input resolution")
    return LayerInfo(i, "upsample", prev.channels, prev.stride // stride,
                     options={"stride": stride})


def _plan_shortcut(s: CfgSection, i: int, plans: list[LayerInfo]) -> LayerInfo:
    prev = plans[-1]
    source = _absolute(s, "from", i, s.get_int("from"))
    activation = s.options.get("activation", "linear")
    _require(s, "activation", activation in ACTIVATIONS, f"one of {sorted(ACTIVATIONS)}")
    _require(s, "alpha", s.get_float("alpha", 1.0) == 1.0, "weighted shortcuts not supported")
    _require(s, "beta", s.get_float("beta", 1.0) == 1.0, "weighted shortcuts not supported")
    other = plans[source]
    _require(s, "from", (other.channels, other.stride) == (prev.channels, prev.stride),
             f"layer {source} ({other.channels} ch, stride {other.stride}) does not match "
             f"layer {i - 1} ({prev.channels} ch, stride {prev.stride})")
    return LayerInfo(i, "shortcut", prev.channels, prev.stride, sources=(source,),
                     options={"activation": activation})


def _plan_route(s: CfgSection, i: int, plans: list[LayerInfo]) -> LayerInfo:
    _require(s, "groups", s.get_int("groups", 1) == 1, "grouped routes are not supported")
    _require(s, "group_id", s.get_int("group_id", 0) == 0, "grouped routes are not supported")
    if "layers" not in s.options:
        raise s.error("missing required key 'layers'")
    sources = tuple(_absolute(s, "layers", i, v) for v in s.get_list("layers", int))
    _require(s, "layers", len(sources) > 0, "no layers given")
    strides = {plans[j].stride for j in sources}
    _require(s, "layers", len(strides) == 1, f"routed layers have different strides {strides}")
    channels = sum(plans[j].channels for j in sources)
    return LayerInfo(i, "route", channels, strides.pop(), sources=sources)


def _plan_yolo(s: CfgSection, i: int, plans: list[LayerInfo]) -> tuple[LayerInfo, YoloSpec]:
    prev = plans[-1]
    total = s.get_int("num", 1)
    classes = s.get_int("classes", 20)
    mask = tuple(s.get_list("mask", int)) if "mask" in s.options else tuple(range(total))
    values = s.get_list("anchors", float) if "anchors" in s.options else []
    _require(s, "scale_x_y", s.get_float("scale_x_y", 1.0) == 1.0, "only 1 is supported")
    _require(s, "new_coords", s.get_int("new_coords", 0) == 0, "only 0 is supported")
    _require(s, "classes", classes > 0, "must be positive")
    _require(s, "anchors", len(values) == 2 * total, f"need {2 * total} values for num={total}")
    _require(s, "mask", len(mask) > 0 and all(0 <= m < total for m in mask),
             f"mask indices must lie in [0, {total})")
    expected = len(mask) * (classes + 5)
    _require(s, "classes", prev.kind == "convolutional" and prev.channels == expected,
             f"the layer before [yolo] must be a convolution with {expected} filters "
             f"(len(mask) x (classes + 5)), found {prev.channels} channels")
    anchors = tuple((values[2 * m], values[2 * m + 1]) for m in mask)
    spec = YoloSpec(i, anchors, mask, classes, prev.stride)
    return LayerInfo(i, "yolo", prev.channels, prev.stride), spec


def plan_network(sections: Sequence[CfgSection]) -> tuple[list[LayerInfo], list[YoloSpec]]:
    """Infer every layer's channels, stride and stored floats from the cfg (no tensors made).

    Used both to build :class:`Darknet` and to describe a cfg/weights pair without allocating
    the network (yolov3 holds 62M floats).
    """
    net = sections[0]
    channels = net.get_int("channels", 3)
    _require(net, "channels", channels > 0, "must be positive")
    plans: list[LayerInfo] = []
    specs: list[YoloSpec] = []
    input_layer = LayerInfo(-1, "input", channels, 1)
    for i, section in enumerate(sections[1:]):
        _check_keys(section)
        prev = plans[-1] if plans else input_layer
        if section.kind == "convolutional":
            info = _plan_conv(section, i, prev)
        elif section.kind == "maxpool":
            info = _plan_maxpool(section, i, prev)
        elif section.kind == "upsample":
            info = _plan_upsample(section, i, prev)
        elif not plans:
            raise section.error("cannot be the first layer")
        elif section.kind == "shortcut":
            info = _plan_shortcut(section, i, plans)
        elif section.kind == "route":
            info = _plan_route(section, i, plans)
        else:
            info, spec = _plan_yolo(section, i, plans)
            specs.append(spec)
        _check_not_reading_yolo(section, info, plans)
        plans.append(info)
    _check_input_size(net, plans, specs)
    return plans, specs


def _check_not_reading_yolo(section: CfgSection, info: LayerInfo, plans: list[LayerInfo]) -> None:
    """A [yolo] layer's output is a detection tensor, not a feature map: nothing may read it."""
    reads = set(info.sources) | ({info.index - 1} if info.kind != "route" and plans else set())
    for j in sorted(reads):
        if plans[j].kind == "yolo":
            raise section.error(f"reads [yolo] layer {j}, whose output is not a feature map")


def _check_input_size(net: CfgSection, plans: list[LayerInfo], specs: list[YoloSpec]) -> None:
    if not specs:
        raise net.error("the network has no [yolo] layer")
    classes = {spec.num_classes for spec in specs}
    if len(classes) != 1:
        raise net.error(f"[yolo] layers disagree on the number of classes: {sorted(classes)}")
    max_stride = max(p.stride for p in plans)
    for key in ("width", "height"):
        value = net.get_int(key, 0)
        _require(net, key, value > 0 and value % max_stride == 0,
                 f"must be a positive multiple of the network's stride {max_stride}")


# --------------------------------------------------------------------------------------------
# Modules


class ConvLayer(nn.Module):
    """``[convolutional]``: conv (bias only without BN), optional batch norm, activation."""

    def __init__(self, in_channels: int, info: LayerInfo) -> None:
        super().__init__()
        o = info.options
        self.conv = nn.Conv2d(in_channels, o["filters"], o["size"], o["stride"], o["padding"],
                              bias=not o["bn"])
        self.bn = nn.BatchNorm2d(o["filters"], eps=BN_EPS) if o["bn"] else None
        self.activation = ACTIVATIONS[o["activation"]]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.activation(x)

    def weight_tensors(self) -> list[torch.Tensor]:
        """Tensors in Darknet's file order: BN beta, gamma, mean, var, conv weight (or bias, weight)."""
        if self.bn is None:
            return [self.conv.bias, self.conv.weight]
        bn = self.bn
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, self.conv.weight]


class MaxPoolLayer(nn.Module):
    """``[maxpool]`` with Darknet's geometry: window starts ``padding // 2`` before the input,
    out-of-image cells count as -inf, output size ``(w + padding - size) // stride + 1``."""

    def __init__(self, info: LayerInfo) -> None:
        super().__init__()
        self.size = info.options["size"]
        self.stride = info.options["stride"]
        self.padding = info.options["padding"]

    def _pads(self, length: int) -> tuple[int, int]:
        out = (length + self.padding - self.size) // self.stride + 1
        before = self.padding // 2
        return before, (out - 1) * self.stride + self.size - before - length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self._pads(x.shape[-1])
        top, bottom = self._pads(x.shape[-2])
        if left or right or top or bottom:
            x = F.pad(x, (left, right, top, bottom), value=-math.inf)
        return F.max_pool2d(x, self.size, self.stride)


class UpsampleLayer(nn.Module):
    """``[upsample]``: nearest-neighbour, as Darknet's ``upsample_cpu``."""

    def __init__(self, info: LayerInfo) -> None:
        super().__init__()
        self.stride = info.options["stride"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.stride, mode="nearest")


class ShortcutLayer(nn.Module):
    """``[shortcut]``: residual sum with an earlier layer, then the activation."""

    def __init__(self, info: LayerInfo) -> None:
        super().__init__()
        self.source = info.sources[0]
        self.activation = ACTIVATIONS[info.options["activation"]]()

    def forward(self, x: torch.Tensor, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.activation(x + outputs[self.source])


class RouteLayer(nn.Module):
    """``[route]``: channel concatenation of earlier layers."""

    def __init__(self, info: LayerInfo) -> None:
        super().__init__()
        self.sources = info.sources

    def forward(self, x: torch.Tensor, outputs: dict[int, torch.Tensor]) -> torch.Tensor:
        if len(self.sources) == 1:
            return outputs[self.sources[0]]
        return torch.cat([outputs[j] for j in self.sources], dim=1)


class YoloLayer(nn.Module):
    """``[yolo]``: reshapes the head's conv output to ``[B, A, H, W, 5 + C]`` (no activation)."""

    def __init__(self, spec: YoloSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        a, c = self.spec.num_anchors, self.spec.num_classes
        return x.view(b, a, 5 + c, h, w).permute(0, 1, 3, 4, 2).contiguous()


class Darknet(nn.Module):
    """A Darknet network built from cfg sections; layer ``i`` is Darknet's layer ``i``.

    ``forward`` returns the raw (pre-activation) output of every ``[yolo]`` layer as
    ``[B, A, H, W, 5 + C]`` — channels ``tx, ty, tw, th, objectness, class logits`` as in
    Darknet's memory layout — and the outputs of the layers asked for in ``keep_layers``.
    Decoding (sigmoid, exp, anchors) lives in :mod:`cpgan.model.yolo`.
    """

    def __init__(self, sections: Sequence[CfgSection]) -> None:
        super().__init__()
        self.source = sections[0].source
        self.layer_info, self.yolo_specs = plan_network(sections)
        self.input_width = sections[0].get_int("width")
        self.input_height = sections[0].get_int("height")
        self.input_channels = sections[0].get_int("channels", 3)
        self.layers = nn.ModuleList(self._build_layer(info) for info in self.layer_info)
        self._reused = frozenset(j for info in self.layer_info for j in info.sources)

    @classmethod
    def from_cfg_file(cls, path: str | os.PathLike) -> "Darknet":
        """Build from a ``.cfg`` file; a missing or unreadable file is a :class:`CpganError`."""
        return cls(read_cfg(path))

    def _build_layer(self, info: LayerInfo) -> nn.Module:
        if info.kind == "convolutional":
            previous = self.layer_info[info.index - 1].channels if info.index else self.input_channels
            return ConvLayer(previous, info)
        if info.kind == "maxpool":
            return MaxPoolLayer(info)
        if info.kind == "upsample":
            return UpsampleLayer(info)
        if info.kind == "shortcut":
            return ShortcutLayer(info)
        if info.kind == "route":
            return RouteLayer(info)
        return YoloLayer(next(s for s in self.yolo_specs if s.layer == info.index))

    @property
    def input_size(self) -> int:
        """Side of the square network input from ``[net]`` (letterboxing here is square)."""
        if self.input_width != self.input_height:
            raise ValueError(f"{self.source}: network input "
                             f"{self.input_width}x{self.input_height} is not square")
        return self.input_width

    @property
    def num_classes(self) -> int:
        return self.yolo_specs[0].num_classes

    @property
    def max_stride(self) -> int:
        return max(info.stride for info in self.layer_info)

    def conv_layers(self, cutoff: int | None = None) -> list[ConvLayer]:
        """Convolutions with index < ``cutoff`` (all when None), in file order."""
        stop = len(self.layers) if cutoff is None else cutoff
        return [m for i, m in enumerate(self.layers) if i < stop and isinstance(m, ConvLayer)]

    def forward(
        self, x: torch.Tensor, keep_layers: Sequence[int] = ()
    ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Run the network; return raw yolo outputs and ``{layer: output}`` for ``keep_layers``."""
        self._check_input(x, keep_layers)
        wanted = set(keep_layers)
        saved: dict[int, torch.Tensor] = {}
        heads: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (ShortcutLayer, RouteLayer)):
                x = layer(x, saved)
            elif isinstance(layer, YoloLayer):
                heads.append(layer(x))
            else:
                x = layer(x)
            if i in self._reused or i in wanted:
                saved[i] = x
        return heads, {i: saved[i] for i in keep_layers}

    def _check_input(self, x: torch.Tensor, keep_layers: Sequence[int]) -> None:
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"expected [B, {self.input_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % self.max_stride or x.shape[3] % self.max_stride:
            raise ValueError(f"input {tuple(x.shape[2:])} is not a multiple of stride {self.max_stride}")
        for i in keep_layers:
            if not 0 <= i < len(self.layers) or self.layer_info[i].kind == "yolo":
                raise ValueError(f"layer {i} is not a feature layer of {self.source}")


def for_cpu_inference(model: Darknet) -> Darknet:
    """``model`` (in place) with every batch norm folded into its convolution and its
    tensors in ``channels_last`` order, for inference only.

    In eval mode ``BN(conv(x))`` is one affine convolution, so folding saves a full pass over
    every feature map, and oneDNN's convolutions run faster on NHWC tensors: together 1.12x
    on YOLOv3 at 416 on one idle CPU thread (``bench/detect.py --forward-only``, BENCHMARKS.md). The
    outputs equal the unfolded network's up to float rounding. A folded network cannot be
    trained or written to a ``.weights`` file, so call this on a loaded copy that only infers.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for layer in model.layers:
        if isinstance(layer, ConvLayer) and layer.bn is not None:
            layer.conv = fuse_conv_bn_eval(layer.conv, layer.bn)
            layer.bn = None
    return model.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# .weights I/O


@dataclass(frozen=True)
class WeightsHeader:
    """Darknet ``.weights`` header; ``seen`` is int64 when ``major*10 + minor >= 2``."""

    major: int
    minor: int
    revision: int
    seen: int

    @staticmethod
    def seen_is_64bit(major: int, minor: int) -> bool:
        # Darknet's parser: size_t seen when (major*10 + minor) >= 2 and both are < 1000.
        return major * 10 + minor >= 2 and major < 1000 and minor < 1000

    @property
    def nbytes(self) -> int:
        return 20 if self.seen_is_64bit(self.major, self.minor) else 16

    def to_bytes(self) -> bytes:
        seen_type = "<i8" if self.seen_is_64bit(self.major, self.minor) else "<i4"
        version = np.array([self.major, self.minor, self.revision], dtype="<i4").tobytes()
        return version + np.array([self.seen], dtype=seen_type).tobytes()


def weight_floats(model: Darknet, cutoff: int | None = None) -> int:
    """Number of float32 values a ``.weights`` file holds for layers ``< cutoff``."""
    stop = len(model.layer_info) if cutoff is None else cutoff
    return sum(info.weight_floats for info in model.layer_info[:stop])


def expected_weights_bytes(
    model: Darknet, cutoff: int | None = None, major: int = 0, minor: int = 2
) -> int:
    """Exact size of a ``.weights`` file for ``model`` (yolov3.cfg: 248,007,048 bytes)."""
    header = 20 if WeightsHeader.seen_is_64bit(major, minor) else 16
    return header + 4 * weight_floats(model, cutoff)


def _check_cutoff(model: Darknet, cutoff: int | None) -> None:
    if cutoff is not None and not 0 <= cutoff <= len(model.layers):
        raise ValueError(f"cutoff {cutoff} outside [0, {len(model.layers)}] for {model.source}")


def read_weights_header(path: str | os.PathLike) -> WeightsHeader:
    """Read the header only; a file too short to hold one is a :class:`CpganError`."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(20)
    except OSError as exc:
        raise CpganError(f"{path}: cannot read Darknet weights ({exc.strerror})") from None
    if len(head) < 12:
        raise CpganError(f"{path}: {len(head)} bytes is too short for a Darknet weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(head[:12], dtype="<i4"))
    wide = WeightsHeader.seen_is_64bit(major, minor)
    if len(head) < (20 if wide else 16):
        raise CpganError(f"{path}: {len(head)} bytes is too short for a Darknet weights header")
    seen = int(np.frombuffer(head[12:20] if wide else head[12:16], dtype="<i8" if wide else "<i4")[0])
    return WeightsHeader(major, minor, revision, seen)


def read_weights(
    model: Darknet, path: str | os.PathLike, cutoff: int | None = None
) -> WeightsHeader:
    """Load a Darknet ``.weights`` file into ``model`` (layers ``< cutoff`` only when given).

    The file size is checked against the cfg *before* anything is loaded, so a truncated
    download, an oversized file or a weights file for another cfg leaves the model untouched
    and names both byte counts. ``cutoff`` follows Darknet's ``load_weights_upto``: a backbone
    file such as ``darknet53.conv.74`` holds the convolutions of layers 0..73.
    """
    _check_cutoff(model, cutoff)
    header = read_weights_header(path)
    expected = header.nbytes + 4 * weight_floats(model, cutoff)
    found = os.path.getsize(path)
    if found != expected:
        scope = "all layers" if cutoff is None else f"cutoff {cutoff}"
        raise CpganError(f"{path}: expected {expected} bytes for {model.source} ({scope}, "
                         f"header v{header.major}.{header.minor}), found {found} bytes")
    values = np.fromfile(path, dtype="<f4", offset=header.nbytes)
    if not np.isfinite(values).all():
        raise CpganError(f"{path}: weights contain NaN or infinite values")
    _check_variances(model, values, cutoff, path)
    offset = 0
    with torch.no_grad():
        for layer in model.conv_layers(cutoff):
            for tensor in layer.weight_tensors():
                chunk = values[offset:offset + tensor.numel()]
                tensor.copy_(torch.from_numpy(chunk).view_as(tensor))
                offset += tensor.numel()
    return header


def _check_variances(model: Darknet, values: np.ndarray, cutoff: int | None,
                     path: str | os.PathLike) -> None:
    """Refuse negative batch-norm running variances: they turn every output into NaN, and a
    detector that silently finds no region is worse than a clear error."""
    offset = 0
    for index, layer in enumerate(model.conv_layers(cutoff)):
        tensors = layer.weight_tensors()
        if layer.bn is not None:
            start = offset + sum(t.numel() for t in tensors[:3])
            if (values[start:start + tensors[3].numel()] < 0).any():
                raise CpganError(f"{path}: convolution {index} has a negative batch-norm "
                                 "variance (corrupt file or wrong cfg)")
        offset += sum(t.numel() for t in tensors)


def write_weights(
    model: Darknet,
    path: str | os.PathLike,
    major: int = 0,
    minor: int = 2,
    revision: int = 0,
    seen: int = 0,
    cutoff: int | None = None,
) -> int:
    """Write ``model`` in Darknet's ``.weights`` format, atomically; return the byte count.

    With ``cutoff`` only layers ``< cutoff`` are written (Darknet's ``partial`` command, which
    makes backbone files like ``darknet53.conv.74``).
    """
    _check_cutoff(model, cutoff)
    header = WeightsHeader(major, minor, revision, seen)
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        handle.write(header.to_bytes())
        for layer in model.conv_layers(cutoff):
            for tensor in layer.weight_tensors():
                handle.write(tensor.detach().to("cpu", torch.float32).numpy().astype("<f4").tobytes())
    return expected_weights_bytes(model, cutoff, major, minor)


# --------------------------------------------------------------------------------------------
# Inspection (for ``cpgan-prep inspect-weights FILE --cfg CFG``)


def describe_weights(cfg_path: str | os.PathLike, weights_path: str | os.PathLike) -> dict:
    """Layer table, parameter counts and a size verdict for a cfg/weights pair.

    Works from the cfg plan, so describing yolov3 allocates no tensors. When the size matches
    a backbone cutoff instead of the full network (``darknet53.conv.74``), the verdict says
    which cutoffs fit, since that is the usual reason a file is "too small".
    """
    sections = read_cfg(cfg_path)
    plans = plan_network(sections)[0]
    width, height = sections[0].get_int("width"), sections[0].get_int("height")
    header = read_weights_header(weights_path)
    actual = os.path.getsize(weights_path)
    floats = np.cumsum([0] + [p.weight_floats for p in plans])
    expected = header.nbytes + 4 * int(floats[-1])
    rows = [{"index": p.index, "type": p.kind, "channels": p.channels, "stride": p.stride,
             "output": f"{width // p.stride}x{height // p.stride}x{p.channels}",
             "weight_floats": p.weight_floats, "params": p.trainable_params} for p in plans]
    fits = [c for c in range(len(plans) + 1) if header.nbytes + 4 * int(floats[c]) == actual]
    return {
        "cfg": str(cfg_path),
        "weights": str(weights_path),
        "header": {"major": header.major, "minor": header.minor,
                   "revision": header.revision, "seen": header.seen},
        "layers": rows,
        "total_params": sum(p.trainable_params for p in plans),
        "total_weight_floats": int(floats[-1]),
        "expected_bytes": expected,
        "actual_bytes": actual,
        "matching_cutoffs": fits,
        "verdict": _verdict(expected, actual, fits, len(plans)),
    }


def _verdict(expected: int, actual: int, fits: list[int], layers: int) -> str:
    if actual == expected:
        return f"OK: {actual} bytes match the cfg ({layers} layers)"
    if fits:
        return (f"PARTIAL: {actual} bytes match a backbone file with cutoff {fits[0]}"
                f"{'..' + str(fits[-1]) if len(fits) > 1 else ''} (full network: {expected} bytes)")
    kind = "truncated" if actual < expected else "oversized"
    return f"MISMATCH: expected {expected} bytes, found {actual} bytes ({kind})"


def format_description(description: dict) -> str:
    """Plain-text rendering of :func:`describe_weights` for the CLI."""
    d = description
    h = d["header"]
    lines = [f"cfg: {d['cfg']}", f"weights: {d['weights']}",
             f"header: version {h['major']}.{h['minor']}.{h['revision']}, seen {h['seen']}",
             f"{'layer':>5}  {'type':<14} {'output':>14} {'stride':>6} {'params':>10}"]
    for row in d["layers"]:
        lines.append(f"{row['index']:>5}  {row['type']:<14} {row['output']:>14} "
                     f"{row['stride']:>6} {row['params']:>10}")
    lines += [f"total parameters: {d['total_params']:,} ({d['total_weight_floats']:,} floats stored)",
              f"expected bytes: {d['expected_bytes']:,}  actual bytes: {d['actual_bytes']:,}",
              d["verdict"]]
    return "\n".join(lines)


def default_feature_layer(layers: Sequence[LayerInfo]) -> int:
    """The backbone's output: the last [shortcut] at the deepest stride before any [yolo] head.

    CPGAN's region features come from YOLOv3's stride-32 backbone output (layer 74 of
    yolov3.cfg, the last residual of Darknet-53, 1024 channels). A cfg without residuals at
    that stride (yolov3-tiny) takes its widest layer there instead (layer 12, 1024 channels).
    """
    first_head = next(i for i, info in enumerate(layers) if info.kind == "yolo")
    deepest = max(info.stride for info in layers[:first_head])
    candidates = [info for info in layers[:first_head] if info.stride == deepest]
    shortcuts = [info.index for info in candidates if info.kind == "shortcut"]
    if shortcuts:
        return shortcuts[-1]
    widest = max(info.channels for info in candidates)
    return next(info.index for info in candidates if info.channels == widest)
