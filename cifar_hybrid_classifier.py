"""Train a hybrid CNN + Vision Transformer on CIFAR-100 from scratch.

The default run fits itself into an hour on the machine that runs it. On a 2-core AMD EPYC (Zen 3) with
AVX2 and no GPU it trains the medium size and reaches 71.7 and 71.4 % test top-1 with test-time
augmentation (69.4 and 68.7 % plain; seeds 42 and 43) in 58 and 57 minutes; on a 2-core AMD EPYC
(Zen 5) in bfloat16 it trains the large size, 74.7 and 74.4 % (72.6 and 72.4 % plain). `--epochs 14`
trains 14 epochs of the base size: 68.8 and 69.0 % on that Zen 3 in 49 and 45 minutes. Commands,
machines and the rest of the figures: RESULTS.md.

    python cifar_hybrid_classifier.py                       # download via Keras, train an hour, report, save
    python cifar_hybrid_classifier.py --data cifar-100-python.tar.gz --epochs 1
    python cifar_hybrid_classifier.py predict photo.jpg         # top-5 classes (before training: models/)
    python cifar_hybrid_classifier.py explain photo.jpg         # what the model looks at, as a picture
    python cifar_hybrid_classifier.py evaluate                  # test-set report of the saved model
    python cifar_hybrid_classifier.py export                    # SavedModel and TFLite files for serving

Sections follow the data: configuration, data, augmentation pipeline, layers,
model, trainer, then the run machinery (backups, time plans, durable files),
evaluation, using a saved model, command line. Importing this module only
defines things; everything runs from `main()`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import os
import pickle
import platform
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from dataclasses import dataclass, field


def silence_native_stderr():
    """Point file descriptor 2 at /dev/null and return the function that points it back.

    TensorFlow's C++ start-up lines (oneDNN notes, "failed call to cuInit" without a GPU) go straight to
    descriptor 2 before any log threshold applies. Setting TF_CPP_MIN_LOG_LEVEL (to anything) shows them.
    """
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return lambda: None
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)

    def restore():
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    return restore


# TensorFlow turns its oneDNN kernels on by default only on x86 CPUs with AVX-512 VNNI, BF16 or AMX. Without
# them (an AVX2-only laptop) its own kernels compute a convolution's input gradient several times slower than the
# convolution itself, the largest part of a step (docs/design.md). Set before TensorFlow loads; a user's value wins.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
_restore_stderr = silence_native_stderr()
try:  # the module's top level stays definitions (and the line above): importing it runs nothing else
    import numpy as np
    import tensorflow as tf
    import keras
    from keras import layers, ops
finally:
    _restore_stderr()

__version__ = "1.0.0"
NUM_CLASSES = 100
NUM_COARSE = 20
IMAGE_SHAPE = (32, 32, 3)
# Per-channel statistics of the CIFAR-100 training set, in 0..255 pixel units.
CIFAR100_MEAN = (129.30, 124.07, 112.43)
CIFAR100_STD = (68.17, 65.39, 70.42)
# The two data sets in the official python format: their files, label keys, classes and statistics.
DATASETS = {
    "cifar100": {"name": "CIFAR-100", "archive": "cifar-100-python.tar.gz", "folder": "cifar-100-python",
                 "train": ("train",), "test": "test", "meta": "meta", "labels": "fine_labels",
                 "names": "fine_label_names", "classes": NUM_CLASSES, "mean": CIFAR100_MEAN, "std": CIFAR100_STD,
                 "sha256": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"},
    "cifar10": {"name": "CIFAR-10", "archive": "cifar-10-python.tar.gz", "folder": "cifar-10-batches-py",
                "train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": "test_batch", "meta": "batches.meta",
                "labels": "labels", "names": "label_names", "classes": 10,
                "mean": (125.31, 122.95, 113.87), "std": (62.99, 62.09, 66.71),
                "sha256": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
}
# The default command's model, shipped so that the commands work before any training (its record: the .json).
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "cifar100-hybrid-base.keras")


# --- Configuration: every hyperparameter, its default, and its command-line check ---------------------------

def _checked(convert, ok, requirement):
    """An argparse `type` that converts, then checks the value against `requirement`."""
    def parse(text):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = convert.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
_positive_float = _checked(float, lambda v: 0 < v < math.inf, "a number > 0")
_non_negative_float = _checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
_rate = _checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def _widths(text):
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, e.g. 64,128,256; got {text}")
    return values


# The size family (RESULTS.md, "Model sizes"). Larger sizes widen the convolutions rather than deepen the
# ViT: on a CPU a ViT FLOP costs more time than a conv FLOP (RESULTS.md, "Ablations"). Past about 14 epochs
# a wider model gained more than the epochs its time would buy a narrower one (RESULTS.md, "Ablations");
# medium is there for the machines whose budget holds 14 epochs of it but not of large.
MODEL_SIZES = {
    "small": dict(stem_width=24, cnn_widths=(64, 128), embed_dim=96, depth=2, num_heads=4, head_units=192),
    "base": dict(stem_width=32, cnn_widths=(128, 256), embed_dim=128, depth=2, num_heads=4, head_units=256),
    "medium": dict(stem_width=40, cnn_widths=(176, 352), embed_dim=160, depth=2, num_heads=5, head_units=320),
    "large": dict(stem_width=48, cnn_widths=(224, 448), embed_dim=192, depth=2, num_heads=6, head_units=384),
}
# The default run is an hour's budget, which the slow class fills with the medium size and a fast machine
# with the large one (RESULTS.md, "Headline"); --epochs trains a fixed number of the base size's instead.
DEFAULT_TIME_BUDGET = 60.0
FIXED_EPOCHS = 14
# With a time budget, a budget with room for more than 14 epochs of the base size buys a larger size first.
MIN_EPOCHS_PER_SIZE = 14
RETIME_FROM = 0.8  # a size timed with room for 80-100 % of those epochs is timed again
# Given far more epochs, the large size learns its training images by heart; CutMix on half of them and
# stronger label smoothing regularize it. The base size, which does not overfit so, lost with either
# (RESULTS.md, "Ablations"). With --time-budget these are the defaults of options left open.
LONG_SCHEDULE_FROM_EPOCHS = 24
LONG_SCHEDULE = {"cutmix": 0.5, "label_smoothing": 0.2}


# The option groups of --help, each named at its first field in Config.
OPTION_GROUPS = {"dataset": "data and output", "time_budget": "training",
                 "model_size": "model (a --model-size sets what the command line leaves open)",
                 "validation_split": "advanced: the rest of the recipe"}


def _option(default, help, type=None, **kwargs):
    """A dataclass field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, "type": type, **kwargs})


@dataclass
class Config:
    # Data and output
    dataset: str = _option("cifar100", "the data set to train on", str, choices=tuple(DATASETS))
    data: str | None = _option(None, "the data set's python archive (cifar-100-python.tar.gz or "
                               "cifar-10-python.tar.gz) or its extracted folder; without it Keras downloads and "
                               "caches the data set", str)
    output: str = _option("cifar_hybrid.keras", "where to save the trained model (.keras); the run's history, "
                          "metrics and report files are written beside it", str)
    checkpoint_dir: str | None = _option(None, "folder for the training-state backup that an interrupted run "
                                         "resumes from (default: the --output name with .backup instead of "
                                         ".keras); removed after a successful run", str)
    fresh: bool = _option(False, "ignore an existing backup and start from scratch")
    tensorboard: str | None = _option(None, "also log each epoch's figures to this TensorBoard log folder "
                                      "(tensorboard --logdir DIR)", str)
    seed: int = _option(42, "seed for Python, NumPy, TensorFlow, Keras and the input pipeline", int)
    # Training
    time_budget: float | None = _option(None, "minutes for the whole run, evaluation included: timed steps fix "
                                        "the model size, epochs and steps so the schedule ends in time (default: "
                                        f"{DEFAULT_TIME_BUDGET:g}, unless --epochs is given; 0: train --epochs)",
                                        _non_negative_float)
    epochs: int | None = _option(None, "train exactly this many epochs of the base size (or --model-size) instead "
                                 f"of a time budget (default with --time-budget 0: {FIXED_EPOCHS}; ignored with "
                                 "a --time-budget above 0)", _positive_int)
    batch_size: int = _option(128, "images per training step and replica; the global batch is this times "
                              "the number of replicas", _positive_int)
    learning_rate: float = _option(2e-3, "peak AdamW learning rate (reached after warm-up) for one replica; "
                                   "scaled linearly with the number of replicas", _positive_float)
    distribute: str = _option("auto", "tf.distribute strategy; auto: multi-worker when TF_CONFIG names several "
                              "workers, mirrored when several GPUs are visible, else none", str,
                              choices=("auto", "none", "mirrored", "multi-worker"))
    precision: str = _option("auto", "auto: mixed_float16 on a GPU; mixed_bfloat16 on a CPU with native bf16 where "
                             "a bf16 matmul, timed for 0.5 s, runs at least 1.25x float32's speed; else float32",
                             str, choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"))
    tta: bool = _option(True, "test-time augmentation in the final evaluation: average the predictions for "
                        "each image, its mirror image, and both shifted one pixel diagonally each way")
    # Model
    model_size: str = _option("auto", "small, base, medium or large (RESULTS.md, \"Model sizes\"); auto: the "
                              f"largest size this machine trains for at least {MIN_EPOCHS_PER_SIZE} epochs in the "
                              "time budget, or base with --epochs", str, choices=("auto", *MODEL_SIZES))
    stem_width: int = _option(32, "channels of the convolutional stem both branches read (32x32 image to a "
                              "16x16 feature map)", _positive_int)
    cnn_widths: tuple = _option((128, 256), "channels of the CNN branch's stages after the stem; each stage "
                                "halves the resolution", _widths)
    patch_size: int = _option(4, "ViT patch size in pixels of its input, the stem's 16x16 feature map; must "
                              "divide 16", _positive_int)
    embed_dim: int = _option(128, "ViT token width", _positive_int)
    depth: int = _option(2, "number of transformer encoder blocks", _positive_int)
    num_heads: int = _option(4, "attention heads; must divide --embed-dim", _positive_int)
    head_units: int = _option(256, "width of the fusion head's hidden layer", _positive_int)
    branches: str = _option("both", "which branches feed the fusion head; cnn alone trains faster and beat "
                            "the hybrid at equal time, in 14 epochs' time and in an hour (RESULTS.md, "
                            "\"Branch ablation\")", str,
                            choices=("both", "cnn", "vit"))
    # Advanced
    validation_split: float = _option(0.1, "fraction of the training set held out, stratified, for model "
                                      "selection; 0: a final fit on every training image, no validation, the "
                                      "last epoch's weights kept", _rate)
    weight_decay: float = _option(0.05, "AdamW decoupled weight decay (not applied to biases, norms, "
                                  "CLS token and position embeddings)", _non_negative_float)
    warmup_fraction: float = _option(0.1, "fraction of all steps spent in linear learning-rate warm-up "
                                     "before the cosine decay", _rate)
    label_smoothing: float = _option(0.1, "label smoothing of the cross-entropy loss; where --time-budget plans "
                                     f"at least {LONG_SCHEDULE_FROM_EPOCHS} epochs of the large size, "
                                     f"{LONG_SCHEDULE['label_smoothing']} unless given", _rate)
    shift_lr_scale: float = _option(8.0, "learning-rate multiple for the batch norms' shifts (beta) in the "
                                    "stem and the CNN branch (docs/design.md)", _positive_float)
    muon_step: float = _option(0.02, "peak angle (in radians, about) by which each Muon step turns a conv kernel "
                               "of the stem and the CNN branch; 0: AdamW for them (docs/design.md)",
                               _non_negative_float)

    crop_padding: int = _option(4, "pixels of padding before the random 32x32 crop (0 disables)", int)
    flip: bool = _option(True, "random horizontal flips")
    cutmix: float = _option(0.0, "probability that a training image gets a box cut from another image of its "
                            "batch, its label mixed by the box's area (CutMix, Yun et al. 2019); where "
                            f"--time-budget plans at least {LONG_SCHEDULE_FROM_EPOCHS} epochs of the large size, "
                            f"{LONG_SCHEDULE['cutmix']} unless given", _rate)
    whiten_stem: bool = _option(True, "start the stem's first convolution as a whitening of the training "
                                "images' patches and keep it fixed (docs/design.md)")
    identity_init: bool = _option(True, "start every later conv3x3 of the stem and the CNN branch as a partial "
                                  "identity (docs/design.md)")
    mlp_ratio: float = _option(2.0, "transformer MLP width as a multiple of --embed-dim", _positive_float)
    dropout: float = _option(0.0, "dropout inside the transformer (off by default: on a CPU it costs about "
                             "a quarter of the step time)", _rate)
    head_dropout: float = _option(0.1, "dropout in the fusion head", _rate)
    l2: float = _option(1e-4, "L2 kernel regularization of the fusion head", _non_negative_float)

    def __post_init__(self):
        # The run's length: the budget by default; epochs given alone train exactly that many.
        if self.time_budget is None:
            self.time_budget = 0.0 if self.epochs is not None else DEFAULT_TIME_BUDGET
        if self.epochs is None:  # with a budget, a placeholder until the time plan fixes the epochs
            self.epochs = FIXED_EPOCHS


PROG = "cifar_hybrid_classifier.py"


class ArgumentParser(argparse.ArgumentParser):
    """A usage error in one line and where to read more: the whole usage would bury the line that matters."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_arg_parser():
    """The training command line, generated from `Config` so the two never drift apart."""
    parser = ArgumentParser(
        prog=PROG, usage=f"{PROG} [train] [OPTION ...]\n       {PROG} predict|explain|evaluate|export ... (each with "
                         "--help)",
        description="Train a hybrid CNN + Vision Transformer on CIFAR-100 (or CIFAR-10), evaluate it on the test set "
                    "and save it as a .keras file (the default command; it may also be named: train).",
        epilog=f"Using a saved model: {PROG} predict|explain IMAGE... | {PROG} evaluate | {PROG} export "
               "(each with --help).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        group = parser.add_argument_group(OPTION_GROUPS[f.name]) if f.name in OPTION_GROUPS else group
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        kwargs = {"default": f.default, "help": meta.pop("help")}
        if f.type in ("bool", bool):  # a switch that is off by default needs no --no- form
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
            meta.pop("type")
        if f.default in (None, 0):  # None, 0 or off: its help says what that means, "(default: None)" would not
            kwargs["default"] = argparse.SUPPRESS
        if f.name in MODEL_SIZES["base"]:  # left out unless given, so the model size can fill it in
            kwargs["help"] += " (default: from --model-size; base: " + \
                (",".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)) + ")"
            kwargs["default"] = argparse.SUPPRESS
        elif isinstance(f.default, tuple) or f.name in LONG_SCHEDULE:  # left out unless given: a plan may fill it
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            kwargs["help"] += f" (default: {shown})"
            kwargs["default"] = argparse.SUPPRESS
        kwargs.update({k: v for k, v in meta.items() if v is not None})
        group.add_argument(flag, **kwargs)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_config(argv=None):
    """Parse and cross-check the command line; bad values exit with code 2 before anything loads."""
    parser = build_arg_parser()
    args = vars(parser.parse_args(argv))
    config = Config(**args)
    # A size and a time plan fill in the rest.
    config.explicit = {name for name in args if name in (*MODEL_SIZES["base"], *LONG_SCHEDULE, "time_budget")}
    sizes = [config.model_size] if config.model_size != "auto" else list(MODEL_SIZES) if config.time_budget \
        else ["base"]  # with a time budget (the default), run() times the sizes and picks one
    errors = {size: architecture_error(apply_model_size(dataclasses.replace(config), size, config.explicit))
              for size in sizes}
    config.sizes = [size for size in sizes if errors[size] is None]
    if not config.sizes:
        parser.error(errors[sizes[0]])
    if len(config.sizes) == 1:
        apply_model_size(config, config.sizes[0])
    if config.crop_padding < 0 or config.crop_padding >= IMAGE_SHAPE[0]:  # reflection needs a wider image
        parser.error(f"--crop-padding must be between 0 and {IMAGE_SHAPE[0] - 1}, got {config.crop_padding}")
    if config.checkpoint_dir is None:
        config.checkpoint_dir = os.path.splitext(config.output)[0] + ".backup"
    if os.path.abspath(config.checkpoint_dir) == os.path.abspath(config.output):
        parser.error("--checkpoint-dir must differ from --output")
    return config


def architecture_error(config):
    """What is wrong with the architecture options, or None."""
    if config.embed_dim % config.num_heads:
        return f"--num-heads {config.num_heads} must divide --embed-dim {config.embed_dim}"
    side = IMAGE_SHAPE[0] // 2  # the stem's feature map, which the ViT branch reads
    if side % config.patch_size:
        return f"--patch-size {config.patch_size} must divide {side}, the side of the ViT branch's input"
    return None


def apply_model_size(config, size, explicit=None):
    """Set the architecture options the command line left open from the named size."""
    explicit = getattr(config, "explicit", set()) if explicit is None else explicit
    config.model_size, config.explicit = size, explicit
    for name, value in MODEL_SIZES[size].items():
        if name not in explicit:
            setattr(config, name, value)
    return config


# --- Data: the official CIFAR-100 python format, read straight from the archive -----------------------------

class InputError(ValueError):
    """Bad data or paths from the user: reported in one line with exit code 2, never a traceback."""


@dataclass
class CifarData:
    x_train: np.ndarray          # (50000, 32, 32, 3) uint8
    y_train: np.ndarray          # (50000,) labels: CIFAR-100's fine labels 0..99, or CIFAR-10's 0..9
    coarse_train: np.ndarray     # (50000,) CIFAR-100's coarse labels 0..19 (None for CIFAR-10)
    x_test: np.ndarray
    y_test: np.ndarray
    coarse_test: np.ndarray
    fine_names: list             # the names of the classes the model predicts
    coarse_names: list
    name: str = "CIFAR-100"

    def fine_to_coarse(self):
        """The superclass of each fine class, as the labels pair them (None without superclasses)."""
        if self.coarse_train is None:
            return None
        mapping = np.zeros(len(self.fine_names), np.int64)
        mapping[np.concatenate([self.y_train, self.y_test])] = np.concatenate([self.coarse_train, self.coarse_test])
        return mapping


class _CifarUnpickler(pickle._Unpickler):
    """Allows only what the official pickles contain (dicts, lists, bytes, ints, NumPy arrays), so an
    untrusted archive cannot run code. The pure-Python unpickler keeps its memo in a dict; the C one
    grows an array to the largest memo index it reads, so one flipped byte could cost gigabytes."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(raw, member, spec):
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # the reason in one line: some of pickle's messages span two
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"'{member}' is not a valid {spec['name']} pickle ({reason})") from None
    if not isinstance(obj, dict):
        raise InputError(f"'{member}' holds a {type(obj).__name__}, expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


MAX_MEMBER_BYTES = 1 << 28  # 256 MiB; the largest official member, CIFAR-100's train, has 155 MB


def _read_members(path, spec):
    """Raw bytes of the training, test and meta pickles from a .tar.gz archive or a folder."""
    wanted = (*spec["train"], spec["test"], spec["meta"])
    if os.path.isdir(path):
        folder = path
        if not os.path.exists(os.path.join(folder, spec["meta"])) and os.path.isdir(os.path.join(path, spec["folder"])):
            folder = os.path.join(path, spec["folder"])
        raw = {}
        for name in wanted:
            member = os.path.join(folder, name)
            if not os.path.isfile(member):
                raise InputError(f"{path}: no '{name}' file; expected the extracted {spec['folder']} folder")
            if os.path.getsize(member) > MAX_MEMBER_BYTES:
                raise InputError(f"{member}: {os.path.getsize(member):,} bytes, more than any {spec['name']} file")
            try:
                with open(member, "rb") as f:
                    raw[name] = f.read()
            except OSError as exc:
                raise InputError(f"{member}: cannot read ({exc.strerror})") from None
        return raw
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder; pass the {spec['name']} python archive or its folder")
    raw = {}
    try:
        # One sequential pass: random access into a gzip stream would decompress it again per member.
        with tarfile.open(path, "r|gz") as archive:
            for member in archive:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted and name not in raw:
                    if member.size > MAX_MEMBER_BYTES:  # read before it is believed: no huge allocation
                        raise InputError(f"{path}: '{member.name}' declares {member.size:,} bytes, more than "
                                         f"any {spec['name']} file")
                    raw[name] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InputError(f"{path}: not a readable {spec['name']} .tar.gz archive ({reason})") from None
    missing = [name for name in wanted if name not in raw]
    if missing:
        raise InputError(f"{path}: archive lacks {', '.join(missing)}; expected {spec['folder']}/"
                         f"{{{','.join(wanted)}}}")
    return raw


def _parse_split(d, member, spec):
    """Images and labels of one pickle: (images, labels, CIFAR-100's coarse labels or None)."""
    label_keys = ((spec["labels"], spec["classes"]),) + ((("coarse_labels", NUM_COARSE),) if spec["labels"] ==
                                                         "fine_labels" else ())
    for key in ("data", *(key for key, _ in label_keys)):
        if key not in d:
            raise InputError(f"'{member}' has no '{key}' entry")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise InputError(f"'{member}' data is {desc}, expected uint8 (N, 3072)")
    labels = []
    for key, limit in label_keys:
        try:
            values = np.asarray(d[key], dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"'{member}' {key} are not integers") from None
        if values.shape != (len(data),):
            raise InputError(f"'{member}' has {values.size} {key} for {len(data)} images")
        if values.size and (values.min() < 0 or values.max() >= limit):
            raise InputError(f"'{member}' {key} out of range: expected 0..{limit - 1}, "
                            f"found {values.min()}..{values.max()}")
        labels.append(values)
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels[0], labels[1] if len(labels) > 1 else None


def _parse_names(d, key, count):
    names = d.get(key)
    if not isinstance(names, list) or len(names) != count:
        raise InputError(f"the meta file needs {count} {key}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(path=None, dataset="cifar100"):
    """CIFAR-100 (or CIFAR-10) as uint8 images, labels (and coarse labels), class names, from the official
    python archive or its extracted folder; `None` downloads it once into the Keras cache, as Keras does."""
    spec = DATASETS[dataset]
    if path is None:
        try:
            cache = keras.utils.get_file(fname=spec["folder"] + "-target", extract=True, file_hash=spec["sha256"],
                                         origin="https://www.cs.toronto.edu/~kriz/" + spec["archive"])
        except Exception as exc:
            raise InputError(f"could not download {spec['name']} ({exc}); pass --data PATH to a local copy") from None
        path = os.path.join(cache, spec["folder"])
    raw = _read_members(path, spec)
    train = [_parse_split(_unpickle(raw[name], name, spec), name, spec) for name in spec["train"]]
    train = [None if parts[0] is None else np.concatenate(parts) for parts in zip(*train)]
    test = _parse_split(_unpickle(raw[spec["test"]], spec["test"], spec), spec["test"], spec)
    meta = _unpickle(raw[spec["meta"]], spec["meta"], spec)
    coarse_names = _parse_names(meta, "coarse_label_names", NUM_COARSE) if train[2] is not None else None
    return CifarData(*train, *test, fine_names=_parse_names(meta, spec["names"], spec["classes"]),
                     coarse_names=coarse_names, name=spec["name"])


# --- Augmentation pipeline: tf.data over the uint8 arrays, seeded per epoch ---------------------------------

def without_autotuning(ds):
    """`ds` without tf.data's autotuning thread: ending an iterator waits for that thread, for up to half a
    minute on a slow machine, and every pipeline here is many times faster than the model it feeds."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


class AugmentationPipeline:
    """Feeds uint8 batches (the model does its own scaling), augmented a whole batch at a time: a per-image
    map costs tf.data more CPU time than the crops. Every random choice is a stateless op keyed on
    (seed, epoch, batch), so an epoch's batches are the same however many threads map them."""

    def __init__(self, images, labels, batch_size, seed=0, crop_padding=4, flip=True, cutmix=0.0, classes=100):
        self.images = tf.constant(images)   # one tensor, gathered by index: no per-epoch copy
        self.labels = tf.constant(labels, dtype=tf.int32)
        self.batch_size = batch_size
        self.seed = seed
        self.crop_padding = crop_padding
        self.flip = flip
        self.cutmix, self.classes = cutmix, classes

    def __len__(self):
        return int(self.labels.shape[0])

    def steps_per_epoch(self):
        return len(self) // self.batch_size

    def _augment(self, index, batch_seed):
        images = tf.gather(self.images, index)
        n = tf.shape(index)[0]
        # Four streams, of which crops and flips use two: the split keeps the draws of earlier runs.
        seeds = tf.random.experimental.stateless_split(batch_seed, num=4)
        if self.crop_padding:
            p = self.crop_padding
            padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]], mode="REFLECT")
            # One offset per image and axis; gathering rows, then columns, crops the whole batch at once.
            offsets = tf.random.stateless_uniform((2, n), seeds[0], 0, 2 * p + 1, tf.int32)
            window = tf.range(IMAGE_SHAPE[0])
            rows = offsets[0][:, None] + window
            columns = offsets[1][:, None] + window
            images = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), columns, axis=2, batch_dims=1)
        if self.flip:
            flips = tf.random.stateless_uniform((n, 1, 1, 1), seeds[1]) < 0.5
            images = tf.where(flips, tf.reverse(images, axis=[2]), images)
        if self.cutmix:
            return self._cutmix(images, tf.gather(self.labels, index), seeds[2])
        return images, tf.gather(self.labels, index)

    def _cutmix(self, images, labels, seed):
        """CutMix: a box of the next image in the (shuffled) batch, of area fraction ~ U(0, 1) before clipping
        at the border, pasted at a uniform centre; the label becomes the two one-hot labels mixed by area."""
        n, size = tf.shape(images)[0], IMAGE_SHAPE[0]
        draws = tf.random.stateless_uniform((4, n), seed)
        half = size * tf.sqrt(draws[0]) * tf.cast(draws[1] < self.cutmix, tf.float32) / 2
        pixel = tf.range(size, dtype=tf.float32)[None, :] + 0.5
        rows = tf.abs(pixel - size * draws[2][:, None]) < half[:, None]
        columns = tf.abs(pixel - size * draws[3][:, None]) < half[:, None]
        box = tf.logical_and(rows[:, :, None], columns[:, None, :])
        images = tf.where(box[..., None], tf.roll(images, 1, axis=0), images)
        area = tf.reduce_mean(tf.cast(box, tf.float32), axis=[1, 2])[:, None]
        one_hot = tf.one_hot(labels, self.classes)
        return images, (1 - area) * one_hot + area * tf.roll(one_hot, 1, axis=0)

    def train_dataset(self, epoch):
        """Shuffled, augmented, full batches (static shapes) for one epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
        steps = self.steps_per_epoch()
        epoch_seed = tf.constant([self.seed * 100_003 + epoch, 0], tf.int64)
        ds = tf.data.Dataset.from_tensor_slices((order[:steps * self.batch_size].reshape(steps, -1),
                                                 tf.range(steps, dtype=tf.int64)))
        # Its control flow is Python's: autograph would only spend a second of every start converting it.
        augment = tf.autograph.experimental.do_not_convert(
            lambda index, step: self._augment(index, epoch_seed + tf.stack([0, step])))
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        return without_autotuning(ds.prefetch(tf.data.AUTOTUNE))

    def eval_dataset(self, batch_size=None):
        """Every image once, in order, unchanged."""
        ds = tf.data.Dataset.from_tensor_slices((self.images, self.labels))
        return without_autotuning(ds.batch(batch_size or self.batch_size).prefetch(tf.data.AUTOTUNE))


# --- Layers: small, serializable building blocks ------------------------------------------------------------

@keras.saving.register_keras_serializable(package="cifar_hybrid")
class ImageStandardization(layers.Layer):
    """Raw 0..255 pixels (uint8 or float) to per-channel standardized values."""

    def __init__(self, mean=CIFAR100_MEAN, std=CIFAR100_STD, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, images):
        x = ops.cast(images, "float32")
        x = (x - ops.array(self.mean, "float32")) / ops.array(self.std, "float32")
        return ops.cast(x, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class PatchEmbedding(layers.Layer):
    """Cuts the image into non-overlapping patches and projects each to a token."""

    def __init__(self, patch_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        # A strided convolution is exactly "flatten each patch, then a shared Dense".
        self.projection = layers.Conv2D(embed_dim, patch_size, strides=patch_size, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.projection.build(input_shape)

    def call(self, images):
        # Computed as that Dense: on a CPU a convolution whose stride equals its kernel trains
        # several times slower than the same product as one matrix multiplication.
        p, (h, w, c) = self.patch_size, images.shape[1:]
        x = ops.reshape(images, (-1, h // p, p, w // p, p, c))
        x = ops.reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, (h // p) * (w // p), p * p * c))
        kernel = ops.reshape(ops.cast(self.projection.kernel, x.dtype), (p * p * c, self.embed_dim))
        return ops.matmul(x, kernel) + ops.cast(self.projection.bias, x.dtype)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "embed_dim": self.embed_dim}


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class ClassToken(layers.Layer):
    """Prepends a learnable CLS token whose final state summarises the image."""

    def build(self, input_shape):
        self.cls_token = self.add_weight(name="cls_token", shape=(1, 1, input_shape[-1]),
                                         initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def call(self, tokens):
        cls = ops.broadcast_to(ops.cast(self.cls_token, tokens.dtype), (ops.shape(tokens)[0], 1, tokens.shape[-1]))
        return ops.concatenate([cls, tokens], axis=1)


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class PositionEmbedding(layers.Layer):
    """Adds a learnable vector per token position: attention itself is order-blind."""

    def build(self, input_shape):
        self.position_embedding = self.add_weight(
            name="position_embedding", shape=(1, input_shape[1], input_shape[2]),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def call(self, tokens):
        return tokens + ops.cast(self.position_embedding, tokens.dtype)


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class TransformerEncoderBlock(layers.Layer):
    """Pre-norm block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, embed_dim, num_heads, mlp_ratio=2.0, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        policy = self.dtype_policy
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, dtype=policy)
        self.attention = layers.MultiHeadAttention(num_heads, embed_dim // num_heads, dropout=dropout, dtype=policy)
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, dtype=policy)
        self.mlp_hidden = layers.Dense(int(embed_dim * mlp_ratio), activation="gelu", dtype=policy)
        self.mlp_out = layers.Dense(embed_dim, dtype=policy)
        self.drop = layers.Dropout(dropout, dtype=policy)

    def build(self, input_shape):
        self.norm1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.norm2.build(input_shape)
        self.mlp_hidden.build(input_shape)
        self.mlp_out.build(input_shape[:-1] + (int(self.embed_dim * self.mlp_ratio),))

    def call(self, x, training=None, return_attention_scores=False):
        h, scores = self.self_attention(self.norm1(x), training=training)
        x = x + self.drop(h, training=training)
        h = self.mlp_out(self.drop(self.mlp_hidden(self.norm2(x)), training=training))
        x = x + self.drop(h, training=training)
        return (x, scores) if return_attention_scores else x

    def self_attention(self, h, training=None):
        """What `self.attention(h, h)` computes, and its weights (batch, heads, tokens, tokens), from the same
        variables in fewer, larger operations: one matmul projects queries, keys and values together, and the
        heads multiply as batched matmuls where Keras's layer runs einsums, which on a CPU made the ViT branch
        train far slower than its FLOPs (RESULTS.md, ablation table). The Keras layer stays as the owner of
        the variables, so models saved before load unchanged."""
        heads, size, width = self.num_heads, self.embed_dim // self.num_heads, self.embed_dim
        projections = (self.attention._query_dense, self.attention._key_dense, self.attention._value_dense)
        kernel = ops.concatenate([ops.reshape(d.kernel, (width, heads * size)) for d in projections], axis=1)
        bias = ops.concatenate([ops.reshape(d.bias, (heads * size,)) for d in projections], axis=0)
        tokens = h.shape[1]
        qkv = ops.matmul(h, ops.cast(kernel, h.dtype)) + ops.cast(bias, h.dtype)
        qkv = ops.transpose(ops.reshape(qkv, (-1, tokens, 3, heads, size)), (2, 0, 3, 1, 4))
        # Unstacking, not indexing: the gradient of an index is a zero tensor per slice, of unstacking one stack.
        query, key, value = ops.unstack(qkv, 3, axis=0)
        query = query * ops.cast(size ** -0.5, h.dtype)
        scores = ops.softmax(ops.matmul(query, ops.transpose(key, (0, 1, 3, 2))), axis=-1)
        attended = ops.matmul(self.drop(scores, training=training), value)
        attended = ops.reshape(ops.transpose(attended, (0, 2, 1, 3)), (-1, tokens, heads * size))
        output = self.attention._output_dense
        kernel = ops.reshape(output.kernel, (heads * size, width))
        return ops.matmul(attended, ops.cast(kernel, h.dtype)) + ops.cast(output.bias, h.dtype), scores

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class BatchNormalization(layers.BatchNormalization):
    """Keras batch normalization that trains with TensorFlow's fused kernel: one op forward and one
    backward instead of a pass per statistic, which saves step time on a CPU (RESULTS.md, "Ablations").

    Same weights and results. Inference, other backends and synchronized statistics take Keras's own
    path, so a saved model runs anywhere; Keras's class name keeps the saved weights interchangeable.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and mask is None and not self.synchronized
                and not getattr(self, "renorm", False) and self.center and self.scale
                and len(inputs.shape) == 4 and self.axis in (-1, 3) and keras.backend.backend() == "tensorflow"):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, "float32")  # statistics in float32, as Keras does
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, self.gamma, self.beta, epsilon=self.epsilon,
                                                             data_format="NHWC", is_training=True)
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], "float32")
        # The kernel returns the unbiased variance; Keras's moving variance averages the biased one.
        variance = variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)


def batch_norm_relu(policy, synchronized_bn=False):
    """BN then ReLU; across several replicas, batch statistics over the global batch (TensorFlow only)."""
    return [BatchNormalization(momentum=0.9, synchronized=synchronized_bn, dtype=policy), layers.ReLU(dtype=policy)]


def conv_stage(width, policy, synchronized_bn=False, first=False):
    """conv3x3 -> max-pool -> BN -> ReLU -> conv3x3 -> BN -> ReLU: pooling first makes the second conv
    four times cheaper. `first` adds a conv3x3 -> BN -> ReLU in front (models saved before the shared stem)."""
    def conv():
        return layers.Conv2D(width, 3, padding="same", use_bias=False, dtype=policy)

    head = [conv(), *batch_norm_relu(policy, synchronized_bn)] if first else []
    return head + [conv(), layers.MaxPooling2D(2, dtype=policy), *batch_norm_relu(policy, synchronized_bn),
                   conv(), *batch_norm_relu(policy, synchronized_bn)]


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class ConvStem(layers.Layer):
    """The convolutions both branches read, one conv stage: 32x32 image to a 16x16 feature map.

    The ViT embeds patches of learned features instead of raw pixels (the "hybrid" ViT of Dosovitskiy
    et al. 2020, CCT's convolutional tokenizer), and both branches pay for these convolutions once. Only
    its first conv runs at 32x32: there batch norm and ReLU cost more time than their FLOPs suggest.
    """

    def __init__(self, width=32, synchronized_bn=False, kind="pool", full_resolution_conv=False, **kwargs):
        super().__init__(**kwargs)
        # Configs saved by earlier versions name the stem's kind ("pool"), or before that its absence.
        if kind != "pool" or full_resolution_conv:
            raise ValueError(f"the {kind if kind != 'pool' else 'full'} stem is no longer built; only the pool stem")
        self.width = int(width)
        self.synchronized_bn = bool(synchronized_bn)
        self.stack = keras.Sequential(conv_stage(self.width, self.dtype_policy, self.synchronized_bn), name="stem")

    def build(self, input_shape):
        self.stack.build(input_shape)

    def call(self, images, training=None):
        return self.stack(images, training=training)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "synchronized_bn": self.synchronized_bn}


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class CNNBranch(layers.Layer):
    """Conv stages with batch norm, each halving the resolution, then global pooling. `stem=True` (models
    saved before the shared stem) starts with its own full-resolution conv."""

    def __init__(self, widths=(32, 64, 128), synchronized_bn=False, stem=True, **kwargs):
        super().__init__(**kwargs)
        self.widths = tuple(int(w) for w in widths)
        self.synchronized_bn = bool(synchronized_bn)
        self.stem = bool(stem)
        stack = []
        for i, width in enumerate(self.widths):
            stack += conv_stage(width, self.dtype_policy, self.synchronized_bn, first=self.stem and i == 0)
        stack.append(layers.GlobalAveragePooling2D(dtype=self.dtype_policy))
        self.stack = keras.Sequential(stack, name="stages")

    def build(self, input_shape):
        self.stack.build(input_shape)

    def call(self, images, training=None):
        return self.stack(images, training=training)

    def feature_map(self, images, training=None):
        """The last stage's output before the pooling: what Grad-CAM weighs."""
        for layer in self.stack.layers[:-1]:
            images = layer(images, training=training)
        return images

    def get_config(self):
        return {**super().get_config(), "widths": self.widths, "synchronized_bn": self.synchronized_bn,
                "stem": self.stem}


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class ViTBranch(layers.Layer):
    """Patch embedding, CLS token, position embeddings, encoder blocks, final norm; returns the CLS state."""

    def __init__(self, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        policy = self.dtype_policy
        self.patch_embedding = PatchEmbedding(patch_size, embed_dim, dtype=policy)
        self.class_token = ClassToken(dtype=policy)
        self.position_embedding = PositionEmbedding(dtype=policy)
        self.embedding_dropout = layers.Dropout(dropout, dtype=policy)
        self.blocks = [TransformerEncoderBlock(embed_dim, num_heads, mlp_ratio, dropout, dtype=policy)
                       for _ in range(depth)]
        self.norm = layers.LayerNormalization(epsilon=1e-6, dtype=policy)

    def build(self, input_shape):
        self.patch_embedding.build(input_shape)
        grid = (input_shape[1] // self.patch_size) * (input_shape[2] // self.patch_size)
        shape = (input_shape[0], grid + 1, self.embed_dim)  # the patch tokens and the CLS token
        self.class_token.build(shape)
        self.position_embedding.build(shape)
        for block in self.blocks:
            block.build(shape)
        self.norm.build(shape)

    def tokens(self, images, training=None, return_attention_scores=False):
        """The token sequence after the last block, (batch, patches + 1, embed_dim); with
        `return_attention_scores`, also each block's attention weights, (batch, heads, tokens, tokens)."""
        x = self.position_embedding(self.class_token(self.patch_embedding(images)))
        x = self.embedding_dropout(x, training=training)
        scores = []
        for block in self.blocks:
            x, block_scores = block(x, training=training, return_attention_scores=True)
            scores.append(block_scores)
        return (self.norm(x), scores) if return_attention_scores else self.norm(x)

    def call(self, images, training=None):
        return self.tokens(images, training=training)[:, 0]

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "dropout": self.dropout}


@keras.saving.register_keras_serializable(package="cifar_hybrid")
class FusionHead(layers.Layer):
    """Concatenates the branch vectors; L2-regularized dense layers with dropout; float32 softmax."""

    def __init__(self, num_classes=NUM_CLASSES, units=256, dropout=0.1, l2=1e-4, class_names=None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        # The names travel in the saved model's config, so using the model needs no data set.
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.units = units
        self.dropout = dropout
        self.l2 = l2
        policy = self.dtype_policy
        self.concat = layers.Concatenate(dtype=policy)
        self.hidden = layers.Dense(units, activation="gelu", kernel_regularizer=keras.regularizers.L2(l2),
                                   dtype=policy)
        self.drop = layers.Dropout(dropout, dtype=policy)
        # Logits and softmax in float32: bf16/fp16 softmax over 100 classes loses precision.
        self.classifier = layers.Dense(num_classes, kernel_regularizer=keras.regularizers.L2(l2), dtype="float32")
        self.softmax = layers.Softmax(dtype="float32")

    def build(self, input_shape):
        features = sum(shape[-1] for shape in input_shape)
        self.hidden.build((None, features))
        self.classifier.build((None, self.units))

    def call(self, branch_outputs, training=None):
        return self.softmax(self.logits(branch_outputs, training=training))

    def logits(self, branch_outputs, training=None):
        return self.classifier(self.drop(self.hidden(self.concat(list(branch_outputs))), training=training))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "units": self.units,
                "dropout": self.dropout, "l2": self.l2, "class_names": self.class_names}


# --- Model --------------------------------------------------------------------------------------------------

def build_model(config, dtype=None, synchronized_bn=False, class_names=None):
    """The hybrid: raw 0..255 images in, class probabilities out. `dtype` is a Keras dtype policy name (None:
    the global policy); `class_names` travel in the fusion head's config and show as `model.class_names`."""
    spec = DATASETS[config.dataset]
    inputs = keras.Input(IMAGE_SHAPE, dtype="float32", name="image")
    x = ImageStandardization(spec["mean"], spec["std"], dtype=dtype, name="standardize")(inputs)
    stem = ConvStem(config.stem_width, synchronized_bn, dtype=dtype, name="stem")(x)
    features = []
    if config.branches in ("both", "cnn"):
        features.append(CNNBranch(config.cnn_widths, synchronized_bn, stem=False, dtype=dtype,
                                  name="cnn_branch")(stem))
    if config.branches in ("both", "vit"):
        features.append(ViTBranch(config.patch_size, config.embed_dim, config.depth, config.num_heads,
                                  config.mlp_ratio, config.dropout, dtype=dtype, name="vit_branch")(stem))
    outputs = FusionHead(spec["classes"], config.head_units, config.head_dropout, config.l2, class_names,
                         dtype=dtype, name="fusion_head")(features)
    return _with_class_names(keras.Model(inputs, outputs, name="cifar_hybrid"))


def whiten_stem(model, images, samples=5000, eps=5e-4):
    """Set the stem's first convolution to whiten the patches of `images` and freeze it (airbench).

    Its filters become the covariance's leading eigenvectors scaled by 1/sqrt(eigenvalue), each paired
    with its negative: the net starts from decorrelated features, and the frozen layer costs no gradient.
    Filters beyond twice a patch's length (2 x 27 for 3x3 RGB) keep their random start.
    """
    conv = model.get_layer("stem").stack.layers[0]
    standardize = model.get_layer("standardize")
    kh, kw, channels, filters = conv.kernel.shape
    covariance = np.zeros((kh * kw * channels,) * 2)
    count = 0
    for start in range(0, min(samples, len(images)), 500):
        x = keras.ops.convert_to_numpy(standardize(images[start:min(samples, start + 500)])).astype(np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::conv.strides[0],
                                                                                     ::conv.strides[1]]
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * channels)  # the kernel's (kh, kw, c)
        covariance += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance / count)
    order = np.argsort(eigenvalues)[::-1][:min(filters // 2, len(eigenvalues))]
    basis = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
    kernel = keras.ops.convert_to_numpy(conv.kernel).reshape(-1, filters)
    kernel[:, :2 * len(order)] = np.concatenate([basis, -basis], axis=1)
    conv.kernel.assign(kernel.reshape(kh, kw, channels, filters).astype("float32"))
    conv.trainable = False


def identity_init(model):
    """Start every conv3x3 after the stem's first as a partial identity (airbench's dirac initialization):
    the first min(inputs, outputs) filters pass their channel through, so a net of plain conv stages
    without shortcuts starts close to a shallow one and trains like it early on."""

    convs = [layer for part in model.layers if part.name in ("stem", "cnn_branch")
             for layer in part.stack.layers if isinstance(layer, layers.Conv2D)]
    for conv in convs[1:]:
        kh, kw, channels, filters = conv.kernel.shape
        kernel = keras.ops.convert_to_numpy(conv.kernel).copy()
        n = min(channels, filters)
        kernel[..., :n] = 0.0
        kernel[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        conv.kernel.assign(kernel)


def initialize_convolutions(model, config, images, samples=5000):
    """The starts the options ask for: the whitened stem (from `images`) and the identity convolutions."""
    if config.whiten_stem:
        whiten_stem(model, images, samples=samples)
    if config.identity_init:
        identity_init(model)


def _with_class_names(model):
    heads = [layer for layer in model.layers if isinstance(layer, FusionHead)]
    model.class_names = heads[0].class_names if heads else None
    return model


def resolve_precision(precision):
    """Pick the dtype policy for `--precision auto`."""
    if precision != "auto":
        return precision
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if _cpu_bf16_is_faster() else "float32"


def seconds_of(call):
    """Wall seconds that `call()` takes."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def matmul_gflops(dtype, n=2048, repeats=10):
    """This machine's measured speed of an n x n matmul in `dtype`, in GFLOP/s (median of `repeats`)."""
    a = tf.cast(tf.random.normal((n, n)), dtype)
    matmul = tf.function(lambda a: tf.matmul(a, a))
    times = [seconds_of(lambda: matmul(a).numpy()) for _ in range(repeats + 1)]  # the first call traces
    return 2 * n ** 3 / float(np.median(times[1:])) / 1e9


def onednn_allows_bf16():
    """False under ONEDNN_MAX_CPU_ISA=AVX2 or older (an AVX-512 machine run as an AVX2-only one): oneDNN
    then has no bf16 matmul and aborts the process on one."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return isa in ("ALL", "DEFAULT") or isa.startswith(("AVX512", "AVX10"))


@functools.cache
def _cpu_bf16_is_faster():
    """Native bf16 flags, and bf16 matmuls timed (half a second, once per process) at 1.25x float32's:
    an Intel Xeon with avx512_bf16 and no AMX trains slower in bf16 (RESULTS.md, "Throughput"). The two
    are timed in alternating rounds and each keeps its fastest: a busy shared host only ever slows a
    round, and one slow round of bf16 must not make a whole run float32."""
    if not (onednn_allows_bf16() and _cpu_has_native_bf16()):
        return False
    rounds = [(matmul_gflops(tf.bfloat16, n=1024, repeats=3), matmul_gflops(tf.float32, n=1024, repeats=3))
              for _ in range(3)]
    bf16, fp32 = (max(speeds) for speeds in zip(*rounds))
    return bf16 > 1.25 * fp32


def _cpu_has_native_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16")) or (
        platform.machine() == "aarch64" and " bf16" in flags)


# --- Trainer: a custom loop (see docs/design.md) over a tf.distribute strategy ------------------------------

@keras.saving.register_keras_serializable(package="cifar_hybrid")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then cosine decay to zero at `total_steps`, a horizon that can move.

    A time-budgeted run that falls behind or gets ahead calls `retarget`, which keeps the rate reached
    and spreads the rest of the decay over the new horizon: the rate still ends at zero and never rises.
    """

    def __init__(self, peak, total_steps, warmup_fraction, warmup_steps=None, anchor_step=None,
                 anchor_progress=0.0):
        self.peak = float(peak)
        self.warmup_fraction = float(warmup_fraction)
        warmup_steps = float(total_steps) * self.warmup_fraction if warmup_steps is None else float(warmup_steps)
        self.total_steps = tf.Variable(float(total_steps), trainable=False, name="total_steps")
        self.warmup_steps = tf.Variable(warmup_steps, trainable=False, name="warmup_steps")
        # The decay runs from progress `anchor_progress` at step `anchor_step` to 1 at `total_steps`.
        self.anchor_step = tf.Variable(warmup_steps if anchor_step is None else float(anchor_step),
                                       trainable=False, name="anchor_step")
        self.anchor_progress = tf.Variable(float(anchor_progress), trainable=False, name="anchor_progress")

    def _progress(self, step):
        anchor, total = ops.cast(self.anchor_step, "float32"), ops.cast(self.total_steps, "float32")
        share = ops.clip((step - anchor) / ops.maximum(total - anchor, 1.0), 0.0, 1.0)
        return self.anchor_progress + (1.0 - self.anchor_progress) * share

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = ops.cast(self.warmup_steps, "float32")
        decayed = 0.5 * self.peak * (1.0 + ops.cos(np.pi * self._progress(step)))
        return ops.where(step < warmup, self.peak * step / ops.maximum(warmup, 1.0), decayed)

    def retarget(self, step, total_steps):
        """From `step` on, end the decay at `total_steps` instead, continuing from the current rate."""
        warmup = float(self.warmup_steps.numpy())
        if step < warmup:  # still warming up: the ramp still reaches the peak, sooner if the run shrank
            warmup = min(warmup, max(float(step), self.warmup_fraction * total_steps))
            self.warmup_steps.assign(warmup)
            self.anchor_step.assign(warmup)
            self.anchor_progress.assign(0.0)
        else:
            self.anchor_progress.assign(float(self._progress(float(step))))
            self.anchor_step.assign(float(step))
        self.total_steps.assign(float(total_steps))

    def get_config(self):
        return {"peak": self.peak, "total_steps": float(self.total_steps.numpy()),
                "warmup_fraction": self.warmup_fraction, "warmup_steps": float(self.warmup_steps.numpy()),
                "anchor_step": float(self.anchor_step.numpy()),
                "anchor_progress": float(self.anchor_progress.numpy())}


def orthogonalized(matrix, steps=3):
    """About U V^T for matrix = U S V^T, all directions at one scale: the quintic Newton-Schulz iteration
    of K. Jordan's Muon, which pushes the singular values towards 1 fast rather than exactly.

    Each step multiplies x by a polynomial p of its Gram matrix G = x x^T, and G by p^2 (p commutes with
    G), so the steps run on the small m x m Gram matrix and touch the long side n only twice: the first
    Gram matrix and the final product. A conv kernel's n is 9 times its inputs, so this does the same
    iteration in about half the arithmetic."""
    wide = matrix.shape[0] <= matrix.shape[1]
    x = matrix if wide else ops.transpose(matrix)
    x = x / (ops.sqrt(ops.sum(ops.square(x))) + 1e-7)  # all singular values <= 1
    gram = ops.matmul(x, ops.transpose(x))
    eye = ops.eye(gram.shape[0], dtype=gram.dtype)
    product = None
    for step in range(steps):
        p = 3.4445 * eye + ops.matmul(-4.7750 * eye + 2.0315 * gram, gram)
        product = p if product is None else ops.matmul(p, product)
        if step + 1 < steps:
            gram = ops.matmul(ops.matmul(p, p), gram)
    x = ops.matmul(product, x)
    return x if wide else ops.transpose(x)


class ShiftScaledAdamW(keras.optimizers.AdamW):
    """AdamW whose batch-norm shifts (beta) learn `shift_lr_scale` times faster, and whose conv kernels
    (`kernels`) take Muon steps when `muon_step` > 0 (docs/design.md).

    Batch norm makes a conv blind to its kernel's scale, so AdamW turns the small kernels fast while the
    shifts, on a scale of about 1, lag behind (airbench's "scalebias"). Muon steps: the Nesterov momentum,
    orthogonalized, with the kernel held at a fixed norm, so each step turns it by `muon_step` times the
    schedule's fraction of its peak.
    """

    def __init__(self, learning_rate, shifts=(), shift_lr_scale=1.0, kernels=(), muon_step=0.0,
                 muon_momentum=0.9, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.shifts, self.shift_lr_scale = list(shifts), float(shift_lr_scale)
        self.kernels = list(kernels) if muon_step > 0 else []
        self.muon_step, self.muon_momentum = float(muon_step), float(muon_momentum)
        self._peak = learning_rate.peak if isinstance(learning_rate, WarmupCosine) else float(learning_rate)

    def build(self, variables):
        # In a distributed step the update sees TensorFlow's own variables: match them by key.
        self._shift_keys = {self._var_key(v) for v in self.shifts}
        self._kernel_keys = {self._var_key(v) for v in self.kernels}
        super().build(variables)

    def update_step(self, gradient, variable, learning_rate):
        key = self._var_key(variable)
        if key in self._kernel_keys:
            return self._conv_muon_step(gradient, variable, learning_rate)
        if key in self._shift_keys:
            learning_rate = learning_rate * self.shift_lr_scale
        super().update_step(gradient, variable, learning_rate)

    def _conv_muon_step(self, gradient, variable, learning_rate):
        filters = variable.shape[-1]
        momentum = self._momentums[self._get_variable_index(variable)]  # AdamW's first moment slot
        self.assign(momentum, momentum * self.muon_momentum + gradient)
        update = gradient + self.muon_momentum * momentum  # Nesterov
        direction = ops.reshape(orthogonalized(ops.reshape(update, (-1, filters))), variable.shape)
        scale = math.sqrt(filters)  # the norm of an orthogonal matrix of that many columns
        kept = variable * (scale / (ops.sqrt(ops.sum(ops.square(variable))) + 1e-12))
        self.assign(variable, kept - (self.muon_step * learning_rate / self._peak) * direction)


def make_optimizer(model, config, learning_rate):
    """The optimizer `config` asks for, over `model`'s batch-norm shifts and conv kernels."""
    shifts = [layer.beta for layer in model._flatten_layers() if isinstance(layer, BatchNormalization)]
    kernels = [layer.kernel for part in model.layers if part.name in ("stem", "cnn_branch")
               for layer in part.stack.layers if isinstance(layer, layers.Conv2D) and layer.trainable]
    optimizer = ShiftScaledAdamW(learning_rate, shifts, config.shift_lr_scale, kernels, config.muon_step,
                                 weight_decay=config.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "cls_token", "position_embedding"])
    return optimizer


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the state is backed up; the command line exits with `exit_code` (130 or 143)."""

    def __init__(self, exit_code, message):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(Exception):
    """A non-finite loss: the command line exits with code 3 and keeps every earlier file."""


class PeerLost(Exception):
    """A multi-worker run lost a worker (a collective failed or was aborted): exit code 4, one line."""


def make_strategy(name):
    """The `tf.distribute` strategy for --distribute; call it first: a multi-worker strategy must exist
    before TensorFlow starts its runtime."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    except (ValueError, AttributeError):
        raise InputError("TF_CONFIG is not valid JSON; see the README for its form") from None
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    if name == "auto":
        name = "multi-worker" if workers > 1 else "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 \
            else "none"
    if name == "multi-worker":
        if workers < 2:
            raise InputError("--distribute multi-worker needs TF_CONFIG naming two or more workers")
        # No per-collective timeout: TensorFlow gives each collective that has one a thread that sleeps out
        # the timeout, and at dozens per step they pile up until no thread can start. The coordination
        # service's heartbeats find a dead or frozen peer instead, and abort every pending collective.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":  # all local GPUs; without any, all logical CPU devices
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """True for the one process that writes outputs: the chief, worker 0 without a chief, or a lone process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return not cluster or resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster)


class Trainer:
    """Fits the model with AdamW (Muon for the conv kernels) + warm-up/cosine, keeps the best-validation weights."""

    def __init__(self, config, data, strategy=None, log=print, started=None):
        self.config = config
        self.started = started or time.time()  # the clock that history's "elapsed" reads
        self.data = data
        self.log = log
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = config.batch_size * self.replicas
        self.is_chief = is_chief(self.strategy)
        self.precision = resolve_precision(config.precision)
        self._split()
        self.train_pipeline = AugmentationPipeline(self.x_train, self.y_train, self.global_batch, config.seed,
                                                   config.crop_padding, config.flip, config.cutmix,
                                                   DATASETS[config.dataset]["classes"])
        self.val_pipeline = AugmentationPipeline(self.x_val, self.y_val, config.batch_size) \
            if len(self.y_val) else None
        self.steps_per_epoch = self.train_pipeline.steps_per_epoch()
        if self.steps_per_epoch < 1:
            raise InputError(f"{len(self.train_pipeline)} training images are fewer than one global batch of "
                             f"{self.global_batch}; lower --batch-size")
        self.epochs = config.epochs
        self.time_plan = None  # with --time-budget: plan_time_budget
        with self.strategy.scope():
            self.model = build_model(config, self.precision, self.replicas > 1, data.fine_names)
        initialize_convolutions(self.model, config, self.x_train)  # a resumed run restores its weights over these
        self.loss_fn = self.make_loss()
        self.start_epoch, self.start_step, self.partial = 0, 0, (0.0, 0.0, 0.0)  # where fit() begins
        self.history, self.best_accuracy, self.stop_signal = [], -1.0, None
        self.tensorboard = tf.summary.create_file_writer(config.tensorboard) \
            if config.tensorboard and self.is_chief else None
        self._predict_step = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True,
                                         autograph=False)
        self._prepare_training()

    def make_loss(self):
        return keras.losses.CategoricalCrossentropy(label_smoothing=self.config.label_smoothing, reduction=None)

    def _prepare_training(self):
        """A fresh optimizer and step function for the current plan (the schedule needs the step count)."""
        self.total_steps = self.steps_per_epoch * self.epochs
        with self.strategy.scope():
            self.optimizer = self._make_optimizer()
            self.optimizer.build(self.model.trainable_variables)  # its slots must exist before a restore
        # No autograph: the step's control flow is Python's, and converting it cost each start seconds.
        self._train_step = tf.function(self._distributed_train_step, autograph=False)
        self.backup = TrainingBackup(self)

    def resume(self):
        """Restore the last backup (unless --fresh); True if this run continues an earlier one."""
        return self.backup.restore()

    def plan_time_budget(self, seconds, test_images):
        """Fix epochs and steps so the run fits in `seconds`, and re-plan after each epoch (`TimePlan`)."""
        self.time_plan = TimePlan.measure(self, seconds, test_images)

    def request_stop(self, signum, frame=None):
        """Signal handler: finish the current batch, back up, exit 128 + signal; a second signal exits at once."""
        if self.stop_signal is not None:
            os.write(2, b"\nsecond interrupt: quitting at once\n")
            os._exit(128 + signum)
        self.stop_signal = signum
        os.write(2, b"\nstopping after this batch and saving a backup (interrupt again to quit at once)\n")

    def check_stop(self):
        """Raise `TrainingInterrupted` if a stop was requested (call it right after a backup)."""
        if self.stop_signal is not None:
            raise TrainingInterrupted(
                128 + self.stop_signal, f"interrupted by {signal.Signals(self.stop_signal).name}: the training "
                f"state is saved in {self.config.checkpoint_dir}; run the same command again to resume")

    def _split(self):
        from sklearn.model_selection import train_test_split
        c, d = self.config, self.data
        if not c.validation_split:  # a final fit, once the recipe is chosen: every image trains
            self.x_train, self.y_train = d.x_train, d.y_train
            self.x_val, self.y_val = d.x_train[:0], d.y_train[:0]
            return
        try:
            train_idx, val_idx = train_test_split(np.arange(len(d.y_train)), test_size=c.validation_split,
                                                  stratify=d.y_train, random_state=c.seed)
        except ValueError as exc:
            raise InputError(f"cannot carve a stratified validation split of {c.validation_split} from "
                            f"{len(d.y_train)} training images ({exc})") from None
        self.x_train, self.y_train = d.x_train[train_idx], d.y_train[train_idx]
        self.x_val, self.y_val = d.x_train[val_idx], d.y_train[val_idx]

    def _make_optimizer(self):
        c = self.config
        self.schedule = WarmupCosine(c.learning_rate * self.replicas, self.total_steps, c.warmup_fraction)
        optimizer = make_optimizer(self.model, c, self.schedule)
        if self.precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)  # fp16 gradients underflow without it
        return optimizer

    def _distributed_train_step(self, images, labels):
        global_batch, classes = self.global_batch, DATASETS[self.config.dataset]["classes"]

        def step(x, y):
            with tf.GradientTape() as tape:
                probs = self.model(x, training=True)
                targets = tf.one_hot(y, classes) if y.dtype.is_integer else y  # soft with CutMix
                per_example = self.loss_fn(targets, probs)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
                if self.model.losses:
                    loss += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
                scaled = self.optimizer.scale_loss(loss)
            variables = self.model.trainable_variables
            self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1), tf.argmax(targets, -1)), tf.float32))
            return loss, correct

        loss, correct = self.strategy.run(step, args=(images, labels))
        reduce = tf.distribute.ReduceOp.SUM
        return self.strategy.reduce(reduce, loss, axis=None), self.strategy.reduce(reduce, correct, axis=None)

    def learning_rate(self):
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    def global_step(self):
        """Optimizer steps taken so far (Keras before 3.5 has no `int()` of a variable)."""
        return int(self.optimizer.iterations.numpy())

    def predict(self, pipeline):
        """Class probabilities of the model in training for every image of an evaluation pipeline, in order."""
        return np.concatenate([self._predict_step(x).numpy() for x, _ in pipeline.eval_dataset()])

    def fit(self):
        """Train from `start_epoch`/`start_step` (non-zero after `resume`), backing up after every epoch."""
        c = self.config
        epoch = self.start_epoch - 1
        while epoch + 1 < self.epochs:  # a time plan may add epochs on the way
            epoch += 1
            start, done = time.time(), self.start_step
            loss_sum, correct, seen = self.partial if done else (0.0, 0.0, 0.0)
            self.start_step = 0
            dataset = self.train_pipeline.train_dataset(epoch).take(self.steps_per_epoch).skip(done)
            options = tf.data.Options()  # several workers: each takes its share of every global batch
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
            dataset = self.strategy.experimental_distribute_dataset(dataset.with_options(options))
            progress = keras.utils.Progbar(self.steps_per_epoch, verbose=int(sys.stdout.isatty()),
                                           stateful_metrics=["loss", "acc"])
            step = done
            for step, (images, labels) in enumerate(dataset, done + 1):
                loss, hits = self._train_step(images, labels)
                loss = float(loss)
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"the training loss became {loss} at epoch {epoch + 1}, batch {step}; the last backup "
                        f"(in {c.checkpoint_dir}, if any) and any earlier model file are untouched; lower "
                        "--learning-rate and add --fresh to start over")
                loss_sum, correct = loss_sum + loss, correct + float(hits)
                seen += self.global_batch
                progress.update(step, [("loss", loss_sum / step), ("acc", correct / seen)])
                if self.stop_signal is not None:
                    self.backup.save(epoch, step, (loss_sum, correct, seen))
                    self.check_stop()
            train_seconds = time.time() - start
            record = {"epoch": epoch + 1, "learning_rate": self.learning_rate(),
                      "train_loss": loss_sum / max(step, 1), "train_accuracy": correct / max(seen, 1)}
            validated = ""
            if self.val_pipeline is not None:
                probs = self.predict(self.val_pipeline)
                record["val_accuracy"] = float(np.mean(probs.argmax(-1) == self.y_val))
                record["val_loss"] = float(-np.mean(np.log(probs[np.arange(len(probs)), self.y_val] + 1e-12)))
                improved = record["val_accuracy"] > self.best_accuracy
                if improved:
                    self.best_accuracy = record["val_accuracy"]
                    for best, weight in zip(self.best_weights, self.model.weights):
                        best.assign(weight)
                validated = f"  val {100 * record['val_accuracy']:.2f}%{' (best)' * improved}"
            record.update(seconds=time.time() - start, elapsed=time.time() - self.started)
            self.history.append(record)
            self._log_to_tensorboard(record)
            self.backup.save(epoch + 1, 0)
            self.log(f"epoch {epoch + 1}/{self.epochs}  loss {record['train_loss']:.3f}  train "
                     f"{100 * record['train_accuracy']:.1f}%{validated}  "
                     f"lr {record['learning_rate']:.2e}  {record['seconds']:.0f}s")
            self.check_stop()
            if self.time_plan is not None and epoch + 1 < self.epochs:
                self.time_plan.replan(self.epochs - epoch - 1, train_seconds, time.time() - start - train_seconds)
        if self.val_pipeline is not None and self.history and self.best_accuracy > self.history[-1]["val_accuracy"]:
            self.log(f"restoring the best-validation weights ({100 * self.best_accuracy:.2f}%)")
            self.model.set_weights([w.numpy() for w in self.best_weights])
        return self.history

    def _log_to_tensorboard(self, record):
        """What `tf.summary.scalar` writes, without needing the tensorboard package (only to view the logs)."""
        if self.tensorboard is not None:
            from tensorflow.core.framework.summary_pb2 import SummaryMetadata
            scalar = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
            with self.tensorboard.as_default(step=record["epoch"]):
                for name, value in record.items():
                    if name != "epoch":
                        tf.summary.write(name, tf.constant(value, tf.float32), metadata=scalar)
            self.tensorboard.flush()

    def export_model(self):
        """A float32, single-device copy of the trained model: it runs anywhere, under any Keras backend."""
        if self.precision == "float32" and self.replicas == 1:
            return self.model
        model = build_model(self.config, "float32", class_names=self.data.fine_names)  # drops synchronized BN
        model.set_weights(self.model.get_weights())
        return model


# --- Run machinery: backups, time plans, one run per output, durable files, size timing ---------------------

class TrainingBackup:
    """The training state a rerun resumes from (docs/reference.md, "Interrupting and resuming"): weights
    (with the dropout seed state), optimizer state, the schedule's horizon, the best-validation weights and
    the progress of `trainer`, whose attributes it reads when saving and sets when restoring."""

    RESUME_IGNORES = ("data", "output", "checkpoint_dir", "fresh", "tta", "tensorboard")  # may change on resume
    # Options older backups lack, as those runs trained; options since removed, as this code trains. A
    # backup resumes only where both sides agree, so a run that used a removed option is refused.
    ADDED_OPTIONS = {"shift_lr_scale": 1.0, "muon_step": 0.0, "cutmix": 0.0}
    REMOVED_OPTIONS = {"cutout": 0, "color_jitter": False, "muon_rms": 0.0, "stem": "pool"}

    @classmethod
    def fingerprint(cls, config):
        """The options that shape training, as JSON: a backup resumes only under the same ones."""
        return json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k not in cls.RESUME_IGNORES},
                          sort_keys=True)

    def __init__(self, trainer):
        self.trainer = t = trainer
        with t.strategy.scope():
            t.best_weights = [tf.Variable(w, trainable=False) for w in t.model.get_weights()]
        self.state = {"epoch": tf.Variable(0, dtype=tf.int64), "step": tf.Variable(0, dtype=tf.int64),
                      "epochs": tf.Variable(0, dtype=tf.int64), "steps_per_epoch": tf.Variable(0, dtype=tf.int64),
                      "partial": tf.Variable([0.0, 0.0, 0.0], dtype=tf.float64),
                      "best_accuracy": tf.Variable(-1.0, dtype=tf.float64),
                      "history": tf.Variable(""), "config": tf.Variable(self.fingerprint(t.config))}
        # model.variables (not .weights) also holds the dropout seed state.
        checkpoint = tf.train.Checkpoint(model=list(t.model.variables), optimizer=list(t.optimizer.variables),
                                         best_weights=t.best_weights, horizon=t.schedule.total_steps,
                                         warmup=t.schedule.warmup_steps, anchor_step=t.schedule.anchor_step,
                                         anchor_progress=t.schedule.anchor_progress, **self.state)
        # Every worker must save (saving may need collectives); only the chief's copy is kept.
        folder = t.config.checkpoint_dir if t.is_chief else \
            os.path.join(tempfile.gettempdir(), f"cifar_hybrid-worker-{os.getpid()}")
        self.manager = tf.train.CheckpointManager(checkpoint, folder, max_to_keep=1)

    def save(self, epoch, step, partial=(0.0, 0.0, 0.0)):
        """Everything a resumed run needs; the manager writes new files and then swaps its index atomically."""
        t = self.trainer
        values = {"epoch": epoch, "step": step, "epochs": t.epochs, "steps_per_epoch": t.steps_per_epoch,
                  "partial": partial, "best_accuracy": t.best_accuracy, "history": json.dumps(t.history)}
        for name, value in values.items():
            self.state[name].assign(value)
        path = self.manager.save()
        if not t.is_chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)
            return
        # TensorFlow renames its files into place but does not promise they reached the disk.
        for name in (*tf.io.gfile.glob(path + ".*"), os.path.join(self.manager.directory, "checkpoint")):
            fsync_path(name)
        fsync_path(self.manager.directory)

    def restore(self):
        """Restore the last backup (unless --fresh) into the trainer; True if the run continues an earlier one."""
        t, folder = self.trainer, self.trainer.config.checkpoint_dir
        path = tf.train.latest_checkpoint(folder)  # every worker reads the chief's backup
        if path is None:
            return False
        if t.config.fresh:
            t.log(f"--fresh: ignoring the backup in {folder}")
            return False
        try:
            saved = json.loads(tf.train.load_variable(path, "config/.ATTRIBUTES/VARIABLE_VALUE"))
            saved = {**self.ADDED_OPTIONS, **self.REMOVED_OPTIONS, **saved}
            ours = {**self.REMOVED_OPTIONS, **json.loads(self.fingerprint(t.config))}
            changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {v}" for k, v in ours.items() if saved.get(k) != v]
            if changed:
                raise InputError(f"the backup in {folder} is from a run with other options ({'; '.join(changed)}); "
                                 "rerun with the same options to resume, or add --fresh to start over")
            self.manager.checkpoint.restore(path).assert_existing_objects_matched()
        except InputError:
            raise
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"the backup in {folder} is damaged ({reason}); add --fresh to start over") from None
        state = {name: v.numpy() for name, v in self.state.items()}
        t.epochs, t.steps_per_epoch = int(state["epochs"]), int(state["steps_per_epoch"])
        t.total_steps = int(t.schedule.total_steps.numpy())
        t.start_epoch, t.start_step = int(state["epoch"]), int(state["step"])
        t.partial, t.best_accuracy = tuple(state["partial"]), float(state["best_accuracy"])
        t.history = json.loads(state["history"])
        t.log(f"resuming from the backup in {folder}: epoch {t.start_epoch + 1} of {t.epochs}, "
              f"{t.start_step} of {t.steps_per_epoch} steps done, learning rate {t.learning_rate():.9g}")
        return True

    def remove(self):
        """Delete the files the backup manager wrote (only those: the folder may be the user's)."""
        folder = self.manager.directory
        if not self.trainer.is_chief:
            shutil.rmtree(folder, ignore_errors=True)
            return
        for prefix in self.manager.checkpoints:
            for name in tf.io.gfile.glob(prefix + ".*"):
                os.remove(name)
        if os.path.exists(os.path.join(folder, "checkpoint")):
            os.remove(os.path.join(folder, "checkpoint"))
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


class TimePlan:
    """--time-budget: the trainer's epochs, steps per epoch and schedule horizon from the pace measured
    on this machine, re-planned after every epoch so the run ends within its budget."""

    def __init__(self, trainer, deadline, reserve_seconds=0.0):
        self.trainer, self.deadline, self.reserve_seconds = trainer, deadline, reserve_seconds
        self.epoch_paces, self.epoch_steps = [], []  # seconds per step and steps of each epoch so far

    @classmethod
    def measure(cls, trainer, seconds, test_images):
        """Fix epochs and steps so training, validation and the test pass fit in `seconds`, timing real
        training steps (then restoring the initial weights) and a validation pass."""
        t, planning_started, initial = trainer, time.time(), trainer.model.get_weights()

        batches = iter(t.strategy.experimental_distribute_dataset(t.train_pipeline.train_dataset(epoch=0)))
        times = [seconds_of(lambda: float(t._train_step(*next(batches))[0])) for _ in range(min(13, t.steps_per_epoch))]
        compile_seconds = times[0]
        step_seconds = float(np.median(times[1:])) if len(times) > 1 else compile_seconds
        # An evaluation pass over the validation images (without them, as many training images) times
        # the validation after every epoch and the final passes over validation and test images.
        validating = t.val_pipeline is not None
        probe = t.val_pipeline if validating else \
            AugmentationPipeline(t.x_train[:5000], t.y_train[:5000], t.config.batch_size)
        t.predict(probe)  # the first pass also traces the function: time the second
        probe_seconds = seconds_of(lambda: t.predict(probe))
        val_seconds = probe_seconds if validating else 0.0
        passes = 2 * len(TTA_VIEWS) if t.config.tta else 1
        test_seconds = passes * probe_seconds * (len(t.y_val) + test_images) / max(1, len(probe)) + 5.0
        # 5% margin; the compile is paid again because the real plan gets a fresh step function.
        left = 0.95 * seconds - (time.time() - planning_started) - compile_seconds - test_seconds
        full = t.train_pipeline.steps_per_epoch()
        steps = int(left / step_seconds)
        epochs = max(1, -(-steps // full))
        steps = int((left - epochs * val_seconds) / step_seconds)  # validation after every epoch costs too
        if steps < epochs:
            raise InputError(f"--time-budget leaves {seconds / 60:.2g} min, no time to train (one step takes "
                             f"{step_seconds:.2f}s, evaluation {test_seconds:.0f}s); raise the budget")
        t.epochs, t.steps_per_epoch = epochs, min(full, steps // epochs)
        long_schedule = getattr(t.config, "long_schedule_by_plan", ())
        if long_schedule and epochs >= LONG_SCHEDULE_FROM_EPOCHS:
            for name in long_schedule:
                setattr(t.config, name, LONG_SCHEDULE[name])  # before the backup records them
            t.train_pipeline.cutmix, t.loss_fn = t.config.cutmix, t.make_loss()
            given = " and ".join(f"--{name.replace('_', '-')} {LONG_SCHEDULE[name]}" for name in long_schedule)
            t.log(f"--time-budget: {given}, as the large size has {LONG_SCHEDULE_FROM_EPOCHS} epochs or more")
        t.model.set_weights(initial)
        t._prepare_training()
        planned = (time.time() - planning_started + compile_seconds + test_seconds
                   + t.epochs * (t.steps_per_epoch * step_seconds + val_seconds))
        t.log(f"time plan: {t.epochs} epoch(s) of {t.steps_per_epoch} steps, about {planned / 60:.1f} "
              f"minutes ({step_seconds:.3f}s per step, {val_seconds:.0f}s per validation)")
        return cls(trainer, planning_started + 0.97 * seconds, test_seconds)

    def replan(self, remaining_epochs, train_seconds, val_seconds):
        """Fit the remaining epochs to the pace of every step so far (a shared machine's speed jumps between
        epochs; following each jump would resize them back and forth); the last epoch takes the slowest
        recent pace, so the run ends in time. Where the time left holds one more full epoch, the run takes
        it: epochs run full at most, so a pace faster than planned would otherwise end the run early. The
        schedule's horizon follows."""
        t = self.trainer
        self.epoch_paces.append(train_seconds / t.steps_per_epoch)
        self.epoch_steps.append(t.steps_per_epoch)
        step_seconds = float(np.dot(self.epoch_paces, self.epoch_steps) / np.sum(self.epoch_steps))
        if remaining_epochs == 1:
            step_seconds = max(step_seconds, *self.epoch_paces[-3:])
        left = self.deadline - time.time() - self.reserve_seconds
        full = t.train_pipeline.steps_per_epoch()
        added = remaining_epochs > 1 and left >= (remaining_epochs + 1) * (full * step_seconds + val_seconds)
        if added:
            remaining_epochs, t.epochs = remaining_epochs + 1, t.epochs + 1
        steps = int((left / remaining_epochs - val_seconds) / step_seconds)
        steps = max(1, min(full, steps))
        if steps != t.steps_per_epoch or added:
            t.steps_per_epoch = steps
            t.total_steps = t.global_step() + remaining_epochs * steps
            t.schedule.retarget(t.global_step(), t.total_steps)
            t.log(f"re-planned to the measured pace ({step_seconds:.3f}s per step): "
                  f"{remaining_epochs} more epoch(s) of {steps} steps")


def fsync_path(path):
    """Flush a file's data, or a folder's entries, to the disk (what a rename alone does not promise)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, content):
    """`content` (text, bytes, or a function that writes to a file name) into a temporary file beside `path`,
    fsynced, renamed over `path`, and the folder fsynced: even a power cut leaves the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's private 0600 would otherwise reach the final file
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_tree(folder):
    """fsync every file and folder under `folder`, the folders after what they hold."""
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def save_model_atomically(model, path):
    write_atomically(path, model.save)


class RunLock:
    """One run per output: an exclusive `flock` on the file `lock` (holding the PID) in the backup folder,
    taken before the backup is read. The kernel drops it however the process ends: no stale locks."""

    def __init__(self, folder):
        self.folder, self.path, self.fd = folder, os.path.join(folder, "lock"), None

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        if fcntl is None:  # Windows: no advisory locks
            return self
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.read(fd, 20).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise InputError(f"another run (PID {pid}) is training with the backup in {self.folder}; let "
                                 "it finish, or give this run another --output") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if os.fstat(fd).st_ino == current:
                self.fd = fd
            else:  # a run that just finished removed the file we opened: lock the one there now
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc_info):
        if self.fd is not None:
            os.remove(self.path)
            os.close(self.fd)
        if not os.listdir(self.folder):  # a finished run leaves no backup folder
            os.rmdir(self.folder)


def check_free_space(config, parameters):
    """The model file plus a backup (weights, best weights, two AdamW slots) must fit, with headroom."""
    need = {os.path.dirname(os.path.abspath(config.output)): 4 * parameters + (8 << 20)}
    backup_folder = config.checkpoint_dir if os.path.isdir(config.checkpoint_dir) else \
        os.path.dirname(os.path.abspath(config.checkpoint_dir))
    need[backup_folder] = need.get(backup_folder, 0) + 2 * 16 * parameters + (8 << 20)  # old and new backup
    for folder, size in need.items():
        free = shutil.disk_usage(folder).free
        if free < size:
            raise InputError(f"{folder}: {free / 1e6:.1f} MB free, but the model and its backup need about "
                             f"{size / 1e6:.0f} MB; free some space or choose another --output")


def choose_model_size(config, seconds, train_images):
    """--time-budget with --model-size auto: the largest size that trains `MIN_EPOCHS_PER_SIZE` epochs, from a
    few timed steps of each size, smallest first (at most about 5 % of the budget; a near miss is timed twice, and
    the faster timing counts); a resumed run keeps its size, CutMix and label smoothing. Whether the large
    size gets the long schedule's regularization (`LONG_SCHEDULE`) the time plan decides (`TimePlan.measure`):
    it times real steps, where this timing of a few steps can catch a slow minute of a shared machine."""

    path = None if config.fresh else tf.train.latest_checkpoint(config.checkpoint_dir)
    explicit = getattr(config, "explicit", set())
    try:
        saved = json.loads(tf.train.load_variable(path, "config/.ATTRIBUTES/VARIABLE_VALUE")) if path else {}
    except Exception:  # a damaged backup: resuming reports it
        saved = {}
    if saved.get("model_size") in MODEL_SIZES:
        for name in set(LONG_SCHEDULE) - explicit:  # older backups lack cutmix: they trained without
            setattr(config, name, saved.get(name, Config.__dataclass_fields__[name].default))
        config.long_schedule_by_plan = []
        return apply_model_size(config, saved["model_size"])
    sizes = getattr(config, "sizes", list(MODEL_SIZES))  # parse_config leaves out sizes the options rule out
    chosen, steps, started = sizes[0], train_images // config.batch_size, time.time()
    for size in sizes:
        if time.time() - started > 0.05 * seconds:  # timing (mostly compiling) may take 5 % of the budget
            break
        candidate = apply_model_size(dataclasses.replace(config), size, explicit)
        step_seconds = time_training_step(candidate)
        # About 10 % of the budget goes to validation, the test pass and compiling.
        epochs, again = 0.9 * seconds / (steps * step_seconds), ""
        if RETIME_FROM * MIN_EPOCHS_PER_SIZE <= epochs < MIN_EPOCHS_PER_SIZE and size != sizes[0]:
            # A shared host's noise only ever slows steps: a slow minute must not cost a machine the size it
            # has room for, so a near miss is timed once more and the faster timing counts.
            again = f" (timed twice; the first timing left room for {epochs:.1f})"
            step_seconds = min(step_seconds, time_training_step(candidate))
            epochs = 0.9 * seconds / (steps * step_seconds)
        print(f"model size {size}: {step_seconds:.3f}s per step, room for about {epochs:.1f} epochs{again}")
        if epochs < MIN_EPOCHS_PER_SIZE and size != sizes[0]:
            break
        chosen = size
    print(f"--time-budget: model size {chosen}, the largest with room for {MIN_EPOCHS_PER_SIZE} epochs "
          "(or the smallest)")
    config.long_schedule_by_plan = [name for name in LONG_SCHEDULE if name not in explicit] if chosen == "large" \
        else []
    return apply_model_size(config, chosen)


def time_training_step(config, repeats=5):
    """Median seconds of one training step of the model `config` describes, on random images."""
    model = build_model(config, resolve_precision(config.precision))
    optimizer = make_optimizer(model, config, 1e-4)
    optimizer.build(model.trainable_variables)  # slots made inside the step would make TensorFlow trace it twice
    images = tf.random.uniform((config.batch_size, *IMAGE_SHAPE), 0, 255)
    initialize_convolutions(model, config, images.numpy(), samples=64)  # a fixed stem trains faster: time that
    classes = model.output_shape[-1]
    labels = tf.one_hot(tf.random.uniform((config.batch_size,), 0, classes, tf.int32), classes)

    @tf.function(autograph=False)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(labels, model(images, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    times = [seconds_of(lambda: float(step())) for _ in range(repeats + 2)]  # a call to trace, one to warm up
    return float(np.median(times[2:]))


# --- Evaluation and the run's reports -----------------------------------------------------------------------

def evaluate(probs, labels, class_names, fine_to_coarse=None, coarse_labels=None):
    """Top-1, top-5, superclass accuracy of the fine predictions, scikit-learn's per-class figures,
    the confusion matrix and its ten largest off-diagonal cells."""
    from sklearn.metrics import classification_report, confusion_matrix
    predictions, classes = probs.argmax(-1), np.arange(len(class_names))
    top5 = np.argsort(probs, axis=-1)[:, -5:]
    report = {"labels": classes, "target_names": list(class_names), "zero_division": 0}
    confusion = confusion_matrix(labels, predictions, labels=classes)
    mistakes = confusion - np.diag(np.diag(confusion))
    worst = np.argsort(-mistakes, axis=None, kind="stable")[:10]  # ties: in class order
    results = {"top1": float(np.mean(predictions == labels)),
               "top5": float(np.mean((top5 == labels[:, None]).any(-1))),
               "report": classification_report(labels, predictions, digits=3, **report),
               "per_class": classification_report(labels, predictions, output_dict=True, **report),
               "confusion": confusion,
               "most_confused": [{"true": class_names[i], "predicted": class_names[j], "count": int(mistakes[i, j])}
                                 for i, j in zip(*np.unravel_index(worst, mistakes.shape)) if mistakes[i, j]]}
    if fine_to_coarse is not None:
        results["superclass_top1"] = float(np.mean(fine_to_coarse[predictions] == coarse_labels))
    return results


def format_report(results, title):
    """The human-readable report: what the command line prints and `*.report.txt` holds."""
    lines = [title, results["report"], "Most confused classes (true -> predicted: test images):"]
    lines += [f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in results["most_confused"]] or ["  none"]
    summary = f"top-1 {100 * results['top1']:.2f}%  top-5 {100 * results['top5']:.2f}%"
    if "superclass_top1" in results:
        summary += f"  superclass top-1 {100 * results['superclass_top1']:.2f}% (from the fine predictions)"
    return "\n".join(lines + ["", "test " + summary])


def evaluate_on_test_set(trainer, model, data, started):
    """The final report of a training run, on the exported model (the one that is saved)."""
    config = trainer.config

    def plain_and_tta(images):
        return predict_probabilities(model, images, tta=config.tta, with_plain=True)

    augmented = None
    if config.tta and trainer.val_pipeline is not None:  # TTA's evidence: validation data, never the test set
        plain, augmented = (float(np.mean(p.argmax(-1) == trainer.y_val)) for p in plain_and_tta(trainer.x_val))
        print(f"validation top-1 {100 * plain:.2f}% plain, {100 * augmented:.2f}% with TTA")
    plain, probs = plain_and_tta(data.x_test)
    results = evaluate(probs, data.y_test, data.fine_names, data.fine_to_coarse(), data.coarse_test)
    results["validation_top1_with_tta"] = augmented
    results["top1_plain"] = float(np.mean(plain.argmax(-1) == data.y_test))
    results["text"] = format_report(results, f"Test set classification report (fine labels"
                                             f"{', TTA' if config.tta else ''}):")
    if config.tta:
        results["text"] += f"\n(the saved model alone, without TTA: top-1 {100 * results['top1_plain']:.2f}%)"
    print("\n" + results["text"])
    print(f"wall time {(time.time() - started) / 60:.1f} min")
    return results


def describe_environment():
    """Library versions and hardware, for the metrics file."""
    import sklearn
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    return {"versions": {"cifar_hybrid_classifier": __version__, "python": platform.python_version(),
                         "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                         "scikit-learn": sklearn.__version__},
            "hardware": {"cpu": cpu, "logical_cpus": os.cpu_count(), "gpus": gpus, "platform": platform.platform()}}


HISTORY_FIELDS = ["epoch", "seconds", "elapsed", "learning_rate", "train_loss", "train_accuracy", "val_loss",
                  "val_accuracy"]


def write_run_reports(trainer, results, stem, started):
    """`<stem>.history.csv`, `.metrics.json`, `.report.txt`; with matplotlib, curve and confusion images."""
    config, names, per_class = trainer.config, trainer.data.fine_names, results["per_class"]
    test = {key: results[key] for key in ("top1", "top5", "superclass_top1") if key in results}
    test.update(top1_without_tta=results["top1_plain"], tta=config.tta, images=int(results["confusion"].sum()))
    metrics = {"test": test, "best_validation_top1": None if trainer.val_pipeline is None else trainer.best_accuracy,
               "validation_top1_with_tta": results["validation_top1_with_tta"],
               "per_class": {name: per_class[name] for name in names},
               "averages": {name: per_class[name] for name in ("macro avg", "weighted avg")},
               "most_confused": results["most_confused"], "epochs_trained": len(trainer.history),
               "wall_time_seconds": round(time.time() - started, 1), "seed": config.seed,
               "precision": trainer.precision, "replicas": trainer.replicas, "config": dataclasses.asdict(config),
               **describe_environment()}
    history = io.StringIO()
    writer = csv.DictWriter(history, HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: f"{v:.9g}" if isinstance(v, float) else v for k, v in h.items()} for h in trainer.history)
    write_atomically(stem + ".history.csv", history.getvalue())
    write_atomically(stem + ".metrics.json", json.dumps(metrics, indent=1) + "\n")
    write_atomically(stem + ".report.txt", results["text"] + "\n")
    save_plots(trainer.history, results["confusion"], names, stem)


def save_plots(history, confusion, class_names, stem):
    """Training curves and the row-normalized confusion matrix as PNG files, where matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("for training-curve and confusion-matrix images as well: pip install matplotlib")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, keys in zip(axes, (("train_loss", "val_loss"), ("train_accuracy", "val_accuracy"), ("learning_rate",))):
        for key in keys:
            ax.plot([h["epoch"] for h in history], [h.get(key, np.nan) for h in history], marker="o", label=key)
        ax.set(xlabel="epoch")
        ax.legend()
    confusion_fig, ax = plt.subplots(figsize=(14, 14))
    ax.imshow(confusion / np.maximum(confusion.sum(1, keepdims=True), 1), cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=6)
    ax.set(xlabel="predicted class", ylabel="true class", title="Test set confusion matrix (each row sums to 1)")
    for figure, suffix in ((fig, ".curves.png"), (confusion_fig, ".confusion.png")):
        figure.tight_layout()
        write_atomically(stem + suffix, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
        plt.close(figure)


# --- Using a saved model: load it, read image files, predict ------------------------------------------------

def load_model(path):
    """Load a saved model, with its `class_names` (None for models saved without them).

    A missing, truncated or foreign file is a one-line `InputError`."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a .keras model file (truncated or damaged?)")
    try:
        model = _with_class_names(keras.models.load_model(path))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot load the model ({reason})") from None
    if tuple(model.input_shape[1:]) != IMAGE_SHAPE or len(model.output_shape) != 2:
        raise InputError(f"{path}: not an image classifier for {IMAGE_SHAPE} inputs")
    return model


# Images are measured from their headers before decoding: a file of a megabyte can declare gigapixels
# (a decompression bomb). The limit is on decoded pixels, at most 4 bytes each: 100 MP cost <= 400 MB.
MAX_IMAGE_MEGAPIXELS = 100
# Large JPEGs decode at 1/2, 1/4 or 1/8 scale (in the DCT), keeping this many pixels on the shorter side
# so that the 32x32 box filter still averages 8x8 of them.
JPEG_MIN_DECODED_SIDE = 256


def _png_size(raw):
    width, height = struct.unpack(">II", raw[16:24])
    return (width, height, width * height) if raw[12:16] == b"IHDR" else None


def _bmp_size(raw):
    core = struct.unpack("<I", raw[14:18])[0] == 12  # the oldest header has 16-bit sizes
    width, height = struct.unpack("<HH", raw[18:22]) if core else struct.unpack("<ii", raw[18:26])
    return abs(width), abs(height), abs(width * height)  # a negative height is a top-down BMP


_JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-15, less DHT, JPG and DAC


def _jpeg_size(raw):
    """From the frame header (SOFn), walking the segments before it; decoded at `jpeg_ratio`'s scale."""
    i = 2
    while raw[i] == 0xFF:
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", raw[i + 5:i + 9])
            ratio = jpeg_ratio(width, height)
            return width, height, -(-width // ratio) * -(-height // ratio)
        else:
            i += 2 + struct.unpack(">H", raw[i + 2:i + 4])[0]
    return None


def _gif_size(raw):
    """The canvas (the largest frame, or the screen) plus every frame: the decoder holds all their pixels."""
    width, height, flags = struct.unpack("<HHB", raw[6:11])
    i, frames = 13 + (3 << (flags & 7) + 1 if flags & 0x80 else 0), 0  # after the global colour table
    while i < len(raw) and raw[i] in (0x2C, 0x21):
        if raw[i] == 0x2C:  # an image: position, size, flags, local colour table, LZW code size, data
            w, h, flags = struct.unpack("<HHB", raw[i + 5:i + 10])
            width, height, frames = max(width, w), max(height, h), frames + w * h
            i += 11 + (3 << (flags & 7) + 1 if flags & 0x80 else 0)
        else:  # an extension: its label, then its data
            i += 2
        while raw[i]:  # data sub-blocks up to the empty one
            i += raw[i] + 1
        i += 1
    return width, height, width * height + frames


def _webp_size(raw):
    """From the canvas (VP8X) or the one image (VP8 lossy, VP8L lossless); RGBA times the animation's frames."""
    i, size, frames = 12, None, 0
    while i + 8 <= len(raw) and raw[8:12] == b"WEBP":
        kind, length = raw[i:i + 4], struct.unpack("<I", raw[i + 4:i + 8])[0]
        data = raw[i + 8:i + 8 + length]
        if kind == b"VP8X":
            size = size or (1 + int.from_bytes(data[4:7], "little"), 1 + int.from_bytes(data[7:10], "little"))
        elif kind == b"VP8 ":
            size = size or (struct.unpack("<H", data[6:8])[0] & 0x3FFF, struct.unpack("<H", data[8:10])[0] & 0x3FFF)
        elif kind == b"VP8L":
            bits = struct.unpack("<I", data[1:5])[0]
            size = size or (1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF))
        frames += kind == b"ANMF"
        i += 8 + length + (length & 1)
    return None if size is None else (*size, size[0] * size[1] * max(frames, 1))


# (how the file begins, format, its size function): each returns (width, height, pixels it decodes to)
IMAGE_FORMATS = ((b"\x89PNG\r\n\x1a\n", "PNG", _png_size), (b"\xff\xd8", "JPEG", _jpeg_size),
                 (b"GIF8", "GIF", _gif_size), (b"BM", "BMP", _bmp_size), (b"RIFF", "WebP", _webp_size))


def image_size(raw):
    """(format, width, height, pixels to decode) from an image file's header, without decoding it; None
    for a file that is not PNG, JPEG, GIF, BMP or WebP, or whose header is cut short."""
    for magic, kind, size in IMAGE_FORMATS:
        if raw.startswith(magic):
            try:
                found = size(raw)
            except (struct.error, IndexError):
                return None
            return None if found is None else (kind, *found)
    return None


def jpeg_ratio(width, height):
    """The scale (1, 2, 4 or 8) to decode a JPEG at: the largest that keeps JPEG_MIN_DECODED_SIDE pixels."""
    return next(r for r in (8, 4, 2, 1) if min(width, height) >= r * JPEG_MIN_DECODED_SIDE or r == 1)


def area_weights(size, out):
    """The (out, size) matrix of the "area" resize: output pixel j averages input span [j, j+1) * size/out."""
    scale = size / out
    edges = np.arange(out + 1) * scale
    left = np.arange(size)
    overlap = np.minimum(edges[1:, None], left + 1) - np.maximum(edges[:-1, None], left)
    return (np.clip(overlap, 0, None) / scale).astype(np.float32)


def as_rgb(pixels):
    """Decoded pixels (1-4 channels, uint8) as float32 RGB: transparent pixels over white, as a web page shows them."""
    image = pixels.astype(np.float32)
    if image.shape[-1] in (2, 4):
        alpha = image[..., -1:] / 255.0
        image = image[..., :-1] * alpha + 255.0 * (1.0 - alpha)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def shrink_to_cifar(pixels, strip_bytes=1 << 24):
    """Decoded uint8 pixels as 32x32 RGB: the central square, each output pixel the average of its area (as
    CIFAR's images were made), summed in strips of rows so only one strip at a time is ever float32;
    small images are enlarged bilinearly."""
    height, width = pixels.shape[:2]
    side, out = min(height, width), IMAGE_SHAPE[0]
    top, left = (height - side) // 2, (width - side) // 2
    square = pixels[top:top + side, left:left + side]
    if side < out:
        image = tf.image.resize(as_rgb(square), IMAGE_SHAPE[:2], method="bilinear").numpy()
    else:
        weights = area_weights(side, out)
        rows = max(1, strip_bytes // (side * 4 * 4))
        columns = sum(np.tensordot(weights[:, r:r + rows], as_rgb(square[r:r + rows]), axes=1)
                      for r in range(0, side, rows))
        image = np.tensordot(weights, columns, axes=([1], [1])).transpose(1, 0, 2)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def read_image(path, max_megapixels=MAX_IMAGE_MEGAPIXELS):
    """An image file as 32x32 RGB uint8, shrunk the way CIFAR images were; an image whose header says it
    would decode to more than `max_megapixels` is refused before any pixel is decoded."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    header = image_size(raw)
    if header is None:
        raise InputError(f"{path}: not a readable PNG, JPEG, BMP, GIF or WebP image")
    kind, width, height, pixels = header
    if pixels > max_megapixels * 1e6:
        raise InputError(f"{path}: a {width} x {height} {kind} image decodes to {pixels / 1e6:.0f} megapixels, "
                         f"over the limit of {max_megapixels:g}; give --max-megapixels {math.ceil(pixels / 1e6)} "
                         "to read it")
    # One copy into a tensor, and the bytes freed before decoding (tf.constant of bytes makes four copies).
    encoded = tf.convert_to_tensor(np.array(raw, dtype=object))
    del raw
    try:
        if kind == "JPEG":
            decoded = tf.io.decode_jpeg(encoded, ratio=jpeg_ratio(width, height))
        else:  # the first frame of a GIF or WebP; palettes expanded, 16-bit scaled to 8-bit
            decoded = tf.io.decode_image(encoded, expand_animations=False)
    except tf.errors.OpError:
        raise InputError(f"{path}: not a readable {kind} image") from None
    del encoded
    return shrink_to_cifar(np.asarray(decoded))  # a view of the tensor's pixels, not a copy


# Test-time augmentation: (rows down, columns right, weight) of each view, of the image and its mirror
# image; chosen on validation data (RESULTS.md, "Ablations").
TTA_VIEWS = ((0, 0, 1.0), (1, 1, 0.5), (-1, -1, 0.5))


def shifted(images, down, right):
    """(N, H, W, C) images moved by whole pixels, the edges filled by reflection (as the training crops are)."""
    pad = max(abs(down), abs(right))
    if not pad:
        return images
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    return padded[:, pad - down:pad - down + height, pad - right:pad - right + width]


def predict_probabilities(model, images, batch_size=256, tta=False, with_plain=False):
    """Class probabilities for (N, 32, 32, 3) images; with `tta`, the weighted mean over `TTA_VIEWS` of
    each image and its mirror image. `with_plain` also returns the plain predictions, computed once."""
    def predict(views):
        batches = without_autotuning(tf.data.Dataset.from_tensor_slices(views).batch(batch_size))
        return keras.ops.convert_to_numpy(model.predict(batches.prefetch(tf.data.AUTOTUNE), verbose=0))

    plain = predict(images)
    probs = plain
    if tta:
        total = 0.0
        for down, right, weight in TTA_VIEWS:
            for view in (images, images[:, :, ::-1]):
                total = total + weight * (plain if view is images and not down and not right
                                          else predict(shifted(view, down, right)))
        probs = total / (2 * sum(weight for *_, weight in TTA_VIEWS))
    return (plain, probs) if with_plain else probs


def explain_images(model, images):
    """(probs, the ViT's attention rollout, the CNN's Grad-CAM) for (N, 32, 32, 3) images, from the saved
    model's own layers joined as `build_model` joins them; a map is None when the model lacks its branch."""
    parts = {type(layer): layer for layer in model.layers}
    standardize, stem, cnn, vit, head = (parts.get(kind) for kind in
                                         (ImageStandardization, ConvStem, CNNBranch, ViTBranch, FusionHead))
    if standardize is None or head is None or (cnn is None and vit is None):
        raise InputError(f"{model.name}: not a model this script built; explain needs its branches")
    x = standardize(ops.convert_to_tensor(images, "float32"))
    x = x if stem is None else stem(x)
    features, scores = [], None
    with tf.GradientTape() as tape:
        if cnn is not None:
            feature_map = cnn.feature_map(x)
            tape.watch(feature_map)
            features.append(cnn.stack.layers[-1](feature_map))  # the branch's own global pooling
        if vit is not None:
            tokens, scores = vit.tokens(x, return_attention_scores=True)
            features.append(tokens[:, 0])
        logits = tf.cast(head.logits(features), tf.float32)
        top_logits = tf.reduce_sum(tf.reduce_max(logits, axis=-1))  # images are independent in inference
    gradcam = None
    if cnn is not None:  # Selvaraju et al. 2017: channels weighted by their mean gradient, then ReLU
        weights = tf.reduce_mean(tape.gradient(top_logits, feature_map), axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(tf.cast(weights * feature_map, tf.float32), axis=-1)).numpy()
        peak = cam.max(axis=(1, 2), keepdims=True)
        gradcam = np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0.0)
    rollout = None if scores is None else attention_rollout([s.numpy() for s in scores])
    return keras.ops.convert_to_numpy(head.softmax(logits)), rollout, gradcam


def attention_rollout(scores):
    """How much each patch feeds the CLS token through all the blocks (Abnar and Zuidema 2020), as
    (N, side, side) maps that sum to 1, from each block's (N, heads, tokens, tokens) attention weights:
    heads averaged, the identity added for the residual path, rows renormalised, blocks multiplied."""

    rollout = None
    for block in scores:
        a = np.asarray(block, np.float64).mean(axis=1)
        a = a + np.eye(a.shape[-1])
        a /= a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
    to_patches = rollout[:, 0, 1:]
    to_patches /= to_patches.sum(axis=-1, keepdims=True)
    side = math.isqrt(to_patches.shape[-1])
    return to_patches.reshape(-1, side, side)


EXPLAIN_SCALE = 8  # each 32x32 panel is drawn at 256x256 pixels


def explanation_panels(image, rollout=None, gradcam=None):
    """The picture's panels as uint8 RGB arrays: the input, then each map over it (blue low, red high)."""
    big = np.repeat(np.repeat(image, EXPLAIN_SCALE, 0), EXPLAIN_SCALE, 1).astype(np.float32)
    panels = [big.astype(np.uint8)]
    for heat in (rollout, gradcam):
        if heat is not None:
            heat = tf.image.resize(np.asarray(heat, np.float32)[..., None], big.shape[:2]).numpy()
            heat /= max(float(heat.max()), 1e-12)  # the rollout sums to 1: stretched to full colour
            colour = np.clip(1.5 - np.abs(4 * heat - np.array([3.0, 2.0, 1.0])), 0, 1) * 255
            panels.append((0.5 * big + 0.5 * colour).astype(np.uint8))
    return panels


def write_explanation(path, panels, titles, top3):
    """With matplotlib: titled panels and the top-3 classes beside them; without: the panels alone."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
        row = np.concatenate([part for panel in panels for part in (gap, panel)][1:], axis=1)
        write_atomically(path, tf.io.encode_png(row).numpy())
        return
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3 * (len(panels) + 1), 3.4), dpi=100)
    for ax, panel, title in zip(axes, panels, titles):
        ax.imshow(panel)
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.9, wspace=0.06)
    axes[-1].text(0.05, 0.5, "top 3 classes\n\n" + "\n".join(f"{100 * p['probability']:5.1f}%  {p['class']}"
                                                            for p in top3), va="center", fontsize=11)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def serving_archive(model):
    """Keras's SavedModel export with two signatures: `serve` for float images, `serve_uint8` for raw bytes."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, dtype in (("serve", tf.float32), ("serve_uint8", tf.uint8)):
        archive.add_endpoint(name, lambda images: model(tf.cast(images, tf.float32), training=False),
                             input_signature=[tf.TensorSpec((None, *IMAGE_SHAPE), dtype, name="images")])
    return archive


def tflite_probabilities(blob, images):
    """Run a .tflite model's `serve_uint8` signature (TensorFlow's interpreter, else LiteRT's)."""
    import warnings
    with warnings.catch_warnings():  # TensorFlow points to the LiteRT package; both run the same file
        warnings.simplefilter("ignore")
        try:
            interpreter = tf.lite.Interpreter(model_content=blob)
        except AttributeError:
            from ai_edge_litert.interpreter import Interpreter
            interpreter = Interpreter(model_content=blob)
    outputs = interpreter.get_signature_runner("serve_uint8")(images=images)
    return next(iter(outputs.values()))


def replace_folder(source, target):
    """Move the finished folder `source` to `target`; a previous `target` is deleted only afterwards."""
    parent, previous = os.path.dirname(os.path.abspath(target)), None
    fsync_tree(source)
    if os.path.exists(target):
        previous = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.replace(target, os.path.join(previous, "old"))
    os.replace(source, target)
    fsync_path(parent)
    if previous:
        shutil.rmtree(previous)


# --- Command line -------------------------------------------------------------------------------------------

def check_writable(path, option, is_folder=False):
    """Fail fast, before loading data or training, if `path` (a file, or with `is_folder` a folder that may
    not exist yet) cannot be written."""
    if os.path.exists(path) and os.path.isdir(path) != is_folder:
        raise InputError(f"{option} {path}: is a {'file, not a folder' if is_folder else 'folder'}; choose "
                         f"another {option}")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{option} {path}: folder {folder} does not exist; create it first")
    try:  # a real write: permission bits alone miss read-only mounts
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"{option} {path}: folder {folder} is not writable ({exc.strerror}); "
                         f"choose another {option}") from None


def check_output_path(path):
    if not path.endswith(".keras"):
        raise InputError(f"--output {path}: the file name must end in .keras")
    check_writable(path, "--output")


def set_seeds(seed):
    keras.utils.set_random_seed(seed)  # seeds Python's random, NumPy, TensorFlow and Keras' own generators


def run(config):
    if keras.backend.backend() != "tensorflow":  # the loop uses tf.distribute; a saved model runs anywhere
        raise InputError(f"training needs the TensorFlow backend, not KERAS_BACKEND={keras.backend.backend()}")
    check_output_path(config.output)
    check_writable(config.checkpoint_dir, "--checkpoint-dir", is_folder=True)
    if config.tensorboard:
        check_writable(config.tensorboard, "--tensorboard", is_folder=True)
    strategy = make_strategy(config.distribute)
    fit_run_length_to_strategy(config, strategy)
    if config.data is not None and not os.path.exists(config.data):
        raise InputError(f"--data {config.data}: no such file or folder")
    # Only the process that keeps the backup locks it (the other workers keep theirs in a temporary folder).
    with RunLock(config.checkpoint_dir) if is_chief(strategy) else contextlib.nullcontext():
        return train_and_report(config, strategy)


def fit_run_length_to_strategy(config, strategy):
    """A time budget times this process's steps, so the workers of a multi-worker run would each plan a
    different run: the default budget gives way to the fixed epochs there, a budget asked for is an error."""
    if not config.time_budget or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    if "time_budget" in getattr(config, "explicit", ()):
        raise InputError("--time-budget cannot be used with multi-worker training (each worker would time "
                         "its own steps and plan differently); use --epochs")
    config.time_budget = 0.0
    if config.model_size == "auto":
        apply_model_size(config, "base")
    print(f"multi-worker training: {config.epochs} epochs of the {config.model_size} size instead of the default "
          "time budget (each worker would plan its own); --epochs sets them")


def train_and_report(config, strategy):
    """Load the data, pick the size, build, resume or plan, fit, evaluate, save: the run after its checks."""
    set_seeds(config.seed)
    started = time.time()
    data = load_cifar(config.data, config.dataset)
    print(f"{data.name}: {len(data.y_train)} training and {len(data.y_test)} test images "
          f"(loaded in {time.time() - started:.1f}s)")
    if config.model_size == "auto" and not config.time_budget:  # a Config built in code, not parsed
        apply_model_size(config, "base")
    if config.model_size == "auto":
        budget = config.time_budget * 60 - (time.time() - started)
        choose_model_size(config, budget, int(len(data.y_train) * (1 - config.validation_split)))
        set_seeds(config.seed)  # the timing models drew from the generators
    trainer = Trainer(config, data, strategy=strategy, started=started)
    check_free_space(config, trainer.model.count_params())
    print(f"model {trainer.model.name}:")
    for layer in trainer.model.layers[1:]:
        print(f"  {layer.name:<14} {type(layer).__name__:<22} {layer.count_params():>10,} parameters")
    print(f"  {'total':<37} {trainer.model.count_params():>10,} parameters")
    print(f"precision {trainer.precision}; {len(trainer.y_train)} train / {len(trainer.y_val)} validation images; "
          f"batch {config.batch_size}")
    if trainer.replicas > 1:
        print(f"{type(strategy).__name__} over {trainer.replicas} replicas: global batch {trainer.global_batch} "
              f"({config.batch_size} per replica), peak learning rate {config.learning_rate * trainer.replicas:g} "
              f"({config.learning_rate:g} x {trainer.replicas}, linear scaling)")
    if not trainer.resume():  # a resumed run keeps the plan its backup holds
        if config.time_budget:
            trainer.plan_time_budget(config.time_budget * 60 - (time.time() - started), len(data.y_test))
        else:
            print(f"plan: {trainer.epochs} epoch(s) of {trainer.steps_per_epoch} steps")
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {s: signal.signal(s, trainer.request_stop) for s in (signal.SIGINT, signal.SIGTERM)} \
        if in_main_thread else {}
    try:
        try:
            trainer.fit()
        except tf.errors.OpError as exc:  # a collective failed: TensorFlow's own detection of a lost peer
            if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
                raise
            raise PeerLost(f"lost a peer worker (a collective operation failed: {type(exc).__name__}); rerun every "
                           f"worker with the same command to resume from the chief's last backup in "
                           f"{config.checkpoint_dir}") from None
        model = trainer.export_model()
        results = evaluate_on_test_set(trainer, model, data, started)
        trainer.check_stop()  # the backup already holds the finished training
        if trainer.is_chief:  # other workers hold the same weights and write nothing
            stem = os.path.splitext(config.output)[0]
            save_model_atomically(model, config.output)
            write_run_reports(trainer, results, stem, started)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    trainer.backup.remove()
    if trainer.is_chief:
        print(f"saved the model to {os.path.abspath(config.output)}")
    return results, trainer


COMMANDS = {
    "predict": "Print the most likely classes of image files, using a saved model.",
    "explain": "Picture what a saved model looks at in image files: the ViT branch's attention rollout and "
               "the CNN branch's Grad-CAM for the top class, with the top-3 classes.",
    "evaluate": "Evaluate a saved model on its data set's test set (CIFAR-100 or CIFAR-10, from its number "
                "of classes): top-1, top-5, superclass accuracy, per-class report, most confused classes.",
    "export": "Export a saved model for serving: a TensorFlow SavedModel and/or a TFLite file, each checked "
              "against the Keras model right after writing.",
}


def build_command_parser(command):
    """The command lines of the commands that use a saved model (training's comes from `Config`)."""
    parser = ArgumentParser(prog=f"{PROG} {command}", description=COMMANDS[command],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if command in ("predict", "explain"):
        parser.add_argument("images", nargs="+", metavar="IMAGE",
                            help="PNG, JPEG, BMP or GIF files of any size and colour mode")
    parser.add_argument("--model", default=argparse.SUPPRESS, metavar="PATH", help=f"the saved .keras model (default: "
                        f"{Config.output} if it exists, else the shipped models/{os.path.basename(SHIPPED_MODEL)})")
    if command == "predict":
        parser.add_argument("--top", type=_positive_int, default=5, metavar="K", help="classes to print per image")
    if command in ("predict", "explain"):
        parser.add_argument("--json", action="store_true", help="print JSON instead of text")
        parser.add_argument("--max-megapixels", type=_positive_float, default=MAX_IMAGE_MEGAPIXELS, metavar="N",
                            help="refuse, before decoding, an image that would decode to more pixels than this "
                            "(a large JPEG decodes at 1/2 to 1/8 scale): a small file can declare gigapixels")
    if command == "explain":
        parser.add_argument("--output-dir", default=".", metavar="DIR",
                            help="folder for the pictures, <image name>.explain.png each")
    if command in ("evaluate", "export"):
        parser.add_argument("--data", metavar="PATH", help=Config.__dataclass_fields__["data"].metadata["help"] +
                            ("" if command == "evaluate" else "; export checks the exports on its test set "
                             "(default: 256 random images)"))
    if command == "evaluate":
        parser.add_argument("--batch-size", type=_positive_int, default=256, metavar="N",
                            help="images per prediction batch")
        parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False,
                            help="average the predictions for each image, its mirror image, and both "
                            "shifted one pixel diagonally each way (the training run's TTA)")
    if command == "export":
        parser.add_argument("--format", default="all", choices=("savedmodel", "tflite", "all"),
                            help="what to write: a TensorFlow SavedModel folder, a TFLite file, or both")
        parser.add_argument("--output", metavar="PATH", help="path without extension for PATH.savedmodel (a "
                            "folder) and PATH.tflite (default: the model's path without .keras; for the shipped "
                            "model, its name in the current folder)")
    return parser


def model_to_use(path):
    """--model, else the default command's output here, else the shipped model (said on stderr, not in --json)."""
    shipped = os.path.relpath(SHIPPED_MODEL) if SHIPPED_MODEL.startswith(os.getcwd() + os.sep) else SHIPPED_MODEL
    if path is None and not os.path.exists(Config.output) and os.path.isfile(SHIPPED_MODEL):
        print(f"using the shipped model {shipped} (no {Config.output} here; train your own with: python {PROG})",
              file=sys.stderr)
        return SHIPPED_MODEL
    if not os.path.exists(path or Config.output):
        raise InputError(f"{path or Config.output}: no such model file; train one with: python {PROG}" +
                         (f", or leave out --model to use the shipped {shipped}" * os.path.isfile(SHIPPED_MODEL)))
    return path or Config.output


def read_image_files(paths, max_megapixels=MAX_IMAGE_MEGAPIXELS):
    """One result per path ({"file": ...}, with "error" for a file that cannot be read) and the images read."""
    results, images = [], []
    for path in paths:
        try:
            images.append(read_image(path, max_megapixels))
            results.append({"file": path})
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            results.append({"file": path, "error": str(exc)})
    return results, images


def top_classes(model, probs, k):
    names = list(model.class_names or (f"class {i}" for i in range(model.output_shape[-1])))
    return [{"class": names[i], "index": int(i), "probability": float(probs[i])}
            for i in np.argsort(-probs, kind="stable")[:k]]


def print_results(results, as_json):
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        if "error" not in result:
            print(result["file"] + (f" -> {result['picture']}" if "picture" in result else ""))
            for p in result["predictions"]:
                print(f"  {100 * p['probability']:6.2f}%  {p['class']}")


def predict_images(args):
    """The `predict` command: exit code 0, or 2 if any file could not be read."""
    model = load_model(args.model)
    results, images = read_image_files(args.images, args.max_megapixels)
    read = [r for r in results if "error" not in r]
    for result, probs in zip(read, predict_probabilities(model, np.stack(images)) if images else []):
        result["predictions"] = top_classes(model, probs, args.top)
    print_results(results, args.json)
    return 2 if len(read) < len(results) else 0


def explain_files(args):
    """The `explain` command: one picture per image; exit code 0, or 2 if any file could not be read."""
    model = load_model(args.model)
    check_writable(args.output_dir, "--output-dir", is_folder=True)
    os.makedirs(args.output_dir, exist_ok=True)
    results, images = read_image_files(args.images, args.max_megapixels)
    read = [r for r in results if "error" not in r]
    if images:
        images = np.stack(images)
        probs, rollout, gradcam = explain_images(model, images)
        if np.abs(probs - predict_probabilities(model, images)).max() > 1e-4:
            raise InputError(f"{args.model}: its layers do not join the way explain expects")
        for i, result in enumerate(read):
            result["predictions"] = top_classes(model, probs[i], 3)
            panels = explanation_panels(images[i], None if rollout is None else rollout[i],
                                        None if gradcam is None else gradcam[i])
            titles = ["input (32x32)"] + (["ViT attention rollout"] if rollout is not None else []) + \
                ([f"CNN Grad-CAM: {result['predictions'][0]['class']}"] if gradcam is not None else [])
            name = os.path.splitext(os.path.basename(result["file"]))[0] + ".explain.png"
            result["picture"] = os.path.join(args.output_dir, name)
            write_explanation(result["picture"], panels, titles, result["predictions"])
    print_results(results, args.json)
    return 2 if len(read) < len(results) else 0


EXPORT_TOLERANCE = 1e-4  # float32 round-off stays far below; more means a broken export


def export_files(args):
    """The `export` command: check every export against the Keras model, then move it into place."""
    model = load_model(args.model)
    model_here = os.path.basename(args.model) if args.model == SHIPPED_MODEL else args.model  # models/ is no output
    stem = args.output or os.path.splitext(model_here)[0]
    targets = {"savedmodel": stem + ".savedmodel", "tflite": stem + ".tflite"}
    formats = list(targets) if args.format == "all" else [args.format]
    folder = os.path.dirname(os.path.abspath(stem))
    for name in formats:  # only the files this export writes: a folder named like an unwritten one is no error
        check_writable(targets[name], "--output", is_folder=name == "savedmodel")

    if args.data is not None:
        images = load_test_set(model, args).x_test
    else:
        images = np.random.default_rng(0).integers(0, 256, (256, *IMAGE_SHAPE), dtype=np.uint8)
    expected = predict_probabilities(model, images.astype(np.float32))
    with tempfile.TemporaryDirectory(prefix=".tmp-export-", dir=folder) as work:
        savedmodel = os.path.join(work, "savedmodel")
        archive = serving_archive(model)
        quiet = {"verbose": False} if "verbose" in inspect.signature(archive.write_out).parameters else {}
        archive.write_out(savedmodel, **quiet)  # Keras 3.6+ would print the signatures
        exported = {}
        if "savedmodel" in formats:
            loaded = tf.saved_model.load(savedmodel)  # kept in a name: its functions need it alive
            exported["savedmodel"] = loaded.serve_uint8(tf.constant(images)).numpy()
        if "tflite" in formats:
            blob = tf.lite.TFLiteConverter.from_saved_model(savedmodel, signature_keys=["serve_uint8"]).convert()
            exported["tflite"] = tflite_probabilities(blob, images)
        for name, probs in exported.items():
            difference = float(np.abs(probs - expected).max())
            if not difference <= EXPORT_TOLERANCE:
                raise InputError(f"the {name} export differs from the Keras model by {difference:.2e} (more than "
                                 f"{EXPORT_TOLERANCE:g}): a broken export; nothing was written")
            print(f"{name}: max difference from the Keras model {difference:.2e} on {len(images)} images")
        if "savedmodel" in formats:
            replace_folder(savedmodel, targets["savedmodel"])
        if "tflite" in formats:
            write_atomically(targets["tflite"], blob)
    for name in formats:
        size = sum(os.path.getsize(os.path.join(root, file)) for root, _, files in os.walk(targets[name])
                   for file in files) if name == "savedmodel" else os.path.getsize(targets[name])
        print(f"wrote {targets[name]} ({size / 1e6:.1f} MB)")

    return 0


def load_test_set(model, args):
    """The data set (`--data`) whose classes the model predicts: CIFAR-100 or CIFAR-10, by their number."""
    classes = model.output_shape[-1]
    dataset = next((name for name, spec in DATASETS.items() if spec["classes"] == classes), None)
    if dataset is None:
        raise InputError(f"{args.model}: {classes} classes, neither CIFAR-100's nor CIFAR-10's")
    if args.data is not None and not os.path.exists(args.data):
        raise InputError(f"--data {args.data}: no such file or folder")
    data = load_cifar(args.data, dataset)
    if model.class_names and list(model.class_names) != data.fine_names:
        raise InputError(f"{args.model}: its classes are not the {classes} classes of {args.data or data.name}")
    return data


def evaluate_model(args):
    """The `evaluate` command."""
    model = load_model(args.model)
    data = load_test_set(model, args)
    probs = predict_probabilities(model, data.x_test, args.batch_size, args.tta)
    results = evaluate(probs, data.y_test, data.fine_names, data.fine_to_coarse(), data.coarse_test)
    print(format_report(results, f"{args.model} on the {data.name} test set ({len(data.y_test)} images"
                                 f"{', TTA' if args.tta else ''}):"))
    return 0


def main(argv=None):
    """`[train] [options]`, or a command that uses a saved model (`COMMANDS`); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    restore = silence_native_stderr()
    try:
        tf.config.list_physical_devices()  # TensorFlow probes for GPUs here, and says so on stderr
    finally:
        restore()
    commands = ("train", *COMMANDS)
    if argv and not argv[0].startswith("-") and argv[0] not in commands:  # training takes no positional argument
        close = difflib.get_close_matches(argv[0], commands, n=1)
        print(f"error: unknown command '{argv[0]}'; " + (f"did you mean '{close[0]}'?" if close else
              f"the commands are {', '.join(commands)} (see {PROG} --help)"), file=sys.stderr)
        return 2
    command = argv.pop(0) if argv and argv[0] in commands else "train"
    args = parse_config(argv) if command == "train" else build_command_parser(command).parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs as they happen
    try:
        if command == "train":
            run(args)
            return 0
        args.model = model_to_use(getattr(args, "model", None))  # left out of args unless given
        return {"predict": predict_images, "explain": explain_files, "evaluate": evaluate_model,
                "export": export_files}[command](args)
    except (InputError, TrainingDiverged, PeerLost) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, TrainingDiverged) else 4 if isinstance(exc, PeerLost) else 2
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before training started: nothing to back up
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
