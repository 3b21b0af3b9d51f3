"""Fuzz the data loader with damaged archives derived from a tiny valid one; print the figures as JSON.

    python benchmarks/fuzz_loader.py [--cases 5000] [--seed 0] [--timeout 10]

Each case damages a tiny, valid CIFAR-100 archive in the official format in one way: a truncation
at a random offset, random bytes flipped in the gzip stream or inside one pickle, a pickle whose
values have other types or shapes, tar members renamed, duplicated, missing, made a symlink or
given a huge declared size. `load_cifar` must then either load it (the damage was harmless, e.g.
a flipped pixel) or refuse it with an `InputError` of one line, which the command line prints
as `error: ...` with exit code 2. Anything else is a failure: another exception (a traceback for
the user), a case that runs past `--timeout` seconds, or one that raises the process's peak
memory by more than 512 MB. The exit code is 1 if any case failed.
The test suite runs a fixed-seed sample of these cases (tests/test_data.py).
"""

import argparse
import gzip
import json
import os
import pickle
import resource
import signal
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cifar_hybrid_classifier as chc  # noqa: E402

MEMBERS = ("train", "test", "meta")


def valid_members(rng):
    """Pickles of a tiny CIFAR-100: 20 training and 10 test images."""
    def split(n):
        fine = rng.integers(0, 100, n)
        return {b"batch_label": b"fuzz", b"filenames": [f"{i}.png".encode() for i in range(n)],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()}
    meta = {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}
    return {"train": split(20), "test": split(10), "meta": meta}


def pack(entries):
    """A .tar.gz from (name, bytes, kind, declared size) entries, header by header, so a header may
    declare a size its data does not have; kind is "file" or "symlink"."""
    raw = bytearray()
    for name, content, kind, declared in entries:
        info = tarfile.TarInfo("cifar-100-python/" + name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            raw += info.tobuf(tarfile.PAX_FORMAT)
            continue
        info.size = len(content) if declared is None else declared
        raw += info.tobuf(tarfile.PAX_FORMAT) + content + b"\0" * (-len(content) % 512)
    return gzip.compress(bytes(raw + b"\0" * 1024), mtime=0)


def flip(data, rng, count):
    data = bytearray(data)
    for _ in range(count):
        data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    return bytes(data)


ODD_VALUES = [None, 3, 2.5, "text", b"bytes", [], [1, 2], {"a": 1}, np.zeros((2, 3072), np.float32),
              np.zeros((5, 3072), np.uint8), np.zeros((20, 32, 32, 3), np.uint8), np.zeros(0, np.uint8),
              np.zeros((20, 3072), np.int64), [[1]] * 20, ["x"] * 20, [10 ** 30] * 20, [-1] * 20, [0.5] * 20]


def damaged_archive(rng):
    """(kind of damage, archive bytes) for one random case."""
    members = valid_members(rng)
    blobs = {name: pickle.dumps(obj, protocol=2) for name, obj in members.items()}
    entries = [[name, blobs[name], "file", None] for name in MEMBERS]
    kind = ["truncate", "flip_gzip", "flip_pickle", "odd_value", "odd_top_level", "rename", "duplicate",
            "missing", "symlink", "huge_size"][rng.integers(10)]
    if kind in ("truncate", "flip_gzip"):
        archive = pack(entries)
        if kind == "truncate":
            return kind, archive[:rng.integers(len(archive))]
        return kind, flip(archive, rng, int(rng.integers(1, 8)))
    target = MEMBERS[rng.integers(3)]
    index = [name for name, *_ in entries].index(target)
    if kind == "flip_pickle":
        entries[index][1] = flip(blobs[target], rng, int(rng.integers(1, 8)))
    elif kind == "odd_value":
        obj = members[target]
        key = list(obj)[rng.integers(len(obj))]
        obj[key] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
        entries[index][1] = pickle.dumps(obj, protocol=2)
    elif kind == "odd_top_level":
        entries[index][1] = pickle.dumps(ODD_VALUES[rng.integers(len(ODD_VALUES))], protocol=2)
    elif kind == "rename":
        entries[index][0] = ["TRAIN", "train.bak", "x/" + target, target + " ", ""][rng.integers(5)] or "unnamed"
    elif kind == "duplicate":
        entries.insert(int(rng.integers(len(entries) + 1)), list(entries[index]))
    elif kind == "missing":
        del entries[index]
    elif kind == "symlink":
        entries[index][2] = "symlink"
    elif kind == "huge_size":
        entries[index][3] = int(rng.choice([1 << 33, 10 ** 11, len(blobs[target]) + 1 + int(rng.integers(4096))]))
    return kind, pack(entries)


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


MEMORY_LIMIT_MB = 512  # a tiny archive needs a few MB; more is a decompression or allocation bomb


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def run_case(path, timeout):
    """("loaded" | "refused" | "failed", detail, seconds) for loading the archive at `path`."""
    started, peak_before = time.perf_counter(), peak_memory_mb()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        chc.load_cifar(path)
        outcome, detail = "loaded", ""
    except chc.InputError as exc:
        message = str(exc)
        outcome, detail = ("refused", message) if message and "\n" not in message else ("failed", repr(message))
    except Timeout:
        outcome, detail = "failed", f"still running after {timeout}s"
    except Exception as exc:  # what the user would see as a traceback
        outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grew = peak_memory_mb() - peak_before  # the process's high-water mark: only new peaks count
    if grew > MEMORY_LIMIT_MB:
        outcome, detail = "failed", f"memory peak grew by {grew:.0f} MB ({outcome}: {detail})"
    return outcome, detail, time.perf_counter() - started


def fuzz(cases, seed, timeout=10.0):
    """Run `cases` damaged archives; returns the figures (and up to ten failures)."""
    rng = np.random.default_rng(seed)
    counts, slowest, failures, by_kind = {"loaded": 0, "refused": 0, "failed": 0}, (0.0, ""), [], {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cifar-100-python.tar.gz")
        for case in range(cases):
            kind, archive = damaged_archive(rng)
            with open(path, "wb") as f:
                f.write(archive)
            outcome, detail, seconds = run_case(path, timeout)
            counts[outcome] += 1
            by_kind.setdefault(kind, {"loaded": 0, "refused": 0, "failed": 0})[outcome] += 1
            slowest = max(slowest, (seconds, kind))
            if outcome == "failed" and len(failures) < 10:
                failures.append({"case": case, "kind": kind, "detail": detail})
    return {"cases": cases, "seed": seed, **counts, "slowest_case_seconds": round(slowest[0], 3),
            "slowest_case_kind": slowest[1], "total_seconds": round(time.perf_counter() - started, 1),
            "by_kind": by_kind, "failures": failures}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one case may take")
    args = parser.parse_args()
    figures = fuzz(args.cases, args.seed, args.timeout)
    print(json.dumps(figures, indent=1))
    return 1 if figures["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
