"""InsideBias: flag a biased model from its activations on a few probe images per group.

Part of the detector stage (store → **detector** → report). Where the weight-space
meta-detector reads weights only, InsideBias (Serna, Peña, Morales & Fierrez, "InsideBias:
Measuring Bias in Deep Networks and Application to Face Gender Biometrics", ICPR 2020) runs
the model on very few images of each demographic group (15 in the paper) and compares how
strongly its convolutional filters respond: a model that under-learned a group responds
more weakly to it.

Definition (DESIGN §6). For conv layer *l* and group *d*::

    λ_d^[l] = mean over the group's probe images of
              the mean over the layer's filters of
              each filter's spatial maximum of the post-ReLU activation map
    Λ_d^[l] = λ_d^[l] / max_g λ_g^[l]

so the best-served group has Λ = 1 in every layer and a low ``min_d Λ`` flags bias and
names the under-learned group. Images follow the input convention of every model here:
uint8 (N, 3, H, W) divided by 255.

Choices made here, and why:

* **Post-ReLU by construction.** Our architectures apply ReLU functionally
  (``torch.relu(conv(x))``), so there is no ReLU module to hook. The hook sits on each
  ``Conv2d`` and applies ``relu`` to its output itself; the map is taken before pooling,
  which is the layer's own response (a max-pool could only drop border rows from it).
* **Default layer = the deepest conv layer measured** (the last one in forward order).
  The paper's layer-by-layer curves (its Fig. 1) show the gap between well- and poorly-
  represented groups opening up with depth and widest at the last layers, where features
  are most specific to what the model learned; early filters (edges, colour) respond
  alike to any face. Every layer is still measured and reported, so a caller can pick
  another with ``layer=``.
* **A dead layer gives NaN.** If every group's λ is 0 in a layer (no filter ever fires),
  the ratio is 0/0: Λ is NaN for that layer and the result carries a note saying so,
  rather than a made-up 1 that would read as "perfectly fair".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from modelzoo.datasets import ImageSet
from modelzoo.errors import WeightbiasError
from modelzoo.faces import IMAGE_SUFFIXES, decode_face

_BATCH = 256  # probe sets are small; batching only bounds memory for a large user folder


class InsideBiasError(WeightbiasError, ValueError):
    """Bad probes (too few groups or images, wrong shape or dtype), an unknown layer, or an
    unreadable probe folder."""


@dataclass(frozen=True)
class InsideBiasResult:
    """λ and Λ for every measured layer (rows, forward order) and probe group (columns).

    ``notes`` explains anything a reader must know to trust the numbers (e.g. a dead layer
    whose Λ is NaN).
    """

    groups: tuple[str, ...]
    layers: tuple[str, ...]
    activation: np.ndarray
    ratio: np.ndarray
    n_probes: dict[str, int]
    notes: tuple[str, ...] = field(default=())

    @property
    def default_layer(self) -> str:
        """The deepest measured conv layer: where the paper saw the group gap widest."""
        return self.layers[-1]

    def _row(self, layer: str | None) -> tuple[str, np.ndarray]:
        name = self.default_layer if layer is None else layer
        if name not in self.layers:
            raise InsideBiasError(f"layer {name!r} was not measured; measured layers: {list(self.layers)}")
        return name, self.ratio[self.layers.index(name)]

    def min_ratio(self, layer: str | None = None) -> float:
        """min_d Λ_d in ``layer`` (default: :attr:`default_layer`); low means biased, NaN means dead."""
        _, row = self._row(layer)
        return float(row.min())  # NaN propagates: a dead layer has no verdict

    def lowest_group(self, layer: str | None = None) -> str:
        """The group with the lowest Λ in ``layer``: the one the model under-learned."""
        name, row = self._row(layer)
        if np.isnan(row).any():
            raise InsideBiasError(f"layer {name!r} is dead (λ = 0 for every group), so it names no group")
        return self.groups[int(np.argmin(row))]

    def to_dict(self) -> dict:
        """JSON-ready: per-layer λ and Λ by group name (NaN as None), the verdict of the default
        layer, probe counts and notes."""

        def number(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        def table(values: np.ndarray) -> dict[str, dict[str, float | None]]:
            return {layer: {group: number(values[i, j]) for j, group in enumerate(self.groups)}
                    for i, layer in enumerate(self.layers)}

        dead = bool(np.isnan(self.ratio[-1]).any())
        return {
            "method": "insidebias",
            "groups": list(self.groups),
            "layers": list(self.layers),
            "default_layer": self.default_layer,
            "min_ratio": number(self.min_ratio()),
            "lowest_group": None if dead else self.lowest_group(),
            "activation": table(self.activation),
            "ratio": table(self.ratio),
            "n_probes": dict(self.n_probes),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------- layers and hooks


def _conv_modules(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the model's ``Conv2d`` modules in forward order.

    Registration order usually is forward order, but nothing forces it, and "the last conv
    layer" must mean the deepest one; so when the model publishes ``input_shape`` the order
    is read from one forward pass on a blank image (convs the forward never calls are left
    out: they have no activations). Without ``input_shape``, registration order is returned.
    """
    convs = _conv_modules(model)
    shape = getattr(model, "input_shape", None)
    if not convs or shape is None:
        return list(convs)
    parameter = next(model.parameters())
    blank = torch.zeros((1, *shape), dtype=parameter.dtype, device=parameter.device)
    order: list[str] = []

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name not in order:
                order.append(name)
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in convs.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(blank)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order


def _check_layers(model: nn.Module, layers: list[str] | None) -> list[str]:
    convs = _conv_modules(model)
    if not convs:
        raise InsideBiasError(f"{type(model).__name__} has no Conv2d layer; InsideBias measures conv layers")
    if layers is None:
        return list(convs)
    if isinstance(layers, str) or not layers:
        raise InsideBiasError(f"layers must be a non-empty list of conv layer names or None, got {layers!r}")
    unknown = [name for name in layers if name not in convs]
    if unknown:
        raise InsideBiasError(f"unknown conv layer(s) {unknown}; the model's Conv2d layers: {list(convs)}")
    if len(set(layers)) != len(layers):
        raise InsideBiasError(f"layers lists a name twice: {layers}")
    return list(layers)


def _check_probes(model: nn.Module, probes: dict[str, np.ndarray]) -> None:
    if not isinstance(probes, dict) or len(probes) < 2:
        count = len(probes) if isinstance(probes, dict) else type(probes).__name__
        raise InsideBiasError(f"InsideBias compares groups: probes needs at least 2 groups, got {count}")
    expected = getattr(model, "input_shape", None)
    for group, images in probes.items():
        if not isinstance(group, str) or not group:
            raise InsideBiasError(f"probe group names must be non-empty strings, got {group!r}")
        if not isinstance(images, np.ndarray):
            raise InsideBiasError(f"probes[{group!r}] must be a numpy array, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise InsideBiasError(f"probes[{group!r}] must be uint8 images (0–255), got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise InsideBiasError(f"probes[{group!r}] must have shape (n, 3, H, W), got {images.shape}")
        if expected is not None and tuple(images.shape[1:]) != tuple(expected):
            raise InsideBiasError(f"probes[{group!r}] has images of shape {images.shape[1:]}, but "
                                  f"{type(model).__name__} takes {tuple(expected)}")
        if len(images) == 0:
            raise InsideBiasError(f"probes[{group!r}] holds no images; every group needs at least one")


def insidebias(model: nn.Module, probes: dict[str, np.ndarray], layers: list[str] | None = None,
               device: str | torch.device = "cpu") -> InsideBiasResult:
    """Measure λ and Λ (module docstring) of ``model`` on each group's probe images.

    ``probes`` maps group name → uint8 images (n, 3, H, W) of the model's ``input_shape``;
    ``layers`` names the conv layers to measure (default: all). The model is moved to
    ``device`` (``nn.Module.to`` works in place) and run in eval mode without gradients; its
    training flag is restored and every hook removed afterwards, also when the forward
    fails. Result rows follow forward order whatever order ``layers`` was given in, so the
    default layer is always the deepest measured.
    """
    _check_probes(model, probes)
    names = _check_layers(model, layers)
    convs = _conv_modules(model)
    model.to(device)
    dtype = next(model.parameters()).dtype
    fired: list[str] = []  # forward order of the hooked layers
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def capture(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name not in fired:
                fired.append(name)
            # Our models apply ReLU functionally, so the post-ReLU map is made here.
            peaks = torch.relu(output).amax(dim=(2, 3))  # (n, filters): each filter's spatial max
            captured[name].append(peaks.mean(dim=1).double().cpu())  # per image: mean over filters
        return hook

    handles = [convs[name].register_forward_hook(capture(name)) for name in names]
    was_training = model.training
    per_group: dict[str, dict[str, np.ndarray]] = {}
    try:
        model.eval()
        with torch.no_grad():
            for group, images in probes.items():
                for values in captured.values():
                    values.clear()
                for start in range(0, len(images), _BATCH):
                    batch = torch.from_numpy(np.ascontiguousarray(images[start : start + _BATCH]))
                    model(batch.to(device).to(dtype).div_(255.0))
                per_group[group] = {name: _per_image(name, values, len(images))
                                    for name, values in captured.items()}
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    ordered = tuple(name for name in fired if name in names)
    groups = tuple(probes)
    activation = np.array([[per_group[g][name].mean() for g in groups] for name in ordered])
    ratio, notes = _ratios(activation, ordered)
    return InsideBiasResult(groups=groups, layers=ordered, activation=activation, ratio=ratio,
                            n_probes={g: len(probes[g]) for g in groups}, notes=tuple(notes))


def _per_image(name: str, values: list[torch.Tensor], n_images: int) -> np.ndarray:
    """The per-image values of one layer for one group, checked: one activation map per image."""
    per_image = torch.cat(values).numpy() if values else np.empty(0)
    if len(per_image) == 0:
        raise InsideBiasError(f"conv layer {name!r} never ran in the model's forward pass, so it has "
                              "no activations to measure")
    if len(per_image) != n_images:
        raise InsideBiasError(f"conv layer {name!r} ran {len(per_image) / n_images:g}× per image; "
                              "InsideBias needs exactly one activation map per image and layer")
    return per_image


def _ratios(activation: np.ndarray, layers: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """Λ = λ / max_g λ per layer; NaN (with a note) for a layer where every λ is 0."""
    peak = activation.max(axis=1, keepdims=True)
    dead = peak[:, 0] <= 0
    ratio = np.full_like(activation, np.nan)
    ratio[~dead] = activation[~dead] / peak[~dead]
    notes = [f"layer {layer!r}: every group's activation is 0 (no filter fires on any probe), so Λ is "
             "undefined (NaN) there" for layer, is_dead in zip(layers, dead, strict=True) if is_dead]
    return ratio, notes


# ---------------------------------------------------------------- probe images


def probe_indices(imageset: ImageSet, group_names: tuple[str, ...], per_group: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Sorted indices of ``per_group`` images of each group, seeded, balanced over the labels.

    ``imageset.bias`` holds group indices into ``group_names``. Within a group the draw is
    split as evenly as the group allows over the class labels of the set (e.g. 3 + 2 over
    both genders for 5 probes), so that λ compares groups rather than a gender mix that
    happened to differ between them; a class a group lacks is made up from the others.
    """
    if not isinstance(per_group, int) or per_group < 1:
        raise InsideBiasError(f"per_group must be a positive int, got {per_group!r}")
    if len(group_names) == 0:
        raise InsideBiasError("group_names is empty")
    if len(imageset) and (imageset.bias.min() < 0 or imageset.bias.max() >= len(group_names)):
        raise InsideBiasError(f"the image set's group indices run from {imageset.bias.min()} to "
                              f"{imageset.bias.max()}, but only {len(group_names)} group names were given")
    classes = np.unique(imageset.labels)
    rng = np.random.default_rng([seed, 0x1B1A5])
    chosen: dict[str, np.ndarray] = {}
    for index, name in enumerate(group_names):
        members = np.flatnonzero(imageset.bias == index)
        if len(members) < per_group:
            raise InsideBiasError(f"group {name!r} has {len(members)} images; {per_group} probes per "
                                  "group were asked for")
        by_class = [members[imageset.labels[members] == label] for label in classes]
        quota = _even_quota(np.array([len(cell) for cell in by_class]), per_group, rng)
        picks = [rng.choice(cell, count, replace=False) for cell, count in zip(by_class, quota, strict=True)]
        chosen[name] = np.sort(np.concatenate(picks))
    return chosen


def _even_quota(capacity: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` over cells as evenly as their ``capacity`` allows (odd remainders go to
    cells drawn at random, so no class is always favoured)."""
    quota = np.zeros_like(capacity)
    remaining = total
    while remaining > 0:
        open_cells = np.flatnonzero(quota < capacity)
        share, extra = divmod(remaining, len(open_cells))
        add = np.full(len(open_cells), share)
        add[rng.permutation(len(open_cells))[:extra]] += 1
        add = np.minimum(add, capacity[open_cells] - quota[open_cells])
        quota[open_cells] += add
        remaining -= int(add.sum())
    return quota


def probe_images(imageset: ImageSet, group_names: tuple[str, ...], per_group: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Group name → the uint8 images :func:`probe_indices` picks: ready for :func:`insidebias`."""
    return {name: imageset.images[index] for name, index in
            probe_indices(imageset, group_names, per_group, seed).items()}


def read_probe_folder(folder: str | Path, image_size: int) -> dict[str, np.ndarray]:
    """A user's probe folder: one sub-folder per group, its images (jpg/png, anywhere below it).

    Decoded exactly as the face datasets are (:func:`modelzoo.faces.decode_face`: centre
    crop, resize to ``image_size``), so probes look to a model like its training images.
    Groups are the sub-folder names, sorted; hidden sub-folders are ignored. Unlike dataset
    loading, an unreadable image is an error, not a skip: probes are few and hand-picked.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InsideBiasError(f"probe folder {root} does not exist or is not a folder")
    if not isinstance(image_size, int) or image_size < 1:
        raise InsideBiasError(f"image_size must be a positive int, got {image_size!r}")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise InsideBiasError(f"probe folder {root} has no group sub-folders; expected "
                              f"{root}/<group>/<image>")
    probes: dict[str, np.ndarray] = {}
    for sub in subfolders:
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InsideBiasError(f"probe group folder {sub} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        images = []
        for path in files:
            try:
                images.append(decode_face(path, image_size))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise InsideBiasError(f"cannot read probe image {path}: {err}") from err
        probes[sub.name] = np.stack(images)
    return probes
