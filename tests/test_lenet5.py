import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import DATA, HIDDEN

import lenet5
from cli import UserError
from lenet5 import (
    QCFS,
    LeNet5,
    load_checkpoint,
    main,
    model_from_checkpoint,
    percentile_activations,
    record_activations,
    save_checkpoint,
)
from mnist import Batches, load_mnist, split_train_val

# ----------------------------------------------------------------------------- model


def test_lenet5_layer_shapes():
    model = LeNet5().eval()
    x = torch.zeros(3, 1, 32, 32)
    shapes = {}
    for name, layer in model.named_children():
        x = layer(x)
        shapes[name] = tuple(x.shape[1:])
    assert shapes["act1"] == (6, 28, 28) and shapes["s2"] == (6, 14, 14)
    assert shapes["act3"] == (16, 10, 10) and shapes["s4"] == (16, 5, 5)
    assert shapes["flatten"] == (400,) and shapes["act5"] == (120,) and shapes["act6"] == (84,)
    assert shapes["out"] == (10,)
    assert lenet5.hooked_layers(model) == ["act1", "act3", "act5", "act6", "out"]


def test_qcfs_floors_clips_and_shifts():
    qcfs = QCFS(levels=4, threshold=2.0)  # levels 0, 0.5, 1, 1.5, 2
    x = torch.tensor([-1.0, 0.0, 0.24, 0.26, 0.74, 0.76, 1.9, 2.0, 3.0])
    assert qcfs(x).tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_qcfs_gradient_passes_floor_straight_through():
    qcfs = QCFS(levels=4, threshold=2.0)
    x = torch.tensor([-1.0, 0.3, 1.1, 3.0], requires_grad=True)
    qcfs(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # clipped inputs get no gradient
    # d/dlambda of lambda * q(x / lambda), q the clipped, quantised value in [0, 1], with floor's
    # gradient taken as 1: q below and above the clip (0 and 1), q - x / lambda in between
    expected = 0 + (0.25 - 0.15) + (0.5 - 0.55) + 1
    assert qcfs.threshold.grad.item() == pytest.approx(expected)


def test_qcfs_with_one_lambda_per_channel():
    x = torch.randn(8, 3, 5, 5) * 2
    per_layer, per_channel = QCFS(levels=4, threshold=1.5), QCFS(4, 1.5, channels=3)
    assert torch.equal(per_channel(x), per_layer(x))  # equal lambdas: the same function
    per_channel.threshold.data = torch.tensor([1.0, 2.0, 4.0])
    for c, lam in enumerate((1.0, 2.0, 4.0)):
        assert torch.equal(per_channel(x)[:, c], QCFS(4, lam)(x[:, c]))
    linear = QCFS(2, 1.0, channels=3)  # a linear layer's [N, neurons]
    assert torch.equal(linear(x[:, :, 0, 0]), QCFS(2, 1.0)(x[:, :, 0, 0]))


def test_thresholds_have_their_own_learning_rate_and_decay():
    args = lenet5.parse_args(["--activation", "qcfs", "--threshold-lr", "0.2",
                              "--threshold-decay", "0", "--epochs", "1"])
    optimizer, _ = lenet5.optimiser(LeNet5("qcfs"), args, steps_per_epoch=10)
    weights, lam = optimizer.param_groups
    assert len(lam["params"]) == 4 and all(p.dim() == 0 for p in lam["params"])
    assert lam["weight_decay"] == 0 and weights["weight_decay"] == args.weight_decay
    assert lam["max_lr"] == 0.2 and weights["max_lr"] == args.lr
    relu, _ = lenet5.optimiser(LeNet5(), lenet5.parse_args(["--epochs", "1"]), 10)
    assert len(relu.param_groups) == 1


def test_qcfs_lenet_keeps_the_layer_names():
    model = LeNet5("qcfs", levels=2)
    assert lenet5.hooked_layers(model) == ["act1", "act3", "act5", "act6", "out"]
    assert lenet5.thresholds(model) == {"act1": 1.0, "act3": 1.0, "act5": 1.0, "act6": 1.0}
    assert model.act3.levels == 2 and lenet5.thresholds(LeNet5()) == {}


# ----------------------------------------------------------------------------- the hook


def _trained_looking_model():
    torch.manual_seed(0)
    model = LeNet5()
    for bn in (model.bn1, model.bn3):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
    return model.eval()


def test_percentiles_match_torch_quantile_on_the_same_activations():
    model = _trained_looking_model()
    images = torch.rand(40, 1, 32, 32)
    batches = [(images[:25], None), (images[25:], None)]  # two batches, one partial
    recorded, per_channel = percentile_activations(model, batches, "cpu")
    with torch.no_grad():
        act1 = F.relu(model.bn1(model.c1(images)))
        act5 = nn.Sequential(*list(model)[:11])(images)  # c1 ... act5
        logits = model(images)
    for p in ("99", "99.9", "99.99"):
        expected = torch.quantile(act1.flatten(), float(p) / 100).item()
        assert recorded["act1"][p] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        for c in range(6):  # a convolution's channel: all images and positions
            expected = torch.quantile(act1[:, c].flatten(), float(p) / 100).item()
            assert per_channel["act1"][p][c] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        for j in (0, 57, 119):  # a linear layer's neuron: all images
            expected = torch.quantile(act5[:, j], float(p) / 100).item()
            assert per_channel["act5"][p][j] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert recorded["act1"]["100"] == pytest.approx(act1.max().item())
    assert per_channel["act1"]["100"] == pytest.approx(act1.amax((0, 2, 3)).tolist())
    assert recorded["out"]["99"] == pytest.approx(torch.quantile(logits.flatten(), 0.99).item())
    assert set(recorded) == set(per_channel) == {"act1", "act3", "act5", "act6", "out"}
    assert [len(per_channel[name]["99"]) for name in per_channel] == [6, 16, 120, 84, 10]


def test_hooks_are_removed_afterwards():
    model = _trained_looking_model()
    record_activations(model, [(torch.rand(2, 1, 32, 32), None)], "cpu", ["act1", "out"])
    assert all(not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- checkpoint


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"model_state": {"w": torch.ones(2)}}, path)

    def dies_halfway(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model_state": {"w": torch.zeros(2)}}, path)
    assert torch.equal(load_checkpoint(path)["model_state"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


@pytest.mark.parametrize("content, message", [
    (None, "no checkpoint at .*python lenet5.py"),
    (b"not a checkpoint at all", "not a readable checkpoint"),
    ({"weights": 1}, "not a checkpoint of lenet5.py"),
])
def test_load_checkpoint_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "ck.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_weights_of_another_architecture_are_refused():
    state = LeNet5().state_dict()
    state["c1.weight"] = torch.zeros(8, 1, 5, 5)
    with pytest.raises(UserError, match="do not fit LeNet5"):
        model_from_checkpoint({"model_state": state})


# ----------------------------------------------------------------------------- command line


def _quick_run(tmp_path, name="ck.pt", *extra):
    checkpoint = tmp_path / name
    main(["--epochs", "1", "--limit-train", "600", "--val-size", "500", "--batch-size", "100",
          "--device", "cpu", "--data-dir", str(DATA), "--checkpoint", str(checkpoint), *extra])
    return checkpoint


def test_cli_smoke_run_writes_a_self_describing_checkpoint(tmp_path):
    path = _quick_run(tmp_path, "ck.pt", "--percentile", "99.5")
    ck = torch.load(path, weights_only=True)
    for key in ("model_state", "percentiles", "percentile", "epoch", "val_accuracy",
                "test_accuracy", "args", "seed", "torch_version", "torchvision_version"):
        assert key in ck
    assert ck["percentile"] == "99.5" and ck["epoch"] == 1
    assert set(ck["percentiles"]["act3"]) == {"99", "99.5", "99.9", "99.99", "100"}
    assert set(ck["channel_percentiles"]["act3"]) == set(ck["percentiles"]["act3"])
    assert len(ck["channel_percentiles"]["act3"]["99.5"]) == 16
    assert ck["calibration_images"] == 600  # all of them: fewer than the default 2,048
    assert 0 < ck["val_accuracy"] <= 1 and 0 < ck["test_accuracy"] <= 1
    model_from_checkpoint(ck)
    history = json.loads((tmp_path / "ck_history.json").read_text())
    assert [h["epoch"] for h in history] == [1] and history[0]["saved"]


def test_percentiles_come_from_the_first_calibration_images_of_the_split(tmp_path):
    path = _quick_run(tmp_path, "ck.pt", "--calibration-images", "100")
    ck = load_checkpoint(path)
    assert ck["calibration_images"] == 100 and ck["args"]["calibration_images"] == 100
    images, labels = load_mnist(DATA, train=True)
    train_index, _ = split_train_val(len(labels), 500, seed=1, limit_train=600)
    first = train_index[:100]
    expected = percentile_activations(model_from_checkpoint(ck),
                                      Batches(images[first], labels[first], 1000), "cpu",
                                      sorted(float(p) for p in ck["percentiles"]["out"]), seed=1)
    assert (ck["percentiles"], ck["channel_percentiles"]) == expected


def test_more_calibration_images_than_training_images_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _quick_run(tmp_path, "ck.pt", "--calibration-images", "601")
    assert str(exit_info.value.code) == ("lenet5.py: error: --calibration-images 601: there are "
                                         "only 600 training images")
    assert not list(tmp_path.iterdir())


def test_interrupted_rerun_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    path = _quick_run(tmp_path, "ck.pt")
    before = path.read_bytes()
    history_before = (tmp_path / "ck_history.json").read_bytes()
    original, epochs = lenet5.train_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        epochs.append(1)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(lenet5, "train_epoch", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as exit_info:
        _quick_run(tmp_path, "ck.pt", "--epochs", "3", "--seed", "5")
    assert exit_info.value.code == 130
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and f"lenet5.py: interrupted; {path} is untouched" in message
    assert f"this run's best so far is in {tmp_path / 'ck.partial.pt'}" in message
    assert path.read_bytes() == before  # byte for byte
    assert (tmp_path / "ck_history.json").read_bytes() == history_before
    assert load_checkpoint(tmp_path / "ck.partial.pt")["epoch"] == 1


def test_completed_rerun_keeps_the_checkpoint_it_replaces(tmp_path, capsys):
    path = _quick_run(tmp_path, "ck.pt")
    before = path.read_bytes()
    _quick_run(tmp_path, "ck.pt", "--seed", "5")
    assert (tmp_path / "ck.prev.pt").read_bytes() == before
    assert path.read_bytes() != before and load_checkpoint(path)["seed"] == 5
    assert not (tmp_path / "ck.partial.pt").exists()
    assert f"the checkpoint it replaced is kept as {tmp_path / 'ck.prev.pt'}" in (
        capsys.readouterr().out)


def _spoiled(tmp_path, change):
    """A quick checkpoint with `change` applied to its contents."""
    path = _quick_run(tmp_path, "spoiled.pt")
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda ck: ck["model_state"]["f6.bias"].fill_(float("inf")),
     r"layer f6 holds NaN or infinite values \(f6.bias\)"),
    (lambda ck: ck["percentiles"]["act1"].update({"99": None}),
     r"percentiles\['act1'\]\['99'\] is None, not a finite number >= 0"),
    (lambda ck: ck["percentiles"].update({"act6": [1, 2]}), "percentiles is not a table of tables"),
    (lambda ck: ck["channel_percentiles"]["act3"].update({"99": [1.0, float("nan")]}),
     r"channel_percentiles\['act3'\]\['99'\] is \[1.0, nan\], not a list of finite numbers >= 0"),
    (lambda ck: ck["channel_percentiles"]["act3"].update({"99": 2.0}),
     r"channel_percentiles\['act3'\]\['99'\] is 2.0, not a list of finite numbers >= 0"),
    (lambda ck: ck.update(percentile=99), "percentile is 99, not a key of its percentiles"),
    (lambda ck: ck.update(levels=0), "unknown activation 'relu' with levels 0"),
])
def test_init_from_an_odd_checkpoint_gives_one_line(tmp_path, change, message):
    spoiled = _spoiled(tmp_path, change)
    with pytest.raises(SystemExit) as exit_info:
        _quick_run(tmp_path, "qcfs.pt", "--activation", "qcfs", "--init-from", str(spoiled))
    text = str(exit_info.value.code)
    assert text.startswith("lenet5.py: error:") and "\n" not in text
    assert re.search(message, text)
    assert not (tmp_path / "qcfs.pt").exists() and not (tmp_path / "qcfs.partial.pt").exists()


def test_qcfs_fine_tuning_starts_from_the_percentiles_and_records_lambda(tmp_path, monkeypatch):
    relu = _quick_run(tmp_path, "relu.pt")
    started = {}
    original = lenet5.init_from

    def spy(model, path, key):
        original(model, path, key)
        started.update(lenet5.thresholds(model))
    monkeypatch.setattr(lenet5, "init_from", spy)
    path = _quick_run(tmp_path, "qcfs.pt", "--activation", "qcfs", "--levels", "3",
                      "--init-from", str(relu), "--percentile", "99.9")
    relu_ck, ck = (torch.load(p, weights_only=True) for p in (relu, path))
    assert started == {name: pytest.approx(values["99.9"])
                       for name, values in relu_ck["percentiles"].items() if name != "out"}
    assert ck["activation"] == "qcfs" and ck["levels"] == 3
    model = model_from_checkpoint(ck)
    assert isinstance(model.act5, QCFS) and model.act5.levels == 3
    assert ck["thresholds"] == pytest.approx(lenet5.thresholds(model))
    assert ck["thresholds"] != pytest.approx(started)  # lambda was trained
    channels = _quick_run(tmp_path, "channels.pt", "--activation", "qcfs", "--init-from", str(relu),
                          "--channel-thresholds")
    trained = lenet5.thresholds(model_from_checkpoint(torch.load(channels, weights_only=True)))
    assert [len(trained[name]) for name in HIDDEN] == [6, 16, 120, 84]
    assert started == {name: pytest.approx(  # one per channel, each from its own percentile
        [v if v > 0 else relu_ck["percentiles"][name]["99"]
         for v in relu_ck["channel_percentiles"][name]["99"]]) for name in HIDDEN}


def test_defaults_depend_on_the_activation_and_on_fine_tuning():
    scratch = lenet5.parse_args([])
    assert scratch.checkpoint == Path("checkpoints/lenet5_best.pt")
    assert (scratch.epochs, scratch.lr) == (25, 0.05)
    tune = lenet5.parse_args(["--activation", "qcfs", "--init-from", "a.pt", "--epochs", "3"])
    assert tune.checkpoint == Path("checkpoints/lenet5_qcfs_best.pt")
    assert (tune.epochs, tune.lr) == (3, 0.01)  # the fine-tuning default, unless given


def test_same_seed_gives_the_same_weights(tmp_path):
    first = torch.load(_quick_run(tmp_path, "a.pt"), weights_only=True)["model_state"]
    second = torch.load(_quick_run(tmp_path, "b.pt"), weights_only=True)["model_state"]
    other = torch.load(_quick_run(tmp_path, "c.pt", "--seed", "7"), weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["c1.weight"], other["model_state"]["c1.weight"])


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--batch-size", "-4"], "--batch-size: must be at least 1"),
    (["--lr", "nan"], "--lr: must be a positive number"),
    (["--percentile", "0"], r"--percentile: must be in \(0, 100\]"),
    (["--percentile", "100.5"], r"--percentile: must be in \(0, 100\]"),
    (["--val-size", "60000"], "--val-size: must be below 60000"),
    (["--limit-train", "many"], "--limit-train: expected a positive integer"),
    (["--activation", "tanh"], "--activation: invalid choice"),
    (["--levels", "0"], "--levels: must be at least 1"),
    (["--calibration-images", "0"], "--calibration-images: must be at least 1"),
    (["--init-from", "checkpoints/lenet5_best.pt"], "are the same file"),
])
def test_bad_arguments_give_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err)


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--init-from", "{file}"], "is not a readable checkpoint"),
    (["--checkpoint", "{file}/sub/ck.pt"], "cannot write to"),
])
def test_bad_device_or_folder_fails_before_training(tmp_path, argv, message):
    (tmp_path / "file").write_text("a file, not a folder")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--data-dir", str(tmp_path / "nowhere")])
    assert message in str(exit_info.value.code)
