"""tf.distribute: two logical CPU devices in one process, and two worker processes on loopback."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cifar_hybrid_classifier as chc
from conftest import (ROOT, SOAK_ARGS, TINY_ARGS, assert_a_lost_peer_ended_the_run, assert_flat_threads,
                      freeze_the_chief_then_continue_it, run_outputs, run_two_workers, write_soak_folder)

ENV = {**os.environ, "PYTHONPATH": ROOT}

# Logical devices must be configured before TensorFlow's runtime starts, hence a fresh process; the script
# comes first, as it sets TensorFlow's environment before TensorFlow loads.
TWO_CPUS = """
    import sys
    import cifar_hybrid_classifier as chc
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""

ONE_STEP_BOTH_WAYS_THEN_EXPORT = textwrap.dedent(TWO_CPUS + """
    import keras
    import numpy as np
    data = chc.load_cifar(sys.argv[1])
    # No dropout: replicas draw their own masks.
    common = ["--data", sys.argv[1], *sys.argv[3:], "--head-dropout", "0"]
    images, labels = data.x_train[:32], data.y_train[:32].astype("int32")

    def one_step(strategy, batch_size, learning_rate, initial):
        config = chc.parse_config([*common, "--batch-size", str(batch_size), "--learning-rate", str(learning_rate)])
        trainer = chc.Trainer(config, data, strategy=strategy, log=lambda *_: None)
        trainer.model.set_weights(initial)
        # AdamW's first step is about lr * g / |g|: float rounding in a near-zero gradient becomes an
        # lr-sized difference. Plain SGD keeps the comparison about the gradients the replicas compute.
        with strategy.scope():
            trainer.optimizer = keras.optimizers.SGD(trainer.schedule.peak)
        batch = tf.data.Dataset.from_tensors((images, labels))
        trainer._train_step(*next(iter(strategy.experimental_distribute_dataset(batch))))
        return trainer.replicas, trainer.model.get_weights()

    # Batch statistics computed the same way on both sides: Keras's synchronized batch norm (which the
    # replicas need) takes E[x^2] - E[x]^2, plain batch norm two passes; in float32 they differ by ~1e-4.
    build_model = chc.build_model
    chc.build_model = lambda config, dtype=None, synchronized_bn=False, class_names=None: build_model(
        config, dtype, True, class_names)
    initial = chc.build_model(chc.parse_config(common)).get_weights()
    # Same global batch (32) and the same effective learning rate (linear scaling doubles 0.005).
    one, single = one_step(tf.distribute.get_strategy(), 32, 0.01, initial)
    two, mirrored = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 16, 0.005, initial)
    assert (one, two) == (1, 2)
    arrays = {f"{name}_{i}": w for name, ws in (("initial", initial), ("single", single), ("mirrored", mirrored))
              for i, w in enumerate(ws)}
    np.savez(sys.argv[2], **arrays)

    # The trainer over two replicas (as --distribute mirrored makes them) synchronizes its batch norm, and
    # the model it exports is a plain single-device one. (Whole distributed runs: the two-worker tests.)
    chc.build_model = build_model
    strategy = chc.make_strategy("mirrored")
    trainer = chc.Trainer(chc.parse_config(common), data, strategy=strategy, log=lambda *_: None)
    exported = trainer.export_model()
    flags = [m.get_layer("cnn_branch").synchronized_bn for m in (trainer.model, exported)]
    assert (strategy.num_replicas_in_sync, flags) == (2, [True, False]), flags
    batch = data.x_test[:4]
    probs = exported.predict(batch, verbose=0)
    assert probs.shape == (4, 100) and np.allclose(probs.sum(-1), 1, atol=1e-4)
    np.testing.assert_allclose(probs, trainer.model(batch, training=False), atol=1e-5)  # the trained weights
""")


def test_one_mirrored_step_equals_one_single_device_step_and_the_mirrored_model_exports_plain(tmp_path, cifar_folder):
    out = tmp_path / "weights.npz"
    result = subprocess.run([sys.executable, "-c", ONE_STEP_BOTH_WAYS_THEN_EXPORT, cifar_folder, str(out), *TINY_ARGS],
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = np.load(out)
    count = sum(name.startswith("single_") for name in saved.files)
    weights = {name: [saved[f"{name}_{i}"] for i in range(count)] for name in ("initial", "single", "mirrored")}
    moved = max(float(np.abs(a - b).max()) for a, b in zip(weights["initial"], weights["single"]))
    assert count > 10 and moved > 1e-4  # the step moved weights by far more than the tolerance
    for single, mirrored in zip(weights["single"], weights["mirrored"]):
        np.testing.assert_allclose(mirrored, single, atol=1e-5)


def test_two_workers_end_in_one_line_when_a_peer_freezes_or_dies_and_a_rerun_resumes_with_flat_threads(tmp_path):
    # Every worker restores from the chief's backup folder: here a path both can read.
    soak_folder = write_soak_folder(str(tmp_path / "data"))
    args = ["--data", soak_folder, *SOAK_ARGS, "--checkpoint-dir", str(tmp_path / "backup")]
    act, at = freeze_the_chief_then_continue_it("epoch 1/4")
    codes, logs, _, ended = run_two_workers(tmp_path, args, "lost", act)
    # Worker 1's next collective waits on a frozen chief: the coordination service's heartbeats end it.
    # The chief, continued, finds its peer gone. Each ends in one line, no traceback, well within the bound.
    assert codes == [4, 4], [log[-3000:] for log in logs]
    assert_a_lost_peer_ended_the_run(logs[1], ended[1] - at["frozen"])
    assert_a_lost_peer_ended_the_run(logs[0], ended[0] - at["continued"])

    # The rerun is the soak: 3 epochs of 37 steps, over a hundred, whose threads must stay flat from epoch to
    # epoch (a leak of one thread per step passes every short run). Threads are read from /proc (Linux).
    codes, logs, samples, _ = run_two_workers(tmp_path, args, "resumed")
    assert codes == [0, 0], [log[-3000:] for log in logs]
    for log, threads in zip(logs, samples):
        assert "over 2 replicas: global batch 16 (8 per replica)" in log and "plan:" not in log
        # Frozen within a poll of its epoch 1 line, the chief had no time for epoch 2's 37 steps.
        assert re.search(r"resuming from the backup in .*: epoch 2 of 4, 0 of 37 steps", log), log[-3000:]
        assert "epoch 4/4" in log and "epoch 1/4" not in log
        if os.path.exists("/proc/self/status"):
            assert_flat_threads(threads, log, epochs=3)
    # Only the chief writes: the run's files in its folder, nothing in the other's, no temporary folders.
    chief, other = tmp_path / "worker0", tmp_path / "worker1"
    assert sorted(p.name for p in chief.iterdir()) == run_outputs() and not (tmp_path / "backup").exists()
    assert list(other.iterdir()) == []
    assert list((tmp_path / "resumed-tmp0").iterdir()) == [] and list((tmp_path / "resumed-tmp1").iterdir()) == []
    model = chc.load_model(str(chief / "cifar_hybrid.keras"))
    assert not model.get_layer("cnn_branch").synchronized_bn  # a plain single-device model
    assert model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0).shape == (2, 100)


def test_strategy_choice_from_the_environment(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert chc.make_strategy("none").num_replicas_in_sync == 1
    assert chc.make_strategy("auto").num_replicas_in_sync == 1  # no TF_CONFIG, no GPUs here
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(chc.InputError, match="TF_CONFIG"):
        chc.make_strategy("auto")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}}))
    with pytest.raises(chc.InputError, match="two or more workers"):
        chc.make_strategy("multi-worker")
