"""The reference's optimiser and learning-rate schedule in Keras.

The recipe of Nowak et al., "Fantastic Weights and How to Find Them" (NeurIPS 2023,
arXiv:2306.12230) as its reference code runs it (github.com/alooow/fantastic_weights_paper,
``main.py``): SGD with momentum 0.9, Nesterov and coupled L2 weight decay
(``torch.optim.SGD(..., weight_decay=l2)``) on every parameter, and the learning rate
multiplied by 0.1 after 50 % and 75 % of the epochs (``MultiStepLR`` with milestones
``int(epochs / 2)`` and ``int(epochs * 3 / 4)``).

`TorchSGD` (PyTorch's SGD: momentum buffer of the raw gradients, coupled L2) lives in
the package, `keras_dst.optimizers.TorchSGD`, so that a model saved with it loads with
``import keras_dst`` alone; it is re-exported here.
"""

import keras

from keras_dst.optimizers import TorchSGD

__all__ = ["TorchSGD", "step_decay"]


def step_decay(learning_rate, epochs, steps_per_epoch, milestones=(0.5, 0.75), factor=0.1):
    """LR ×`factor` after each milestone fraction of the epochs (per epoch, as the reference).

    100 epochs give drops before epochs 50 and 75 (0-based), 200 epochs at 100 and 150.
    Returns a `keras.optimizers.schedules.PiecewiseConstantDecay` of the step.
    """
    drop_epochs = sorted({int(epochs * m) for m in milestones if 0 < int(epochs * m) < epochs})
    if not drop_epochs:
        return float(learning_rate)
    # The schedule sees the 0-based step; step e * steps_per_epoch starts epoch e.
    boundaries = [e * steps_per_epoch - 1 for e in drop_epochs]
    values = [float(learning_rate) * factor ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
