"""Soak tests: runs of several hundred steps whose threads and memory must stay flat from epoch to epoch.

A leak of one thread (or a few kilobytes) per step passes every short test; here it shows as hundreds.
Threads and resident memory are read from /proc at each `epoch k/n` line, so these tests need Linux.
"""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_ARGS, make_split, run_two_workers, watch, write_folder

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")

# Batch 8 per replica: 900 training images make 56 steps per epoch of a global batch of 16 on two
# workers, and 112 of 8 in one process: 224 and 448 steps in all.
SOAK_ARGS = [*TINY_ARGS, "--epochs", "4", "--batch-size", "8"]
THREAD_MARGIN = 16  # TensorFlow starts and ends pool threads on demand; a leak of one per step adds hundreds


@pytest.fixture(scope="module")
def soak_folder(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("cifar_soak")), train=make_split(1200, 7))


def assert_flat_threads(samples, log):
    assert len(samples) == 4, log[-3000:]
    threads = [count for count, _ in samples]
    assert max(threads) - threads[0] <= THREAD_MARGIN, f"threads after each epoch: {threads}"


def test_two_workers_keep_their_threads_over_hundreds_of_steps(tmp_path, soak_folder):
    codes, logs, samples, _ = run_two_workers(tmp_path, ["--data", soak_folder, *SOAK_ARGS], "soak")
    assert codes == [0, 0], [log[-3000:] for log in logs]
    assert "epoch 4/4" in logs[0] and "plan: 4 epoch(s) of 56 steps" in logs[0]
    for worker, log in zip(samples, logs):
        assert_flat_threads(worker, log)


def test_one_process_keeps_its_threads_and_memory_over_hundreds_of_steps(tmp_path, soak_folder):
    log = tmp_path / "soak.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cifar_hybrid_classifier.py"), "--data",
                                 soak_folder, *SOAK_ARGS], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": ROOT})
    codes, texts, (samples,), _ = watch([proc], [log])
    assert codes == [0], texts[0][-3000:]
    assert "plan: 4 epoch(s) of 112 steps" in texts[0]
    assert_flat_threads(samples, texts[0])
    # The first epoch traces the step functions and fills the allocator's pools; after it, memory holds.
    resident = [rss for _, rss in samples]
    assert max(resident[1:]) <= 1.03 * resident[1], f"resident MB after each epoch: {[r >> 20 for r in resident]}"
