"""keras_dst: Dynamic Sparse Training for Keras 3 (TensorFlow backend).

    model = keras_dst.prunable(model, density=0.1)           # masks + ERK
    model.compile(optimizer, loss, jit_compile=True)
    model.fit(x, y, callbacks=[keras_dst.DynamicSparseTraining(
        prune="magnitude", grow="gradient", update_every=800)])
"""

from keras_dst import (
    optimizers,  # noqa: F401  (registers TorchSGD for load_model)
    testing,  # noqa: F401  (keras_dst.testing.assert_sparse_invariants)
)
from keras_dst.callbacks import DynamicSparseTraining
from keras_dst.convert import prunable, strip, unfit_layers
from keras_dst.criteria import Criterion, criterion_names, get_criterion, register_criterion
from keras_dst.distributions import layer_densities, register_distribution
from keras_dst.export import ExportReport, LiteRTModel, export
from keras_dst.gradual import GradualPruning
from keras_dst.growth import GrowthRule, get_growth, growth_names, register_growth
from keras_dst.layers import MaskConstraint, SparseWrapper, register_prunable_layer
from keras_dst.masks import apply_masks, density, masks, set_masks, sparse_targets, summary
from keras_dst.overlap import CriteriaOverlap
from keras_dst.saving import BackupAndRestore, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "BackupAndRestore", "CriteriaOverlap", "GradualPruning", "apply_masks",
    "Criterion", "DynamicSparseTraining", "ExportReport", "LiteRTModel", "export", "GrowthRule",
    "MaskConstraint", "SparseWrapper",
    "criterion_names", "density", "get_criterion", "get_growth", "growth_names",
    "layer_densities", "load_model", "masks", "prunable", "register_criterion", "register_distribution",
    "register_growth", "register_prunable_layer", "save_model", "set_masks", "sparse_targets", "strip",
    "summary", "unfit_layers",
]
