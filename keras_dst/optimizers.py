"""`TorchSGD`: PyTorch's SGD in Keras, the optimizer of the reference recipe.

The reference code of "Fantastic Weights and How to Find Them" (Nowak et al.,
NeurIPS 2023, arXiv:2306.12230; github.com/alooow/fantastic_weights_paper,
``main.py:get_optimizer``) trains with ``torch.optim.SGD(params, lr,
momentum=0.9, weight_decay=l2, nesterov=True)``. Keras' `keras.optimizers.SGD`
differs from it in two ways that matter for DST:

* its velocity is ``v <- mu v - lr g`` (scaled by the learning rate), PyTorch's
  buffer is ``b <- mu b + g`` and the learning rate multiplies it only in the
  update. After a learning-rate drop the two give different steps, and momentum
  growth (which ranks entries by the buffer) ranks differently;
* its ``weight_decay`` is decoupled (``w <- w - lr wd w`` beside the update),
  PyTorch's is coupled L2: ``wd w`` is added to the gradient *before* the
  momentum buffer.

`TorchSGD` implements torch.optim.SGD's update (dampening 0, as the reference;
https://pytorch.org/docs/stable/generated/torch.optim.SGD.html):

    g' = g + l2 w
    b  <- mu b + g'                        (b = g' at the first step: b starts at 0)
    w  <- w - lr (g' + mu b)   (Nesterov)   or   w - lr b

The decay is added inside the update, so the gradients keras_dst's criteria and
gradient growth see (those passed to ``optimizer.apply``) are the raw loss
gradients, as in the reference. Importing keras_dst registers the class, so a
model saved with it loads with ``import keras_dst`` and
``keras.models.load_model`` alone.
"""

from typing import Any

import keras
from keras import ops

from keras_dst import compat, validation


@keras.saving.register_keras_serializable(package="keras_dst")
class TorchSGD(keras.optimizers.SGD):
    """SGD with PyTorch's semantics: momentum buffer of raw gradients, coupled L2 decay.

    Args:
      learning_rate: float or a `keras.optimizers.schedules.LearningRateSchedule`.
      momentum: float in [0, 1].
      nesterov: bool; True needs a momentum > 0 (as ``torch.optim.SGD``).
      l2: coupled weight decay coefficient (PyTorch's ``weight_decay``), a finite real >= 0;
        applied to every variable the optimizer updates (kernels, biases, BN).
      name: optimizer name.
      **kwargs: other `keras.optimizers.Optimizer` arguments. Keras' own
        ``weight_decay`` (decoupled) still works, on top of `l2`.
    """

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 l2: float = 0.0, name: str = "torch_sgd", **kwargs: Any):
        l2 = validation.check_nonnegative_real(l2, "l2")
        momentum = validation.check_density(momentum, "momentum", allow_zero=True)
        nesterov = validation.check_bool(nesterov, "nesterov")
        if nesterov and momentum == 0:  # as torch.optim.SGD
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0.0; pass "
                             "nesterov=False or a momentum.")
        super().__init__(learning_rate=learning_rate, momentum=momentum,
                         nesterov=nesterov, name=name, **kwargs)
        self.l2 = l2

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if self.l2:
            gradient = ops.add(gradient, ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        direction = gradient
        if self.momentum:
            mu = ops.cast(self.momentum, variable.dtype)
            buffer = self.momentums[compat.optimizer_variable_index(self, variable)]
            self.assign(buffer, ops.add(ops.multiply(buffer, mu), gradient))
            direction = (ops.add(gradient, ops.multiply(buffer, mu)) if self.nesterov
                         else buffer)
        self.assign_sub(variable, ops.multiply(direction, learning_rate))

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


# Files saved before TorchSGD moved here (from examples/optim.py) name it
# "keras_dst_examples>TorchSGD"; they load as this class. Saving uses "keras_dst>TorchSGD".
keras.saving.get_custom_objects()["keras_dst_examples>TorchSGD"] = TorchSGD
