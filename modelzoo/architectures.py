"""Architectures: the small classifiers a zoo is made of, and their flat-weight layout.

Part of the trainer stage. Each architecture is a plain ``nn.Module`` whose attribute names
give readable ``state_dict`` keys, exposes its bottleneck layer by name (for fairness
regularizers that tap features), and can be built at a width multiplier so detectors can be
tested across architectures. :func:`layout` publishes, for every tensor, where it sits in
the flat parameter vector a zoo stores (PyTorch ``state_dict`` order); the same facts, without
torch, are in :mod:`modelzoo.layouts`.

Example
-------
>>> model = build_model("digit-cnn", width=0.5)
>>> n_params(model) == sum(slot.size for slot in layout(model))
True
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from modelzoo.layouts import ArchitectureError, TensorSlot, arch_info, check_width, layout_records
from modelzoo.layouts import scaled as _scaled

__all__ = ["ARCHITECTURES", "ArchitectureError", "DigitCNN", "GenderCNN", "LNTLConvNet", "SimpleConvNet",
           "TensorSlot", "build_model", "flatten", "layout", "layout_records", "n_params", "unflatten"]


class DigitCNN(nn.Module):
    """IFBiD's DigitWdb classifier: 28×28×3 input, 49,562 parameters at width 1.

    conv 24@5×5 → pool → conv 48@3×3 → pool → conv 64@3×3 → pool → dense 128 → dropout 0.3
    → dense 10; valid padding, ReLU.
    """

    input_shape = (3, 28, 28)
    num_classes = 10
    bottleneck = "fc1"

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, hidden = (_scaled(c, width) for c in (24, 48, 64, 128))
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 3)
        self.conv3 = nn.Conv2d(c2, c3, 3)
        self.fc1 = nn.Linear(c3, hidden)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(hidden, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck activations (post-ReLU output of ``fc1``)."""
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv3(x)), 2)
        return torch.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


class GenderCNN(nn.Module):
    """IFBiD's GenderWdb classifier on 48×48×3 input: 106,242 parameters at width 1.

    conv 24@5×5 → 48@3×3 → 48@3×3 → 64@3×3 → 64@3×3, each with ReLU and maxpool 2 → dense 128
    (the bottleneck ``fc1``) → dropout 0.3 → dense 2. IFBiD used 120×120 input with valid
    padding, which also ends in a 1×1×64 map; 'same' padding at 48×48 (48→24→12→6→3→1) keeps
    exactly that parameter count, and so the same weight layout, at a fifth of the convolution
    multiply-adds (14M instead of 74M per image), which is what makes CPU zoos of face models
    affordable.
    """

    input_shape = (3, 48, 48)
    num_classes = 2
    bottleneck = "fc1"

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4, c5, hidden = (_scaled(c, width) for c in (24, 48, 48, 64, 64, 128))
        self.conv1 = nn.Conv2d(3, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1)
        self.fc1 = nn.Linear(c5, hidden)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(hidden, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck activations (post-ReLU output of ``fc1``)."""
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        return torch.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.features(x)))


class LNTLConvNet(nn.Module):
    """Kim et al.'s ColoredMNIST classifier ("Learning Not to Learn", CVPR 2019; the
    feidfoe/learning-not-to-learn ``convnet``), for reproducing their table on their network:
    28×28×3 input, 67,760 parameters (and 7 batch-norm statistics) at width 1.

    batch norm on the input → conv 32@5×5 → ReLU → maxpool 3, stride 2 (14×14) → conv 32@3×3 →
    ReLU (the map LNTL's colour heads read) → conv 64@3×3, stride 2 (7×7) → ReLU → conv 64@3×3 →
    ReLU → global average pool (the bottleneck ``pool``, 64 features) → dense 10; 'same'
    padding. Convolutions start He-normal over their fan-out, as the source initialises them.
    Not vectorizable (the input batch norm keeps running statistics).
    """

    input_shape = (3, 28, 28)
    num_classes = 10
    bottleneck = "pool"

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4 = (_scaled(c, width) for c in (32, 32, 64, 64))
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c4, self.num_classes)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
            nn.init.normal_(conv.weight, 0.0, (2.0 / fan_out) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(self.bn0(x))), 3, stride=2, padding=1)
        x = torch.relu(self.conv4(torch.relu(self.conv3(torch.relu(self.conv2(x))))))
        return self.fc(self.pool(x))


class UnitNorm(nn.Module):
    """Scales each sample's feature vector to unit L2 norm (EnD's ``pattern_norm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1)


class SimpleConvNet(nn.Module):
    """ReBias's Biased-MNIST classifier (Bahng et al., ICML 2020; clovaai/rebias
    ``SimpleConvNet``), for reproducing the Biased-MNIST tables on their network: 28×28×3 input,
    531,210 parameters (and 484 batch-norm statistics) at width 1.

    Four convolutions 16, 32, 64, 128 @7×7 ('same' padding, no pooling), each followed by batch
    norm and ReLU → global average pool (the bottleneck ``pool``, 128 features) → dense 10. The
    source feeds images normalised to [−1, 1]; ``forward`` maps the trainer's [0, 1] there.
    Convolutions start He-normal over their fan-out, as the source initialises them.

    ``end_variant`` is EnD's network (Tartaglione et al., CVPR 2021; EIDOSLAB
    ``simple_convnet``): the last activation is tanh and the pooled features are L2-normalised
    inside ``pool``, so the classifier and EnD's term (tapped at ``pool``) read the same
    unit-norm vectors. Not vectorizable (batch norm keeps running statistics).
    """

    input_shape = (3, 28, 28)
    num_classes = 10
    bottleneck = "pool"

    def __init__(self, width: float = 1.0, end_variant: bool = False) -> None:
        super().__init__()
        channels = [_scaled(c, width) for c in (16, 32, 64, 128)]
        self.end_variant = end_variant
        previous = 3
        for k, out in enumerate(channels, start=1):
            setattr(self, f"conv{k}", nn.Conv2d(previous, out, 7, padding=3))
            setattr(self, f"bn{k}", nn.BatchNorm2d(out))
            previous = out
        norm = [UnitNorm()] if end_variant else []
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *norm)
        self.fc = nn.Linear(previous, self.num_classes)
        for k in range(1, 5):
            nn.init.kaiming_normal_(getattr(self, f"conv{k}").weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = 2 * x - 1
        for k in range(1, 5):
            x = getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(x))
            x = torch.tanh(x) if self.end_variant and k == 4 else torch.relu(x)
        return self.fc(self.pool(x))


def _end_convnet(width: float = 1.0) -> SimpleConvNet:
    return SimpleConvNet(width, end_variant=True)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"digit-cnn": DigitCNN, "gender-cnn": GenderCNN,
                                                      "lntl-cnn": LNTLConvNet, "rebias-cnn": SimpleConvNet,
                                                      "end-cnn": _end_convnet}


def build_model(arch: str, width: float = 1.0) -> nn.Module:
    """Instantiate a registered architecture at a width multiplier."""
    arch_info(arch)  # an unknown name fails with the list of known ones
    return ARCHITECTURES[arch](width=check_width(width))


def layout(model: nn.Module) -> list[TensorSlot]:
    """The layout table: each state_dict tensor's name, shape, offset and size, in order."""
    slots, offset = [], 0
    for name, tensor in model.state_dict().items():
        slots.append(TensorSlot(name, tuple(tensor.shape), offset, tensor.numel()))
        offset += tensor.numel()
    return slots


def n_params(model: nn.Module) -> int:
    return sum(t.numel() for t in model.state_dict().values())


def flatten(model: nn.Module) -> np.ndarray:
    """All state_dict tensors concatenated in layout order, as float32."""
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in model.state_dict().values()]).numpy()


def unflatten(vector: np.ndarray, slots: list[TensorSlot]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into a state_dict following ``slots``."""
    total = sum(slot.size for slot in slots)
    if vector.ndim != 1 or vector.size != total:
        raise ArchitectureError(f"flat vector has shape {vector.shape}; layout needs ({total},)")
    tensor = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
    return {s.name: tensor[s.offset : s.offset + s.size].reshape(s.shape).clone() for s in slots}
