"""Soak tests: runs of a hundred steps and more whose threads and memory must stay flat from epoch to epoch.

A leak of one thread (or a few kilobytes) per step passes every short test; here it shows as a hundred.
Threads and resident memory are read from /proc at each `epoch k/n` line, so these tests need Linux.
"""

import os
import signal
import subprocess
import sys

import pytest

from conftest import (ROOT, TINY_ARGS, assert_a_lost_peer_ended_the_run, make_split, run_two_workers,
                      signal_worker_after, watch, write_folder)

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")

# Batch 8 per replica: 600 training images make 37 steps per epoch of a global batch of 16 on two
# workers, and 75 of 8 in one process: over a hundred steps before the two-worker run's end, 300 in one.
SOAK_ARGS = [*TINY_ARGS, "--epochs", "4", "--batch-size", "8"]
THREAD_MARGIN = 16  # TensorFlow starts and ends pool threads on demand; a leak of one per step adds dozens


@pytest.fixture(scope="module")
def soak_folder(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("cifar_soak")), train=make_split(800, 7))


def assert_flat_threads(samples, log, epochs=4):
    assert len(samples) >= epochs, log[-3000:]
    threads = [count for count, _ in samples]
    assert max(threads) - threads[0] <= THREAD_MARGIN, f"threads after each epoch: {threads}"


def test_two_workers_keep_their_threads_and_a_killed_one_ends_the_run_in_one_line(tmp_path, soak_folder):
    # Worker 1 is killed once the chief has logged epoch 3: the chief's next collective fails.
    act, sent = signal_worker_after("epoch 3/4", 1, signal.SIGKILL)
    codes, logs, samples, ended = run_two_workers(tmp_path, ["--data", soak_folder, *SOAK_ARGS], "soak", act)
    assert codes == [4, -9], logs[0][-3000:]
    assert "plan: 4 epoch(s) of 37 steps" in logs[0] and "epoch 4/4" not in logs[0]
    assert_a_lost_peer_ended_the_run(logs[0], ended[0] - sent["at"])
    # Worker 1 may die before its own line of epoch 3 reached its log.
    assert_flat_threads(samples[0], logs[0], epochs=3)
    assert_flat_threads(samples[1], logs[1], epochs=2)


def test_one_process_keeps_its_threads_and_memory_over_hundreds_of_steps(tmp_path, soak_folder):
    log = tmp_path / "soak.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cifar_hybrid_classifier.py"), "--data",
                                 soak_folder, *SOAK_ARGS], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": ROOT})
    codes, texts, (samples,), _ = watch([proc], [log])
    assert codes == [0], texts[0][-3000:]
    assert "plan: 4 epoch(s) of 75 steps" in texts[0]
    assert_flat_threads(samples, texts[0])
    # The first epoch traces the step functions and fills the allocator's pools; after it, memory holds.
    resident = [rss for _, rss in samples]
    assert max(resident[1:]) <= 1.03 * resident[1], f"resident MB after each epoch: {[r >> 20 for r in resident]}"
