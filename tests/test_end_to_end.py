"""The whole program as a user runs it. (A saved model in a fresh process: test_shipped_model.py.)"""

import csv
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest

import cifar_hybrid_classifier as chc
from conftest import (FINE_NAMES, ONEDNN_OPTS_GIVEN, ROOT, SOAK_ARGS, TINY_ARGS, assert_flat_threads, run_outputs,
                      watch, write_soak_folder, write_tarball)

SCRIPT = os.path.join(ROOT, "cifar_hybrid_classifier.py")


def read_tensorboard_scalars(folder):
    """{tag: [(step, value), ...]} from the event files in `folder`, read with TensorFlow alone."""
    import tensorflow as tf
    scalars = {}
    for path in tf.io.gfile.glob(os.path.join(folder, "events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


def test_script_trains_hundreds_of_steps_with_flat_threads_and_memory_then_reports_and_saves(tmp_path,
                                                                                            tmp_path_factory):
    # 300 steps: a leak of one thread (or a few kilobytes) per step, which passes every short run, shows
    # as hundreds. Threads and resident memory are read from /proc at each `epoch k/n` line (on Linux).
    folder = write_soak_folder(str(tmp_path_factory.mktemp("cifar_soak")))
    tarball = write_tarball(str(tmp_path_factory.mktemp("tar_soak") / "cifar-100-python.tar.gz"), folder)
    output, logs = tmp_path / "cifar_hybrid.keras", tmp_path_factory.mktemp("output")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # which would show TensorFlow's lines
    with open(logs / "out.txt", "w") as out, open(logs / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, SCRIPT, "train", "--data", tarball, "--output", str(output),
                                 *SOAK_ARGS, "--tta", "--tensorboard", str(tmp_path / "logs")],
                                stdout=out, stderr=err, cwd=tmp_path, env=env)
    codes, (out,), (samples,), _ = watch([proc], [logs / "out.txt"])
    err = (logs / "err.txt").read_text()
    assert codes == [0], err[-3000:]
    assert "plan: 4 epoch(s) of 75 steps" in out
    if os.path.exists("/proc/self/status"):
        assert_flat_threads(samples, out)
        # The first epoch traces the step functions and fills the allocator's pools; after it, memory holds.
        resident = [rss for _, rss in samples]
        assert max(resident[1:]) <= 1.03 * resident[1], f"resident MB after each epoch: {[r >> 20 for r in resident]}"
    # TensorFlow's C++ start-up lines (oneDNN notes, the CUDA probe) are silenced.
    assert not re.search(r"^([IWEF]\d{4} |WARNING: All log messages)", err, re.M), err[:3000]
    assert "precision" in out and "recall" in out and "f1-score" in out
    assert all(name in out for name in (FINE_NAMES[0], FINE_NAMES[57], FINE_NAMES[99]))
    assert "test top-1" in out and "top-5" in out and "superclass top-1" in out
    validation = re.search(r"validation top-1 [\d.]+% plain, ([\d.]+)% with TTA", out)
    assert validation and "(fine labels, TTA)" in out
    assert "Most confused classes" in out
    assert f"saved the model to {output}" in out
    assert output.is_file() and output.stat().st_size > 10_000
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user creates
    # The run's files and nothing else: no temporary files, no backup.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "logs") == run_outputs()
    if "cifar_hybrid.curves.png" not in run_outputs():
        assert out.count("pip install matplotlib") == 1

    with open(tmp_path / "cifar_hybrid.history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert [h["epoch"] for h in history] == ["1", "2", "3", "4"]
    assert list(history[0]) == ["epoch", "seconds", "elapsed", "learning_rate", "train_loss", "train_accuracy",
                                "val_loss", "val_accuracy"]
    assert all(float(h["val_loss"]) > 0 and 0 <= float(h["val_accuracy"]) <= 1 for h in history)

    metrics = json.loads((tmp_path / "cifar_hybrid.metrics.json").read_text())
    test = metrics["test"]
    assert set(test) == {"top1", "top5", "superclass_top1", "top1_without_tta", "tta", "images"}
    assert test["images"] == 200 and test["tta"] is True and 0 <= test["top1"] <= test["top5"] <= 1
    assert f"test top-1 {100 * test['top1']:.2f}%  top-5 {100 * test['top5']:.2f}%" in out
    assert f"{100 * metrics['validation_top1_with_tta']:.2f}" == validation.group(1)
    assert list(metrics["per_class"]) == FINE_NAMES
    assert set(metrics["per_class"][FINE_NAMES[3]]) == {"precision", "recall", "f1-score", "support"}
    assert metrics["config"]["epochs"] == 4 and metrics["seed"] == 42 and metrics["epochs_trained"] == 4
    assert metrics["config"]["cnn_widths"] == [8, 16]
    assert {"python", "tensorflow", "keras", "numpy", "scikit-learn"} <= set(metrics["versions"])
    assert metrics["versions"]["cifar_hybrid_classifier"] == chc.__version__
    assert metrics["hardware"]["logical_cpus"] >= 1 and metrics["hardware"]["cpu"]
    assert 0 < metrics["wall_time_seconds"] < 600
    assert all(set(p) == {"true", "predicted", "count"} for p in metrics["most_confused"])

    report = (tmp_path / "cifar_hybrid.report.txt").read_text()
    assert report.strip() in out and "Most confused classes" in report and FINE_NAMES[57] in report

    scalars = read_tensorboard_scalars(tmp_path / "logs")
    assert {"learning_rate", "train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(scalars)
    assert [step for step, _ in scalars["val_accuracy"]] == [1, 2, 3, 4]
    assert scalars["val_accuracy"][3][1] == pytest.approx(float(history[3]["val_accuracy"]), abs=1e-6)


def test_training_learns_and_keeps_the_best_weights(cifar_folder):
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--epochs", "4", "--learning-rate", "0.01"])
    chc.set_seeds(config.seed)
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # Warm-up then cosine decay to zero: the peak is reached, the end is near zero.
    assert history[-1]["learning_rate"] < 1e-4
    best = max(h["val_accuracy"] for h in history)
    final = float(np.mean(trainer.predict(trainer.val_pipeline).argmax(-1) == trainer.y_val))
    assert final == best


def test_mixed_precision_model_exports_in_float32(cifar_folder):
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--precision", "mixed_bfloat16"])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    exported = trainer.export_model()
    assert exported is not trainer.model
    assert all(layer.dtype_policy.name == "float32" for layer in exported.layers[1:])
    batch = np.random.default_rng(2).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(exported.predict(batch, verbose=0), trainer.model.predict(batch, verbose=0),
                               atol=0.02)


class VirtualClock:
    """The trainer's `time` module in a test: the clock moves only when the trainer trains a step or runs a
    validation pass, each at a fixed cost, so a time plan comes out the same on a busy machine. With
    `compute=False` the steps and passes only cost time: for a test of the plan alone, no graph to trace."""

    def __init__(self, step_seconds, pass_seconds, compute=True):
        self.now, self.step_seconds, self.pass_seconds = 1000.0, step_seconds, pass_seconds
        self.compute = compute

    def time(self):
        return self.now

    perf_counter = time

    def install(self, monkeypatch):
        monkeypatch.setattr(chc, "time", self)
        prepare, predict = chc.Trainer._prepare_training, chc.Trainer.predict

        def prepare_with_costly_steps(trainer):
            prepare(trainer)
            step = trainer._train_step

            def costly_step(*args):
                self.now += self.step_seconds
                return step(*args) if self.compute else (0.0, 0.0)
            trainer._train_step = costly_step

        def costly_predict(trainer, pipeline):
            self.now += self.pass_seconds
            return predict(trainer, pipeline) if self.compute else None
        monkeypatch.setattr(chc.Trainer, "_prepare_training", prepare_with_costly_steps)
        monkeypatch.setattr(chc.Trainer, "predict", costly_predict)


def test_time_budget_plans_whole_epochs_and_restores_the_initial_weights(cifar_folder, monkeypatch):
    VirtualClock(step_seconds=1.0, pass_seconds=2.0).install(monkeypatch)
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    initial = trainer.model.get_weights()
    full = trainer.train_pipeline.steps_per_epoch()
    budget = 1.5 * full + 32  # room for about two shortened epochs once planning and the test pass are paid
    trainer.plan_time_budget(seconds=budget, test_images=200)
    assert trainer.epochs >= 2 and 1 <= trainer.steps_per_epoch < full  # whole epochs, shortened to fit
    assert trainer.total_steps == trainer.epochs * trainer.steps_per_epoch
    for before, after in zip(initial, trainer.model.get_weights()):
        np.testing.assert_array_equal(before, after)  # the timing steps left no trace
    assert trainer.global_step() == 0
    history = trainer.fit()
    assert len(history) == trainer.epochs
    assert trainer.global_step() == trainer.total_steps
    assert history[-1]["elapsed"] <= budget  # within the budget on the virtual clock
    assert history[-1]["learning_rate"] < 1e-6  # the cosine decay ran to its end


def test_a_final_fit_without_validation_trains_on_every_image_within_its_budget_and_keeps_the_last_weights(
        cifar_folder, monkeypatch):
    clock = VirtualClock(step_seconds=1.0, pass_seconds=2.0)
    clock.install(monkeypatch)
    passes, predict = [], chc.Trainer.predict
    monkeypatch.setattr(chc.Trainer, "predict", lambda t, pipeline: passes.append(clock.now) or predict(t, pipeline))
    data = chc.load_cifar(cifar_folder)
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--validation-split", "0"])
    ends = []
    trainer = chc.Trainer(config, data, log=lambda line: line.startswith("epoch") and ends.append(
        trainer.model.get_weights()))
    assert len(trainer.y_train) == len(data.y_train) and trainer.val_pipeline is None
    full = trainer.train_pipeline.steps_per_epoch()
    budget = 1.5 * full + 32
    trainer.plan_time_budget(seconds=budget, test_images=200)
    planned = len(passes)  # the plan times an evaluation pass on training images
    history = trainer.fit()
    assert planned == 2 and len(passes) == planned  # no validation after the epochs
    assert len(history) == trainer.epochs >= 2 and history[-1]["elapsed"] <= budget
    assert all("val_accuracy" not in h for h in history)
    assert len(ends) == len(history)
    for last, kept in zip(ends[-1], trainer.model.get_weights()):
        np.testing.assert_array_equal(last, kept)


def test_a_final_fit_reports_on_the_test_set_alone(tmp_path, cifar_folder, capsys):
    output = str(tmp_path / "final.keras")
    assert chc.main(["--data", cifar_folder, "--output", output, *TINY_ARGS, "--validation-split", "0", "--tta"]) == 0
    out = capsys.readouterr().out
    assert "400 train / 0 validation images" in out and "validation top-1" not in out and "test top-1" in out
    metrics = json.loads((tmp_path / "final.metrics.json").read_text())
    assert metrics["best_validation_top1"] is None and metrics["validation_top1_with_tta"] is None
    assert metrics["test"]["tta"] and metrics["epochs_trained"] == 1
    rows = (tmp_path / "final.history.csv").read_text().splitlines()
    assert rows[0].endswith("val_loss,val_accuracy") and rows[1].endswith(",,")  # no validation figures
    assert chc.load_model(output).output_shape == (None, 100)


def test_time_budget_too_small_is_a_clear_error(cifar_folder, monkeypatch):
    VirtualClock(step_seconds=1.0, pass_seconds=2.0, compute=False).install(monkeypatch)
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    with pytest.raises(chc.InputError, match="no time to train"):
        trainer.plan_time_budget(seconds=0.5, test_images=200)


def test_tta_averages_the_image_its_mirror_and_their_diagonal_shifts(cifar_folder):
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    images = trainer.x_val[:40]
    plain = chc.predict_probabilities(trainer.model, images, batch_size=16)
    again, tta = chc.predict_probabilities(trainer.model, images, batch_size=16, tta=True, with_plain=True)
    np.testing.assert_allclose(plain, trainer.model.predict(images, verbose=0), atol=1e-5)
    np.testing.assert_array_equal(again, plain)

    def moved(x, down, right):  # by hand: reflect-pad one pixel, then cut the window out
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        return padded[:, 1 - down:33 - down, 1 - right:33 - right]

    # The shift moves the content: pixel (5, 7) of the image is at (6, 8) one pixel down and right.
    np.testing.assert_array_equal(chc.shifted(images, 1, 1)[:, 6, 8], images[:, 5, 7])
    np.testing.assert_array_equal(chc.shifted(images, -1, -1)[:, 4, 6], images[:, 5, 7])
    views = [(1.0, images), (1.0, images[:, :, ::-1])] + [
        (0.5, moved(x, d, d)) for x in (images, images[:, :, ::-1]) for d in (1, -1)]
    expected = sum(w * trainer.model.predict(x, verbose=0) for w, x in views) / 4.0
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    pipeline = chc.AugmentationPipeline(images, trainer.y_val[:40], batch_size=16)
    np.testing.assert_allclose(trainer.predict(pipeline), plain, atol=1e-5)  # the loop's own validation path


def test_warmup_cosine_schedule_and_moving_horizon():
    schedule = chc.WarmupCosine(peak=1e-3, total_steps=100, warmup_fraction=0.1)
    lr = lambda step: float(schedule(step))  # noqa: E731
    assert lr(0) == 0.0 and abs(lr(5) - 5e-4) < 1e-9 and abs(lr(10) - 1e-3) < 1e-9
    assert abs(lr(55) - 5e-4) < 1e-8 and lr(100) < 1e-12 and lr(150) < 1e-12
    at_30 = lr(30)
    schedule.retarget(30, 60)  # a re-plan shortens the run: the decay goes on from the rate reached
    assert lr(30) == pytest.approx(at_30, rel=1e-5) and lr(60) < 1e-12
    assert np.all(np.diff([lr(step) for step in range(30, 61)]) <= 0)
    schedule.retarget(40, 200)  # and lengthens it: the rate falls more slowly, but does not rise
    assert np.all(np.diff([lr(step) for step in range(30, 201)]) <= 0) and lr(200) < 1e-12
    assert chc.WarmupCosine(**schedule.get_config()).get_config() == schedule.get_config()
    early = chc.WarmupCosine(peak=1e-3, total_steps=100, warmup_fraction=0.1)
    early.retarget(4, 40)  # during the warm-up: the ramp reaches the peak sooner, then decays to zero
    assert float(early(4)) == pytest.approx(1e-3, rel=1e-5) and float(early(40)) < 1e-12


def test_replan_on_a_jumpy_pace_keeps_the_rate_falling_and_ends_in_time(cifar_folder, monkeypatch):
    """The host's pace alternates between 1x and 2x from one epoch to the next (as seen on a shared
    machine). Simulated epochs drive the planner: the learning rate must never rise after the warm-up,
    decay to zero at the last step, and the run must end within its budget."""
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    monkeypatch.setattr(trainer.train_pipeline, "steps_per_epoch", lambda: 400)  # room to re-plan either way
    epochs, pace, val_seconds, clock = 12, 0.1, 2.0, [1000.0]
    trainer.epochs, trainer.steps_per_epoch = epochs, 200
    trainer._prepare_training()
    budget = epochs * (200 * pace + val_seconds) / 0.95  # what plan_time_budget would have been given
    plan = chc.TimePlan(trainer, deadline=clock[0] + 0.97 * budget)
    rates, steps = [], []
    with monkeypatch.context() as m:
        m.setattr(chc.time, "time", lambda: clock[0])
        for epoch in range(epochs):
            first, n = trainer.global_step(), trainer.steps_per_epoch
            rates += list(np.asarray(trainer.schedule(np.arange(first, first + n))))  # this epoch's steps
            steps.append(n)
            trainer.optimizer.iterations.assign(first + n)
            train_seconds = n * pace * (1 if epoch % 2 == 0 else 2)
            clock[0] += train_seconds + val_seconds
            if epoch + 1 < epochs:
                plan.replan(epochs - epoch - 1, train_seconds, val_seconds)
    peak = int(np.argmax(rates))
    assert rates[peak] == pytest.approx(config.learning_rate, rel=1e-3)
    assert np.all(np.diff(rates[peak:]) <= 1e-9), "the learning rate rose after the warm-up"
    assert trainer.total_steps == trainer.global_step() == len(rates)
    assert float(trainer.schedule(trainer.total_steps)) < 1e-9
    assert clock[0] - 1000.0 <= 0.97 * budget, "the run overran its budget"
    assert len(set(steps)) > 1 and max(steps[2:]) < 1.5 * min(steps[2:]), steps  # re-planned, without swings


def test_replan_adds_an_epoch_where_the_pace_leaves_one_unused(cifar_folder, monkeypatch):
    """The first timing came out a quarter slow, so the plan's epochs run full and a whole epoch's time
    would be left over: the planner takes one more, and the run still ends in time with the rate at zero."""
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    monkeypatch.setattr(trainer.train_pipeline, "steps_per_epoch", lambda: 200)
    planned_epochs, pace, val_seconds, clock = 8, 0.1, 2.0, [1000.0]
    trainer.epochs, trainer.steps_per_epoch = planned_epochs, 200
    trainer._prepare_training()
    budget = planned_epochs * (200 * 1.25 * pace + val_seconds) / 0.95
    plan = chc.TimePlan(trainer, deadline=clock[0] + 0.97 * budget)
    epoch = 0
    with monkeypatch.context() as m:
        m.setattr(chc.time, "time", lambda: clock[0])
        while epoch < trainer.epochs:  # as `Trainer.fit` loops
            first, n = trainer.global_step(), trainer.steps_per_epoch
            trainer.optimizer.iterations.assign(first + n)
            clock[0] += n * pace + val_seconds
            epoch += 1
            if epoch < trainer.epochs:
                plan.replan(trainer.epochs - epoch, n * pace, val_seconds)
    assert trainer.epochs > planned_epochs
    assert trainer.total_steps == trainer.global_step() and float(trainer.schedule(trainer.total_steps)) < 1e-9
    assert clock[0] - 1000.0 <= 0.97 * budget, "the run overran its budget"


def test_replan_shrinks_remaining_epochs_when_behind(cifar_folder):
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--epochs", "3"])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    plan = chc.TimePlan(trainer, deadline=time.time())  # already out of time
    plan.replan(remaining_epochs=2, train_seconds=1.0, val_seconds=0.1)
    assert trainer.steps_per_epoch == 1
    assert trainer.total_steps == 2 and float(trainer.schedule.total_steps.numpy()) == 2.0


def test_plots_where_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"epoch": e, "learning_rate": 1e-3 / e, "train_loss": 4.0 / e, "train_accuracy": 0.1 * e,
                "val_loss": 4.2 / e, "val_accuracy": 0.09 * e} for e in (1, 2, 3)]
    confusion = np.random.default_rng(0).integers(0, 5, size=(100, 100))
    chc.save_plots(history, confusion, FINE_NAMES, str(tmp_path / "run"))
    for name in ("run.curves.png", "run.confusion.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.confusion.png", "run.curves.png"]


def test_time_budget_picks_the_largest_size_with_room_for_enough_epochs(monkeypatch):
    paces = {"small": 0.4, "base": 0.55, "medium": 0.9, "large": 1.6}  # seconds per step, as on a slow laptop CPU
    monkeypatch.setattr(chc, "time_training_step", lambda config: paces[config.model_size])
    steps = 45000 // 128
    for minutes, expected in [(1, "small"), (30, "small"), (60, "base"), (120, "medium"), (180, "large")]:
        config = chc.parse_config(["--time-budget", str(minutes), "--fresh"])
        assert config.model_size == "auto" and config.sizes == ["small", "base", "medium", "large"]
        chc.choose_model_size(config, minutes * 60, 45000)
        room = {size: 0.9 * minutes * 60 / (steps * pace) for size, pace in paces.items()}
        assert config.model_size == expected, (minutes, room)
        assert config.embed_dim == chc.MODEL_SIZES[expected]["embed_dim"]
    # Options given on the command line win over the size's, and sizes they rule out are skipped.
    config = chc.parse_config(["--time-budget", "180", "--fresh", "--embed-dim", "64"])
    assert config.sizes == ["small", "base"]  # 5 or 6 heads do not divide 64
    chc.choose_model_size(config, 180 * 60, 45000)
    assert (config.model_size, config.embed_dim, config.depth) == ("base", 64, 2)


def test_time_budget_times_a_near_miss_again_and_keeps_the_faster_timing(monkeypatch, capsys):
    # An hour holds 14 epochs of 351 steps at 0.659 s or less. A slow minute during the first timing must not
    # cost the machine its size; a machine slow at both timings, or far too slow at the first, gets the smaller.
    steps = 45000 // 128
    for medium_timings, expected, timed in [((0.75, 0.65), "medium", 2), ((0.75, 0.70), "base", 2),
                                            ((1.0, 0.5), "base", 1), ((0.65, 0.5), "medium", 1)]:
        calls = {"small": iter([0.3]), "base": iter([0.45]), "medium": iter(medium_timings)}
        monkeypatch.setattr(chc, "time_training_step", lambda config: next(calls[config.model_size]))
        config = chc.parse_config(["--time-budget", "60", "--fresh"])
        config.sizes = ["small", "base", "medium"]
        chc.choose_model_size(config, 3600, 45000)
        assert config.model_size == expected, (medium_timings, 0.9 * 3600 / (steps * np.array(medium_timings)))
        assert len(list(calls["medium"])) == len(medium_timings) - timed
        printed = capsys.readouterr().out
        assert "model size medium" in printed and ("timed twice" in printed) == (timed == 2)


def test_time_budget_leaves_the_long_schedule_to_the_plan_for_the_large_size_and_a_resumed_run_keeps_it(
        monkeypatch, tmp_path):
    import tensorflow as tf
    paces = {"small": 0.05, "base": 0.1, "medium": 0.2, "large": 0.3}  # seconds per step, as on a fast CPU
    monkeypatch.setattr(chc, "time_training_step", lambda config: paces[config.model_size])
    backup = str(tmp_path / "run.backup")

    def chosen(minutes, *options):
        config = chc.parse_config(["--time-budget", str(minutes), "--checkpoint-dir", backup, *options])
        chc.choose_model_size(config, minutes * 60, 45000)
        return config.model_size, config.cutmix, config.label_smoothing, config.long_schedule_by_plan

    assert chosen(10) == ("base", 0.0, 0.1, [])  # room for 5 epochs of the large size: never the long schedule
    assert chosen(60) == ("large", 0.0, 0.1, ["cutmix", "label_smoothing"])  # the time plan decides
    assert chosen(60, "--cutmix", "0") == ("large", 0.0, 0.1, ["label_smoothing"])  # the command line wins
    assert chosen(60, "--cutmix", "0.25", "--label-smoothing", "0.1") == ("large", 0.25, 0.1, [])
    # A resumed run keeps the size and regularization its backup trained with, whatever the timing says now.
    paces["large"] = 0.2  # room for 46 epochs
    for cutmix, smoothing in (("0.5", "0.2"), ("0", "0.1")):
        config = chc.parse_config(["--model-size", "large", "--cutmix", cutmix, "--label-smoothing", smoothing,
                                   "--checkpoint-dir", backup])
        state = tf.train.Checkpoint(config=tf.Variable(chc.TrainingBackup.fingerprint(config)))
        tf.train.CheckpointManager(state, backup, max_to_keep=1).save()
        assert chosen(60)[:3] == ("large", float(cutmix), float(smoothing))


def test_the_time_plan_gives_the_large_size_the_long_schedule_from_its_own_timed_steps(cifar_folder, monkeypatch,
                                                                                       tmp_path):
    # A slow minute during the size timing (room for 20 epochs) must not cost a plan of 24 epochs or
    # more its CutMix and label smoothing; a plan of fewer gets neither, and an option given stays as given.
    paces = {"small": 0.02, "base": 0.05, "medium": 0.08, "large": 0.115}  # batches of 32
    monkeypatch.setattr(chc, "time_training_step", lambda config: paces[config.model_size])
    data = chc.load_cifar(cifar_folder)
    long = chc.LONG_SCHEDULE
    cases = ((400, [], long["cutmix"], long["label_smoothing"]), (100, [], 0.0, 0.1),
             (400, ["--cutmix", "0"], 0.0, long["label_smoothing"]))
    for budget, options, cutmix, smoothing in cases:
        config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--time-budget", "60", "--checkpoint-dir",
                                   str(tmp_path / f"run{budget}{len(options)}.backup"), *options])
        chc.choose_model_size(config, 3600, 45000)
        assert config.model_size == "large" and (config.cutmix, config.label_smoothing) == (0.0, 0.1)
        with monkeypatch.context() as patched:
            VirtualClock(step_seconds=1.0, pass_seconds=2.0, compute=False).install(patched)
            trainer = chc.Trainer(config, data, log=lambda *_: None)
            trainer.plan_time_budget(seconds=budget, test_images=200)
        assert (trainer.epochs >= chc.LONG_SCHEDULE_FROM_EPOCHS) == (budget == 400)
        assert trainer.config.cutmix == trainer.train_pipeline.cutmix == cutmix
        assert trainer.config.label_smoothing == trainer.loss_fn.get_config()["label_smoothing"] == smoothing
        saved = json.loads(trainer.backup.state["config"].numpy())
        assert (saved["cutmix"], saved["label_smoothing"]) == (cutmix, smoothing)  # a resumed run trains alike
        _, labels = next(iter(trainer.train_pipeline.train_dataset(epoch=0)))
        assert (labels.shape.rank == 2) == bool(cutmix)  # mixed labels only with CutMix


def test_a_named_size_sets_only_the_architecture_options_left_open():
    config = chc.parse_config(["--model-size", "large", "--depth", "1"])
    assert (config.model_size, config.depth, config.stem_width) == ("large", 1, 48)
    assert chc.parse_config(["--epochs", "14"]).model_size == "base"  # no budget: the fixed epochs' size
    assert chc.Config().stem_width == chc.MODEL_SIZES["base"]["stem_width"]


@pytest.mark.parametrize("argv, budget, epochs", [
    ([], chc.DEFAULT_TIME_BUDGET, chc.FIXED_EPOCHS),  # the default: an hour, which the plan fills
    (["--epochs", "5"], 0.0, 5),  # epochs alone: exactly that many, no budget
    (["--time-budget", "0"], 0.0, chc.FIXED_EPOCHS),
    (["--time-budget", "30"], 30.0, chc.FIXED_EPOCHS),
    (["--time-budget", "30", "--epochs", "5"], 30.0, 5),  # a budget given wins, as --help says
])
def test_the_run_length_is_a_time_budget_unless_epochs_are_given(argv, budget, epochs):
    config = chc.parse_config(argv)
    assert (config.time_budget, config.epochs) == (budget, epochs)
    assert config.model_size == ("auto" if budget else "base")
    assert (chc.Config(epochs=epochs).time_budget, chc.Config().time_budget) == (0.0, chc.DEFAULT_TIME_BUDGET)


def test_multi_worker_training_trains_fixed_epochs_unless_a_budget_is_asked_for(capsys):
    import tensorflow as tf
    multi_worker = mock.Mock(spec=tf.distribute.MultiWorkerMirroredStrategy)
    config = chc.parse_config([])  # the default budget: each worker would plan its own run
    chc.fit_run_length_to_strategy(config, multi_worker)
    assert (config.time_budget, config.epochs, config.model_size) == (0.0, chc.FIXED_EPOCHS, "base")
    assert "instead of the default time budget" in capsys.readouterr().out
    with pytest.raises(chc.InputError, match="--time-budget cannot be used with multi-worker"):
        chc.fit_run_length_to_strategy(chc.parse_config(["--time-budget", "60"]), multi_worker)
    alone = chc.parse_config([])
    chc.fit_run_length_to_strategy(alone, tf.distribute.get_strategy())
    assert alone.time_budget == chc.DEFAULT_TIME_BUDGET


def test_time_training_step_measures_a_real_step():
    config = chc.parse_config(["--model-size", "small", *TINY_ARGS[2:]])
    seconds = chc.time_training_step(config, repeats=2)
    assert isinstance(seconds, float) and seconds > 0 and math.isfinite(seconds)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86 default")
def test_onednn_kernels_are_on_unless_the_environment_says_otherwise():
    # TensorFlow leaves them off on AVX2-only CPUs, the slow class, whose steps they shorten most.
    from tensorflow.python.util import _pywrap_util_port
    if ONEDNN_OPTS_GIVEN is None:
        assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1" and _pywrap_util_port.IsMklEnabled()
    else:
        assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == ONEDNN_OPTS_GIVEN  # the user's choice stands


def test_cifar10_trains_end_to_end_and_evaluates(tmp_path, capsys):
    from conftest import CIFAR10_NAMES, write_cifar10, write_tarball
    archive = write_tarball(str(tmp_path / "cifar-10-python.tar.gz"), write_cifar10(str(tmp_path / "extracted")))
    output = str(tmp_path / "c10.keras")
    # With CutMix, whose mixed labels must have CIFAR-10's 10 classes.
    assert chc.main(["--dataset", "cifar10", "--data", archive, "--output", output, *TINY_ARGS, "--cutmix", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "CIFAR-10: 200 training and 30 test images" in out and "test top-1" in out
    assert "superclass" not in out and CIFAR10_NAMES[9] in out
    metrics = json.loads((tmp_path / "c10.metrics.json").read_text())
    assert "superclass_top1" not in metrics["test"] and list(metrics["per_class"]) == CIFAR10_NAMES
    model = chc.load_model(output)
    assert model.output_shape == (None, 10) and model.class_names == CIFAR10_NAMES
    assert model.get_layer("standardize").mean == chc.DATASETS["cifar10"]["mean"]
    assert chc.main(["evaluate", "--model", output, "--data", archive]) == 0  # the data set follows the model
    assert f"{output} on the CIFAR-10 test set (30 images)" in capsys.readouterr().out


def test_batch_norm_shifts_take_a_multiple_of_the_learning_rate(cifar_folder):
    # No warm-up: the first step runs at the peak rate, and AdamW's first step moves every weight
    # by the rate times |g| / (|g| + epsilon), the rate itself unless the gradient is tiny, so each
    # layer's largest move shows its rate.
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--warmup-fraction", "0",
                               "--learning-rate", "0.01", "--shift-lr-scale", "8"])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    norms = [layer for layer in trainer.model._flatten_layers() if isinstance(layer, chc.BatchNormalization)]
    assert norms
    before = [(n.beta.numpy(), n.gamma.numpy()) for n in norms]
    images, labels = next(iter(trainer.train_pipeline.train_dataset(0)))
    trainer._train_step(images, labels)
    for norm, (beta, gamma) in zip(norms, before):
        assert 0.07 < np.abs(norm.beta.numpy() - beta).max() <= 0.08 * 1.0001
        assert 0.007 < np.abs(norm.gamma.numpy() - gamma).max() <= 0.01 * 1.0001


def test_muon_turns_the_conv_kernels_by_the_step_at_a_fixed_norm_and_leaves_the_rest_to_adamw(cifar_folder):
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--warmup-fraction", "0",
                               "--learning-rate", "0.01", "--muon-step", "0.05"])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    convs = [layer for part in ("stem", "cnn_branch") for layer in trainer.model.get_layer(part).stack.layers
             if isinstance(layer, chc.layers.Conv2D)]
    assert len(convs) >= 3 and not convs[0].trainable  # the whitened first conv stays fixed
    dense = trainer.model.get_layer("vit_branch").trainable_variables[0]
    before = [conv.kernel.numpy() for conv in convs], dense.numpy()
    images, labels = next(iter(trainer.train_pipeline.train_dataset(0)))
    trainer._train_step(images, labels)
    np.testing.assert_array_equal(convs[0].kernel.numpy(), before[0][0])
    for conv, old in zip(convs[1:], before[0][1:]):
        new, filters = conv.kernel.numpy(), old.shape[-1]
        # Batch norm ignores the scale: each step starts from the norm sqrt(filters) (a step of 0.05 adds ~0.1 %)
        assert np.linalg.norm(new) == pytest.approx(np.sqrt(filters), rel=3e-3)
        kept = old * np.sqrt(filters) / np.linalg.norm(old)
        singular = np.linalg.svd((new - kept).reshape(-1, filters), compute_uv=False)
        # Orthogonalized: every direction moves, by about the step (three iterations lift the smallest
        # directions of a gradient only part of the way, so the lower bound is loose).
        assert 0.01 < singular.min() and singular.max() < 0.07
    # AdamW's first step moves some entry of every other weight by about the whole rate
    assert 0.0099 < np.abs(dense.numpy() - before[1]).max() < 0.0101  # (and a weight decay of 0.05 of it)


def test_orthogonalized_matrices_have_singular_values_near_one():
    rng = np.random.default_rng(0)
    for shape in ((16, 144), (144, 16)):  # a gradient-like matrix, wide and tall
        matrix = rng.normal(size=shape).astype("float32")
        singular = np.linalg.svd(chc.keras.ops.convert_to_numpy(chc.orthogonalized(matrix)), compute_uv=False)
        before = np.linalg.svd(matrix, compute_uv=False)
        assert singular.shape == (16,) and before.max() / before.min() > 1.5
        assert 0.6 < singular.min() and singular.max() < 1.25


def test_orthogonalized_matches_the_plain_newton_schulz_iteration():
    # The Gram-matrix form must be the same iteration as x <- p(x x^T) x, only cheaper.
    rng = np.random.default_rng(1)
    for shape in ((48, 432), (432, 48), (7, 7)):
        matrix = rng.normal(size=shape)
        x = matrix if shape[0] <= shape[1] else matrix.T
        x = x / np.linalg.norm(x)
        for _ in range(3):
            gram = x @ x.T
            x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
        expected = x if shape[0] <= shape[1] else x.T
        got = chc.keras.ops.convert_to_numpy(chc.orthogonalized(matrix.astype("float32")))
        assert got.shape == shape
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_optimizer_step_benchmark_times_both_settings(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import optimizer_step
    optimizer_step.main(["--rounds", "1", *TINY_ARGS])
    figures = json.loads(capsys.readouterr().out)
    assert figures["step_ms_adamw"] > 0 and figures["step_ms_muon_convs"] > 0
    assert [len(times) for times in figures["rounds_ms"].values()] == [1, 1] and figures["batch_size"] == 32
