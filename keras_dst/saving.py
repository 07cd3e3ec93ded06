"""Crash-safe saving: `save_model` and `BackupAndRestore` survive a kill at any moment.

`save_model` writes a `.keras` file atomically. Keras' ``model.save(path)``
opens `path` for writing and fills it in place, so a crash (or a full disk, or
a kill) in the middle of a save destroys the previous file and leaves a
truncated archive. `save_model` writes the archive
to a temporary file in the same directory, flushes it to disk and then
renames it over `path` (``os.replace``, atomic on POSIX and Windows): `path`
always holds either the previous complete file or the new complete one.

`BackupAndRestore` backs up a training run at every epoch end. Keras's
``keras.callbacks.BackupAndRestore`` overwrites its weights file in place and
then writes the epoch number to a second file. A process killed during the
first write leaves a truncated weights file, which the next run cannot read; one
killed between the two writes resumes the wrong epoch with the next epoch's
weights, so the run is no longer the uninterrupted one. `examples/kill_resume.py`
shows both with real ``SIGKILL``s.

keras_dst's writes each backup (weights, optimizer state, masks and the epoch)
into a fresh directory, flushes it to disk, renames the directory into place and
only then points the ``latest`` file at it (``os.replace``, atomic on POSIX and
Windows). A reader follows ``latest`` and so only ever sees a complete backup:
the previous one or the new one.
"""

import json
import os
import shutil
import tempfile

import keras

from keras_dst import compat


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
        _fsync(tmp)
        os.replace(tmp, filepath)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync(directory)


_LATEST = "latest"
_WEIGHTS = "model.weights.h5"
_META = "training_metadata.json"


@keras.saving.register_keras_serializable(package="keras_dst")
class BackupAndRestore(keras.callbacks.Callback):
    """Backs up the training state at every epoch end; a restarted `fit` resumes it.

    A drop-in for ``keras.callbacks.BackupAndRestore(backup_dir,
    save_freq="epoch")`` (the setting under which a resumed run is bit-identical
    to an uninterrupted one on CPU) whose backup stays readable whatever moment
    the process is killed at. Under a multi-worker strategy the chief writes
    the backup (the others save to a scratch directory, so that every worker
    does the same reads) and every restarted worker restores it, so give all
    workers the same `backup_dir` on a shared file system.

    Args:
      backup_dir: local directory of the backups (created if needed).
      delete_checkpoint: remove `backup_dir` when `fit` ends normally.
    """

    def __init__(self, backup_dir, delete_checkpoint=True):
        super().__init__()
        if not isinstance(backup_dir, (str, os.PathLike)) or not os.fspath(backup_dir):
            raise ValueError(f"BackupAndRestore needs a directory path, got "
                             f"backup_dir={backup_dir!r}.")
        if not isinstance(delete_checkpoint, bool):
            raise TypeError(f"delete_checkpoint must be a bool, got "
                            f"delete_checkpoint={delete_checkpoint!r}.")
        self.backup_dir = os.fspath(backup_dir)
        self.delete_checkpoint = delete_checkpoint

    def latest(self):
        """Path of the newest complete backup, or None."""
        try:
            with open(os.path.join(self.backup_dir, _LATEST)) as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        return os.path.join(self.backup_dir, name)

    def on_train_begin(self, logs=None):
        path = self.latest()
        if path is None:
            return
        if not self.model.built:
            raise ValueError(f"BackupAndRestore: build model '{self.model.name}' before fit() "
                             "so that its backup can be restored.")
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(path, _WEIGHTS))
        with open(os.path.join(path, _META)) as f:
            epoch = int(json.load(f)["epoch"])
        compat.set_initial_epoch(self.model, epoch)

    def on_epoch_end(self, epoch, logs=None):
        if self.model.distribute_strategy.extended.should_checkpoint:
            self._save(epoch + 1)
        else:  # a non-chief worker of a multi-worker strategy: the same reads, no file
            scratch = tempfile.mkdtemp(prefix="keras_dst_backup_")
            try:
                self.model.save_weights(os.path.join(scratch, _WEIGHTS))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    def _save(self, epoch):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch-{epoch}"
        final = os.path.join(self.backup_dir, name)
        tmp = os.path.join(self.backup_dir, f".{name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.model.save_weights(os.path.join(tmp, _WEIGHTS))
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump({"epoch": epoch}, f)
        for file in (_WEIGHTS, _META):
            _fsync(os.path.join(tmp, file))
        _fsync(tmp)
        if os.path.exists(final):  # an earlier run reached this epoch: not the latest
            if self.latest() == final:  # ... unless it is: keep it, it is complete
                shutil.rmtree(tmp)
                return
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = os.path.join(self.backup_dir, f".{_LATEST}.{os.getpid()}.tmp")
        with open(pointer, "w") as f:
            f.write(name)
        _fsync(pointer)
        os.replace(pointer, os.path.join(self.backup_dir, _LATEST))
        _fsync(self.backup_dir)
        for entry in os.listdir(self.backup_dir):  # older backups, debris of killed runs
            if entry not in (name, _LATEST):
                target = os.path.join(self.backup_dir, entry)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint:
            shutil.rmtree(self.backup_dir, ignore_errors=True)

    def get_config(self):
        return {"backup_dir": self.backup_dir, "delete_checkpoint": self.delete_checkpoint}


def _fsync(path):
    """Flushes a file or a directory to disk (directories: a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
