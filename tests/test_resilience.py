"""Fault injection: kill -9, signals and interrupted saves in real processes; NaN losses; hostile input.

Runs that only need to finish (references, reruns), the NaN stop and the input checks call `main`
in-process: starting an interpreter with TensorFlow costs seconds, and the code path is the same.
"""

import csv
import errno
import json
import os
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import tensorflow as tf

import cifar_hybrid_classifier as chc
from conftest import ROOT, TINY_ARGS, RunsCommand, main_error, make_split, write_folder, write_tarball

SCRIPT = os.path.join(ROOT, "cifar_hybrid_classifier.py")
FOUR_EPOCHS = [*TINY_ARGS, "--epochs", "4"]  # argparse keeps the last --epochs
ENV = {**os.environ, "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory):
    """Enough images (37 steps per epoch) that a signal sent at an epoch boundary lands in the next epoch."""
    return write_folder(str(tmp_path_factory.mktemp("cifar_slow")), train=make_split(1600, 5))


def run_script(*args, cwd=None, code=None):
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, SCRIPT, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=ENV)


def run_main(argv, capsys):
    """`main(argv)` in this process; it must succeed. Returns what it printed."""
    code = chc.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


class Child:
    """A training process whose stdout lines can be awaited; always reaped."""

    def __init__(self, args, stderr_path):
        self.stderr = open(stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=ENV)
        self.lines = queue.Queue()
        self.output = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.lines.get(timeout=max(0.1, deadline - time.time()))
            if line is None:
                break
            self.output.append(line)
            if text in line:
                return
        raise AssertionError(f"never printed {text!r}:\n{''.join(self.output)[-3000:]}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self.stderr.close()


def read_history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def resume_line(stdout):
    match = re.search(r"resuming from the backup in .*: epoch (\d+) of (\d+), (\d+) of (\d+) steps done, "
                      r"learning rate (\S+)", stdout)
    assert match, stdout[-3000:]
    return match


def test_a_signal_backs_up_mid_epoch_kill_9_keeps_the_last_epoch_and_both_resume_on_the_same_schedule(
        tmp_path, slow_folder, capsys):
    args = ["--data", slow_folder, *FOUR_EPOCHS]
    output = tmp_path / "cifar_hybrid.keras"
    # SIGTERM (what `kill` and job schedulers send) in epoch 2: the run finishes its batch, backs up and
    # exits 143. (SIGINT takes the same handler, which main sets for both: its exit code 130 is
    # test_stop_mid_epoch_resumes_at_the_next_batch's.)
    child = Child([*args, "--output", str(output)], tmp_path / "stopped.err")
    try:
        child.wait_for("epoch 1/4")
        time.sleep(0.3)  # into epoch 2
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        child.close()
    stderr = (tmp_path / "stopped.err").read_text()
    assert "Traceback" not in stderr and "run the same command again to resume" in stderr

    # The same command resumes at the batch the signal stopped at, not at the end of epoch 1.
    child = Child([*args, "--output", str(output)], tmp_path / "killed.err")
    try:
        child.wait_for("epoch 2/4")
        match = resume_line("".join(child.output))
        assert (match[1], match[2], match[4]) == ("2", "4", "37") and 0 < int(match[3]) < 37
        child.proc.send_signal(signal.SIGSTOP)  # frozen in epoch 3, still holding its lock
        # One run per output: a second run on it is refused, naming the first (a run that waited for the
        # lock would wait here for ever, as the first run is frozen).
        error = main_error([*args, "--output", str(output)], capsys)
        assert f"another run (PID {child.proc.pid})" in error and "another --output" in error
        child.proc.send_signal(signal.SIGKILL)  # no handler runs; the kernel drops its lock
    finally:
        child.close()
    assert child.proc.returncode == -signal.SIGKILL
    assert (tmp_path / "cifar_hybrid.backup" / "checkpoint").is_file() and not output.exists()

    # After kill -9 the run resumes from the last epoch's backup, on the schedule of a run never stopped.
    resumed = run_main([*args, "--output", str(output)], capsys)
    match = resume_line(resumed)
    assert (match[1], match[2], match[3], match[4]) == ("3", "4", "0", "37")
    # The schedule an uninterrupted run follows: warm-up over a tenth of the 4 x 37 steps, then cosine.
    uninterrupted = chc.WarmupCosine(peak=0.002, total_steps=4 * 37, warmup_fraction=0.1)
    # The first resumed step uses the rate an uninterrupted run has after epoch 2, and so on to the end.
    assert float(match[5]) == pytest.approx(float(uninterrupted(2 * 37)), rel=1e-6)
    assert re.findall(r"^epoch (\d)/4", resumed, re.M) == ["3", "4"]
    history = read_history(tmp_path / "cifar_hybrid.history.csv")
    assert [h["epoch"] for h in history] == ["1", "2", "3", "4"]
    assert [float(h["learning_rate"]) for h in history] == pytest.approx(
        [float(uninterrupted(epoch * 37)) for epoch in range(1, 5)], rel=1e-6, abs=1e-12)
    assert output.is_file() and not (tmp_path / "cifar_hybrid.backup").exists()


def test_stop_mid_epoch_resumes_at_the_next_batch(tmp_path, cifar_folder):
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--epochs", "2", "--checkpoint-dir",
                               str(tmp_path / "b")])
    data = chc.load_cifar(cifar_folder)
    chc.set_seeds(config.seed)
    trainer = chc.Trainer(config, data, log=lambda *_: None)
    assert trainer.steps_per_epoch == 9
    step = trainer._train_step

    def stop_at_step_12(images, labels):
        result = step(images, labels)
        if trainer.global_step() == 12:
            trainer.request_stop(signal.SIGINT)
        return result

    trainer._train_step = stop_at_step_12
    with pytest.raises(chc.TrainingInterrupted) as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 130

    resumed = chc.Trainer(config, data, log=lambda *_: None)
    assert resumed.resume()
    assert (resumed.start_epoch, resumed.start_step, resumed.global_step()) == (1, 3, 12)
    assert resumed.learning_rate() == pytest.approx(float(resumed.schedule(12)))
    resumed.fit()
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.global_step() == 2 * 9


DIES_WHILE_SAVING = textwrap.dedent("""
    import os, sys
    import keras
    import cifar_hybrid_classifier as chc
    model = chc.build_model(chc.parse_config(sys.argv[2:]))
    def save_half_and_die(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\\x03\\x04" + b"half a model" * 100)
        os._exit(9)  # as if killed mid-write
    keras.Model.save = save_half_and_die
    chc.save_model_atomically(model, sys.argv[1])
""")


def test_interrupted_save_leaves_the_previous_model_loadable(tmp_path):
    path = tmp_path / "cifar_hybrid.keras"
    chc.save_model_atomically(chc.build_model(chc.parse_config(TINY_ARGS)), str(path))
    before = path.read_bytes()
    result = run_script(str(path), *TINY_ARGS, code=DIES_WHILE_SAVING)
    assert result.returncode == 9, result.stderr[-3000:]
    assert path.read_bytes() == before
    assert chc.load_model(str(path)).count_params() > 0


def test_nan_loss_stops_with_exit_3_and_keeps_earlier_files(tmp_path, cifar_folder, monkeypatch, capsys):
    output = tmp_path / "m.keras"
    output.write_bytes(b"an earlier model")
    args = ["--data", cifar_folder, *FOUR_EPOCHS, "--output", str(output)]
    step = chc.Trainer._distributed_train_step

    def poisoned(self, images, labels):  # 9 steps per epoch: step 12 is in epoch 2
        loss, correct = step(self, images, labels)
        return tf.where(self.optimizer.iterations >= 12, float("nan"), loss), correct

    with monkeypatch.context() as m:
        m.setattr(chc.Trainer, "_distributed_train_step", poisoned)
        assert "epoch 2, batch 3" in main_error(args, capsys, code=3)
    assert output.read_bytes() == b"an earlier model"
    trainer = chc.Trainer(chc.parse_config(args), chc.load_cifar(cifar_folder), log=lambda *_: None)
    assert trainer.resume() and (trainer.start_epoch, trainer.start_step) == (1, 0)  # the epoch-1 backup is intact


# ---- hostile input: exit 2, one line, no traceback, before any training ----

def corrupt_folder(tmp_path, **members):
    return write_folder(str(tmp_path / "bad"), **members)


def _split_with(**changes):
    split = make_split(400, 1)
    split.update({k.encode(): v for k, v in changes.items()})
    return split


def _without(key):
    split = make_split(400, 1)
    del split[key.encode()]
    return split


def _tarball_without_meta(tmp_path):
    folder = corrupt_folder(tmp_path)
    os.remove(os.path.join(folder, "meta"))
    return write_tarball(str(tmp_path / "nometa.tar.gz"), folder)


def _truncated_tarball(tmp_path):
    path = write_tarball(str(tmp_path / "full.tar.gz"), corrupt_folder(tmp_path))
    data = open(path, "rb").read()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "cut.tar.gz")


def _file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


HOSTILE_DATA = {
    "missing file": (lambda t: str(t / "nope.tar.gz"), "no such file"),
    "empty file": (lambda t: _file(t, "empty.tar.gz", b""), "not a readable CIFAR-100 .tar.gz archive"),
    "not gzip": (lambda t: _file(t, "x.tar.gz", b"hello, not gzip" * 10), "not a readable CIFAR-100"),
    "truncated archive": (_truncated_tarball, "not a readable CIFAR-100"),
    "archive without members": (_tarball_without_meta, "archive lacks meta"),
    "wrong keys": (lambda t: corrupt_folder(t, train=_without("fine_labels")), "no 'fine_labels' entry"),
    "wrong shape": (lambda t: corrupt_folder(t, train=_split_with(data=make_split(400, 1)[b"data"][:, :100])),
                    "expected uint8 (N, 3072)"),
    "wrong dtype": (lambda t: corrupt_folder(t, train=_split_with(
        data=make_split(400, 1)[b"data"].astype("float32"))), "expected uint8 (N, 3072)"),
    "labels out of range": (lambda t: corrupt_folder(t, train=_split_with(fine_labels=[100] * 400)),
                            "fine_labels out of range"),
    "truncated pickle": (lambda t: corrupt_folder(t, train=pickle.dumps(make_split(400, 1), protocol=2)[:5000]),
                         "not a valid CIFAR-100 pickle"),
}


@pytest.mark.parametrize("case", list(HOSTILE_DATA))
def test_hostile_data_is_one_line_exit_2(tmp_path, case, capsys):
    make, message = HOSTILE_DATA[case]
    assert message in main_error(["--data", make(tmp_path), "--output", str(tmp_path / "m.keras"), *TINY_ARGS],
                                 capsys)
    assert not (tmp_path / "m.keras").exists()


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = corrupt_folder(tmp_path, train=pickle.dumps(_split_with(batch_label=RunsCommand(marker)), protocol=2))
    argv = ["--data", write_tarball(str(tmp_path / "evil.tar.gz"), folder), "--output", str(tmp_path / "m.keras"),
            *TINY_ARGS]
    assert "refusing to load posix.system" in main_error(argv, capsys)
    assert not marker.exists()


def test_unreadable_data_folder(tmp_path, monkeypatch, capsys):
    folder = corrupt_folder(tmp_path)
    train = os.path.join(folder, "train")
    os.chmod(train, 0)
    real_open = open

    def refusing_open(path, *args, **kwargs):  # as root, permission bits do not stop reads: the OS refuses here
        if str(path) == train:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    try:
        if os.access(train, os.R_OK):
            monkeypatch.setattr("builtins.open", refusing_open)
        argv = ["--data", folder, "--output", str(tmp_path / "m.keras"), *TINY_ARGS]
        assert "cannot read (Permission denied)" in main_error(argv, capsys)
    finally:
        os.chmod(train, 0o600)


def test_paths_and_options(tmp_path, cifar_folder, monkeypatch, capsys):
    """In-process `main`: the same checks and messages as the command line, without a process per case."""
    out = str(tmp_path / "m.keras")

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def disk_full(path):
        return shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 4096, 4096)

    cases = [
        (["--output", str(tmp_path / "missing" / "m.keras")], "does not exist", None),
        (["--output", out, "--checkpoint-dir", str(tmp_path / "missing" / "b")], "does not exist", None),
        (["--output", out, "--checkpoint-dir", _file(tmp_path, "afile", b"x")], "is a file", None),
        (["--output", out], "MB free", (shutil, "disk_usage", disk_full)),
        (["--output", out], "is not writable (Read-only file system)", (tempfile, "NamedTemporaryFile", refuse)),
    ]
    for extra, message, patch in cases:
        with monkeypatch.context() as m:
            if patch:
                m.setattr(*patch)
            assert message in main_error(["--data", cifar_folder, *TINY_ARGS, *extra], capsys)
    for extra, message in ((["--embed-dim", "30", "--num-heads", "4"], "must divide"),
                           (["--output", out, "--checkpoint-dir", out], "must differ")):
        with pytest.raises(SystemExit) as exit_info:
            chc.main(["--data", cifar_folder, *TINY_ARGS, *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(out)


def backup_with(args, folder, change):
    """Back up the first step of a run of `args`, its recorded options passed through `change` first."""
    trainer = chc.Trainer(chc.parse_config(args), chc.load_cifar(folder), log=lambda *_: None)
    options = json.loads(trainer.backup.state["config"].numpy())
    change(options)
    trainer.backup.state["config"].assign(json.dumps(options))
    trainer.request_stop(signal.SIGINT)  # as if interrupted in the first step: a backup of that step
    with pytest.raises(chc.TrainingInterrupted):
        trainer.fit()


def test_a_backup_of_a_run_with_a_removed_option_is_refused(tmp_path, cifar_folder, capsys):
    args = ["--data", cifar_folder, *TINY_ARGS, "--output", str(tmp_path / "m.keras")]
    backup_with(args, cifar_folder, lambda older: older.update(cutout=8, stem="pool"))  # --stem pool: the default
    assert "(--cutout 8 -> 0);" in main_error(args, capsys)


def test_backup_from_other_options_or_damaged_is_refused(tmp_path, slow_folder, capsys):
    args = ["--data", slow_folder, *FOUR_EPOCHS, "--output", str(tmp_path / "m.keras"), "--muon-step", "0"]

    def older_version(options):  # before --shift-lr-scale and Muon (so it ran as 1 and 0), with --cutout 0
        del options["shift_lr_scale"], options["muon_step"]
        options["cutout"] = 0
    backup_with(args, slow_folder, older_version)

    # In-process `main`: the checks run before any training step.
    assert main_error(args, capsys).endswith("(--shift-lr-scale 1.0 -> 8.0); rerun with the same options to "
                                             "resume, or add --fresh to start over")
    error = main_error([*args, "--shift-lr-scale", "1", "--learning-rate", "0.01"], capsys)
    assert "(--learning-rate 0.002 -> 0.01);" in error
    args += ["--shift-lr-scale", "1"]
    for name in os.listdir(tmp_path / "m.backup"):
        if ".data-" in name:
            (tmp_path / "m.backup" / name).write_bytes(b"garbage")
    assert "is damaged" in main_error(args, capsys)
    messages = []
    fresh = chc.Trainer(chc.parse_config([*args, "--fresh"]), chc.load_cifar(slow_folder), log=messages.append)
    assert not fresh.resume() and any("--fresh: ignoring the backup" in m for m in messages)


def test_damaged_model_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.keras"
    chc.save_model_atomically(chc.build_model(chc.parse_config(TINY_ARGS)), str(good))
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[:2000])
    text = tmp_path / "notes.keras"
    text.write_text("not a model")
    for path, message in ((truncated, "truncated or damaged"), (text, "not a .keras model file"),
                          (tmp_path / "nope.keras", "no such model file")):
        with pytest.raises(chc.InputError, match=message):
            chc.load_model(str(path))


@pytest.fixture
def syscalls(monkeypatch):
    """Records os.fsync (by the path its descriptor was opened with) and os.replace, in call order."""
    calls, opened = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def recording_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = os.path.abspath(path)
        return fd

    def recording_fsync(fd):
        calls.append(("fsync", opened.get(fd)))
        real_fsync(fd)

    def recording_replace(source, target, **kwargs):
        calls.append(("replace", os.path.abspath(source), os.path.abspath(target)))
        real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return calls


def test_saving_flushes_the_file_then_renames_then_flushes_the_folder(tmp_path, syscalls):
    path = str(tmp_path / "m.keras")
    chc.save_model_atomically(chc.build_model(chc.parse_config(TINY_ARGS)), path)
    renames = [call for call in syscalls if call[0] == "replace"]
    assert len(renames) == 1 and renames[0][2] == path
    temporary = renames[0][1]
    assert syscalls == [("fsync", temporary), renames[0], ("fsync", str(tmp_path))]


def test_a_backup_save_flushes_its_files_and_folder(tmp_path, cifar_folder, syscalls):
    folder = str(tmp_path / "b")
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--checkpoint-dir", folder])
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    del syscalls[:]
    trainer.backup.save(0, 0)
    written = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    flushed = [path for kind, path, *_ in syscalls if kind == "fsync"]
    assert sorted(flushed[:-1]) == written and flushed[-1] == folder  # every file, then the folder

