"""Soak test: two workers over a hundred steps, whose threads must stay flat from epoch to epoch.

A leak of one thread (or a few kilobytes) per step passes every short test; here it shows as a hundred.
Threads are read from /proc at each `epoch k/n` line, so this test needs Linux. (One process's soak is
the end-to-end test of the script: test_end_to_end.py.)
"""

import os
import signal

import pytest

from conftest import (SOAK_ARGS, assert_a_lost_peer_ended_the_run, assert_flat_threads, run_two_workers,
                      signal_worker_after, write_soak_folder)

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")


def test_two_workers_keep_their_threads_and_a_killed_one_ends_the_run_in_one_line(tmp_path):
    # Worker 1 is killed once the chief has logged epoch 3: the chief's next collective fails.
    soak_folder = write_soak_folder(str(tmp_path / "data"))
    act, sent = signal_worker_after("epoch 3/4", 1, signal.SIGKILL)
    codes, logs, samples, ended = run_two_workers(tmp_path, ["--data", soak_folder, *SOAK_ARGS], "soak", act)
    assert codes == [4, -9], logs[0][-3000:]
    assert "plan: 4 epoch(s) of 37 steps" in logs[0] and "epoch 4/4" not in logs[0]
    assert_a_lost_peer_ended_the_run(logs[0], ended[0] - sent["at"])
    # Worker 1 may die before its own line of epoch 3 reached its log.
    assert_flat_threads(samples[0], logs[0], epochs=3)
    assert_flat_threads(samples[1], logs[1], epochs=2)
