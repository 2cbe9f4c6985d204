"""fairtrain: changes how one model learns (fairness regularizers and fairness metrics).

Regularizers plug into the trainer stage of the flow (dataset → trainer + regularizer → store):
:mod:`fairtrain.regularizers` (a registry of ``nn.Module`` loss terms tapping a named layer)
and :mod:`fairtrain.metrics` (group, individual and representation fairness measures).
"""
