"""The fairness regularizers with an adversarial attribute head, each after its paper (DESIGN
§4): GRAD (gradient reversal), LNTL (reversal and an entropy term, per-pixel colour heads) and
SensitiveNets (one-vs-rest detectors the features must confuse).

Part of the trainer stage; the registry that builds them by name is :mod:`fairtrain.regularizers`.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fairtrain.base import RegularizerError, check_gamma, check_int, check_unit, frozen_call, reverse_gradient
from fairtrain.interface import HeadRegularizer, ReversalHeadRegularizer
from fairtrain.taps import FeatureTap, Tap

IGNORE = -100  # a pixel target no loss counts (cross_entropy's default ignore_index)


class GRAD(ReversalHeadRegularizer):
    """Raff & Sylvester 2018 (gradient reversal against discrimination).

    An attribute head predicts S from the features behind a gradient-reversal layer; the term
    is R = CE(head(GRL_λ(y)), s), so the trainer's total is L_y + γ·L_s: the head descends
    L_s, the features ascend it, scaled by γλ. λ = ``grl_weight``, optionally ramped as
    λ_p = 2/(1+e^(−10p)) − 1 from the ``progress`` p in [0, 1] the trainer sets. The paper's
    attribute branch is two fully connected layers of 40 with batch norm and ReLU (the
    defaults) and its weight of ℓ_p is 100 (any of 50–2000 equivalent): here that is γ, the
    zoo's ``gamma``. A one-sample batch, which batch norm cannot normalise, adds nothing.
    """

    name = "grad"
    default_tap = Tap(None, "relu")  # reversal on the trunk's output: the post-ReLU bottleneck

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 40,
                 depth: int = 2, batch_norm: bool = True, grl_weight: float = 1.0,
                 ramp: bool = False) -> None:
        super().__init__(gamma, feature_dim=feature_dim, num_groups=num_groups, hidden=hidden,
                         grl_weight=grl_weight, ramp=ramp, depth=depth, batch_norm=batch_norm)
        self.batch_norm = bool(batch_norm) and hidden > 0

    def bias_loss(self, features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
        if self.batch_norm and self.training and len(features) < 2:
            return features.new_zeros(())
        return super().bias_loss(features, sensitive)


class LNTL(ReversalHeadRegularizer):
    """Kim et al., CVPR 2019 ("Learning Not to Learn"): bias heads behind gradient reversal, and
    an entropy term that leaves them uncertain.

    With ``target = "pixels"`` (the source's form; the default) three heads, one per colour
    channel, each conv 3×3 → batch norm → ReLU → conv 3×3, read the tapped map (an early
    convolution's, (C, H, W)) and predict every pixel's colour in ``bins`` levels: the input
    image sampled at H×W by nearest pixel, each channel ``value // (256 / bins)``, channels at 0
    (the background) ignored (:meth:`pixel_colours`). The network's input is captured by the
    regularizer's own hook, so the trainer passes nothing more. R is

        Σ_c CE(head_c(GRL_λ(f)), colour_c) + μ·(log bins − mean_c,pixels H(softmax(head_c(f)))),

    the heads learning the colour through the CE while the features, through the reversal (λ =
    ``grl_weight``, the source's 0.1), unlearn it; the entropy term (μ = ``entropy_weight``,
    the source's 0.01) runs the heads with detached weights, so only the features are pushed to
    leave them uncertain. As in the source (``alternate``, the default), each batch takes two
    steps: the network on the task loss and the entropy term, then, on a fresh forward pass,
    the heads on their colour loss and the network on its reversal (:meth:`adversary_term`);
    ``alternate = False`` adds both terms to one step. The source also unlearns from a
    pretrained baseline: the recipe's ``warmup_epochs``. ``target = "group"`` is a linear head
    predicting the sensitive group from the flattened features instead (for tasks whose bias
    is not a pixel colour, e.g. faces).
    """

    name = "lntl"
    default_tap = Tap("conv2", "relu")  # Kim et al.'s heads sit on an early map (their conv2)
    vectorizable = False  # its own hook reads the network's input images

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int,
                 feature_shape: tuple[int, ...] | None = None, target: str = "pixels", bins: int = 8,
                 hidden: int = 0, grl_weight: float = 0.1, ramp: bool = False,
                 entropy_weight: float = 0.01, alternate: bool = True) -> None:
        if target not in ("pixels", "group"):
            raise RegularizerError(f"target must be 'pixels' or 'group', got {target!r}")
        if target == "pixels" and (feature_shape is None or len(feature_shape) != 3):
            raise RegularizerError(f"lntl's per-pixel colour target needs a convolution map tap (C, H, W), "
                                   f"got features of shape {feature_shape}; tap a convolution "
                                   f"(reg.layer) or set reg.target = 'group'")
        self.target, self.bins = target, check_int("bins", bins, 2, maximum=256)
        self.feature_shape = tuple(feature_shape) if feature_shape is not None else None
        super().__init__(gamma, feature_dim=feature_dim, num_groups=num_groups, hidden=hidden,
                         grl_weight=grl_weight, ramp=ramp)
        self.entropy_weight = check_gamma(entropy_weight, "entropy_weight")
        self.alternating = bool(alternate)
        self.inputs: torch.Tensor | None = None

    def build_head(self, hidden: int, depth: int, batch_norm: bool) -> torch.nn.Module:
        if self.target == "group":
            return super().build_head(hidden, depth, batch_norm)
        channels = self.feature_shape[0]
        return torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.BatchNorm2d(channels),
            torch.nn.ReLU(), torch.nn.Conv2d(channels, self.bins, 3, padding=1)) for _ in range(3))

    def attach(self, model: torch.nn.Module) -> FeatureTap:
        tap = super().attach(model)
        if self.target == "pixels":
            tap._handles.append(model.register_forward_pre_hook(self._capture_inputs))
        return tap

    def _capture_inputs(self, module: torch.nn.Module, args: tuple) -> None:
        self.inputs = args[0].detach()

    def pixel_colours(self, size: tuple[int, int]) -> torch.Tensor:
        """(N, 3, H, W) colour levels of the captured input images at the map's resolution, as
        the source builds its target: each cell takes its nearest input pixel (PIL's NEAREST,
        centre convention), each channel ``value // (256 / bins)``; a channel at 0 (the black
        background, or a colour without that channel) is IGNORE."""
        if self.inputs is None:
            raise RegularizerError("lntl reads the input images through its own hook: attach it to the "
                                   "model (reg.attach(model)) before the forward pass")
        values = torch.round(F.interpolate(self.inputs.float(), size=size, mode="nearest-exact") * 255)
        levels = (values // (256 / self.bins)).long().clamp(0, self.bins - 1)
        return levels.masked_fill(values == 0, IGNORE)

    def entropy_term(self, features: torch.Tensor) -> torch.Tensor:
        """log K − mean entropy of the (frozen) heads' predictions; gradient reaches features only."""
        if self.target == "group":
            log_p = F.log_softmax(frozen_call(self.head, features), dim=1)
            return math.log(self.num_groups) + (log_p.exp() * log_p).sum(1).mean()
        maps = features.view(len(features), *self.feature_shape)
        negentropy = torch.stack([(log_p.exp() * log_p).sum(1).mean() for log_p in
                                  (F.log_softmax(frozen_call(head, maps), dim=1) for head in self.head)])
        return math.log(self.bins) + negentropy.mean()

    def bias_loss(self, features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
        if self.target == "group":
            return super().bias_loss(features, sensitive)
        maps = reverse_gradient(features.view(len(features), *self.feature_shape), self.reversal_weight)
        colours = self.pixel_colours(self.feature_shape[1:])
        if not (colours != IGNORE).any():
            return features.new_zeros(())
        return sum(F.cross_entropy(head(maps), colours[:, c], ignore_index=IGNORE)
                   for c, head in enumerate(self.head))

    def network_term(self, features: torch.Tensor) -> torch.Tensor:
        return self.entropy_weight * self.entropy_term(features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, target={self.target}, alternate={self.alternating}"


class SensitiveNets(HeadRegularizer):
    """Morales et al., T-PAMI 2021 (SensitiveNets-style adversary).

    One-vs-rest detectors P_k(y) = σ(head(y))_k of each sensitive class k. The term is

        R = BCE(head(sg(y)), onehot(s)) + mean_{i,k} |q − P_k(y_i)|,   q = 0.9,

    where sg stops the gradient. The detector loss trains the head on detached features, so
    it cannot move the network; the confusion term evaluates the head with detached *weights*
    on live features, so it pushes the features toward "every detector fires at q" (the
    attribute becomes unreadable) while the head is never pushed to be confused.
    """

    name = "sensitive_nets"
    default_tap = Tap(None, "relu")  # the embedding the detectors read: the post-ReLU bottleneck

    def __init__(self, gamma: float = 1.0, *, feature_dim: int, num_groups: int, hidden: int = 0,
                 target_prob: float = 0.9) -> None:
        super().__init__(gamma, feature_dim=feature_dim, num_groups=num_groups, hidden=hidden)
        self.target_prob = check_unit("target_prob", target_prob)

    def adversary_loss(self, features: torch.Tensor, sensitive: torch.Tensor) -> torch.Tensor:
        """The detectors' own loss, on detached features: trains the head, never the network."""
        onehot = F.one_hot(sensitive, self.num_groups).to(features.dtype)
        return F.binary_cross_entropy_with_logits(self.head(features.detach()), onehot)

    def confusion(self, features: torch.Tensor) -> torch.Tensor:
        """mean |q − P_k(y)| with the head frozen: gradient reaches the features only."""
        return (self.target_prob - torch.sigmoid(frozen_call(self.head, features))).abs().mean()

    def penalty(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                sensitive: torch.Tensor | None) -> torch.Tensor:
        return self.adversary_loss(features, sensitive) + self.confusion(features)
