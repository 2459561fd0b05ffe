import re
from pathlib import Path

import pytest
import torch

from checkpoint import CHECKS, check_checkpoint, load_checkpoint, save_checkpoint
from cli import Number, UserError


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"model_state": {"w": torch.ones(2)}}, path)

    def dies_halfway(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model_state": {"w": torch.zeros(2)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["model_state"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


@pytest.mark.parametrize("content, message", [
    (None, "no checkpoint at .*python lenet5.py"),
    ("folder", "is a folder, not a checkpoint"),
    (b"not a checkpoint at all", "not a readable checkpoint"),
    ({"weights": 1}, "not a checkpoint of lenet5.py"),
])
def test_load_checkpoint_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "ck.pt"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def _set(path, value):
    """A change that sets the value at `path` (keys, outermost first) of a checkpoint."""
    def change(checkpoint):
        table = checkpoint
        for key in path[:-1]:
            table = table[key]
        table[path[-1]] = value
    return change


def _drop(*path):
    def change(checkpoint):
        table = checkpoint
        for key in path[:-1]:
            table = table[key]
        del table[path[-1]]
    return change


def _weight(key, value):
    return lambda checkpoint: checkpoint["model_state"][key].fill_(value)


# One row per bad value: which network (the conftest's ReLU or QCFS one), how it is spoiled, and
# what the one line must say. A new bad input is one more row.
SPOILED = [
    ("relu", _weight("c3.weight", float("nan")), r"layer c3 holds NaN or infinite values"),
    ("relu", _weight("f6.bias", float("inf")), r"layer f6 holds NaN or infinite values"),
    ("relu", _set(["model_state"], [1, 2]), "model_state is not a table of tensors"),
    ("relu", _set(["percentiles", "act5", "99"], float("inf")),
     r"percentiles\['act5'\]\['99'\] is inf, not a finite number >= 0"),
    ("relu", _set(["percentiles", "act3", "99.9"], "big"),
     r"percentiles\['act3'\]\['99.9'\] is 'big', not a finite number"),
    ("relu", _set(["percentiles", "act1", "99"], None), r"\['act1'\]\['99'\] is None"),
    ("relu", _set(["percentiles", "act6"], [1, 2]), "percentiles is not a table of tables"),
    ("relu", _set(["percentiles"], {}), "percentiles is not a table of tables"),
    ("relu", _drop("percentiles", "act3", "99.9"), r"\['act3'\] has other percentiles than"),
    ("relu", _set(["percentiles", "act3", "99"], 1e9), "not increasing with p"),
    ("relu", _set(["percentiles", "act1", "99"], 1e-30), "implausibly small"),
    ("relu", _set(["percentiles", "out", "99"], 1e-30), "implausibly small"),
    ("relu", lambda ck: ck["percentiles"].update(act1={"a": 1.0}), "not percentiles"),
    ("relu", _set(["channel_percentiles", "act3", "99"], [1.0, float("nan")]),
     r"channel_percentiles\['act3'\]\['99'\] is \[1.0, nan\], not a list of finite numbers"),
    ("relu", _set(["channel_percentiles", "act3", "99"], 2.0), "not a list of finite numbers"),
    ("relu", _set(["channel_percentiles", "act3", "99"], [1.0, 2.0]), "lists of different len"),
    ("relu", _set(["percentile"], 99), "percentile is 99, not a key of the percentiles table"),
    ("relu", _set(["percentile"], "95"), "percentile is '95', not a key of the percentiles"),
    ("relu", _set(["activation"], "tanh"), "activation is 'tanh', not relu or qcfs"),
    ("relu", _set(["levels"], 0), r"levels is 0, not an integer in \[1, 1024\]"),
    ("relu", _set(["levels"], 10**20), r"levels is 100000000000000000000, not an integer in"),
    ("relu", _set(["arch"], "ResNet"), "arch is 'ResNet', not 'LeNet5-BN'"),
    ("relu", _set(["seed"], -1), r"seed is -1, not an integer in \[0, 4294967295\]"),
    ("relu", _set(["seed"], "three"), "seed is 'three', not an integer"),
    ("relu", _set(["seed"], 10**400), r"seed is 1000.*, not an integer in \[0, 4294967295\]"),
    ("relu", _set(["val_accuracy"], 2.0), r"val_accuracy is 2.0, not a number in \[0, 1\]"),
    ("relu", _set(["epoch"], 0), r"epoch is 0, not an integer in \[1, 10000\]"),
    ("relu", _weight("bn3.running_var", -0.5), r"layer bn3 has a negative variance"),
    ("relu", _drop("percentiles"), "holds no activation percentiles"),
    ("relu", _set(["calibration_images"], -5), r"calibration_images is -5, not an integer in"),
    ("relu", _set(["calibration_images"], 0), r"calibration_images is 0, not an integer in \[1, "),
    ("relu", _set(["calibration_images"], "many"), "calibration_images is 'many'"),
    ("relu", _set(["args"], "x"), "args is 'x', not a table of the arguments"),
    ("relu", _set(["args", "val_size"], 10**9), r"args.val_size is 1000000000, not an integer"),
    ("relu", _set(["args", "limit_train"], "many"), "args.limit_train is 'many'"),
    ("relu", _set(["thresholds"], {"act1": -1.0}), "thresholds is .*, not positive numbers"),
    ("qcfs", _drop("thresholds"), r"thresholds names \[\], but the weights hold lambda of"),
    ("qcfs", _drop("thresholds", "act3"), r"thresholds names \['act1', 'act5', 'act6'\]"),
    ("qcfs", _weight("act3.threshold", -1.0), "act3.threshold in the weights is -1.0, not pos"),
    ("qcfs", _weight("act3.threshold", 0.0), "act3.threshold in the weights is 0.0, not pos"),
    ("qcfs", _weight("act5.threshold", 2.5), r"not positive and equal to thresholds\['act5'\]"),
    ("qcfs", _set(["activation"], "relu"), "but the weights hold lambda"),
    ("qcfs", _drop("levels"), "a QCFS checkpoint without its levels L"),
    ("qcfs", lambda ck: ck["model_state"].update({"act1.threshold": torch.ones(6)}) or ck[
        "thresholds"].update(act1=[1.0, 1.0, 1.0]), r"act1.threshold in the weights is \[1.0, "),
]


@pytest.mark.parametrize("network, change, message", SPOILED)
def test_every_bad_value_is_named(network, change, message, request):
    checkpoint = torch.load(request.getfixturevalue(
        "trained" if network == "relu" else "qcfs"), weights_only=True)
    check_checkpoint(checkpoint, "ck.pt")  # the unspoiled one passes
    change(checkpoint)
    with pytest.raises(UserError, match=message) as error:
        check_checkpoint(checkpoint, "ck.pt")
    assert str(error.value).startswith("ck.pt: ") and "\n" not in str(error.value)


def _unusable(check):
    """Values a number check must refuse: not finite, too large for a float, of another kind, just
    outside its range, and a fraction where an integer is asked."""
    values = [10**400, -10**400, float("inf"), float("nan"), True, "1", None, [1],
              check.lowest - 1, check.highest + 1 if check.integer else check.highest * 1.5]
    return [v for v in values if not (v is None and check.empty)] + (
        [check.lowest + 0.5] if check.integer else [])


NUMBERS = [(key, value) for key, check in CHECKS.items() if isinstance(check, Number)
           for value in _unusable(check)]
NUMBERS += [(key, value) for key in ("percentiles.act3.99", "percentiles.out.99.9",
                                     "thresholds.act5") for value in (10**400, 1e39, -1e39)]


@pytest.mark.parametrize("key, value", NUMBERS)
def test_every_number_admitted_is_bounded_and_usable(key, value, qcfs):
    """A number that is valid in a file but not one to compute with is refused, naming its key."""
    checkpoint = torch.load(qcfs, weights_only=True)
    if key == "thresholds.act5":  # the weights hold the same lambda: spoil both
        checkpoint["model_state"]["act5.threshold"].fill_(1.0)
        checkpoint["thresholds"]["act5"] = 1.0
    _set(key.split(".", 1) if key.startswith("args.") else
         [key] if "." not in key else key.split(".", 2), value)(checkpoint)
    with pytest.raises(UserError, match=re.escape(key.split(".")[0])) as error:
        check_checkpoint(checkpoint, "ck.pt")
    assert "\n" not in str(error.value)


def test_old_checkpoints_without_the_newer_keys_pass(trained):
    checkpoint = torch.load(trained, weights_only=True)
    for key in ("channel_percentiles", "calibration_images", "percentile", "channel_thresholds",
                "arch"):
        del checkpoint[key]
    check_checkpoint(checkpoint, "old.pt")
