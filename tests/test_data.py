"""The CIFAR-100 loader: both layouts, and clear errors for everything else."""

import os
import re
import pickle

import numpy as np
import pytest

import cifar_hybrid_classifier as chc
from conftest import COARSE_NAMES, FINE_NAMES, RunsCommand, make_meta, make_split, write_folder, write_tarball


def test_tarball_and_folder_load_the_same(cifar_folder, cifar_tarball):
    from_tar = chc.load_cifar100(cifar_tarball)
    from_folder = chc.load_cifar100(cifar_folder)
    from_parent = chc.load_cifar100(os.path.dirname(cifar_folder))
    for data in (from_tar, from_folder, from_parent):
        assert data.x_train.shape == (400, 32, 32, 3) and data.x_train.dtype == np.uint8
        assert data.x_test.shape == (200, 32, 32, 3) and data.x_test.dtype == np.uint8
        assert data.fine_names == FINE_NAMES and data.coarse_names == COARSE_NAMES
        np.testing.assert_array_equal(data.x_train, from_tar.x_train)
        np.testing.assert_array_equal(data.y_test, from_tar.y_test)


def test_images_are_decoded_channels_last():
    split = make_split(4, 0)
    data = chc._parse_split({k.decode(): v for k, v in split.items()}, "train")
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
        chc.load_cifar100(corrupt(tmp_path, train=split))


def test_rejects_bad_meta(tmp_path):
    meta = make_meta()
    meta[b"fine_label_names"] = meta[b"fine_label_names"][:99]
    with pytest.raises(chc.InputError, match="100 fine_label_names"):
        chc.load_cifar100(corrupt(tmp_path, meta=meta))


def test_rejects_truncated_pickle(tmp_path):
    raw = pickle.dumps(make_split(100, 3), protocol=2)
    with pytest.raises(chc.InputError, match="not a valid CIFAR-100 pickle"):
        chc.load_cifar100(corrupt(tmp_path, train=raw[: len(raw) // 2]))


def test_rejects_truncated_archive(tmp_path, cifar_tarball):
    raw = open(cifar_tarball, "rb").read()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(chc.InputError, match="not a readable CIFAR-100 .tar.gz"):
        chc.load_cifar100(str(truncated))


def test_rejects_non_gzip_and_missing_files(tmp_path):
    text = tmp_path / "notes.tar.gz"
    text.write_text("not an archive")
    with pytest.raises(chc.InputError, match="not a readable"):
        chc.load_cifar100(str(text))
    with pytest.raises(chc.InputError, match="no such file"):
        chc.load_cifar100(str(tmp_path / "missing.tar.gz"))
    with pytest.raises(chc.InputError, match="no 'train' file"):
        chc.load_cifar100(str(tmp_path))


def test_rejects_archive_without_members(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    archive = write_tarball(str(tmp_path / "other.tar.gz"), str(folder))
    with pytest.raises(chc.InputError, match="archive lacks train, test, meta"):
        chc.load_cifar100(archive)


def test_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    split = make_split(100, 3)
    split[b"batch_label"] = RunsCommand(marker)
    with pytest.raises(chc.InputError, match="refusing to load"):
        chc.load_cifar100(corrupt(tmp_path, train=pickle.dumps(split, protocol=2)))
    assert not marker.exists()
