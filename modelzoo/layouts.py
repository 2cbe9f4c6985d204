"""Architecture facts without torch: input shape, classes, and the flat-weight layout table.

Part of the trainer stage, split from :mod:`modelzoo.architectures` so the light layers
(spec parsing, store reading and verification, ``weightbias zoo info``) know every
architecture's shape without importing torch. The layout lists each ``state_dict`` tensor of
an architecture at a width multiplier: its name, shape, and where it sits in the flat weight
vector a zoo stores. ``tests/test_architectures.py`` checks it against the torch modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from modelzoo.errors import WeightbiasError


class ArchitectureError(WeightbiasError, ValueError):
    """Unknown architecture, bad width, or weights that do not fit the layout."""


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in the flat parameter vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


def scaled(channels: int, width: float) -> int:
    """Channels of a layer at a width multiplier (at least one)."""
    return max(1, round(channels * width))


def _convs(widths: list[int], kernels: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of conv1..convK on a 3-channel input, ``widths[k]`` filters of ``kernels[k]``."""
    shapes, previous = [], 3
    for k, (out, kernel) in enumerate(zip(widths, kernels, strict=True), start=1):
        shapes += [(f"conv{k}.weight", (out, previous, kernel, kernel)), (f"conv{k}.bias", (out,))]
        previous = out
    return shapes


def _conv_stack(channels: tuple[int, ...], kernels: tuple[int, ...], hidden: int, n_classes: int,
                width: float) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of conv1..convK, fc1 and fc2 for a plain conv stack ending in a 1×1 map."""
    widths = [scaled(c, width) for c in channels]
    units = scaled(hidden, width)
    return [*_convs(widths, kernels), ("fc1.weight", (units, widths[-1])), ("fc1.bias", (units,)),
            ("fc2.weight", (n_classes, units)), ("fc2.bias", (n_classes,))]


def _lntl_cnn(width: float) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of Kim et al.'s ColoredMNIST network: input batch norm (with its running
    statistics), four convolutions (5×5, then 3×3) and one dense layer on the pooled map."""
    widths = [scaled(c, width) for c in (32, 32, 64, 64)]
    norm = [(f"bn0.{name}", (3,)) for name in ("weight", "bias", "running_mean", "running_var")]
    return [*norm, ("bn0.num_batches_tracked", ()), *_convs(widths, (5, 3, 3, 3)),
            ("fc.weight", (10, widths[-1])), ("fc.bias", (10,))]


def _simple_convnet(width: float) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of ReBias's SimpleConvNet (and EnD's variant, which has the same tensors):
    four 7×7 convolutions, each with its batch norm, and one dense layer on the pooled map."""
    widths = [scaled(c, width) for c in (16, 32, 64, 128)]
    convs = _convs(widths, (7, 7, 7, 7))
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for k, out in enumerate(widths, start=1):
        norm = [(f"bn{k}.{name}", (out,)) for name in ("weight", "bias", "running_mean", "running_var")]
        shapes += [*convs[2 * k - 2 : 2 * k], *norm, (f"bn{k}.num_batches_tracked", ())]
    return [*shapes, ("fc.weight", (10, widths[-1])), ("fc.bias", (10,))]


@dataclass(frozen=True)
class ArchInfo:
    """What the light layers need to know of one architecture."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    bottleneck: str
    tensor_shapes: Callable[[float], list[tuple[str, tuple[int, ...]]]]


ARCH_INFO: dict[str, ArchInfo] = {
    "digit-cnn": ArchInfo("digit-cnn", (3, 28, 28), 10, "fc1",
                          lambda w: _conv_stack((24, 48, 64), (5, 3, 3), 128, 10, w)),
    "gender-cnn": ArchInfo("gender-cnn", (3, 48, 48), 2, "fc1",
                           lambda w: _conv_stack((24, 48, 48, 64, 64), (5, 3, 3, 3, 3), 128, 2, w)),
    "lntl-cnn": ArchInfo("lntl-cnn", (3, 28, 28), 10, "pool", _lntl_cnn),
    "rebias-cnn": ArchInfo("rebias-cnn", (3, 28, 28), 10, "pool", _simple_convnet),
    "end-cnn": ArchInfo("end-cnn", (3, 28, 28), 10, "pool", _simple_convnet),
}


def arch_info(arch: str) -> ArchInfo:
    if arch not in ARCH_INFO:
        raise ArchitectureError(f"unknown architecture {arch!r}; known: {sorted(ARCH_INFO)}")
    return ARCH_INFO[arch]


def check_width(width: float) -> float:
    if not 0 < width <= 8:
        raise ArchitectureError(f"width must lie in (0, 8], got {width}")
    return width


def arch_layout(arch: str, width: float = 1.0) -> list[TensorSlot]:
    """The layout table of ``arch`` at ``width``, in ``state_dict`` order."""
    slots, offset = [], 0
    for name, shape in arch_info(arch).tensor_shapes(check_width(width)):
        size = 1
        for dim in shape:
            size *= dim
        slots.append(TensorSlot(name, shape, offset, size))
        offset += size
    return slots


def layout_records(slots: list[TensorSlot]) -> list[dict]:
    """The layout as JSON-ready records (what a zoo store keeps in its attributes)."""
    return [asdict(slot) | {"shape": list(slot.shape)} for slot in slots]


def slots_from_records(records: list[dict]) -> tuple[TensorSlot, ...]:
    return tuple(TensorSlot(r["name"], tuple(r["shape"]), r["offset"], r["size"]) for r in records)
