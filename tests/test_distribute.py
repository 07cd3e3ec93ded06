"""DST under tf.distribute: MirroredStrategy and MultiWorkerMirroredStrategy.

Logical devices must be configured before TensorFlow initialises its devices,
so every scenario runs in a fresh subprocess: this file is also the worker
script (``python tests/test_distribute.py mirrored|worker ...``), which prints
one JSON line that the tests check.

jit_compile: these runs use jit_compile=False. Keras compiles the whole
replicated step (``strategy.run`` included) into one XLA function, and XLA
cannot place variables of several CPU devices in one cluster ("Trying to access
resource ... located in device CPU:1 from device CPU:0"); a plain Keras model
without keras_dst fails the same way, so it is a Keras/XLA limit, not ours.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {  # name -> DynamicSparseTraining kwargs (one per ordering / criterion family)
    "magnitude_gradient": dict(prune="magnitude", grow="gradient"),  # ordering "after_optimizer"
    "snip_random": dict(prune="snip", grow="random"),  # ordering "before_optimizer"
    "running_snip_gradient": dict(prune="running_snip", grow="gradient"),  # per-step EMA
}


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _run(args, timeout, **env):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def mirrored_result():
    """One subprocess run of every configuration; its tests are in one `xdist_group`
    so that under pytest-xdist's ``--dist loadgroup`` it runs once."""
    return _run(["mirrored"], timeout=600)


@pytest.mark.xdist_group("mirrored")
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_mirrored_replicas_agree_after_every_update(mirrored_result, config):
    r = mirrored_result[config]
    assert r["replicas"] == 2
    assert r["updates_checked"] >= 3  # masks compared on both replicas after each update
    assert r["replica_mismatches"] == [], r["replica_mismatches"]
    assert r["churn"] > 0  # the topology really changed
    assert r["invariant_errors"] == []


@pytest.mark.xdist_group("mirrored")
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_mirrored_matches_one_replica_with_same_global_batch(mirrored_result, config):
    r = mirrored_result[config]
    assert r["mask_diff_vs_single"] == 0
    assert r["counts"] == r["counts_single"]
    assert r["max_weight_diff_vs_single"] < 1e-5
    assert r["iterations"] == r["iterations_single"]


@pytest.mark.xdist_group("mirrored")
def test_mirrored_checkpoint_restores_the_masks_on_every_replica(mirrored_result):
    r = mirrored_result["checkpoint"]
    assert r["masks_differed_before"]
    assert r["replicas_equal_saved"] and all(r["replicas_equal_saved"].values()), r


@pytest.mark.xdist_group("mirrored")
def test_masks_attached_outside_the_scope_are_made_in_the_strategy_of_the_weights(mirrored_result):
    # a subclassed model built in the scope, made prunable outside it: its masks are
    # per-replica as its weights are (they were single-device variables every replica read)
    r = mirrored_result["attached_outside"]
    assert r["mask_copies"] and all(n == 2 for n in r["mask_copies"].values()), r
    assert r["churn"] > 0 and r["replicas_equal"], r


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_job(tmp_path, tag, backup_dir=None, epochs=3):
    """Two local MultiWorkerMirroredStrategy workers (fresh ports), with a
    keras_dst.BackupAndRestore in `backup_dir` if given; (procs, result paths)."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs, outs = [], []
    for index in range(2):
        out = tmp_path / f"{tag}_worker{index}.json"
        outs.append(out)
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "worker", str(out), str(epochs),
             *([str(backup_dir)] if backup_dir else [])],
            env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    return procs, outs


def _finish(procs, timeout=300):
    """Waits for the workers; (errors of those that failed, stdout of each)."""
    errors, outputs = [], []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outputs.append(out)
            if p.returncode != 0:
                errors.append(err[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return errors, outputs


@pytest.mark.slow
def test_multi_worker_mirrored_two_local_workers_agree(tmp_path):
    procs, outs = _start_job(tmp_path, "job")
    errors, _ = _finish(procs)
    assert not errors, errors
    a, b = (json.loads(o.read_text()) for o in outs)
    assert a["num_replicas"] == b["num_replicas"] == 2
    assert a["churn"] > 0
    assert a["masks"] == b["masks"]  # both workers hold the same topology
    assert a["counts"] == b["counts"] == a["initial_counts"]  # exact per-layer counts
    assert a["weights_sha"] == b["weights_sha"]
    assert a["invariant_errors"] == b["invariant_errors"] == []
    # and the same topology as one process training on the same global batches
    single = _run(["single", "magnitude_gradient"], timeout=300)
    assert a["masks"] == single["masks"]
    assert a["counts"] == single["counts"]


@pytest.mark.slow
def test_multi_worker_job_resumes_after_a_worker_is_killed(tmp_path):
    """Worker 1 is SIGKILLed in epoch 3 of 6; the job is restarted as a whole (what a
    cluster manager does under Keras's fault tolerance) and resumes from the chief's
    keras_dst.BackupAndRestore backup: both workers end with the same masks, equal to
    those of an uninterrupted job, and bit-identical weights."""
    epochs = 6
    procs, ref_outs = _start_job(tmp_path, "reference", tmp_path / "reference_backup", epochs)
    assert _finish(procs)[0] == []
    procs, outs = _start_job(tmp_path, "killed", tmp_path / "backup", epochs)
    try:
        for line in procs[1].stdout:
            if line.strip() == "epoch 3":
                procs[1].send_signal(signal.SIGKILL)
                break
        procs[1].wait(timeout=60)
        assert procs[1].returncode == -signal.SIGKILL
        try:  # the survivor fails or waits on its dead peer's collectives
            procs[0].wait(timeout=20)
        except subprocess.TimeoutExpired:
            procs[0].kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert not outs[0].exists() and not outs[1].exists()  # the job did not finish
    procs, outs = _start_job(tmp_path, "restarted", tmp_path / "backup", epochs)
    errors, stdouts = _finish(procs)
    assert errors == []
    for out in stdouts:  # both resumed from the chief's last backup (after epoch 2, or 3
        # if the chief finished that write before worker 1 died), not from scratch
        epochs_run = [int(x.split()[1]) for x in out.splitlines() if x.startswith("epoch ")]
        assert epochs_run and epochs_run[0] in (2, 3), epochs_run
        assert epochs_run == list(range(epochs_run[0], epochs)), epochs_run
    (a, b), (ref, _) = [[json.loads(o.read_text()) for o in pair] for pair in (outs, ref_outs)]
    assert a["masks"] == b["masks"] == ref["masks"]
    assert a["weights_sha"] == b["weights_sha"] == ref["weights_sha"]
    assert a["counts"] == a["initial_counts"] and a["invariant_errors"] == []


# ----------------------------------------------------------------------------
# Worker side (runs in the subprocess).


def _setup_devices(n):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def _train(strategy, config, check_replicas, dataset=False, epochs=3, callbacks=()):
    """Trains a small sparse MLP with DST under `strategy`; returns a result dict."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_dst

    from conftest import classification_data, mlp

    x, y = classification_data(n=256)
    kwargs = dict(CONFIGS[config])
    track = keras_dst.get_criterion(kwargs["prune"]).ema
    with strategy.scope():
        model = keras_dst.prunable(mlp(), density=0.3, seed=1, track_running_scores=track)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
    initial = {k: int(v.sum()) for k, v in keras_dst.masks(model).items()}
    first = keras_dst.masks(model)

    class Check(keras.callbacks.Callback):
        updates, mismatches, invariant_errors = 0, [], []

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step % 2:
                return
            Check.updates += 1
            for t in keras_dst.sparse_targets(self.model):
                per_mask = [v.numpy() for v in strategy.experimental_local_results(t.mask.value)]
                per_w = [v.numpy() for v in strategy.experimental_local_results(t.weight.value)]
                if check_replicas:
                    assert len(per_mask) == strategy.num_replicas_in_sync == 2, len(per_mask)
                for m, w in zip(per_mask[1:], per_w[1:]):
                    if not (np.array_equal(m, per_mask[0]) and np.array_equal(w, per_w[0])):
                        Check.mismatches.append((step, t.weight.path))
                for m, w in zip(per_mask, per_w):
                    if m.dtype != bool or np.any(w[~m] != 0) or int(m.sum()) != initial[t.weight.path]:
                        Check.invariant_errors.append((step, t.weight.path))

    dst = keras_dst.DynamicSparseTraining(update_every=2, prune_rate=0.3, seed=5, **kwargs)
    if dataset:  # MultiWorkerMirroredStrategy: Keras cannot distribute numpy arrays there
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64).with_options(options)
        # Keras 3.15 bug, not keras_dst: fit's `_maybe_symbolic_build` calls
        # strategy.reduce on an eager PerReplica batch, which MultiWorkerMirroredStrategy
        # rejects (a plain Keras model fails the same way). Build from a local batch.
        with strategy.scope():
            model._symbolic_build(data_batch=(x[:64], y[:64]))
        model._maybe_symbolic_build = lambda *args, **kwargs: None
        model.fit(data, epochs=epochs, verbose=0, callbacks=[dst, Check(), *callbacks])
    else:
        model.fit(x, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=[dst, Check(), *callbacks])
    final = keras_dst.masks(model)
    return dict(
        replicas=strategy.num_replicas_in_sync,
        updates_checked=Check.updates, replica_mismatches=Check.mismatches,
        invariant_errors=Check.invariant_errors,
        churn=int(sum((final[k] != first[k]).sum() for k in final)),
        counts={k: int(v.sum()) for k, v in final.items()}, initial_counts=initial,
        masks=np.concatenate([v.ravel() for v in final.values()]),
        weights=np.concatenate([t.weight.numpy().ravel() for t in keras_dst.sparse_targets(model)]),
        iterations=int(model.optimizer.iterations.numpy()),
        model=model,
    )


def _checkpoint_round_trip(strategy, model):
    """Writes a `tf.train.Checkpoint` of `model` (trained under `strategy`), restores it
    into a fresh prunable model of other masks under `strategy`; returns per sparse
    weight whether every replica's mask and weight equal the saved ones."""
    import tempfile

    import numpy as np
    import tensorflow as tf

    import keras_dst

    from conftest import mlp

    path = tf.train.Checkpoint(model=model).write(os.path.join(tempfile.mkdtemp(), "ckpt"))
    with strategy.scope():
        fresh = keras_dst.prunable(mlp(seed=3), density=0.3, seed=2)
    changed = any((a != b).any() for a, b in zip(keras_dst.masks(model).values(),
                                                  keras_dst.masks(fresh).values()))
    tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    same = {}
    for saved, restored in zip(keras_dst.sparse_targets(model), keras_dst.sparse_targets(fresh)):
        values = [(m.numpy(), w.numpy()) for m, w in zip(
            strategy.experimental_local_results(restored.mask.value),
            strategy.experimental_local_results(restored.weight.value))]
        same[saved.weight.path] = len(values) == 2 and all(
            np.array_equal(m, saved.mask.numpy()) and np.array_equal(w, saved.weight.numpy())
            for m, w in values)
    return dict(masks_differed_before=bool(changed), replicas_equal_saved=same)


def _attach_outside_the_scope(strategy):
    """A subclassed model built under `strategy`, made prunable outside its scope, trained
    with DST inside it: per sparse weight the number of copies of its mask, and whether
    every replica's mask and weight agree after training."""
    import keras
    import numpy as np

    import keras_dst

    from conftest import LOSS, classification_data

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

    x, y = classification_data(n=128)
    with strategy.scope():
        model = Net()
        model(x[:2])
    keras_dst.prunable(model, density=0.3, seed=1)  # in place, outside the scope
    first = keras_dst.masks(model)
    with strategy.scope():
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS, jit_compile=False)
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[keras_dst.DynamicSparseTraining(update_every=2, prune_rate=0.3, seed=5)])
    copies, equal = {}, True
    for t in keras_dst.sparse_targets(model):
        masks = [m.numpy() for m in strategy.experimental_local_results(t.mask.value)]
        weights = [w.numpy() for w in strategy.experimental_local_results(t.weight.value)]
        copies[t.key] = len(masks)
        equal &= all(np.array_equal(m, masks[0]) for m in masks)
        equal &= all(np.array_equal(w, weights[0]) for w in weights)
    final = keras_dst.masks(model)
    return dict(mask_copies=copies, replicas_equal=bool(equal),
                churn=int(sum((final[k] != first[k]).sum() for k in final)))


def _main_mirrored(configs):
    import numpy as np
    import tensorflow as tf

    devices = _setup_devices(2)
    # One strategy for all runs: separate MirroredStrategy objects on the same devices
    # reuse collective instance keys and abort each other's all-reduces (a TF quirk).
    strategy = tf.distribute.MirroredStrategy(devices[:2])
    results = {"attached_outside": _attach_outside_the_scope(strategy)}
    for config in configs:
        two = _train(strategy, config, check_replicas=True)
        if "checkpoint" not in results:
            results["checkpoint"] = _checkpoint_round_trip(strategy, two["model"])
        one = _train(tf.distribute.get_strategy(), config, check_replicas=False)
        results[config] = dict(
            replicas=two["replicas"], updates_checked=two["updates_checked"],
            replica_mismatches=two["replica_mismatches"],
            invariant_errors=two["invariant_errors"] + one["invariant_errors"],
            churn=two["churn"], counts=two["counts"], counts_single=one["counts"],
            mask_diff_vs_single=int((two["masks"] != one["masks"]).sum()),
            max_weight_diff_vs_single=float(np.abs(two["weights"] - one["weights"]).max()),
            iterations=two["iterations"], iterations_single=one["iterations"])
    print(json.dumps(results))


def _patch_keras_for_multi_worker():
    """Works around a Keras 3.15 bug (not keras_dst's; a plain Keras model hits it too).

    fit's per-step log reduction calls ``strategy.reduce("MEAN", v, axis=0)`` on
    scalar logs under MultiWorkerMirroredStrategy ("Invalid reduction dimension 0
    for input with 0 dimensions"). Reduce scalars with axis=None instead.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(
                strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    tf_trainer.reduce_per_replica = reduce_per_replica


def _main_worker(out_path, epochs=3, backup_dir=None):
    import hashlib

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_dst

    _patch_keras_for_multi_worker()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    callbacks = []
    if backup_dir:  # fault tolerance: the chief backs up, a restarted job resumes
        callbacks = [keras.callbacks.LambdaCallback(
                         on_epoch_begin=lambda e, logs: print(f"epoch {e}", flush=True)),
                     keras_dst.BackupAndRestore(backup_dir, delete_checkpoint=False)]
    r = _train(strategy, "magnitude_gradient", check_replicas=False, dataset=True,
               epochs=epochs, callbacks=callbacks)
    result = dict(num_replicas=strategy.num_replicas_in_sync, churn=r["churn"],
                  masks=r["masks"].astype(np.uint8).tolist(), counts=r["counts"],
                  initial_counts=r["initial_counts"], invariant_errors=r["invariant_errors"],
                  weights_sha=hashlib.sha256(r["weights"].tobytes()).hexdigest())
    with open(out_path, "w") as f:
        json.dump(result, f)


def _main_single(config):
    import numpy as np
    import tensorflow as tf

    r = _train(tf.distribute.get_strategy(), config, check_replicas=False)
    print(json.dumps(dict(masks=r["masks"].astype(np.uint8).tolist(), counts=r["counts"])))


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    if sys.argv[1] == "mirrored":
        _main_mirrored(sys.argv[2:] or list(CONFIGS))
    elif sys.argv[1] == "single":
        _main_single(sys.argv[2])
    elif sys.argv[1] == "worker":  # out_path epochs [backup_dir]
        _main_worker(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
