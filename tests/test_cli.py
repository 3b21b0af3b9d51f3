"""Command line: invalid values and unusable paths exit with code 2 before any training."""

import os

import pytest

import cifar_hybrid_classifier as chc
from conftest import TINY_ARGS, main_error


@pytest.mark.parametrize("args", [
    ["--epochs", "0"], ["--batch-size", "0"], ["--batch-size", "-4"], ["--patch-size", "5"],
    ["--embed-dim", "30", "--num-heads", "4"], ["--validation-split", "-0.1"], ["--validation-split", "1"],
    ["--validation-split", "1.5"], ["--learning-rate", "0"], ["--precision", "float64"],
    ["--dropout", "1"], ["--cnn-widths", "64,x"], ["--crop-padding", "-1"], ["--crop-padding", "32"],
    ["--stem-width", "0"], ["--cutout", "8"], ["--muon-rms", "0.2"], ["--stem", "pool"], ["--color-jitter"],
    ["--no-such-option"],
])
def test_invalid_values_exit_with_code_2(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chc.main(args)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, line", [
    (["--epochs", "0"], "error: argument --epochs: must be an integer >= 1, got 0 (see cifar_hybrid_classifier.py "
                        "--help)"),
    (["--no-such-option"], "error: unrecognized arguments: --no-such-option (see cifar_hybrid_classifier.py --help)"),
    (["predict", "x.png", "--top", "0"], "error: argument --top: must be an integer >= 1, got 0 (see "
                                         "cifar_hybrid_classifier.py predict --help)"),
])
def test_a_usage_error_is_one_line_that_points_to_help(argv, line, capsys):
    # In-process; that TensorFlow's start-up lines stay silenced in a real process is the end-to-end run's check.
    with pytest.raises(SystemExit) as exit_info:
        chc.main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_a_mistyped_command_gets_a_suggestion_and_version_is_printed(capsys):
    assert chc.main(["prdict", "photo.jpg"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: unknown command 'prdict'; did you mean 'predict'?"]
    assert chc.main(["photo.jpg"]) == 2
    assert "the commands are train, predict, explain, evaluate, export" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        chc.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"cifar_hybrid_classifier.py {chc.__version__}\n"


def test_help_shows_the_options_in_groups_without_empty_defaults():
    help_text = chc.build_arg_parser().format_help()
    titles = [line[:-1] for line in help_text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["options", *chc.OPTION_GROUPS.values()]
    assert "(default: None)" not in help_text and "--no-fresh" not in help_text and "--fresh" in help_text


def test_config_and_command_line_mirror_each_other():
    defaults = chc.parse_config([])
    # --output gives the backup folder; the default time budget leaves the size to the run's timing
    assert defaults == chc.Config(checkpoint_dir="cifar_hybrid.backup")
    assert (defaults.time_budget, defaults.model_size) == (chc.DEFAULT_TIME_BUDGET, "auto")
    assert chc.parse_config(["--output", "runs/a.keras"]).checkpoint_dir == "runs/a.backup"
    help_text = chc.build_arg_parser().format_help()
    for field in chc.dataclasses.fields(chc.Config):
        assert "--" + field.name.replace("_", "-") in help_text
    config = chc.parse_config(["--cnn-widths", "8,16", "--no-flip", "--epochs", "3"])
    assert config.cnn_widths == (8, 16) and config.flip is False and config.epochs == 3


def test_missing_data_fails_before_training_in_one_line(tmp_path, capsys):
    error = main_error(["--data", str(tmp_path / "nope.tar.gz"), "--output", str(tmp_path / "m.keras")], capsys)
    assert "no such file" in error and "nope.tar.gz" in error
    assert sorted(os.listdir(tmp_path)) == []  # neither a model nor a backup folder


def test_corrupt_data_and_a_missing_output_folder_are_one_line_errors(tmp_path, cifar_tarball, capsys):
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    for argv, message in ((["--data", str(corrupt), "--output", str(tmp_path / "m.keras"), *TINY_ARGS],
                           "not a readable CIFAR-100 .tar.gz archive"),
                          (["--data", cifar_tarball, "--output", str(tmp_path / "missing" / "m.keras")],
                           "does not exist")):
        assert message in main_error(argv, capsys)
    assert not (tmp_path / "m.keras").exists()


def test_output_checks(tmp_path):
    with pytest.raises(chc.InputError, match="must end in .keras"):
        chc.check_output_path(str(tmp_path / "model.h5"))
    folder = tmp_path / "looks_like.keras"
    folder.mkdir()
    with pytest.raises(chc.InputError, match="is a folder"):
        chc.check_output_path(str(folder))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(chc.InputError, match="not writable"):
            chc.check_output_path(str(locked / "m.keras"))
    finally:
        locked.chmod(0o700)


def test_tensorboard_folder_is_checked_before_training(tmp_path, capsys):
    not_a_folder = tmp_path / "logs"
    not_a_folder.write_text("a file")
    assert chc.main(["--data", str(tmp_path / "unused"), "--tensorboard", str(not_a_folder)]) == 2
    assert "--tensorboard" in capsys.readouterr().err
    assert chc.main(["--data", str(tmp_path / "unused"), "--tensorboard", str(tmp_path / "no" / "logs")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["predict"], ["predict", "x.png", "--top", "0"], ["evaluate", "--batch-size", "0"],
                                  ["evaluate", "--no-such-option"]])
def test_subcommand_arguments_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chc.main(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("bf16_gflops, expected", [(900.0, "mixed_bfloat16"), (164.0, "float32")])
def test_auto_precision_takes_bf16_only_where_it_measures_faster(bf16_gflops, expected, monkeypatch):
    # Both CPUs report native bf16: a Zen 5 multiplies it at twice float32's rate, a Xeon without AMX slower.
    monkeypatch.setattr(chc, "_cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(chc.tf.config, "list_physical_devices", lambda kind: [])
    monkeypatch.setattr(chc, "matmul_gflops", lambda dtype, **_: bf16_gflops if dtype == chc.tf.bfloat16 else 450.0)
    chc._cpu_bf16_is_faster.cache_clear()
    try:
        assert chc.resolve_precision("auto") == expected
        assert chc.resolve_precision("float32") == "float32"
    finally:
        chc._cpu_bf16_is_faster.cache_clear()


def test_one_slow_round_of_bf16_timing_on_a_busy_host_does_not_make_the_run_float32(monkeypatch):
    monkeypatch.setattr(chc, "_cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(chc.tf.config, "list_physical_devices", lambda kind: [])
    speeds = {chc.tf.bfloat16: iter([500.0, 900.0, 880.0]), chc.tf.float32: iter([450.0, 460.0, 440.0])}
    monkeypatch.setattr(chc, "matmul_gflops", lambda dtype, **_: next(speeds[dtype]))
    chc._cpu_bf16_is_faster.cache_clear()
    try:
        assert chc.resolve_precision("auto") == "mixed_bfloat16"
    finally:
        chc._cpu_bf16_is_faster.cache_clear()


def test_bf16_is_never_timed_where_onednn_is_limited_to_avx2(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a bf16 matmul would abort the process
    monkeypatch.setattr(chc, "matmul_gflops", lambda *a, **k: pytest.fail("timed a matmul"))
    chc._cpu_bf16_is_faster.cache_clear()
    try:
        assert not chc.onednn_allows_bf16() and not chc._cpu_bf16_is_faster()
    finally:
        chc._cpu_bf16_is_faster.cache_clear()
