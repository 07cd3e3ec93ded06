"""tf.data input pipelines with the splits and preprocessing of the study (Nowak et al.,
"Fantastic Weights and How to Find Them", NeurIPS 2023, arXiv:2306.12230).

`load(name, batch_size, ...)` returns ``(train_ds, val_ds, test_ds, info)``; `info`
is a dict with ``input_shape``, ``num_classes``, ``binary`` (single-logit task),
``train_size``, ``val_size``, ``test_size`` and ``steps_per_epoch``.

Datasets:

* ``digits`` (default, offline): scikit-learn's bundled 8x8 digits (1797 images,
  10 classes); fixed stratified split 1257 / 180 / 360 (seed 0, whatever the run
  seed); standardised with the training mean and std.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagenet2012``: TFDS
  (needs the data downloaded or a network; ``--data_dir`` is TFDS's data_dir).
  Fixed index splits: CIFAR-10 first 45 000 train / last 5 000 val, (Fashion-)MNIST
  54 000 / 6 000; CIFAR-100 and ImageNet use the test (validation) set as the
  validation set, as the reference does.
* ``higgs``: OpenML task 361069, stratified 70 / 15 / 15 split (random_state 42),
  raw features. Read from ``<data_dir>/higgs.npz`` (arrays ``x``, ``y``) when it
  exists, else downloaded with the ``openml`` package (network) and cached there.

Training data is cached (before augmentation), reshuffled every epoch, augmented,
batched with the last partial batch kept (steps per epoch = ceil(N / batch)) and
prefetched.
"""

import functools
import math
import os

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name: (tfds splits train/val/test, mean, std, augmentation)
TFDS = {
    "mnist": (("train[:54000]", "train[54000:]", "test"), (0.1307,), (0.3081,), None),
    "fashion_mnist": (("train[:54000]", "train[54000:]", "test"), (0.5,), (0.5,), None),
    "cifar10": (("train[:45000]", "train[45000:]", "test"),
                (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "reflect"),
    "cifar100": (("train", "test", "test"),
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "constant"),
    "imagenet2012": (("train", "validation", "validation"), IMAGENET_MEAN, IMAGENET_STD,
                     "imagenet"),
}
HIGGS_TASK_ID = 361069


class DataUnavailableError(RuntimeError):
    """The dataset is neither on disk nor downloadable (e.g. no network)."""


def dataset_names():
    """Names accepted by `load`."""
    return ("digits", "higgs") + tuple(TFDS)


def load(name, batch_size, data_dir=None, seed=0, cache=True, drop_remainder=False):
    """Builds the train / validation / test pipelines of dataset `name`.

    Args:
      name: one of `dataset_names()`.
      batch_size: global batch size (train and evaluation).
      data_dir: TFDS data_dir / where ``higgs.npz`` lives (None: defaults).
      seed: shuffle and augmentation seed.
      cache: cache decoded examples in memory (not for ImageNet).
      drop_remainder: drop the last partial batch (needed on TPUs).

    Raises:
      ValueError: unknown name.
    """
    if name not in dataset_names():
        raise ValueError(f"unknown dataset '{name}'; choose one of {', '.join(dataset_names())}.")
    if name in TFDS:
        splits, info = _tfds_splits(name, data_dir)
        cache = cache and name != "imagenet2012"
    else:
        arrays = _digits() if name == "digits" else _higgs(data_dir)
        splits = [tf.data.Dataset.from_tensor_slices(a) for a in arrays]
        info = {"input_shape": tuple(arrays[0][0].shape[1:]),
                "num_classes": 2 if name == "higgs" else 10, "binary": name == "higgs"}
    train_pre, eval_pre = _preprocessors(name)
    sizes = [int(ds.cardinality()) for ds in splits]
    train, val, test = (
        _pipeline(ds, batch_size, pre, training, seed, cache, drop_remainder)
        for ds, pre, training in zip(splits, (train_pre, eval_pre, eval_pre), (True, False, False)))
    info.update(name=name, train_size=sizes[0], val_size=sizes[1], test_size=sizes[2],
                steps_per_epoch=steps_per_epoch(sizes[0], batch_size, drop_remainder))
    return train, val, test, info


def steps_per_epoch(train_size, batch_size, drop_remainder=False):
    """Batches per epoch of `train_size` examples (at least 1)."""
    steps = train_size // batch_size if drop_remainder else math.ceil(train_size / batch_size)
    return max(steps, 1)


@functools.lru_cache(maxsize=None)
def train_size(name, data_dir=None):
    """The number of training examples of dataset `name` where it is known without a
    download: always for digits, for higgs once its file is on disk, for a TFDS dataset
    once prepared in `data_dir`; else None. Remembered per (name, data_dir): a sweep
    asks it of every run."""
    if name == "digits":
        return len(_digits()[0][0])
    if name == "higgs":
        return len(_higgs(data_dir)[0][0]) if os.path.exists(_higgs_path(data_dir)) else None
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            return None
        return builder.info.splits[TFDS[name][0][0]].num_examples
    except Exception:  # (tfds raises many types; the run itself then names the problem)
        return None


def _pipeline(ds, batch_size, preprocess, training, seed, cache, drop_remainder):
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(max(int(ds.cardinality()), 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)


# -- sources -------------------------------------------------------------------------

def _tfds_splits(name, data_dir):
    import tensorflow_datasets as tfds

    try:
        splits, tfds_info = tfds.load(name, split=list(TFDS[name][0]), data_dir=data_dir,
                                      as_supervised=True, with_info=True)
    except Exception as e:  # tfds raises many types (download, missing manual data, ...)
        raise DataUnavailableError(
            f"cannot load TFDS dataset '{name}' (data_dir={data_dir}): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} -- download/prepare it first "
            "(network needed) or pass --data_dir") from e
    shape = tuple(tfds_info.features["image"].shape)
    if name == "imagenet2012":
        shape = (224, 224, 3)
    return splits, {"input_shape": shape, "binary": False,
                    "num_classes": tfds_info.features["label"].num_classes}


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype("float32").reshape(-1, 8, 8, 1)
    y = y.astype("int64")
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=360, random_state=0,
                                                      stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=180,
                                                      random_state=0, stratify=y_rest)
    mean, std = x_train.mean(), x_train.std()
    return [((a - mean) / std, b) for a, b in ((x_train, y_train), (x_val, y_val),
                                               (x_test, y_test))]


def _higgs_path(data_dir):
    return os.path.join(data_dir or os.path.expanduser("~/.keras/datasets"), "higgs.npz")


def _higgs(data_dir):
    from sklearn.model_selection import train_test_split

    path = _higgs_path(data_dir)
    if not os.path.exists(path):
        try:
            import openml
        except ImportError as e:
            raise DataUnavailableError(
                f"higgs: {path} not found and the `openml` package is not installed "
                "(pip install openml; needs a network)") from e
        try:
            dataset = openml.tasks.get_task(HIGGS_TASK_ID).get_dataset()
            x, y, _, _ = dataset.get_data(dataset_format="dataframe",
                                          target=dataset.default_target_attribute)
        except Exception as e:  # network errors of every kind
            raise DataUnavailableError(f"higgs: cannot download OpenML task {HIGGS_TASK_ID}: "
                                       f"{type(e).__name__}: {e}") from e
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, x=x.to_numpy("float32"), y=y.to_numpy().astype("int64"))
    with np.load(path) as f:
        x, y = f["x"].astype("float32"), f["y"].astype("int64")
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.3, random_state=42,
                                                        stratify=y)
    x_test, x_val, y_test, y_val = train_test_split(x_rest, y_rest, test_size=0.5,
                                                    random_state=42, stratify=y_rest)
    column = lambda a: a.astype("float32")[:, None]  # noqa: E731  (one logit, BCE)
    return [(x_train, column(y_train)), (x_val, column(y_val)), (x_test, column(y_test))]


# -- preprocessing -------------------------------------------------------------------

def _preprocessors(name):
    """(train_fn, eval_fn), each mapping one (x, y) example."""
    if name not in TFDS:
        identity = lambda x, y: (x, y)  # noqa: E731  (already standardised / raw)
        return identity, identity
    _, mean, std, augment = TFDS[name]
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)

    def normalise(image):
        return (tf.cast(image, tf.float32) / 255.0 - mean) / std

    if augment == "imagenet":
        return (lambda x, y: (normalise(_random_resized_crop(x)), y),
                lambda x, y: (normalise(_center_crop(x)), y))
    if augment is None:
        plain = lambda x, y: (normalise(x), y)  # noqa: E731
        return plain, plain

    def train_fn(image, label):
        shape = tf.shape(image)
        padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode=augment.upper())
        image = tf.image.random_crop(padded, shape)
        return normalise(tf.image.random_flip_left_right(image)), label

    return train_fn, lambda x, y: (normalise(x), y)


def _random_resized_crop(image, size=224):
    """torchvision's RandomResizedCrop(224) + horizontal flip."""
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop)
    image = tf.image.resize(image, (size, size))
    return tf.image.random_flip_left_right(image)


def _center_crop(image, size=224, resize=256):
    """Resize the shorter side to 256, then a central 224x224 crop."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
    return tf.image.resize_with_crop_or_pad(image, size, size)
