"""modelzoo: makes and stores models (source → dataset → trainer → **store**).

Flow, one module per stage: :mod:`~modelzoo.sources` (find and read MNIST) →
:mod:`~modelzoo.datasets` / :mod:`~modelzoo.faces` (ColoredMNIST, Biased-MNIST, face gender;
HDF5 cache) → :mod:`~modelzoo.training` with :mod:`~modelzoo.architectures` (train one
model from its :class:`ModelConfig`; :mod:`~modelzoo.resume` lets a long one-model run
resume after a kill) → :mod:`~modelzoo.store` (write a Zarr zoo) and
:mod:`~modelzoo.zoo` (read it). :mod:`~modelzoo.spec` describes a zoo, :mod:`~modelzoo.tasks`
holds what differs between tasks, :mod:`~modelzoo.generation` runs a spec on Ray, and
:mod:`~modelzoo.checkpoints` reads and writes checkpoint files without unpickling.

Names are imported on first use, so ``import modelzoo`` is instant and reading a spec or a
store never imports torch.

Example
-------
>>> import modelzoo
>>> spec = modelzoo.parse_spec({"zoo": {"task": "colored_mnist", "arch": "digit-cnn", "n_models": 2},
...                             "fixed": {"epochs": 1, "train_size": 256},
...                             "sweep": {"sigma2": [0.02, 0.05]}})
>>> config = spec.config(0)
>>> config.bias_level, config.train_size
(0.02, 256)
>>> data = modelzoo.training_data(spec, config)       # MNIST from $WEIGHTBIAS_DATA or the cache
>>> result = modelzoo.train_model(spec.arch, spec.width, config, data, eval_size=500)
>>> result.weights.shape, 0 <= result.metrics["unbiased_acc"] <= 1
((49562,), True)
"""

from __future__ import annotations

from modelzoo._lazy import lazy_exports

_EXPORTS = {
    "WeightbiasError": "modelzoo.errors",
    "ZooSpec": "modelzoo.spec", "load_spec": "modelzoo.spec", "parse_spec": "modelzoo.spec",
    "SpecError": "modelzoo.spec",
    "ModelConfig": "modelzoo.config",
    "Task": "modelzoo.tasks", "TASKS": "modelzoo.tasks", "get_task": "modelzoo.tasks",
    "register_task": "modelzoo.tasks",
    "Zoo": "modelzoo.zoo", "open_zoo": "modelzoo.zoo", "StoreError": "modelzoo.zoo",
    "VerifyReport": "modelzoo.verify",
    "generate": "modelzoo.generation", "GenerateSummary": "modelzoo.generation",
    "GenerateError": "modelzoo.generation",
    "train_model": "modelzoo.training", "training_data": "modelzoo.training",
    "TrainingData": "modelzoo.training", "ModelResult": "modelzoo.training",
    "EpochCheckpoint": "modelzoo.resume", "WarmupCheckpoint": "modelzoo.resume",
    "ResumeError": "modelzoo.resume",
    "saved_model": "modelzoo.training",
    "build_model": "modelzoo.architectures", "ARCHITECTURES": "modelzoo.architectures",
    "TensorSlot": "modelzoo.layouts", "arch_layout": "modelzoo.layouts",
    "load_checkpoint": "modelzoo.checkpoints", "save_checkpoint": "modelzoo.checkpoints",
    "recognize": "modelzoo.recognition", "Recognized": "modelzoo.recognition",
    "RecognitionError": "modelzoo.recognition",
    "model_state_dict": "modelzoo.checkpoints", "CheckpointError": "modelzoo.checkpoints",
    "load_mnist": "modelzoo.sources",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

