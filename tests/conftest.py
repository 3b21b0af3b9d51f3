"""Shared fixtures: tiny synthetic CIFAR-100 data written in the official python format."""

import importlib.util
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the environment said before the script, imported by the tests, set its default.
ONEDNN_OPTS_GIVEN = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
sys.path.insert(0, ROOT)
import cifar_hybrid_classifier  # noqa: E402,F401  (first: it sets TensorFlow's environment before TensorFlow loads)
import tensorflow as tf  # noqa: E402

# Functions traced in this process skip Grappler's graph rewrites: for a tiny model they cost a step function's
# first call more than its steps do, dozens of times per suite, and these tests check what the graphs compute,
# not how fast. The tests that start the script in a subprocess run it as a user does, rewrites included.
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})

FINE_NAMES = [f"fine_{i:02d}" for i in range(100)]
COARSE_NAMES = [f"coarse_{i:02d}" for i in range(20)]


def make_split(n, seed):
    """Pickle-ready dict as in the official files: bytes keys, (N, 3072) uint8 data, list labels.

    Each class gets a distinct mean colour so a model can learn something in a few steps.
    """
    rng = np.random.default_rng(seed)
    fine = np.arange(n) % 100
    colours = np.random.default_rng(0).integers(0, 256, size=(100, 3))
    images = colours[fine][:, :, None, None] + rng.normal(0, 20, size=(n, 3, 32, 32))
    data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
    return {b"batch_label": b"synthetic", b"filenames": [f"{i}.png".encode() for i in range(n)],
            b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()}


def make_meta():
    return {b"fine_label_names": [n.encode() for n in FINE_NAMES],
            b"coarse_label_names": [n.encode() for n in COARSE_NAMES]}


def write_folder(folder, train=None, test=None, meta=None):
    """Write cifar-100-python/{train,test,meta} under `folder`; returns the cifar-100-python path."""
    path = os.path.join(folder, "cifar-100-python")
    os.makedirs(path, exist_ok=True)
    members = {"train": train if train is not None else make_split(400, 1),
               "test": test if test is not None else make_split(200, 2),
               "meta": meta if meta is not None else make_meta()}
    for name, obj in members.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2))
    return path


CIFAR10_NAMES = [f"class_{i}" for i in range(10)]


def write_cifar10(folder, drop=None, **changes):
    """Write cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} under `folder` (40 images per
    training batch, 30 test images); `changes` maps a file to {key: function of its value}; `drop` leaves
    one file out. Returns the cifar-10-batches-py path."""
    path = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(path, exist_ok=True)
    members = {f"data_batch_{i}": make_split(40, 10 + i) for i in range(1, 6)}
    members["test_batch"] = make_split(30, 20)
    for split in members.values():
        split[b"labels"] = [label % 10 for label in split.pop(b"fine_labels")]
        del split[b"coarse_labels"]
    members["batches.meta"] = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": 40}
    for name, change in changes.items():
        for key, function in change.items():
            members[name][key.encode()] = function(members[name][key.encode()])
    for name, obj in members.items():
        if name != drop:
            with open(os.path.join(path, name), "wb") as f:
                f.write(pickle.dumps(obj, protocol=2))
    return path


def write_tarball(path, folder):
    """Pack an extracted cifar-100-python (or cifar-10-batches-py) folder the way the official archive is."""
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname=os.path.basename(folder))
    return path


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(scope="session")
def cifar_tarball(tmp_path_factory, cifar_folder):
    return write_tarball(str(tmp_path_factory.mktemp("tar") / "cifar-100-python.tar.gz"), cifar_folder)


class RunsCommand:
    """A pickle payload whose `__reduce__` would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def main_error(argv, capsys, code=2):
    """In-process `main(argv)` (no interpreter to start): it must return `code` and print exactly one
    `error:` line, which is returned. An exception that would have been a traceback fails the test instead."""
    import cifar_hybrid_classifier as chc
    assert chc.main(argv) == code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


# No test-time augmentation: its extra prediction passes cost each run seconds; the end-to-end test of
# the script adds --tta, and the TTA's own test calls it directly.
TINY_ARGS = ["--epochs", "1", "--batch-size", "32", "--validation-split", "0.25", "--precision", "float32",
             "--cnn-widths", "8,16", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
             "--head-units", "32", "--patch-size", "8", "--no-tta"]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory, cifar_folder):
    """A tiny model trained on the synthetic data and saved the way the command line saves it."""
    import cifar_hybrid_classifier as chc
    path = str(tmp_path_factory.mktemp("model") / "m.keras")  # its backup folder goes beside it too
    config = chc.parse_config(["--data", cifar_folder, *TINY_ARGS, "--epochs", "3", "--learning-rate", "0.01",
                               "--output", path])
    chc.set_seeds(config.seed)
    trainer = chc.Trainer(config, chc.load_cifar(cifar_folder), log=lambda *_: None)
    trainer.fit()
    chc.save_model_atomically(trainer.export_model(), path)
    return path


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Default outputs (the model, its backup folder) land in a per-test folder, never in the checkout."""
    monkeypatch.chdir(tmp_path)


def run_outputs(stem="cifar_hybrid"):
    """The files a finished training run leaves beside its model (the images only with matplotlib)."""
    names = [f"{stem}.keras", f"{stem}.history.csv", f"{stem}.metrics.json", f"{stem}.report.txt"]
    if importlib.util.find_spec("matplotlib"):
        names += [f"{stem}.curves.png", f"{stem}.confusion.png"]
    return sorted(names)


def process_status(pid):
    """A live process's thread count and resident memory in bytes, from /proc/PID/status (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) * 1024


EPOCH_LINE = re.compile(r"^epoch \d+/\d+ ", re.M)


def watch(procs, logs, act=None, timeout=600):
    """Wait for every process, polling their logs: each time process i prints an `epoch k/n` line, its
    (threads, resident bytes) right then are appended to samples[i]. `act(texts)` runs at every poll
    (to signal a process when its log shows something). Returns the exit codes, the logs' texts, the
    samples and when each process ended; a process still running at `timeout` is killed."""
    samples, ended = [[] for _ in procs], [None] * len(procs)
    deadline = time.time() + timeout
    try:
        while None in ended and time.time() < deadline:
            texts = [log.read_text() for log in logs]
            for i, proc in enumerate(procs):
                if ended[i] is None and proc.poll() is not None:
                    ended[i] = time.time()
                while ended[i] is None and len(samples[i]) < len(EPOCH_LINE.findall(texts[i])):
                    try:
                        samples[i].append(process_status(proc.pid))
                    except (FileNotFoundError, ProcessLookupError):
                        break
            if act is not None:
                act(texts)
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return [proc.returncode for proc in procs], [log.read_text() for log in logs], samples, ended


# Soak runs: batch 8 per replica, so 600 training images make 75 steps per epoch in one process and 37 of
# a global batch of 16 on two workers: 300 steps in four epochs, over a hundred before a two-worker run's end.
SOAK_ARGS = [*TINY_ARGS, "--epochs", "4", "--batch-size", "8"]
THREAD_MARGIN = 16  # TensorFlow starts and ends pool threads on demand; a leak of one per step adds dozens


def write_soak_folder(folder):
    return write_folder(folder, train=make_split(800, 7))


def assert_flat_threads(samples, log, epochs=4):
    """`samples` from `watch`: one per epoch line, at least `epochs`; the thread count may not climb."""
    assert len(samples) >= epochs, log[-3000:]
    threads = [count for count, _ in samples]
    assert max(threads) - threads[0] <= THREAD_MARGIN, f"threads after each epoch: {threads}"


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_two_workers(tmp_path, args, name, act=None):
    """Train with worker 0 (the chief) and worker 1 on loopback ports, each in its own folder
    (`worker0`, `worker1`) and TMPDIR (`name`-tmp0, `name`-tmp1), logging to `name`0.txt and `name`1.txt.

    `act(texts, procs)` runs at every poll of the logs (see `watch`). Returns what `watch` returns."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    procs, logs = [], [tmp_path / f"{name}{index}.txt" for index in range(2)]
    for index in range(2):
        (tmp_path / f"worker{index}").mkdir(exist_ok=True)
        (tmp_path / f"{name}-tmp{index}").mkdir(exist_ok=True)
        env = {**os.environ, "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path / f"{name}-tmp{index}"),
               "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}
        with open(logs[index], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "cifar_hybrid_classifier.py"), *args, "--distribute",
                 "multi-worker"], cwd=tmp_path / f"worker{index}", env=env, stdout=log, stderr=subprocess.STDOUT))
    return watch(procs, logs, act and (lambda texts: act(texts, procs)))


# The coordination service misses a peer's heartbeats within about ten seconds (README, "Training on
# several GPUs or machines"); a run that waits longer for a lost peer has lost that promise.
LOST_PEER_SECONDS = 60


def freeze_the_chief_then_continue_it(text):
    """An `act` for `run_two_workers`: freeze the chief (SIGSTOP) once its log shows `text` (it logs an
    epoch after backing it up), and continue it (SIGCONT) once worker 1 has ended, so that it finds its peer
    gone; kill it if it outlives the bound. Returns the act and a dict that gets the times of both signals."""
    at = {}

    def act(texts, procs):
        chief, worker = procs
        if "frozen" not in at and text in texts[0]:
            chief.send_signal(signal.SIGSTOP)
            at["frozen"] = time.time()
        if "frozen" in at and "continued" not in at and worker.poll() is not None:
            chief.send_signal(signal.SIGCONT)
            at["continued"] = time.time()
        if "continued" in at and chief.poll() is None and time.time() - at["continued"] > LOST_PEER_SECONDS:
            chief.kill()
    return act, at


def assert_a_lost_peer_ended_the_run(log, seconds):
    """The survivor of a lost peer ended within the bound, in one line naming the cause, no traceback."""
    assert seconds < LOST_PEER_SECONDS, log[-3000:]
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost a peer worker" in errors[0] and "rerun every worker" in errors[0], errors
