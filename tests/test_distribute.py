"""tf.distribute: two logical CPU devices in one process, and two worker processes on loopback."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cifar_hybrid_classifier as chc
from conftest import (ROOT, TINY_ARGS, assert_a_lost_peer_ended_the_run, run_outputs, run_two_workers,
                      signal_worker_after)

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

ONE_STEP_BOTH_WAYS_THEN_A_RUN = textwrap.dedent(TWO_CPUS + """
    import keras
    import numpy as np
    data = chc.load_cifar(sys.argv[1])
    # No dropout: replicas draw their own masks.
    common = ["--data", sys.argv[1], *sys.argv[4:], "--head-dropout", "0"]
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

    # Then a whole run of the script over the two devices (one interpreter for both: TensorFlow's start
    # costs seconds), with the model builder it ships with.
    chc.build_model = build_model
    sys.exit(chc.main(["--data", sys.argv[1], *sys.argv[4:], "--distribute", "mirrored", "--output", sys.argv[3]]))
""")


def test_one_mirrored_step_equals_one_single_device_step_and_a_mirrored_run_trains_end_to_end(tmp_path,
                                                                                               cifar_folder):
    out, output = tmp_path / "weights.npz", tmp_path / "m.keras"
    result = subprocess.run([sys.executable, "-c", ONE_STEP_BOTH_WAYS_THEN_A_RUN, cifar_folder, str(out), str(output),
                             *TINY_ARGS], capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = np.load(out)
    count = sum(name.startswith("single_") for name in saved.files)
    weights = {name: [saved[f"{name}_{i}"] for i in range(count)] for name in ("initial", "single", "mirrored")}
    moved = max(float(np.abs(a - b).max()) for a, b in zip(weights["initial"], weights["single"]))
    assert count > 10 and moved > 1e-4  # the step moved weights by far more than the tolerance
    for single, mirrored in zip(weights["single"], weights["mirrored"]):
        np.testing.assert_allclose(mirrored, single, atol=1e-5)

    assert "MirroredStrategy over 2 replicas: global batch 64 (32 per replica)" in result.stdout
    model = chc.load_model(str(output))
    assert not model.get_layer("cnn_branch").synchronized_bn  # the saved model is a plain single-device one
    probs = model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0)
    assert probs.shape == (2, 100) and np.allclose(probs.sum(-1), 1, atol=1e-4)


def test_a_frozen_chief_ends_the_run_in_one_line_and_a_rerun_resumes(tmp_path, cifar_tarball):
    # Every worker restores from the chief's backup folder: here a path both can read. (A killed worker
    # is the soak test's end: test_soak.py.)
    args = ["--data", cifar_tarball, *TINY_ARGS, "--epochs", "3", "--checkpoint-dir", str(tmp_path / "backup")]
    act, sent = signal_worker_after("epoch 1/3", 0, signal.SIGSTOP)
    codes, logs, _, ended = run_two_workers(tmp_path, args, "lost", act)
    # Frozen by SIGSTOP after epoch 1 (and killed once the other has ended): worker 1's next collective
    # fails, and it ends in one line, no traceback, well within the bound.
    assert codes == [-9, 4], logs[1][-3000:]
    assert_a_lost_peer_ended_the_run(logs[1], ended[1] - sent["at"])
    codes, logs, _, _ = run_two_workers(tmp_path, args, "resumed")
    assert codes == [0, 0], [log[-3000:] for log in logs]
    for log in logs:
        assert "over 2 replicas: global batch 64 (32 per replica)" in log
        assert re.search(r"resuming from the backup in .*: epoch [23] of 3", log), log[-3000:]
        assert "epoch 3/3" in log and "epoch 1/3" not in log
    # Only the chief writes: the run's files in its folder, nothing in the other's, no temporary folders.
    chief, other = tmp_path / "worker0", tmp_path / "worker1"
    assert sorted(p.name for p in chief.iterdir()) == run_outputs() and not (tmp_path / "backup").exists()
    assert list(other.iterdir()) == []
    assert list((tmp_path / "resumed-tmp0").iterdir()) == [] and list((tmp_path / "resumed-tmp1").iterdir()) == []
    probs = chc.load_model(str(chief / "cifar_hybrid.keras")).predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0)
    assert probs.shape == (2, 100)


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
