"""Crash-safe saving: `save_model` writes a `.keras` file atomically.

Keras' ``model.save(path)`` opens `path` for writing and fills it in place, so
a crash (or a full disk, or a kill) in the middle of a save destroys the
previous file and leaves a truncated archive. `save_model` writes the archive
to a temporary file in the same directory, flushes it to disk and then
renames it over `path` (``os.replace``, atomic on POSIX and Windows): `path`
always holds either the previous complete file or the new complete one.
"""

import os
import tempfile

import keras


def save_model(model, filepath, overwrite=True):
    """Saves `model` to the `.keras` file `filepath` atomically.

    The result is exactly ``model.save(filepath)`` (masks, weights, optimizer
    state, config); only the way the file is written differs.

    Args:
      model: a `keras.Model`.
      filepath: local path ending in ``.keras`` (str or path-like). Remote
        paths (``gs://...``) are saved with ``model.save`` (not atomic).
      overwrite: replace an existing file (default); False raises
        `FileExistsError` if `filepath` exists.

    Raises:
      TypeError: `model` is not a Keras model.
      ValueError: `filepath` does not end in ``.keras``.
      FileExistsError: `filepath` exists and `overwrite` is False.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"save_model() needs a keras Model, got {type(model).__name__}.")
    filepath = os.fspath(filepath)
    if not str(filepath).endswith(".keras"):
        raise ValueError(f"save_model() writes the .keras format; the path must end in "
                         f"'.keras', got filepath={filepath!r}.")
    if "://" in str(filepath):
        model.save(filepath, overwrite=overwrite)
        return
    if not overwrite and os.path.exists(filepath):
        raise FileExistsError(f"save_model(): {filepath!r} exists and overwrite=False.")
    directory = os.path.dirname(os.path.abspath(filepath))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(filepath) + ".",
                               suffix=".tmp.keras", dir=directory)
    os.close(fd)
    try:
        model.save(tmp, overwrite=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    """Makes the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
