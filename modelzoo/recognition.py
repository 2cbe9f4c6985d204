"""Recognizing a user's checkpoint: which architecture and width, whatever its tensors are called.

At the store's edge, beside :mod:`modelzoo.checkpoints` (which reads files): a model trained in
someone else's code names its layers ``stem``, ``features.0`` or ``backbone.conv_a``, comes
wrapped (``module.`` from DataParallel/DDP, ``_orig_mod.`` from ``torch.compile``, a Lightning
``model.`` prefix) and, from safetensors or HDF5, in alphabetical rather than forward order.
None of that changes what the network is, so recognition goes by structure:

1. wrappings are stripped (:func:`unwrap_names`);
2. tensors are paired into layers by their module path (``<path>.weight`` + ``<path>.bias``)
   and each layer is read as a convolution (4-D weight) or a linear layer (2-D weight);
3. the layers must match, one to one, the layers of one registered architecture at one
   width, by weight and bias shape. Where shapes alone leave the order open (two layers of
   equal shape), the file's own order decides if it has one (a ``.pt`` state_dict keeps
   registration order); otherwise recognition fails and says so.

Anything the architecture lacks (batch-norm buffers, ``num_batches_tracked``, weight-norm
pieces), a non-floating tensor, or a second architecture that fits equally well is refused
with one line naming what was found and what was expected. Nothing here imports zarr.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from modelzoo.errors import WeightbiasError
from modelzoo.layouts import ARCH_INFO, TensorSlot, arch_layout

# Prefixes wrappers add to every name: DataParallel/DDP, torch.compile, Lightning modules.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
_MAX_LISTED = 4


class RecognitionError(WeightbiasError, ValueError):
    """A state_dict that matches no architecture, or more than one, or not in a knowable order."""


@dataclass(frozen=True)
class Recognized:
    """A checkpoint read as one of our architectures: renamed tensors in layout order."""

    arch: str
    width: float
    state_dict: dict[str, torch.Tensor]  # our names, layout order
    renamed: dict[str, str]  # the file's name -> our name


@dataclass(frozen=True)
class _Layer:
    path: str
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(self.weight.shape), tuple(self.bias.shape)


def unwrap_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every prefix a wrapper put in front of *all* names removed."""
    names = dict(state_dict)
    stripped = True
    while stripped and names:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(name.startswith(prefix) for name in names):
                names = {name[len(prefix):]: tensor for name, tensor in names.items()}
                stripped = True
    return names


def recognize(state_dict: Mapping[str, torch.Tensor], arch: str | None = None,
              ordered: bool = True) -> Recognized:
    """Read ``state_dict`` as one registered architecture (or ``arch``) at some width.

    ``ordered`` says whether the mapping's order is the network's own (a torch state_dict) or
    arbitrary (safetensors and HDF5 list names alphabetically)."""
    if arch is not None and arch not in ARCH_INFO:
        raise RecognitionError(f"unknown architecture {arch!r}; known: {sorted(ARCH_INFO)}")
    layers = _layers(unwrap_names(state_dict))
    fits, reasons = [], []
    for name in [arch] if arch else sorted(ARCH_INFO):
        try:
            fits.append(_match(layers, name, ordered))
        except RecognitionError as err:
            reasons.append(f"{name}: {err}")
    if len(fits) > 1:
        both = ", ".join(f"{fit.arch} width {fit.width:g}" for fit in fits)
        raise RecognitionError(f"the checkpoint fits {both} equally; say which with --arch")
    if not fits:
        found = ", ".join(f"{layer.path} {list(layer.weight.shape)}" for layer in layers[:_MAX_LISTED])
        more = f", ... ({len(layers)} layers)" if len(layers) > _MAX_LISTED else ""
        raise RecognitionError(f"the checkpoint's layers ({found}{more}) match no known architecture at any "
                               f"width: {'; '.join(reasons)}")
    return fits[0]


def _layers(state_dict: dict[str, torch.Tensor]) -> list[_Layer]:
    """Pair ``<path>.weight`` with ``<path>.bias``; refuse anything else, naming it."""
    paths: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise RecognitionError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        path, _, role = name.rpartition(".")
        paths.setdefault(path, {})[role] = tensor
    layers, extra = [], []
    for path, roles in paths.items():
        weight, bias = roles.get("weight"), roles.get("bias")
        if (len(roles) == 2 and weight is not None and bias is not None and weight.dim() in (2, 4)
                and bias.dim() == 1 and bias.shape[0] == weight.shape[0]):
            layers.append(_Layer(path, weight, bias))
        else:
            extra += [f"{path}.{role}" if path else role for role in roles]
    if extra:
        more = f", ... ({len(extra)})" if len(extra) > _MAX_LISTED else ""
        listed = ", ".join(extra[:_MAX_LISTED]) + more
        raise RecognitionError(f"tensors the architectures lack: {listed}; only convolution and linear "
                               "layers with a weight and a bias are read (no batch norm, no buffers)")
    if not layers:
        raise RecognitionError("no convolution or linear layer (a <name>.weight with its <name>.bias)")
    for layer in layers:
        for role, tensor in (("weight", layer.weight), ("bias", layer.bias)):
            if not tensor.is_floating_point():
                raise RecognitionError(f"tensor {layer.path}.{role} holds {tensor.dtype}, not floating-point "
                                       "weights (integer, boolean and complex tensors are never weights)")
    return layers


def _reference_layers(slots: list[TensorSlot]) -> list[tuple[str, tuple, tuple]]:
    by_path: dict[str, dict[str, tuple]] = {}
    for slot in slots:
        path, _, role = slot.name.rpartition(".")
        by_path.setdefault(path, {})[role] = slot.shape
    return [(path, roles["weight"], roles["bias"]) for path, roles in by_path.items()]


def _match(layers: list[_Layer], arch: str, ordered: bool) -> Recognized:
    first_conv = next((layer for layer in layers if layer.weight.dim() == 4 and layer.weight.shape[1] == 3),
                      None)
    reference_first = _reference_layers(arch_layout(arch))[0]
    if first_conv is None:
        raise RecognitionError("no convolution takes 3 input channels (an RGB image)")
    width = first_conv.weight.shape[0] / reference_first[1][0]
    if not 0 < width <= 8:
        raise RecognitionError(f"a first layer of {first_conv.weight.shape[0]} filters is no width of it")
    reference = _reference_layers(arch_layout(arch, width))
    if len(reference) == len(layers):
        layers = _order(layers, reference, ordered)
    wanted = [(w, b) for _, w, b in reference]
    got = [layer.shapes for layer in layers]
    if wanted != got:
        raise RecognitionError(f"width {width:g} needs {len(reference)} layers of shapes "
                               f"{[list(w) for w, _ in wanted[:_MAX_LISTED]]}..., the file has {len(layers)} "
                               f"({[list(w) for w, _ in got[:_MAX_LISTED]]}...)")
    tensors, renamed = {}, {}
    for (path, _, _), layer in zip(reference, layers, strict=True):
        for role, tensor in (("weight", layer.weight), ("bias", layer.bias)):
            tensors[f"{path}.{role}"] = tensor
            renamed[f"{layer.path}.{role}" if layer.path else role] = f"{path}.{role}"
    return Recognized(arch, width, tensors, renamed)


def _order(layers: list[_Layer], reference: list[tuple[str, tuple, tuple]], ordered: bool) -> list[_Layer]:
    """The file's layers in the reference's order, matched by shape; equal shapes keep the file's
    order only when it has one."""
    pools: dict[tuple, list[_Layer]] = {}
    for layer in layers:
        pools.setdefault(layer.shapes, []).append(layer)
    result = []
    for _, weight, bias in reference:
        pool = pools.get((weight, bias), [])
        if not pool:
            return layers  # the caller reports the mismatch
        if len(pool) > 1 and not ordered:
            names = ", ".join(layer.path for layer in pool)
            raise RecognitionError(f"layers {names} have the same shape {list(weight)}, and this file format "
                                   "keeps no layer order, so which is which cannot be established; save "
                                   "a torch state_dict (.pt), or pass the layers in order")
        result.append(pool.pop(0))
    return result
