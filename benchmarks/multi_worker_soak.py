"""Two loopback workers train together; each one's threads and resident memory per epoch, printed as JSON.

    python benchmarks/multi_worker_soak.py --data cifar-100-python.tar.gz --epochs 4 [training options]

Starts worker 0 (the chief) and worker 1 of a `--distribute multi-worker` run on this machine, in a
temporary folder, and reads /proc/PID/status (Linux) every half second. Per worker and epoch: the
threads and resident memory when the epoch's line was printed, and the most of either seen during
the epoch. A leak shows as a count that climbs from epoch to epoch.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cifar_hybrid_classifier.py")
EPOCH = re.compile(r"^epoch (\d+)/\d+ .* (\d+)s$", re.M)


def status(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) // 1024


def main(args):
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]}
    for s in sockets:
        s.close()
    folder = tempfile.mkdtemp(prefix="multi-worker-soak-")
    procs, logs = [], []
    for index in range(2):
        logs.append(os.path.join(folder, f"worker{index}.log"))
        os.makedirs(os.path.join(folder, f"worker{index}"))
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, SCRIPT, *args, "--distribute", "multi-worker"],
                                          cwd=os.path.join(folder, f"worker{index}"), env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    epochs = [[] for _ in procs]
    peaks = [(0, 0) for _ in procs]  # the most threads and MB seen since the last epoch line
    started = time.time()
    while any(proc.poll() is None for proc in procs):
        for i, proc in enumerate(procs):
            try:
                threads, rss = status(proc.pid)
            except (FileNotFoundError, ProcessLookupError, KeyError):
                continue
            peaks[i] = (max(peaks[i][0], threads), max(peaks[i][1], rss))
            with open(logs[i]) as f:
                done = EPOCH.findall(f.read())
            if len(done) > len(epochs[i]):
                epoch, seconds = done[len(epochs[i])]
                epochs[i].append({"epoch": int(epoch), "seconds": int(seconds), "threads": threads,
                                  "resident MB": rss, "most threads": peaks[i][0], "peak MB": peaks[i][1]})
                peaks[i] = (0, 0)
        time.sleep(0.5)
    print(json.dumps({"command": [os.path.basename(SCRIPT), *args, "--distribute", "multi-worker"],
                      "exit codes": [proc.returncode for proc in procs], "wall seconds": round(time.time() - started),
                      "logs": logs, "workers": epochs}, indent=1))
    return max(abs(proc.returncode) for proc in procs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
