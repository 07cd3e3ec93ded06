"""The reference's optimiser and learning-rate schedule in Keras (spec §6.1, §9).

`TorchSGD` is PyTorch's SGD: momentum buffer ``b <- mu b + g'``, update
``w <- w - lr (g' + mu b)`` (Nesterov) or ``w - lr b``, with **coupled** L2 weight
decay ``g' = g + wd w`` on every variable it updates (kernels, biases, BN). The
decay is added inside the optimiser update, so the gradients that keras_dst's
criteria and gradient growth see (the ones passed to ``optimizer.apply``) are the
raw loss gradients, as in the reference. Keras' own ``SGD`` keeps ``-lr b`` and its
``weight_decay`` is decoupled, so neither matches after a learning-rate drop.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dst_examples")
class TorchSGD(keras.optimizers.SGD):
    """PyTorch-style SGD with coupled L2 weight decay.

    Args:
      learning_rate: float or a `keras.optimizers.schedules.LearningRateSchedule`.
      momentum: float in [0, 1].
      nesterov: bool.
      l2: coupled weight decay coefficient (PyTorch's ``weight_decay``).
      **kwargs: other `keras.optimizers.Optimizer` arguments.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, l2=0.0,
                 name="torch_sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=float(momentum),
                         nesterov=nesterov, name=name, **kwargs)
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got l2={l2!r}.")
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.l2:
            gradient = ops.add(gradient, ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        direction = gradient
        if self.momentum:
            mu = ops.cast(self.momentum, variable.dtype)
            buffer = self.momentums[self._get_variable_index(variable)]
            self.assign(buffer, ops.add(ops.multiply(buffer, mu), gradient))
            direction = (ops.add(gradient, ops.multiply(buffer, mu)) if self.nesterov
                         else buffer)
        self.assign_sub(variable, ops.multiply(direction, learning_rate))

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


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
