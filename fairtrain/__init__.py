"""fairtrain: changes how one model learns (fairness regularizers and fairness metrics).

Regularizers plug into the trainer stage of the flow (dataset → trainer + regularizer → store).
"""
