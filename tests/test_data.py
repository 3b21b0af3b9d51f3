"""The CIFAR-100 and CIFAR-10 loader: both layouts, and clear errors for everything else."""

import os
import pickle
import re
import sys

import numpy as np
import pytest

import cifar_hybrid_classifier as chc
from conftest import (CIFAR10_NAMES, COARSE_NAMES, FINE_NAMES, ROOT, RunsCommand, main_error, make_meta, make_split,
                      write_cifar10, write_folder, write_tarball)


def test_tarball_and_folder_load_the_same(cifar_folder, cifar_tarball):
    from_tar = chc.load_cifar(cifar_tarball)
    from_folder = chc.load_cifar(cifar_folder)
    from_parent = chc.load_cifar(os.path.dirname(cifar_folder))
    for data in (from_tar, from_folder, from_parent):
        assert data.x_train.shape == (400, 32, 32, 3) and data.x_train.dtype == np.uint8
        assert data.x_test.shape == (200, 32, 32, 3) and data.x_test.dtype == np.uint8
        assert data.fine_names == FINE_NAMES and data.coarse_names == COARSE_NAMES
        np.testing.assert_array_equal(data.x_train, from_tar.x_train)
        np.testing.assert_array_equal(data.y_test, from_tar.y_test)


def test_images_are_decoded_channels_last():
    split = make_split(4, 0)
    data = chc._parse_split({k.decode(): v for k, v in split.items()}, "train", chc.DATASETS["cifar100"])
    planar = split[b"data"].reshape(4, 3, 32, 32)
    np.testing.assert_array_equal(data[0][2, 5, 7], planar[2, :, 5, 7])
    np.testing.assert_array_equal(data[1], split[b"fine_labels"])
    np.testing.assert_array_equal(data[2], split[b"coarse_labels"])


def corrupt(tmp_path, **members):
    return write_folder(str(tmp_path), **members)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({b"data": s[b"data"][:, :3000]}), re.escape("expected uint8 (N, 3072)")),
    (lambda s: s.update({b"data": s[b"data"].astype(np.float32)}), re.escape("expected uint8 (N, 3072)")),
    (lambda s: s.update({b"fine_labels": [100] * len(s[b"fine_labels"])}), "out of range"),
    (lambda s: s.update({b"coarse_labels": [-1] * len(s[b"coarse_labels"])}), "out of range"),
    (lambda s: s.update({b"fine_labels": s[b"fine_labels"][:-1]}), "fine_labels for"),
    (lambda s: s.pop(b"coarse_labels"), "no 'coarse_labels'"),
])
def test_rejects_malformed_training_pickle(tmp_path, change, message):
    split = make_split(100, 3)
    change(split)
    with pytest.raises(chc.InputError, match=message):
        chc.load_cifar(corrupt(tmp_path, train=split))


def test_rejects_bad_meta(tmp_path):
    meta = make_meta()
    meta[b"fine_label_names"] = meta[b"fine_label_names"][:99]
    with pytest.raises(chc.InputError, match="100 fine_label_names"):
        chc.load_cifar(corrupt(tmp_path, meta=meta))


def test_rejects_truncated_pickle(tmp_path):
    raw = pickle.dumps(make_split(100, 3), protocol=2)
    with pytest.raises(chc.InputError, match="not a valid CIFAR-100 pickle"):
        chc.load_cifar(corrupt(tmp_path, train=raw[: len(raw) // 2]))


def test_rejects_truncated_archive(tmp_path, cifar_tarball):
    raw = open(cifar_tarball, "rb").read()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(chc.InputError, match="not a readable CIFAR-100 .tar.gz"):
        chc.load_cifar(str(truncated))


def test_rejects_non_gzip_and_missing_files(tmp_path):
    text = tmp_path / "notes.tar.gz"
    text.write_text("not an archive")
    with pytest.raises(chc.InputError, match="not a readable"):
        chc.load_cifar(str(text))
    with pytest.raises(chc.InputError, match="no such file"):
        chc.load_cifar(str(tmp_path / "missing.tar.gz"))
    with pytest.raises(chc.InputError, match="no 'train' file"):
        chc.load_cifar(str(tmp_path))


def test_rejects_archive_without_members(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    archive = write_tarball(str(tmp_path / "other.tar.gz"), str(folder))
    with pytest.raises(chc.InputError, match="archive lacks train, test, meta"):
        chc.load_cifar(archive)


def test_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    split = make_split(100, 3)
    split[b"batch_label"] = RunsCommand(marker)
    with pytest.raises(chc.InputError, match="refusing to load"):
        chc.load_cifar(corrupt(tmp_path, train=pickle.dumps(split, protocol=2)))
    assert not marker.exists()


def test_cifar10_tarball_and_folder_load_the_same(tmp_path):
    folder = write_cifar10(str(tmp_path / "extracted"))
    archive = write_tarball(str(tmp_path / "cifar-10-python.tar.gz"), folder)
    for data in (chc.load_cifar(archive, "cifar10"), chc.load_cifar(folder, "cifar10")):
        assert data.x_train.shape == (5 * 40, 32, 32, 3) and data.x_test.shape == (30, 32, 32, 3)
        assert data.fine_names == CIFAR10_NAMES and data.name == "CIFAR-10"
        assert set(data.y_train) == set(range(10)) and data.coarse_train is None and data.fine_to_coarse() is None
    np.testing.assert_array_equal(data.x_train[40:80], chc._parse_split(
        {"data": make_split(40, 12)[b"data"], "labels": [0] * 40}, "b", chc.DATASETS["cifar10"])[0])


@pytest.mark.parametrize("damage, message", [
    ({"drop": "data_batch_3"}, "archive lacks data_batch_3"),
    ({"data_batch_2": {"data": lambda d: d[:, :3000]}}, re.escape("'data_batch_2' data is uint8 (40, 3000)")),
    ({"test_batch": {"labels": lambda labels: [10] * len(labels)}}, "'test_batch' labels out of range: expected 0..9"),
    ({"batches.meta": {"label_names": lambda names: names[:9]}}, "needs 10 label_names"),
])
def test_hostile_cifar10_archives_are_one_line_errors(tmp_path, capsys, damage, message):
    archive = write_tarball(str(tmp_path / "cifar-10-python.tar.gz"), write_cifar10(str(tmp_path / "x"), **damage))
    error = main_error(["--dataset", "cifar10", "--data", archive, "--epochs", "1"], capsys)
    assert re.search(message, error), error
    with pytest.raises(chc.InputError, match="archive lacks data_batch_1"):  # a CIFAR-100 archive is not one
        chc.load_cifar(write_tarball(str(tmp_path / "c100.tar.gz"), write_folder(str(tmp_path / "c100"))), "cifar10")


def test_fuzzed_archives_load_or_are_refused_in_one_line():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fuzz_loader
    figures = fuzz_loader.fuzz(cases=300, seed=0, timeout=10.0)  # benchmarks/fuzz_loader.py runs thousands
    assert figures["failed"] == 0, figures["failures"]  # no other exception, no case past 10 s
    assert figures["loaded"] + figures["refused"] == 300 and figures["refused"] >= 150
    assert len(figures["by_kind"]) == 10  # every kind of damage was tried
