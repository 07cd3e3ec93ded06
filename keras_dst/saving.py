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

`load_model` loads a `.keras` file whose masks were attached in place to the layers
of a subclassed or library model (see `keras_dst.prunable`): Keras rebuilds such a
model from its own class, which knows nothing of the masks, so Keras's loader
refuses the file (the layers' entries hold more than the layers expect) and
`load_model` attaches the masks before the weights are read.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from typing import Optional, Union

import h5py
import keras

from keras_dst import compat
from keras_dst import layers as sparse_layers
from keras_dst.masks import guard_weight_io
from keras_dst.validation import check_bool, check_choice, check_path, errors_named


def save_model(model: "keras.Model", filepath: Union[str, os.PathLike], overwrite: bool = True) -> None:
    """Saves `model` to the `.keras` file `filepath` atomically.

    The result is exactly ``model.save(filepath)`` (masks, weights, optimizer
    state, config); only the way the file is written differs.

    Args:
      model: a `keras.Model`.
      filepath: local path ending in ``.keras`` (str or path-like); its directory
        is created if needed. Remote paths (``gs://...``) are saved with
        ``model.save`` (not atomic).
      overwrite: replace an existing file (default); False raises
        `FileExistsError` if `filepath` exists.

    Raises:
      TypeError: `model` is not a Keras model, `filepath` not a path, `overwrite` not a bool.
      ValueError: `filepath` does not end in ``.keras``.
      FileExistsError: `filepath` exists and `overwrite` is False.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"save_model() needs a keras Model, got {type(model).__name__}.")
    with errors_named("save_model()"):
        filepath = check_path(filepath, "filepath")
        overwrite = check_bool(overwrite, "overwrite")
    if not str(filepath).endswith(".keras"):
        raise ValueError(f"save_model() writes the .keras format; the path must end in "
                         f"'.keras', got filepath={filepath!r}.")
    if "://" in str(filepath):
        model.save(filepath, overwrite=overwrite)
        return
    if not overwrite and os.path.exists(filepath):
        raise FileExistsError(f"save_model(): {filepath!r} exists and overwrite=False.")
    directory = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(directory, exist_ok=True)
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


_ARCHIVE_WEIGHTS = "model.weights.h5"  # the weights member of a `.keras` archive (Keras 3)


def load_model(filepath: Union[str, os.PathLike], custom_objects: Optional[dict] = None,
               compile: bool = True, safe_mode: bool = True) -> "keras.Model":
    """Loads a `.keras` file saved from a keras_dst model of any kind, masks included.

    ``keras.models.load_model`` loads Sequential and functional models made with
    `prunable` (their masks live in `SparseWrapper` layers, which Keras rebuilds
    from the file, with ``import keras_dst``). A subclassed or library model (e.g.
    keras-hub's) has its masks attached to its own layers; Keras rebuilds it from its
    own class, which has no masks, so ``keras.models.load_model`` refuses its file
    ("A total of N objects could not be loaded ... Layer 'query' expected 2
    variables, but received ..."): load it here. Files without attached masks
    (a wrapper model, a dense model) load exactly as with Keras.

    Keras loads the model (its class, config, weights, optimizer state, assets) from
    a copy of the file without keras_dst's entries; then the masks are attached to
    the layers whose entries hold them and the weights are read again, masks first
    (so the guarantees of a load hold: masked entries are 0, a file with non-zeros
    there warns).

    Args:
      filepath: a local `.keras` file, or the directory that ``model.save(path,
        zipped=False)`` writes (str or path-like). Anything else (a remote or
        ``hf://`` path, a legacy `.h5` file) is Keras's to load, without attached
        masks.
      custom_objects, compile, safe_mode: as ``keras.models.load_model`` (safe mode
        stays on by default: nothing but configs and arrays is read).

    Returns:
      The model, with its masks, ever-active flags and running scores.

    Raises:
      TypeError: `filepath` is not a path, `compile` or `safe_mode` not a bool.
      ValueError: the file's masks do not fit the rebuilt model (its layers changed).
    """
    with errors_named("keras_dst.load_model()"):
        filepath = check_path(filepath, "filepath")
        compile, safe_mode = check_bool(compile, "compile"), check_bool(safe_mode, "safe_mode")
    options = dict(custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
    with tempfile.TemporaryDirectory(prefix="keras_dst_load_") as tmp:
        copied = _copy_without_attached_entries(filepath, tmp)
        if copied is None:  # (no attached state: a model of wrappers, or no keras_dst one)
            model = keras.models.load_model(filepath, **options)
            guard_weight_io(model)  # (set_weights / load_weights all or nothing)
            return model
        copy, weights, saved = copied
        model = keras.models.load_model(copy, **options)
        with sparse_layers.attaching_saved_masks(model) as attached:
            model.load_weights(weights)
    if len(attached) != len(saved):
        found = {state.label for state in attached}
        raise ValueError(
            f"keras_dst.load_model({filepath!r}): the file holds masks for {len(saved)} layers, "
            f"the rebuilt model '{model.name}' took them for {len(attached)}; not found: "
            f"{sorted(set(saved) - found)}: the rebuilt model lacks these layers where the "
            "file has them (its code changed since it was saved, or it creates them outside "
            "__init__, in build() or call(), where Keras's load does not match them to the "
            "file: Keras itself leaves their weights as initialised).")
    guard_weight_io(model)
    return model


def _copy_without_attached_entries(filepath: str, tmp: str):
    """Copies the saved model `filepath` (a `.keras` archive, or the directory of
    ``model.save(path, zipped=False)``) into `tmp` without keras_dst's entries.

    Returns ``(copy, weights, saved)``: the copy's path (Keras rebuilds the model from
    it), the path of a copy of the original weights file (entries kept: read once the
    masks are attached), and the labels of the layers whose entries held masks. None
    where there is nothing to remove: no attached masks, or a path that is neither a
    local archive nor such a directory (Keras's loader takes it as it is).
    """
    weights = os.path.join(tmp, _ARCHIVE_WEIGHTS)
    if os.path.isdir(filepath) and os.path.exists(os.path.join(filepath, _ARCHIVE_WEIGHTS)):
        copy = os.path.join(tmp, "model")
        shutil.copytree(filepath, copy)
        shutil.copyfile(os.path.join(copy, _ARCHIVE_WEIGHTS), weights)
        saved = _remove_attached_entries(os.path.join(copy, _ARCHIVE_WEIGHTS))
        return (copy, weights, saved) if saved else None
    if not (os.path.isfile(filepath) and zipfile.is_zipfile(filepath)):
        return None
    with zipfile.ZipFile(filepath) as archive:
        if _ARCHIVE_WEIGHTS not in archive.namelist():
            return None
        with archive.open(_ARCHIVE_WEIGHTS) as src, open(weights, "wb") as dst:
            shutil.copyfileobj(src, dst)
        stripped = os.path.join(tmp, "stripped.weights.h5")
        shutil.copyfile(weights, stripped)
        saved = _remove_attached_entries(stripped)
        if not saved:
            return None
        copy = os.path.join(tmp, "model.keras")
        with zipfile.ZipFile(copy, "w") as out:
            for info in archive.infolist():
                if info.filename == _ARCHIVE_WEIGHTS:
                    out.write(stripped, _ARCHIVE_WEIGHTS, compress_type=info.compress_type)
                else:
                    out.writestr(info, archive.read(info.filename))
    return copy, weights, saved


def _remove_attached_entries(path) -> list:
    """Deletes keras_dst's entries (attached masks) from a Keras weights file; returns the
    labels of the layers whose entries held them."""
    found = []
    with h5py.File(path, "r+") as f:
        groups = []
        f.visititems(lambda name, obj: groups.append(obj) if isinstance(obj, h5py.Group)
                     and sparse_layers.holds_state(obj) else None)
        for group in groups:
            config = sparse_layers.read_store_config(group)
            found.append(config.get("layer", group.name))
            for key in [k for k in group.keys() if sparse_layers.is_state_entry(k)]:
                del group[key]
    return found


_LATEST = "latest"
_WEIGHTS = "model.weights.h5"
_META = "training_metadata.json"
# what BackupAndRestore writes in its directory: backups, the pointer, their temporaries
_OWN_ENTRY = re.compile(r"(epoch-[0-9]+|latest|\.(epoch-[0-9]+|latest)\.[0-9]+\.tmp)")


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

    It restores the backup in ``on_train_begin``: list it after the keras_dst callbacks
    (either order resumes exactly), so that a fit they refuse at its start (two
    callbacks that change masks, say) raises before the backup overwrites the model.

    Args:
      backup_dir: local directory of the backups (created if needed).
      save_freq: ``"epoch"``, the only setting (taken for Keras's signature): a backup
        inside an epoch resumes inexactly, since Keras restarts that epoch from its
        first batch.
      delete_checkpoint: remove the backups when `fit` ends normally (and `backup_dir`
        if nothing else is in it). The callback removes only what it wrote there: other
        files in `backup_dir` (a `ModelCheckpoint`'s, a log) stay.
    """

    def __init__(self, backup_dir: Union[str, os.PathLike], save_freq: str = "epoch",
                 delete_checkpoint: bool = True):
        super().__init__()
        with errors_named("BackupAndRestore"):
            path = check_path(backup_dir, "backup_dir")
            delete_checkpoint = check_bool(delete_checkpoint, "delete_checkpoint")
        if not path:
            raise ValueError(f"BackupAndRestore needs a directory path, got "
                             f"backup_dir={backup_dir!r}.")
        if isinstance(save_freq, bool):  # (delete_checkpoint, second before save_freq came)
            raise TypeError(f"BackupAndRestore: save_freq={save_freq!r}; delete_checkpoint is "
                            "the third argument: pass it by name (delete_checkpoint=...).")
        if not isinstance(save_freq, str):
            raise ValueError(
                f"keras_dst.BackupAndRestore saves at epoch ends only (save_freq='epoch'), got "
                f"save_freq={save_freq!r}: Keras resumes a backup made inside an epoch from "
                "that epoch's first batch, so the resumed run would not be the one it "
                "interrupted. Use shorter epochs (fit's steps_per_epoch) for finer backups.")
        check_choice(save_freq, ("epoch",), "save_freq")
        self.backup_dir = path
        self.delete_checkpoint = delete_checkpoint

    def latest(self) -> Optional[str]:
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
        self._remove_own_entries(keep=(name, _LATEST))

    def _remove_own_entries(self, keep=()):
        """Removes what this callback writes in `backup_dir` (its ``epoch-N`` backups,
        ``latest`` and the temporary entries of killed runs), except `keep`; other files
        there (a `ModelCheckpoint`'s, a log) stay."""
        for entry in os.listdir(self.backup_dir):
            if entry not in keep and _OWN_ENTRY.fullmatch(entry):
                target = os.path.join(self.backup_dir, entry)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):  # (another worker's removal)
                        os.remove(target)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.isdir(self.backup_dir):
            self._remove_own_entries()
            # the folder too if nothing else is in it (not a link to one; never an error:
            # another worker may have removed it, its parent may be read-only)
            if not os.path.islink(self.backup_dir):
                with contextlib.suppress(OSError):
                    os.rmdir(self.backup_dir)

    def get_config(self):
        return {"backup_dir": self.backup_dir, "save_freq": "epoch",
                "delete_checkpoint": self.delete_checkpoint}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


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
