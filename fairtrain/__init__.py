"""fairtrain: changes how one model learns (fairness regularizers and fairness metrics).

Regularizers plug into the trainer stage of the flow (dataset → **trainer + regularizer** →
store): :mod:`fairtrain.regularizers` holds a registry of ``nn.Module`` loss terms, each of
which declares and hooks its own tap (a layer and an activation, after its source paper),
:mod:`fairtrain.metrics` the group, individual and representation fairness
measures the store records and the reports compare, and :mod:`fairtrain.references` the
sources' published numbers and training recipes the evidence compares against. Names are
imported on first use.

Example
-------
>>> import torch, fairtrain
>>> sorted(fairtrain.REGULARIZERS)[:3]
['binary_bernoulli', 'binary_mi', 'end']
>>> ndr = fairtrain.get_regularizer("ndr", gamma=0.5)
>>> ndr.tap                                # where it reads: the bottleneck's pre-activation
Tap(layer=None, activation='pre')
>>> features, logits = torch.rand(8, 4), torch.randn(8, 2)
>>> targets, groups = torch.tensor([0, 1] * 4), torch.tensor([0, 0, 1, 1] * 2)
>>> term = ndr(features, logits, targets, groups)      # γ·R, added to the task loss
>>> term.shape, bool(term >= 0)
(torch.Size([]), True)
>>> fairtrain.demographic_parity_difference([1, 1, 0, 0], [0, 0, 1, 1])
1.0
"""

from __future__ import annotations

from modelzoo._lazy import lazy_exports

_METRICS = ("group_accuracy", "demographic_parity_difference", "equal_opportunity_difference",
            "equalized_odds_difference", "zemel_discrimination", "gpa", "discrimination_accuracy_curve",
            "audc", "knn_consistency", "representation_leakage", "centroid_recoverability", "pca_energy")
_EXPORTS = {
    **dict.fromkeys(("get_regularizer", "REGULARIZERS", "Regularizer", "RegularizerError", "FeatureTap",
                     "Tap", "regularizer_for_model", "regularizer_for_network", "regularizer_options",
                     "regularizer_tap"), "fairtrain.regularizers"),
    **dict.fromkeys(_METRICS, "fairtrain.metrics"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
