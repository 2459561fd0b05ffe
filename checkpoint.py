"""The checkpoint: what lenet5.py writes and every other script reads, and the one check of it.

A checkpoint is a dict saved with torch.save and loaded with weights_only=True:

    arch                  "LeNet5-BN"
    model_state           the weights (a QCFS network's include each layer's lambda, threshold)
    activation, levels    "relu", or "qcfs" with its quantisation levels L
    input_levels          None (trained on the analog image), or L_in: trained on the image
                          rounded to L_in levels, as its spiking input layer fires them at t = 1
    channel_thresholds    QCFS: one lambda per channel (True) or per layer
    thresholds            QCFS: {activation layer: lambda, or a list of one per channel}
    percentiles           {layer: {percentile key: value}}: each activation's and the output
                          layer's percentiles over the calibration images (keys "99", "99.9" ...)
    channel_percentiles   the same per channel: {layer: {key: [value per channel]}}
    percentile            the key a conversion uses by default
    calibration_images    how many training images the percentiles come from
    val_energy_uj         QCFS: the energy per image of its SNN's first step with gamma = L on
                          the validation images (µJ; efficiency.first_step_energy)
    epoch, val_accuracy, test_accuracy, seed, args (lenet5.py's arguments, e.g. val_size),
    torch_version, torchvision_version

`check_checkpoint` checks every one of these values that a script reads, wherever a checkpoint
is loaded (`load_checkpoint`) and before lenet5.py promotes a new one (`promote`: a completed
run's checkpoint and history moved into place as one set, the ones they replace kept).
"""

import reprlib
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import torch

import cli
from cli import Number, UserError, first_line
from mnist import TRAIN_IMAGES

ARCH = "LeNet5-BN"
ACTIVATIONS = ("relu", "qcfs")
OUTPUT_LAYER = "out"  # the last layer's name: its percentiles (logits) may be negative
PERCENTILE = 99.0  # the percentile a conversion uses unless the checkpoint names another


def percentile_key(p):
    """The checkpoint's key for percentile p: 99 -> '99', 99.9 -> '99.9', 100 -> '100'."""
    return f"{float(p):g}"


def default_percentile(checkpoint):
    """The key of the percentile a checkpoint is converted with by default (older checkpoints
    did not record it: theirs was PERCENTILE)."""
    return checkpoint.get("percentile", percentile_key(PERCENTILE))


def save_checkpoint(checkpoint, path):
    """Write atomically: Ctrl-C at any moment leaves the previous file intact."""
    with cli.atomic_path(path) as tmp:
        serialise(checkpoint, tmp)


def serialise(checkpoint, file):
    """torch.save `checkpoint` into `file` (a path or a binary file): the same content gives the
    same bytes. (Pickle writes a string once per object and refers back to it where the same
    object comes again, so equal strings that happen to be one object or two, e.g. an argument
    given in code or on the command line, would give different bytes: every string is interned
    first.)"""
    torch.save(_interned(checkpoint), file)


def _interned(value):
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_interned(k): _interned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map(_interned, value))
    return value


def load_checkpoint(path):
    """Load a checkpoint written by lenet5.py and check it; a clear error for anything else."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint")
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first with `python lenet5.py`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise UserError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(checkpoint, dict) or "model_state" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint of lenet5.py (no model_state)")
    check_checkpoint(checkpoint, path)
    return checkpoint


MAX_LEVELS = 1024  # QCFS levels L, here and in lenet5.py's --levels
MAX_INPUT_LEVELS = 255  # L_in: an 8-bit image has 255 steps, so 255 levels carry it exactly
MAX_EPOCHS = 10_000  # lenet5.py's --epochs
MAX_ENERGY_WEIGHT = 1000.0  # lenet5.py's --energy-weight, per µJ: 0.3 already costs accuracy
MAX_DISTILL_WEIGHT = 1000.0  # lenet5.py's --distill-weight
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1000.0  # its --temperature: softmax(z / T) in float32
MAX_ENERGY_UJ = 1000.0  # µJ per image: more than LeNet5's SNN can spend in a step at any L
FLOAT32_MAX = 3.4028234663852886e38  # percentiles and lambda scale float32 weights


class Check(NamedTuple):
    """A check of a value that is not a number (those are cli.Number): called with it, whether
    it passes."""

    test: object  # value -> whether it is right
    kind: str  # what it must be

    def __call__(self, value):
        return self.test(value)


CHECKS = {  # key (args.* inside "args"): its check; checked where present
    "arch": Check(lambda v: v == ARCH, repr(ARCH)),
    "activation": Check(lambda v: v in ACTIVATIONS, " or ".join(ACTIVATIONS)),
    "levels": Number(1, MAX_LEVELS, integer=True),
    "input_levels": Number(1, MAX_INPUT_LEVELS, integer=True, empty=True),
    "channel_thresholds": Check(lambda v: isinstance(v, bool), "true or false"),
    "seed": Number(0, cli.SEED_RANGE[1], integer=True),
    "calibration_images": Number(1, TRAIN_IMAGES - 1, integer=True),
    "percentile": Check(lambda v: isinstance(v, str), "a key of the percentiles table"),
    "epoch": Number(1, MAX_EPOCHS, integer=True),
    "val_accuracy": Number(0, 1),
    "test_accuracy": Number(0, 1),
    "val_energy_uj": Number(0, MAX_ENERGY_UJ),
    "args": Check(lambda v: isinstance(v, dict), "a table of the arguments"),
    "args.energy_weight": Number(0, MAX_ENERGY_WEIGHT),
    "args.distill_weight": Number(0, MAX_DISTILL_WEIGHT, empty=True),
    "args.temperature": Number(MIN_TEMPERATURE, MAX_TEMPERATURE, empty=True),
    "args.val_size": Number(1, TRAIN_IMAGES - 1, integer=True),
    "args.limit_train": Number(1, TRAIN_IMAGES, integer=True, empty=True),
    "args.calibration_images": Number(1, TRAIN_IMAGES, integer=True, empty=True),
}
PLAUSIBLE = 1e-6  # a percentile below this fraction of its layer's maximum is a spoiled value


def check_checkpoint(checkpoint, path):
    """Check every value any script reads from a checkpoint; the error names the key.

    Types and ranges (CHECKS), weights that are finite numbers, percentile tables with the same
    keys for every layer, non-decreasing in p and not implausibly small, and for QCFS the
    trained thresholds lambda: positive, one per activation, and the same in the weights as in
    the `thresholds` table.
    """
    for key, check in CHECKS.items():
        table, name = (checkpoint.get("args"), key[5:]) if key.startswith("args.") else (
            checkpoint, key)
        if isinstance(table, dict) and name in table and not check(table[name]):
            raise UserError(f"{path}: {key} is {reprlib.repr(table[name])}, not {check.kind}")
    if checkpoint.get("activation") == "qcfs" and "levels" not in checkpoint:
        raise UserError(f"{path}: a QCFS checkpoint without its levels L")
    if "percentiles" not in checkpoint:
        raise UserError(f"{path}: the checkpoint holds no activation percentiles; retrain it "
                        "with `python lenet5.py`")
    state = checkpoint["model_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: model_state is not a table of tensors")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: layer {key.split('.')[0]} holds NaN or infinite values "
                            f"({key})")
        if key.endswith(".running_var") and not (tensor >= 0).all():
            raise UserError(f"{path}: layer {key.split('.')[0]} has a negative variance ({key})")
    for name in ("percentiles", "channel_percentiles"):
        if name in checkpoint:  # checkpoints older than the per-channel table lack it
            _check_percentiles(checkpoint[name], name, path)
    key = default_percentile(checkpoint)
    if any(key not in table for table in checkpoint.get("percentiles", {}).values()):
        raise UserError(f"{path}: percentile is {key!r}, not a key of the percentiles table")
    _check_thresholds(checkpoint, path)


def _check_percentiles(tables, name, path):
    """{layer: {key: value}} (or {key: [value per channel]}): see `check_checkpoint`."""
    per_channel = name == "channel_percentiles"
    kind = "a list of finite numbers" if per_channel else "a finite number"
    if not isinstance(tables, dict) or not tables or not all(
            isinstance(t, dict) and t for t in tables.values()):
        raise UserError(f"{path}: {name} is not a table of tables")
    for layer, table in tables.items():
        if not all(_percentile(key) for key in table):
            raise UserError(f"{path}: {name}[{layer!r}] has keys {list(table)}, not percentiles")
        if list(table) != list(next(iter(tables.values()))):
            raise UserError(f"{path}: {name}[{layer!r}] has other percentiles than the first "
                            "layer's")
        lowest = -FLOAT32_MAX if layer == OUTPUT_LAYER else 0
        for key, value in table.items():
            if isinstance(value, list) != per_channel or not all(
                    cli.is_number(v, lowest, FLOAT32_MAX)
                    for v in (value if per_channel else [value])):
                raise UserError(f"{path}: {name}[{layer!r}][{key!r}] is {reprlib.repr(value)}, "
                                f"not {kind}{' >= 0' if lowest == 0 else ''}")
        if per_channel and len({len(v) for v in table.values()}) > 1:
            raise UserError(f"{path}: {name}[{layer!r}] has lists of different lengths")
        rows = zip(*table.values(), strict=True) if per_channel else [table.values()]
        for row in rows:  # one layer's, or one channel's, percentiles in increasing p
            row = list(row)
            if row != sorted(row) or any(0 < v < PLAUSIBLE * row[-1] for v in row):
                raise UserError(f"{path}: {name}[{layer!r}] is {reprlib.repr(table)}: not "
                                "increasing with p, or implausibly small next to its maximum")


def _percentile(key):
    """Whether `key` names a percentile in (0, 100], as `percentile_key` writes it."""
    try:
        return isinstance(key, str) and 0 < float(key) <= 100
    except ValueError:
        return False


def _check_thresholds(checkpoint, path):
    """A QCFS network's lambda: positive, and the same in the weights and in `thresholds`."""
    table = checkpoint.get("thresholds", {})
    if not isinstance(table, dict) or not all(
            all(cli.is_number(x, 0, FLOAT32_MAX) and x > 0
                for x in (v if isinstance(v, list) else [v]))
            for v in table.values()):
        raise UserError(f"{path}: thresholds is {reprlib.repr(table)}, not positive numbers "
                        "per layer")
    weights = {k.removesuffix(".threshold"): v for k, v in checkpoint["model_state"].items()
               if k.endswith(".threshold")}
    if checkpoint.get("activation") == "qcfs" and not weights:
        raise UserError(f"{path}: activation is 'qcfs', but its weights hold no trained "
                        "thresholds lambda (a ReLU network?)")
    if (checkpoint.get("activation", "relu") == "qcfs") != bool(weights) or set(weights) != set(
            table):
        raise UserError(f"{path}: thresholds names {sorted(table)}, but the weights hold lambda "
                        f"of {sorted(weights)} (activation {checkpoint.get('activation')!r})")
    for layer, lam in weights.items():
        listed = torch.tensor(table[layer], dtype=lam.dtype)
        if lam.shape != listed.shape or not (lam > 0).all() or not torch.allclose(lam, listed,
                                                                                 rtol=1e-6):
            raise UserError(f"{path}: {layer}.threshold in the weights is "
                            f"{reprlib.repr(lam.tolist())}, not positive and equal to "
                            f"thresholds[{layer!r}] = {reprlib.repr(table[layer])}")


# ----------------------------------------------------------------------------- promotion


def history_path(checkpoint_path):
    """Where lenet5.py writes a checkpoint's history: <name>_history.json beside it."""
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_history.json")


def promote(path):
    """Move a completed run's checkpoint and history from their partial paths onto `path` and
    its history, as one set: the checkpoint and history they replace are kept as <name>.prev.pt
    and .prev.json if the checkpoint was a valid one (else earlier .prev files stay); if any of
    that cannot be done, nothing is replaced.

    Returns (whether the file at `path` was a valid checkpoint or none, the .prev path it is
    kept as or None).
    """
    keep = _valid_checkpoint(path)
    history_file = history_path(path)
    replaced = cli.previous_path(path) if keep and path.exists() else None
    with cli.file_set(path.parent) as files:  # all of it, or none
        for target in (path, history_file) if keep else ():
            if target.exists():
                shutil.copy2(target, files.path(cli.previous_path(target).name))
        files.adopt(path.name, cli.partial_path(path))
        files.adopt(history_file.name, cli.partial_path(history_file))
    return keep, replaced


def _valid_checkpoint(path):
    """Whether `path` holds a checkpoint that passes every check (True if there is none)."""
    try:
        return not path.exists() or bool(load_checkpoint(path))
    except UserError:
        return False
