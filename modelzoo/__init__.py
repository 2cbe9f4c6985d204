"""modelzoo: makes and stores models.

Flow, one module per stage: :mod:`~modelzoo.sources` (find and read MNIST) →
:mod:`~modelzoo.datasets` (ColoredMNIST / Biased-MNIST, HDF5 cache) →
:mod:`~modelzoo.training` with :mod:`~modelzoo.architectures` (train one model) →
:mod:`~modelzoo.store` (Zarr zoo store). :mod:`~modelzoo.spec` describes a zoo,
:mod:`~modelzoo.generate` runs it on Ray, :mod:`~modelzoo.checkpoints` exports models.
"""
