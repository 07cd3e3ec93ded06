"""Warnings attributed to the user's line (floor 1: imports nothing from keras_dst).

keras_dst warns from inside Keras's callbacks, its own checks and TensorFlow's
function tracing, where a fixed ``stacklevel`` points at a library frame (Keras's
callback list, a keras_dst helper). `warn` points at the first frame outside
keras_dst, Keras and TensorFlow: the user's ``model.fit(...)``, ``prunable(...)``
or ``load_model(...)`` line, which the warnings filters' ``module`` and
``lineno`` then match, and which the message is shown with.
"""

import sys
import warnings
from typing import Type

# top-level packages whose frames are skipped (the Keras libraries whose models override
# `fit`, such as keras-hub's tasks, included)
_LIBRARIES = frozenset({"keras_dst", "keras", "tensorflow", "tf_keras", "optree", "absl",
                        "keras_hub", "keras_nlp", "keras_cv", "keras_rs"})


def warn(message: str, category: Type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` at the first frame outside the libraries (the
    caller's frame where every frame is inside them)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and \
            frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
