import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import DATA, HIDDEN, ROOT, check_refused

import checkpoint
import cli
import lenet5
import mnist
from checkpoint import load_checkpoint
from cli import UserError
from lenet5 import (
    QCFS,
    LeNet5,
    main,
    model_from_checkpoint,
    percentile_activations,
    record_activations,
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


def test_weights_of_another_architecture_are_refused():
    state = LeNet5().state_dict()
    state["c1.weight"] = torch.zeros(8, 1, 5, 5)
    with pytest.raises(UserError, match="do not fit LeNet5"):
        model_from_checkpoint({"model_state": state})


# ----------------------------------------------------------------------------- command line


def test_distillation_is_the_softened_kl_divergence_times_t_squared():
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 10), torch.randn(5, 10)
    assert lenet5.distillation(teacher, teacher, 3.0).abs() < 1e-6  # nothing left to learn
    for temperature in (1.0, 4.0):
        p = F.softmax(teacher / temperature, 1)
        by_hand = (p * (p.log() - F.log_softmax(logits / temperature, 1))).sum(1).mean()
        assert lenet5.distillation(logits, teacher, temperature).item() == pytest.approx(
            temperature**2 * by_hand.item(), rel=1e-5)


def test_a_teacher_changes_the_training_and_is_recorded(trained, tmp_path, capsys):
    """Same seed, same start: with a teacher (by default, the network a QCFS one starts from)
    the losses differ, and the checkpoint says from whom, with what weight and temperature;
    without one (--distill-weight 0) they are recorded empty."""
    common = ["--activation", "qcfs", "--levels", "4", "--init-from", str(trained), "--epochs",
              "1", "--limit-train", "600", "--val-size", "500", "--device", "cpu", "--data-dir",
              str(DATA)]
    main([*common, "--checkpoint", str(tmp_path / "plain.pt"), "--distill-weight", "0"])
    main([*common, "--checkpoint", str(tmp_path / "taught.pt"), "--temperature", "3"])
    assert f"distillation from {trained} at temperature 3" in capsys.readouterr().out
    plain, taught = (load_checkpoint(tmp_path / name) for name in ("plain.pt", "taught.pt"))
    assert plain["args"]["teacher"] is None and plain["args"]["distill_weight"] is None
    assert taught["args"]["teacher"] == str(trained)
    assert (taught["args"]["distill_weight"], taught["args"]["temperature"]) == (
        lenet5.DISTILL_WEIGHT, 3.0)
    losses = [json.loads(checkpoint.history_path(tmp_path / name).read_text())[0]["train_loss"]
              for name in ("plain.pt", "taught.pt")]
    assert losses[0] != losses[1]


def _quick_run(tmp_path, name="ck.pt", *extra):
    checkpoint = tmp_path / name
    main(["--epochs", "1", "--limit-train", "600", "--val-size", "500", "--batch-size", "20",
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


def _interrupt_in_epoch_2(monkeypatch):
    """Make the next training runs raise KeyboardInterrupt (Ctrl-C) in their second epoch."""
    original, epochs = lenet5.train_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        epochs.append(1)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(lenet5, "train_epoch", interrupted_in_epoch_2)


def test_interrupted_rerun_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    path = _quick_run(tmp_path, "ck.pt")
    before = path.read_bytes()
    history_before = (tmp_path / "ck_history.json").read_bytes()
    _interrupt_in_epoch_2(monkeypatch)
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


def test_two_trainings_into_one_checkpoint_never_swap_their_networks(tmp_path):
    """Started together with the same --checkpoint: one trains and saves its own network, the
    other is refused in one line; what the first reports saved is what the file holds."""
    path = tmp_path / "ck.pt"
    runs = [subprocess.Popen([sys.executable, str(ROOT / "lenet5.py"), "--seed", str(seed),
                              "--epochs", "1", "--limit-train", "2000", "--device", "cpu",
                              "--data-dir", str(DATA), "--checkpoint", str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in (1, 2)]
    done = [(run.args[3], *run.communicate(timeout=300), run.returncode) for run in runs]
    saved = [seed for seed, out, _, code in done if code == 0 and f"saved {path}" in out]
    refused = [err for _, _, err, code in done if code == 1]
    assert len(saved) == 1 and len(refused) == 1, done
    assert refused[0] == (f"lenet5.py: error: another run is writing {path} now (it holds "
                          f"{tmp_path / 'ck.lock'}): wait for it to end, or write elsewhere\n")
    assert load_checkpoint(path)["seed"] == int(saved[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "ck_history.json"]


@pytest.mark.parametrize("writer", ["lenet5.py", "a study's promotion"])
def test_a_checkpoint_another_run_is_writing_is_refused_and_kept(writer, tmp_path, capsys):
    import seeds
    path = _quick_run(tmp_path, "relu_seed1.pt")  # what the study would make (or replace)
    before = path.read_bytes()
    with cli.held(path), pytest.raises(SystemExit) as exit_info:
        if writer == "lenet5.py":
            _quick_run(tmp_path, "relu_seed1.pt", "--seed", "2")
        else:
            seeds.main(["--seeds", "1", "--limit-train", "3000", "--epochs", "1", "--retrain",
                        "--workers", "0", "--data-dir", str(DATA), "--checkpoint-dir",
                        str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert re.fullmatch(r"\S+\.py: error: another run is writing \S*relu_seed1.pt now .*",
                        exit_info.value.code)
    assert path.read_bytes() == before and not (tmp_path / "relu_seed1.prev.pt").exists()


@pytest.mark.parametrize("network, change, message", [
    ("trained", lambda ck: ck["model_state"]["f6.bias"].fill_(float("inf")),
     r"layer f6 holds NaN or infinite values \(f6.bias\)"),
    ("trained", lambda ck: ck["percentiles"]["act1"].update({"99": None}),
     r"percentiles\['act1'\]\['99'\] is None, not a finite number >= 0"),
    ("trained", lambda ck: ck.update(levels=0), r"levels is 0, not an integer in \[1, 1024\]"),
    ("qcfs", lambda ck: ck["model_state"]["act3.threshold"].fill_(-1.0),
     "act3.threshold in the weights is -1.0, not positive"),
])
def test_init_from_an_odd_checkpoint_gives_one_line(tmp_path, network, change, message, request):
    """`check_checkpoint` (every case in test_checkpoint.py) guards --init-from too."""
    checkpoint = torch.load(request.getfixturevalue(network), weights_only=True)
    change(checkpoint)
    spoiled = tmp_path / "spoiled.pt"
    torch.save(checkpoint, spoiled)
    with pytest.raises(SystemExit) as exit_info:
        _quick_run(tmp_path, "qcfs.pt", "--activation", "qcfs", "--init-from", str(spoiled))
    text = str(exit_info.value.code)
    assert text.startswith("lenet5.py: error:") and "\n" not in text
    assert re.search(message, text)
    assert not (tmp_path / "qcfs.pt").exists() and not (tmp_path / "qcfs.partial.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1e30"], "training diverged in epoch 1 \\(loss nan\\)"),
    (["--lr", "1e-9"], "no better than chance \\(validation"),
])
def test_a_failed_run_never_replaces_the_checkpoint(tmp_path, argv, message):
    path = _quick_run(tmp_path, "ck.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for _ in range(2):  # twice: the backup must not take the failed network's place either
        with pytest.raises(SystemExit) as exit_info:
            _quick_run(tmp_path, "ck.pt", "--seed", "3", *argv)
        text = str(exit_info.value.code)
        assert re.search(message, text) and f"{path} is untouched" in text and "\n" not in text
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if ".partial" not in p.name}
    assert after == before  # byte for byte, and no .prev.pt made


def test_a_checkpoint_without_a_suffix_keeps_its_history(tmp_path, monkeypatch, capsys):
    path = _quick_run(tmp_path, "net")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"net", "net_history.json"}
    _interrupt_in_epoch_2(monkeypatch)
    with pytest.raises(SystemExit):
        _quick_run(tmp_path, "net", "--epochs", "3")
    assert f"{path} is untouched" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert {p.name for p in tmp_path.iterdir()} == {"net", "net_history.json", "net.partial",
                                                     "net_history.partial.json"}


def test_a_run_that_cannot_keep_its_backups_replaces_nothing(tmp_path, monkeypatch, capsys):
    """The checkpoint, its history and their backups are one set: all replaced, or none."""
    _quick_run(tmp_path, "ck.pt")
    _quick_run(tmp_path, "ck.pt", "--seed", "2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"ck.pt", "ck_history.json", "ck.prev.pt", "ck_history.prev.json"}
    copy = checkpoint.shutil.copy2

    def history_backup_fails(source, target):
        if "history" in str(source):
            raise OSError(28, "No space left on device", str(target))
        return copy(source, target)
    monkeypatch.setattr(checkpoint.shutil, "copy2", history_backup_fails)
    with pytest.raises(SystemExit, match="No space left on device"):
        _quick_run(tmp_path, "ck.pt", "--seed", "3")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if ".partial" not in p.name}
    assert after == before  # the new checkpoint is not beside the old history
    assert load_checkpoint(tmp_path / "ck.partial.pt")["seed"] == 3  # this run's, kept aside
    monkeypatch.undo()
    (tmp_path / "ck_history.prev.json").unlink()
    (tmp_path / "ck_history.prev.json").mkdir()  # a backup's place taken: said before training
    capsys.readouterr()
    with pytest.raises(SystemExit, match="ck_history.prev.json is a folder"):
        _quick_run(tmp_path, "ck.pt", "--seed", "4")
    assert "epoch" not in capsys.readouterr().out


def test_an_invalid_file_in_the_checkpoints_place_is_not_kept_over_a_good_backup(tmp_path):
    path = _quick_run(tmp_path, "ck.pt")
    _quick_run(tmp_path, "ck.pt", "--seed", "2")  # the first run is now ck.prev.pt
    good = (tmp_path / "ck.prev.pt").read_bytes()
    path.write_text("spoiled by hand")
    _quick_run(tmp_path, "ck.pt", "--seed", "3")
    assert (tmp_path / "ck.prev.pt").read_bytes() == good
    assert load_checkpoint(path)["seed"] == 3


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
    assert lenet5.parse_args(["--init-from", "a.pt"]).epochs == lenet5.FINE_TUNING["epochs"]


def _recipe(args):
    return (args.levels, args.energy_weight, args.input_levels, args.teacher and str(args.teacher),
            args.distill_weight, args.temperature)


@pytest.mark.parametrize("argv, recipe", [
    ([], (lenet5.LEVELS, 0.0, None, None, None, None)),  # ReLU: the analog image, no teacher
    (["--input-levels", "4"], (lenet5.LEVELS, 0.0, 4, None, None, None)),
    (["--init-from", "a.pt"], (lenet5.LEVELS, 0.0, None, None, None, None)),
    (["--activation", "qcfs", "--init-from", "a.pt"],  # the chosen recipe, taught by its start
     (8, 0.03, 4, "a.pt", 1.0, 2.0)),
    (["--activation", "qcfs"], (8, 0.03, 4, None, None, None)),  # from scratch: nobody teaches
    (["--activation", "qcfs", "--init-from", "a.pt", "--teacher", "b.pt", "--temperature", "3"],
     (8, 0.03, 4, "b.pt", 1.0, 3.0)),
    (["--activation", "qcfs", "--init-from", "a.pt", "--levels", "4", "--energy-weight", "0",
      "--input-levels", "analog", "--distill-weight", "0"],  # plain QCFS, as the studies pair it
     (4, 0.0, None, None, None, None)),
])
def test_the_qcfs_recipe_by_default_and_each_part_turned_off(argv, recipe):
    assert _recipe(lenet5.parse_args(argv)) == recipe


def test_same_seed_gives_the_same_weights(tmp_path):
    first = torch.load(_quick_run(tmp_path, "a.pt"), weights_only=True)["model_state"]
    second = torch.load(_quick_run(tmp_path, "b.pt"), weights_only=True)["model_state"]
    other = torch.load(_quick_run(tmp_path, "c.pt", "--seed", "7"), weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["c1.weight"], other["model_state"]["c1.weight"])


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], r"--epochs: must be in \[1, 10000\], got 0"),
    (["--epochs", str(10**20)], r"--epochs: must be in \[1, 10000\]"),
    (["--batch-size", "-4"], r"--batch-size: must be in \[1, 60000\]"),
    (["--batch-size", str(10**9)], r"--batch-size: must be in \[1, 60000\]"),
    (["--lr", "nan"], "--lr: must be a positive number"),
    (["--percentile", "0"], r"--percentile: must be in \(0, 100\]"),
    (["--percentile", "100.5"], r"--percentile: must be in \(0, 100\]"),
    (["--val-size", "60000"], r"--val-size: must be in \[1, 59999\], got 60000"),
    (["--limit-train", "many"], "--limit-train: expected a positive integer"),
    (["--activation", "tanh"], "--activation: invalid choice"),
    (["--levels", "0"], r"--levels: must be in \[1, 1024\]"),
    (["--levels", str(10**20)], r"--levels: must be in \[1, 1024\], got 1000"),
    (["--calibration-images", "0"], r"--calibration-images: must be in \[1, 60000\]"),
    (["--limit-train", "70000"], r"--limit-train: must be in \[1, 60000\]"),
    (["--init-from", "checkpoints/lenet5_best.pt"], "are the same file"),
    (["--seed", "-1"], r"--seed: must be in \[0, 4294967295\], got -1"),
    (["--seed", "4294967296"], r"--seed: must be in \[0, 4294967295\]"),
    (["--weight-decay", "-1"], "--weight-decay: must be a finite number >= 0, got -1"),
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number >= 0, got nan"),
    (["--weight-decay", "inf"], "--weight-decay: must be a finite number >= 0, got inf"),
    (["--threshold-decay", "-1"], "--threshold-decay: must be a finite number >= 0"),
    (["--threshold-lr", "0"], "--threshold-lr: must be a positive number"),
    (["--energy-weight", "0.1"], "--energy-weight needs --activation qcfs"),
    (["--activation", "qcfs", "--energy-weight", "-1"], r"--energy-weight: must be in \[0, 1000\]"),
    (["--distill-weight", "1"], "--distill-weight: needs a teacher"),
    (["--temperature", "2"], "--temperature: needs a teacher"),
    (["--activation", "qcfs", "--init-from", "a.pt", "--distill-weight", "0", "--temperature",
      "2"], "--temperature: needs a teacher"),
    (["--teacher", "t.pt", "--temperature", "0"], r"--temperature: must be in \[0.01, 1000\]"),
    (["--teacher", "t.pt", "--distill-weight", "nan"], "--distill-weight: must be"),
    (["--teacher", "t.pt", "--distill-weight", "-1"], r"--distill-weight: must be in \[0, 1000\]"),
    (["--teacher", "checkpoints/lenet5_best.pt"], "training would overwrite its own teacher"),
    (["--input-levels", "0"], r"--input-levels: must be in \[1, 255\]"),
    (["--input-levels", "analogue"], "--input-levels: expected a positive integer"),
    (["--activation", "qcfs", "--init-from", "checkpoints/lenet5_best.pt", "--checkpoint",
      "checkpoints/lenet5_best.pt"],  # its own teacher too: the starting point is named
     "training would overwrite its own starting point"),
])
def test_bad_arguments_give_one_line(argv, message, capsys):
    check_refused(main, argv, message, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--init-from", "{file}"], "is not a readable checkpoint"),
    (["--teacher", "{file}"], "is not a readable checkpoint"),
    (["--teacher", "{dir}/none.pt"], "no checkpoint at"),
    (["--checkpoint", "{file}/sub/ck.pt"], "cannot write to"),
    (["--checkpoint", "{dir}"], "is a folder; give a file name"),
    ([], "MNIST files missing from"),
])
def test_bad_device_folder_or_data_fails_before_training(tmp_path, argv, message, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "dir").mkdir()
    monkeypatch.setattr(mnist.torchvision.datasets, "MNIST", _no_download)
    argv = [a.replace("{file}", str(tmp_path / "file")).replace("{dir}", str(tmp_path / "dir"))
            for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "ck.pt"), *argv,
              "--data-dir", str(tmp_path / "nowhere")])
    assert message in str(exit_info.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # nothing written
    assert not list((tmp_path / "dir").iterdir())


def _no_download(*args, **kwargs):
    raise RuntimeError("no internet")
