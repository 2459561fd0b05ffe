import ast
import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import DATA, HIDDEN, ROOT, check_refused, random_lenet, run_command

import cli
import constant_input
import early_exit
import efficiency
import layer_scales
import lenet5
import lenet_convert
import mnist
import options
from checkpoint import PERCENTILE, load_checkpoint, percentile_key
from cli import UserError
from counting import max_pool
from layer_scales import activation_scales
from lenet5 import QCFS, LeNet5, percentile_activations
from lenet_convert import (
    SMaxPool,
    SpikeNode,
    clean_mem_spike,
    counting_modules,
    evaluate_snn,
    first_step_within,
    fold_batchnorm,
    fuse,
    fuse_norm_replace,
    normalise,
    predict,
    simulate,
)
from options import CHECKPOINT, Settings
from plots import report_steps, settings_text
from recorded import remeasure_percentiles

# ----------------------------------------------------------------------------- conversion steps


def test_fuse_equals_conv_then_batchnorm():
    torch.manual_seed(0)
    model = random_lenet()
    x = torch.randn(4, 6, 14, 14)
    with torch.no_grad():
        expected = model.bn3(model.c3(x))
        assert torch.allclose(fuse(model.c3, model.bn3)(x), expected, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "qcfs"])
def test_normalised_ann_predicts_exactly_as_the_ann(activation):
    model = random_lenet(activation=activation)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(64, 1, 32, 32)
    scales = {name: p["99"] for name, p in percentile_activations(model, [(images, None)],
                                                                     "cpu")[0].items()}
    with torch.no_grad():
        logits = model(images)
        folded = fold_batchnorm(model)
        normalised = normalise(folded, scales)(images)
        spiking_readout = normalise(folded, scales, spiking_readout=True)(images)
        assert torch.allclose(folded(images), logits, atol=1e-4)
    assert torch.allclose(normalised, logits, atol=1e-4)
    assert torch.equal(normalised.argmax(1), logits.argmax(1))
    assert torch.allclose(spiking_readout * scales["out"], logits, atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # ANN untouched


def _channel_scales(seed=0):
    """Random per-channel scales for LeNet5's hidden layers, a number for the output layer."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {"act1": 6, "act3": 16, "act5": 120, "act6": 84}
    return {name: 0.5 + 2 * torch.rand(n, generator=generator, dtype=torch.float64)
            for name, n in sizes.items()} | {"out": 3.0}


def test_channel_normalised_ann_gives_the_ann_per_channel():
    model = random_lenet()
    scales = _channel_scales()
    images = torch.rand(32, 1, 32, 32)
    with torch.no_grad():
        folded = fold_batchnorm(model)
        normalised = normalise(folded, scales)
        spiking_readout = normalise(folded, scales, spiking_readout=True)
        x, y = images, images
        for (name, layer), normalised_layer in zip(folded.named_children(), normalised,
                                                   strict=True):
            x, y = layer(x), normalised_layer(y)
            if name in ("act1", "act3", "act5", "act6"):  # each channel divided by its scale
                shape = (1, -1) + (1,) * (x.dim() - 2)
                assert torch.allclose(y, x / scales[name].view(shape).float(), atol=1e-5), name
        assert torch.allclose(y, model(images), atol=1e-4)
        assert torch.allclose(spiking_readout(images) * 3.0, model(images), atol=1e-4)
    # after pooling and flattening, C5's column j sees channel j // 25 of act3
    expected = folded.c5.weight * scales["act3"].repeat_interleave(25).float() / scales[
        "act5"].float()[:, None]
    assert torch.allclose(normalised.c5.weight, expected)
    assert torch.allclose(normalised.c5.bias, folded.c5.bias / scales["act5"].float())


def test_channel_scales_come_from_the_per_channel_table():
    checkpoint = {"percentile": "99",
                  "percentiles": {"act1": {"99": 1.5}, "out": {"99": 7.0}},
                  "channel_percentiles": {"act1": {"99": [1.0, 0.0, 2.0]}, "out": {"99": [1, 2]}}}
    scales = activation_scales(checkpoint, "99", per_channel={"act1"})
    assert scales["act1"].tolist() == [1.0, 1.5, 2.0]  # a silent channel keeps the layer's
    assert scales["out"] == 7.0  # all classes share one scale
    assert activation_scales(checkpoint, "99") == {"act1": 1.5, "out": 7.0}
    with pytest.raises(UserError, match="no per-channel 99th percentile of act1"):
        activation_scales(checkpoint | {"channel_percentiles": {}}, "99", per_channel={"act1"})
    with pytest.raises(UserError, match="--norm channel and neuron need activation percentiles"):
        activation_scales(checkpoint | {"thresholds": {"act1": 0.8}}, None, per_channel={"act1"})


def test_norms_choose_the_layers_scaled_per_channel():
    for activation in ("relu", "qcfs"):
        model = LeNet5(activation)
        assert layer_scales.per_channel_layers(model, "layer") == set()
        assert layer_scales.per_channel_layers(model, "channel") == {"act1", "act3"}
        assert layer_scales.per_channel_layers(model, "neuron") == {"act1", "act3", "act5",
                                                                      "act6"}


def test_spiking_model_replaces_activations_and_pools():
    model = random_lenet()
    scales = {"act1": 2.0, "act3": 3.0, "act5": 4.0, "act6": 5.0, "out": 6.0}
    snn = fuse_norm_replace(model, scales, Settings(gamma=2, v0=0.0, lateral_inhibition=False,
                                                    readout="spikes"))
    kinds = {name: type(m).__name__ for name, m in snn.named_children()}
    assert kinds == {"c1": "Conv2d", "act1": "SpikeNode", "s2": "SMaxPool", "c3": "Conv2d",
                     "act3": "SpikeNode", "s4": "SMaxPool", "flatten": "Flatten",
                     "c5": "Linear", "act5": "SpikeNode", "f6": "Linear", "act6": "SpikeNode",
                     "out": "Linear", "readout": "SpikeNode"}
    assert snn.act3.gamma == 2 and snn.act3.v0 == 0.0 and not snn.s2.lateral_inhibition
    # C3 is scaled by lambda(act1) / lambda(act3), the output layer by lambda(act6) / lambda(out)
    assert torch.allclose(snn.c5.weight, model.c5.weight * 3.0 / 4.0)
    assert torch.allclose(snn.out.weight, model.out.weight * 5.0 / 6.0)
    assert torch.allclose(snn.out.bias, model.out.bias / 6.0)


def test_activation_scales_come_from_the_chosen_percentile():
    checkpoint = {"percentile": "99", "percentiles": {"act1": {"99": 1.5, "99.9": 2.5}}}
    assert activation_scales(checkpoint) == {"act1": 1.5}
    assert activation_scales(checkpoint, "99.9") == {"act1": 2.5}
    with pytest.raises(UserError, match=r"no 95th percentile \(it has: 99, 99.9\)"):
        activation_scales(checkpoint, "95")


def test_qcfs_checkpoint_scales_by_its_trained_thresholds():
    checkpoint = {"percentile": "99", "thresholds": {"act1": 0.8},
                  "percentiles": {"act1": {"99": 1.5}, "out": {"99": 7.0}}}
    assert activation_scales(checkpoint) == {"act1": 0.8, "out": 7.0}  # theta = lambda
    assert activation_scales(checkpoint, gamma=2) == {"act1": 0.4, "out": 7.0}  # lambda / gamma
    assert activation_scales(checkpoint, "99") == {"act1": 1.5, "out": 7.0}  # asked for


@pytest.mark.parametrize("levels", [1, 2, 4, 8])
def test_if_neuron_count_after_l_steps_is_the_qcfs_value(levels):
    """With theta = lambda and V0 = theta/2, L steps of a constant input give QCFS's output."""
    a = torch.rand(10_000) * 1.6 - 0.3
    node = SpikeNode(threshold=1.0, gamma=1, v0=0.5)
    count = sum(node(a) for _ in range(levels))
    with torch.no_grad():
        assert torch.equal(count / levels, QCFS(levels, threshold=1.0)(a))


@pytest.mark.parametrize("levels, per_channel", [(1, False), (2, False), (4, False), (4, True)])
def test_qcfs_network_is_exact_after_one_step_when_gamma_is_l(levels, per_channel):
    """theta = lambda / L and gamma = L: a neuron's spikes in one step are its QCFS value."""
    ann = random_lenet(activation="qcfs", levels=levels, channel_thresholds=per_channel)
    for act, threshold in zip((ann.act1, ann.act3, ann.act5, ann.act6), (0.5, 1.0, 0.3, 0.1),
                              strict=True):  # so that every layer has units on and off
        act.threshold.data.copy_(threshold * torch.linspace(0.8, 1.2, act.threshold.numel())
                                 .view_as(act.threshold))
    images = torch.rand(256, 1, 32, 32)
    checkpoint = {"thresholds": lenet5.thresholds(ann), "percentiles": {"out": {"99": 1.0}}}
    snn = fuse_norm_replace(ann, activation_scales(checkpoint, gamma=levels),
                            Settings(gamma=levels, v0=0.5))
    with torch.no_grad():
        logits, first = ann(images), next(simulate(snn, images, 1))
        hidden = nn.Sequential(*list(ann)[:-1])(images)  # the output layer's quantised input
    assert len(torch.unique(hidden)) > 1  # not all on or all off
    assert torch.allclose(first, logits, atol=1e-5)


# ----------------------------------------------------------------------------- spiking modules


@pytest.mark.parametrize("threshold", [1.0, 0.7])
@pytest.mark.parametrize("gamma", [1, 2])
def test_spike_rate_tends_to_the_clipped_activation(threshold, gamma):
    steps = 50
    a = torch.linspace(-0.5, 2.5 * threshold * gamma, 301)
    expected = torch.clamp(a / threshold, 0, gamma)
    for v0, bound in ((0.5, 1 / (2 * steps)), (0.0, 1 / steps)):
        node = SpikeNode(threshold=threshold, gamma=gamma, v0=v0)
        rate = sum(node(a) for _ in range(steps)) / steps
        assert (rate - expected).abs().max() <= bound + 1e-6
        if v0 == 0:
            assert (rate <= expected + 1e-6).all()  # V0 = 0 floors the rate
        assert node.counts.sum() == pytest.approx(rate.sum().item() * steps)


def test_spike_node_resets_to_zero_after_a_burst():
    node = SpikeNode(threshold=1.0, gamma=2, v0=0.0, reset="zero")
    assert node(torch.tensor([2.7])).item() == 2 and node.mem.item() == 0  # by subtraction: 0.7
    assert node(torch.tensor([0.6])).item() == 0 and node.mem.item() == pytest.approx(0.6)
    assert node(torch.tensor([3.5])).item() == 2 and node.mem.item() == 0  # 4.1: capped, then 0
    node = SpikeNode(threshold=0.5, gamma=1, v0=0.0, reset="zero")
    assert [node(torch.tensor([0.3])).item() for _ in range(6)] == [0, 1, 0, 1, 0, 1]


def _calibrated(currents, allowance, gamma=1):
    """Outputs of a calibrated SpikeNode (threshold 1, V0 = 0) driven by `currents`."""
    node = SpikeNode(gamma=gamma, v0=0.0, allowance=allowance)
    return node, [node(torch.tensor([float(c)])).item() for c in currents]


def test_spike_calibration_takes_back_an_early_over_estimate():
    # two spikes at t = 0, 1 (mean interval 0.5), then no input: with an allowance of 1 the
    # neuron is overdue from t = 3 on and emits -1 until its running total is 0.
    node, out = _calibrated([1, 1, 0, 0, 0, 0, 0], allowance=1)
    assert out == [1, 1, 0, -1, -1, 0, 0] and sum(out) == 0
    assert node.counts.sum() == 4  # |events|: a negative spike crosses its synapses too
    assert node.mem.item() == 0  # the potential is not touched
    _, out = _calibrated([1, 1, 0, 0, 0, 0, 0], allowance=3)  # more patience: overdue at t = 5
    assert out == [1, 1, 0, 0, 0, -1, -1]
    _, out = _calibrated([2.5, 0, 0, 0, 0], allowance=1, gamma=2)  # a burst counts as one spike
    assert out == [2, 0, -1, -1, 0]


def test_spike_calibration_leaves_a_regular_neuron_alone():
    _, out = _calibrated([0.5] * 12, allowance=1)  # one spike every second step
    assert out == [0, 1] * 6


def test_spike_calibration_silences_a_late_starter_as_braincog_does():
    # silent from step 0, a neuron is overdue from t = 2 on; its running total falls to -1, -2
    # (emitting 0), and its first spike, at t = 4, only brings the total back to -1.
    _, out = _calibrated([0, 0, 0, 0, 1, 0], allowance=1)
    assert out == [0, 0, 0, 0, 0, 0]


def test_spike_node_resets_by_subtraction():
    node = SpikeNode(threshold=1.0, gamma=1, v0=0.0)
    spikes = [node(torch.tensor([0.6])).item() for _ in range(5)]
    assert spikes == [0, 1, 0, 1, 1]  # 0.6, 1.2->0.2, 0.8, 1.4->0.4, 1.0->0.0
    assert node.mem.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_lateral_inhibition_pool_is_exact(gamma):
    torch.manual_seed(gamma)
    spikes = torch.randint(0, gamma + 1, (20, 3, 4, 8, 8)).float()
    pool = SMaxPool(2, lateral_inhibition=True)
    out = torch.stack([pool(x) for x in spikes])
    assert torch.equal(out.sum(0), F.max_pool2d(spikes.sum(0), 2))
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= gamma


def test_pool_without_inhibition_over_estimates_where_inhibition_is_exact():
    # one 2x2 window; a different unit spikes at each step: the true max count is 1
    steps = [torch.tensor(x).float() for x in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1])]
    outputs = {}
    for inhibition in (False, True):
        pool = SMaxPool(2, lateral_inhibition=inhibition)
        outputs[inhibition] = [pool(x.view(1, 1, 2, 2)).item() for x in steps]
    # without inhibition each step passes the input of the unit with the most input so far
    # (ties to the one spiking now): every spike gets through
    assert outputs[False] == [1, 1, 1]
    assert outputs[True] == [1, 0, 0]


@pytest.mark.parametrize("shape, k", [((2, 3, 7, 9), 2), ((1, 1, 5, 5), 3), ((4, 6, 28, 28), 2),
                                      ((3, 2, 2, 2), 2), ((2, 5, 11, 6), 4)])
def test_max_pool_equals_max_pool2d(shape, k):
    torch.manual_seed(k)
    x = torch.randn(shape)
    assert torch.equal(max_pool(x, k), F.max_pool2d(x, k))
    steps = torch.randn(3, *shape)  # any leading dims, as the layer-wise simulator uses it
    assert torch.equal(max_pool(steps, k), F.max_pool2d(steps.flatten(0, 1), k).unflatten(0, (3,
                                                                                         shape[0])))


def test_each_conversion_step_returns_a_new_network():
    model = random_lenet()
    scales = {name: 2.0 for name in ("act1", "act3", "act5", "act6", "out")}
    before = copy.deepcopy(model.state_dict())
    folded = lenet_convert.fold_batchnorm(model)
    normalised = normalise(folded, scales)
    snn = lenet_convert.replace_by_spiking(normalised, Settings(gamma=3))
    assert [n for n, _ in folded.named_children()] == [n for n, _ in model.named_children()
                                                         if not n.startswith("bn")]
    assert torch.equal(folded.c5.weight, model.c5.weight)  # normalise scaled its own copy
    assert torch.equal(normalised.c5.weight, snn.c5.weight) and snn.act5.gamma == 3
    assert isinstance(normalised.act5, nn.ReLU) and isinstance(normalised.s2, nn.MaxPool2d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("closed_form", [False, True])
def test_clean_mem_spike_makes_runs_repeatable(closed_form):
    snn = fuse_norm_replace(random_lenet(), {n: 1.0 for n in (*HIDDEN, "out")})
    images = torch.rand(8, 1, 32, 32)
    with torch.no_grad():
        first = torch.stack(list(simulate(snn, images, 10, closed_form)))
        assert snn.act3.mem is not None and snn.s4.acc is not None
        assert snn.act1.counts.sum() > 0 and snn.act3.counts.sum() > 0
        clean_mem_spike(snn)
        assert snn.act3.mem is None and snn.s4.acc is None and snn.act3.counts.sum() == 0
        assert snn.act1.counts.sum() == 0
        second = torch.stack(list(simulate(snn, images, 10, closed_form)))
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_snn_weights_a_partial_last_batch_by_its_size():
    # the "network" passes the image through: image [1, 0] predicts class 0
    snn = nn.Sequential(nn.Flatten(), nn.Identity())
    images = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]).view(3, 1, 1, 2)
    labels = torch.tensor([0, 0, 0])  # wrong, wrong | right
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    accuracy, _ = evaluate_snn(snn, batches, 3, "cpu")
    assert accuracy == pytest.approx([1 / 3] * 3)  # not the mean of batch accuracies, 0.5


def test_spiking_readout_breaks_ties_by_potential():
    readout = SpikeNode()
    readout.mem = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.1, 0.0]])
    counts = torch.tensor([[2.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    assert predict(counts, readout).tolist() == [2, 0]
    assert predict(counts, None).tolist() == [0, 0]


def test_first_step_within_and_report_steps():
    assert first_step_within([0.5, 0.989, 0.991, 0.99], 0.9915) == 3
    assert first_step_within([0.5, 0.6], 0.99) is None
    assert report_steps(64) == [1, 2, 4, 8, 16, 32, 64]
    assert report_steps(10) == [1, 2, 4, 8, 10]


# ----------------------------------------------------------------------------- end to end


def test_converted_network_reaches_its_ann(trained, tmp_path):
    result = lenet_convert.main(["--checkpoint", str(trained), "--limit", "1000",
                                 "--timesteps", "64", "--device", "cpu",
                                 "--data-dir", str(DATA), "--out-dir", str(tmp_path)])
    assert result["ann_accuracy"] > 0.9
    assert result["snn_accuracy"][-1] >= result["ann_accuracy"] - 0.01
    saved = json.loads((tmp_path / "snn_accuracy.json").read_text())
    assert saved["snn_accuracy"] == result["snn_accuracy"] and len(saved["snn_accuracy"]) == 64
    for key in ("ann_accuracy", "timesteps", lenet_convert.AT_ANN_LEVEL_KEY, "settings",
                "checkpoint"):
        assert key in saved
    defaults = Settings(percentile=percentile_key(PERCENTILE))._asdict()
    assert saved["settings"] == defaults | {"activation": "relu", "levels": None,
                                            "input_neuron": None, "trained_input_levels": None}
    efficiency = saved["efficiency"]
    assert efficiency["ann_macs_per_image"] == 416_520 and len(efficiency["snn_energy_pj"]) == 64
    assert set(efficiency["firing_rate"]) == {"act1", "act3", "act5", "act6"}
    for name in ("snn_accuracy.png", "snn_efficiency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_qcfs_checkpoint_converts_with_its_thresholds(qcfs, tmp_path):
    result = lenet_convert.main(["--checkpoint", str(qcfs), "--limit", "500", "--timesteps", "8",
                                 "--data-dir", str(DATA), "--out-dir", str(tmp_path)])
    assert result["settings"]["percentile"] is None and result["settings"]["levels"] == 2
    assert result["settings"]["v0"] == 0.5 and result["settings"]["gamma"] == 2  # gamma = L
    assert result["settings"]["default"] == options.QCFS_DEFAULT_REASON  # what it is and why
    assert result["snn_accuracy"][-1] >= result["ann_accuracy"] - 0.02


def test_old_checkpoint_gets_its_per_channel_percentiles_measured(trained, tmp_path, capsys):
    old = tmp_path / "old.pt"
    checkpoint = torch.load(trained, weights_only=True)
    recorded = checkpoint.pop("channel_percentiles")
    checkpoint.pop("calibration_images")
    torch.save(checkpoint, old)
    argv = ["--limit", "200", "--timesteps", "4", "--norm", "neuron", "--data-dir", str(DATA),
            "--out-dir", str(tmp_path)]
    new_run = lenet_convert.main(["--checkpoint", str(trained), *argv])
    assert "no per-channel percentiles" not in capsys.readouterr().out
    old_run = lenet_convert.main(["--checkpoint", str(old), *argv])
    assert f"{old} has no per-channel percentiles: measuring them" in capsys.readouterr().out
    assert old_run["settings"]["norm"] == "neuron"
    assert old_run["snn_accuracy"] == new_run["snn_accuracy"]
    assert old_run["efficiency"]["synops_per_image"] == new_run["efficiency"]["synops_per_image"]
    measured = remeasure_percentiles(checkpoint, lenet5.model_from_checkpoint(checkpoint), DATA,
                                     "cpu")
    assert measured == (checkpoint["percentiles"], recorded)  # what lenet5.py recorded
    assert torch.load(old, weights_only=True).keys() == checkpoint.keys()  # the file unchanged


def test_channel_norm_reset_and_calibration_reach_the_json_and_the_plots(trained, tmp_path,
                                                                         monkeypatch):
    titles = []

    def save_figure(fig, path):
        titles.append(fig.get_suptitle())
        path.write_text("a figure")
    for module in (lenet_convert, efficiency):
        monkeypatch.setattr(module, "save_figure", save_figure)
    result = lenet_convert.main(["--checkpoint", str(trained), "--limit", "200",
                                 "--timesteps", "8", "--norm", "channel", "--reset", "zero",
                                 "--spicalib", "4", "--data-dir", str(DATA),
                                 "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "snn_accuracy.json").read_text())
    assert {k: saved["settings"][k] for k in ("norm", "reset", "spicalib")} == {
        "norm": "channel", "reset": "zero", "spicalib": 4}
    text = ("p=99 per channel, γ=2, V0=0.5θ, reset to 0, lateral inhibition on, analog read-out, "
            "spike calibration 4")
    assert settings_text(saved["settings"]) == text
    assert len(titles) == 2 and all(title.endswith(text) for title in titles)
    assert result["snn_accuracy"][-1] > 0.5  # far above chance, though not at the ANN's level


def test_spiking_readout_agrees_with_the_analog_one(trained, tmp_path):
    runs = {readout: lenet_convert.main(["--checkpoint", str(trained), "--limit", "500",
                                         "--timesteps", "32", "--readout", readout, "--v0", "0.25",
                                         "--data-dir", str(DATA), "--out-dir", str(tmp_path)])
            for readout in ("analog", "spikes")}
    spikes, analog = runs["spikes"], runs["analog"]
    assert spikes["settings"]["readout"] == "spikes" and spikes["settings"]["v0"] == 0.25
    assert abs(spikes["snn_accuracy"][-1] - analog["snn_accuracy"][-1]) <= 0.004  # 2 images
    assert spikes["snn_accuracy"][-1] >= spikes["ann_accuracy"] - 0.006


# ----------------------------------------------------------------------------- bad input


def _corrupt(path):
    path.write_bytes(path.read_bytes()[:1000])


def _other_arch(path):
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_state"]["c5.weight"] = torch.zeros(100, 400)
    torch.save(checkpoint, path)


def _changed(change):
    """A spoiler that loads the checkpoint, applies `change` to it and saves it again."""
    def spoil(path):
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)
    return spoil


def _set(layer, values):
    """A change that sets the lowest recorded percentiles of `layer` to `values`."""
    def change(checkpoint):
        table = checkpoint["percentiles"][layer]
        table.update(zip(table, values, strict=False))
    return change


def _scaled(factor):
    """A change that multiplies every recorded percentile of the hidden layers by `factor`."""
    def change(checkpoint):
        for name in ("percentiles", "channel_percentiles"):
            for layer in HIDDEN:
                table = checkpoint[name][layer]
                table.update({key: (value * factor if isinstance(value, float)
                                    else [v * factor for v in value])
                              for key, value in table.items()})
    return change


# One row per bad input: the network (the conftest's), how its file is spoiled, the arguments,
# and what the one line must say. The values themselves are checked by `check_checkpoint` (one
# row each in test_checkpoint.py); these rows show the converter stops on them.
BAD_INPUT = [
    ("trained", Path.unlink, [], "no checkpoint at .*: train one first with `python lenet5.py`"),
    ("trained", lambda p: p.write_text("hello"), [], "is not a readable checkpoint"),
    ("trained", _corrupt, [], "is not a readable checkpoint"),
    ("trained", lambda p: torch.save([1, 2], p), [], "not a checkpoint of lenet5.py"),
    ("trained", _other_arch, [], "weights do not fit LeNet5"),
    ("trained", _changed(lambda ck: ck.pop("percentiles")), [], "holds no activation percentil"),
    ("trained", _changed(lambda ck: ck["model_state"]["c3.weight"].fill_(float("nan"))), [],
     r"layer c3 holds NaN or infinite values \(c3.weight\)"),
    ("trained", _changed(lambda ck: ck["percentiles"]["act5"].update({"99": float("inf")})), [],
     r"percentiles\['act5'\]\['99'\] is inf, not a finite"),
    ("trained", _changed(lambda ck: ck.update(thresholds={"act1": -1.0})), [],
     "thresholds is .*, not positive numbers"),
    ("qcfs", _changed(lambda ck: ck.pop("thresholds")), [], "thresholds names \\[\\], but the"),
    ("qcfs", _changed(lambda ck: ck["model_state"]["act3.threshold"].fill_(0.0)), [],
     "act3.threshold in the weights is 0.0, not positive"),
    ("trained", _changed(lambda ck: ck["args"].update(val_size=10**9)),
     ["--exit-rule", "margin"], "args.val_size is 1000000000, not an integer in"),
    ("trained", _changed(lambda ck: ck.update(calibration_images=-5) or ck.pop(
        "channel_percentiles")), ["--norm", "neuron"], "calibration_images is -5"),
    ("trained", _changed(lambda ck: ck.update(seed="1") or ck.pop("channel_percentiles")),
     ["--norm", "neuron"], "seed is '1', not an integer"),
    ("trained", _changed(lambda ck: ck.update(seed=-1)), [], "seed is -1, not an integer"),
    ("trained", _changed(_set("act1", [1e-30, 1.0, 2.0])), [], "implausibly small"),
    ("trained", _changed(_set("out", [0.0, 1.0, 2.0])), ["--readout", "spikes"],
     "the output layer's scale is 0: a spiking read-out needs a positive one"),
    ("trained", _changed(_set("out", [-4.0, -3.0, -2.0])), ["--readout", "spikes"],
     "the output layer's scale is -4: a spiking read-out needs a positive one"),
    ("trained", None, ["--percentile", "95"], "no 95th percentile"),
    ("trained", _changed(lambda ck: ck["channel_percentiles"]["act5"].update({"99": [1.0, None]})),
     ["--norm", "channel"], r"channel_percentiles\['act5'\]\['99'\] is \[1.0, None\], not a"),
    ("trained", _changed(lambda ck: ck["channel_percentiles"]["act5"].update(
        {key: [1.0, 2.0] for key in ck["channel_percentiles"]["act5"]})),
     ["--norm", "neuron"], r"channel_percentiles\['act5'\] has 2 values per percentile, not one"),
    ("trained", _changed(lambda ck: ck["model_state"]["bn1.running_var"].fill_(-1.0)), [],
     r"layer bn1 has a negative variance \(bn1.running_var\)"),
    ("trained", _changed(lambda ck: ck.update(seed=10**400)), [], "seed is 1000.*, not an int"),
    ("qcfs", _changed(lambda ck: ck.pop("levels")), [], "a QCFS checkpoint without its levels L"),
    ("trained", _changed(lambda ck: [t.pop("out") for t in (ck["percentiles"],
                                                           ck["channel_percentiles"])]),
     ["--readout", "spikes"], r"percentiles names the layers \['act1', 'act3', 'act5', 'act6'\]"),
    ("trained", _changed(lambda ck: ck.pop("percentiles") and ck.pop("channel_percentiles")),
     ["--norm", "channel"], "holds no activation percentiles"),
    ("trained", _changed(_scaled(1e6)), [], r"percentiles\['act1'\]\['100'\] is .*, but the "
     "largest activation on its 2048 calibration images is .*: the table does not belong"),
    ("trained", _changed(_scaled(1e-6)), ["--percentile", "99.9"], "does not belong to these"),
    ("qcfs", _changed(_scaled(3.0)), [], "does not belong to these weights"),
]


@pytest.mark.parametrize("network, spoil, argv, message", BAD_INPUT)
def test_bad_input_gives_one_line_and_keeps_old_results(network, spoil, argv, message, tmp_path,
                                                       request):
    checkpoint = tmp_path / "ck.pt"
    checkpoint.write_bytes(request.getfixturevalue(network).read_bytes())
    if spoil:
        spoil(checkpoint)
    out = tmp_path / "results"
    out.mkdir()
    (out / "snn_accuracy.json").write_text('{"from": "an earlier run"}')
    for out_dir in (out, tmp_path / "new" / "results"):  # a folder that is not there yet too
        with pytest.raises(SystemExit) as exit_info:
            lenet_convert.main(["--checkpoint", str(checkpoint), "--out-dir", str(out_dir),
                                "--data-dir", str(DATA), "--timesteps", "4", *argv])
        text = str(exit_info.value.code)
        assert text.startswith("lenet_convert.py: error:") and "\n" not in text
        assert re.search(message, text)
    assert (out / "snn_accuracy.json").read_text() == '{"from": "an earlier run"}'
    assert sorted(p.name for p in out.iterdir()) == ["snn_accuracy.json"]
    assert not (tmp_path / "new").exists()  # "nothing written" holds literally


@pytest.mark.parametrize("argv, message", [
    (["--timesteps", "0"], r"--timesteps: must be in \[1, 100000\], got 0"),
    (["--timesteps", str(10**20)], r"--timesteps: must be in \[1, 100000\], got 1000"),
    (["--v0", "1"], r"--v0: must be in \[0, 1\)"),
    (["--v0", "-0.1"], r"--v0: must be in \[0, 1\)"),
    (["--gamma", "0"], r"--gamma: must be in \[1, 1024\]"),
    (["--gamma", str(10**20)], r"--gamma: must be in \[1, 1024\]"),
    (["--batch-size", str(10**9)], r"--batch-size: must be in \[1, 10000\]"),
    (["--limit", "0"], r"--limit: must be in \[1, 10000\]"),
    (["--limit", "20000"], r"--limit: must be in \[1, 10000\], got 20000"),
    (["--readout", "votes"], "--readout: invalid choice"),
    (["--percentile", "-1"], r"--percentile: must be in \(0, 100\]"),
    (["--spicalib", "-1"], r"--spicalib: must be in \[0, 100000\]"),
    (["--spicalib", str(10**20)], r"--spicalib: must be in \[0, 100000\]"),
    (["--spicalib", "two"], "--spicalib: expected an integer >= 0, got 'two'"),
    (["--norm", "foo"], "--norm: invalid choice: 'foo'"),
    (["--reset", "half"], "--reset: invalid choice: 'half'"),
    (["--exit-rule", "margin", "--exit-threshold", "-1"], "margin needs X > 0, got -1"),
    (["--exit-rule", "confidence", "--exit-threshold", "1.5"],
     "confidence needs 0 < X < 1, got 1.5"),
    (["--exit-threshold", "0.5"], "--exit-threshold: needs --exit-rule margin or confidence"),
    (["--exit-rule", "margin", "--exit-margin", "0"], "--exit-margin: must be a positive number"),
    (["--exit-rule", "votes"], "--exit-rule: invalid choice"),
    (["--exit-rule", "margin", "--exit-deadline", "65"],
     "--exit-deadline: 65 is beyond --timesteps 64"),
    (["--exit-deadline", "3"], "--exit-deadline: needs --exit-rule margin or confidence"),
    (["--out-dir", ""], "argument --out-dir: expected a path, got ''"),
    (["--compare", "x.pt", "./x.pt"], "--compare: each checkpoint once"),
    (["--compare", str(CHECKPOINT)], r"--compare: each checkpoint once \(--checkpoint is"),
])
def test_bad_arguments_give_one_line(argv, message, capsys):
    check_refused(lenet_convert.main, argv, message, capsys)


def test_channel_norm_of_a_qcfs_network_needs_a_percentile(qcfs, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        lenet_convert.main(["--checkpoint", str(qcfs), "--norm", "channel",
                            "--data-dir", str(DATA), "--out-dir", str(tmp_path)])
    assert "--norm channel and neuron need activation percentiles" in str(exit_info.value.code)
    assert not list(tmp_path.iterdir())


def test_unwritable_out_dir_fails_before_simulating(trained, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot write to"):
        lenet_convert.main(["--checkpoint", str(trained), "--out-dir", str(tmp_path / "file/x")])


@pytest.mark.parametrize("module, must_not_load", [
    ("lenet_convert", ("compare", "early_exit")),  # the core never needs a feature ...
    ("efficiency", ("lenet_convert", "compare", "early_exit")),  # ... and measures with a leaf
])
def test_the_core_loads_no_feature_module(module, must_not_load):
    done = run_command("-c", f"import sys, {module}; print(sorted(set({must_not_load!r}) & "
                             "set(sys.modules)))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def _project_imports():
    """{module: {project module it imports: whether only to hand over}} for every .py of the
    project (bench/ included), read from the source. An import is a hand-over when it sits in a
    function named `main` or under `if __name__ == "__main__":`."""
    files = {p.stem: p for p in (*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"))}
    graph = {name: {} for name in files}
    for name, path in files.items():
        pending = [(ast.parse(path.read_text()), False)]
        while pending:
            node, handing_over = pending.pop()
            handing_over = handing_over or (
                isinstance(node, ast.FunctionDef) and node.name == "main"
                or isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = ([node.module] if isinstance(node, ast.ImportFrom)
                           else [alias.name for alias in node.names])
                for target in set(targets) & set(files) - {name}:
                    graph[name][target] = graph[name].get(target, True) and handing_over
            pending += [(child, handing_over) for child in ast.iter_child_nodes(node)]
    return graph


def test_no_import_cycle_and_nothing_below_the_entry_script_imports_it():
    graph = _project_imports()
    plain = {module: {t for t, handed in edges.items() if not handed}
             for module, edges in graph.items()}
    done, active = set(), []

    def walk(module):  # depth first: a module met again while still on the path is a cycle
        assert module not in active, "import cycle: " + " -> ".join(active + [module])
        if module not in done:
            active.append(module)
            for target in sorted(plain[module]):
                walk(target)
            active.pop()
            done.add(module)
    for module in sorted(plain):
        walk(module)
    below, frontier = set(), {"lenet_convert"}
    while frontier:
        frontier = set().union(*(plain[m] for m in frontier)) - below
        below |= frontier
    assert {"options", "layer_scales", "constant_input", "counting", "efficiency", "lenet5",
            "checkpoint", "cli", "percentile_tables"} <= below  # what the core is built on ...
    assert not below & {"compare", "early_exit", "look_inside"}  # ... no feature among it ...
    assert [m for m in below if "lenet_convert" in graph[m]] == []  # ... nor, at all, the core


# ----------------------------------------------------------------------------- the first layer


def _stepped_counts(current, steps, gamma, v0):
    """SpikeNode's spikes after each step 1..steps: [steps, *current.shape]."""
    neuron, total, counts = SpikeNode(gamma=gamma, v0=v0), torch.zeros_like(current), []
    for _ in range(steps):
        total = total + neuron(current)
        counts.append(total)
    return torch.stack(counts)


def _hard_currents(steps, gamma, v0):
    """Currents where the closed form is hardest: v0 + t I at, and a few ulps around, whole
    numbers for every t, negative ones, zero, above gamma, and random ones."""
    torch.manual_seed(0)
    t = torch.arange(1, steps + 1, dtype=torch.float32)[:, None]
    k = torch.arange(0, gamma * steps + 2, dtype=torch.float32)[None]
    whole = ((k - v0) / t).flatten()
    whole = whole[(whole > -1) & (whole < gamma + 1)]
    around = torch.cat([torch.nextafter(whole, torch.tensor(side)) for side in (-9.0, 9.0)])
    return torch.cat([whole, around, torch.nextafter(around, 2 * around), -torch.rand(50),
                      torch.zeros(3), gamma + 3 * torch.rand(50), (gamma + 1) * torch.rand(2000)])


@pytest.mark.parametrize("gamma", [1, 2, 3, 8])
@pytest.mark.parametrize("v0", [0.0, 0.25, 0.5, 1 - 2**-24])
def test_constant_input_spikes_are_the_spike_nodes_count(gamma, v0):
    current = _hard_currents(24, gamma, v0)
    stepped = _stepped_counts(current, 24, gamma, v0)
    neuron = SpikeNode(gamma=gamma, v0=v0)
    for t in (1, 2, 7, 24):
        assert torch.equal(constant_input.constant_input_spikes(current, t, neuron),
                           stepped[t - 1]), t
    per_image = torch.randint(1, 25, (len(current),))  # early exit: each its own number of steps
    assert torch.equal(constant_input.constant_input_spikes(current, per_image, neuron),
                       stepped.gather(0, (per_image - 1)[None])[0])
    assert neuron.mem is None and neuron.length == 0  # a description: never stepped itself


@pytest.mark.parametrize("gamma, v0", [(1, 0.5), (2, 0.0), (4, 0.5), (3, 0.9)])
def test_pool_of_constant_input_neurons_fires_as_one_neuron_on_the_pooled_input(gamma, v0):
    """SMaxPool(SpikeNode(I)) gives step by step the spikes of a SpikeNode fed maxpool(I)."""
    current = _hard_currents(16, gamma, v0)[:2048].view(2, 4, 16, 16)
    current = current[:, :, torch.randperm(16)]  # neighbours in a window: unrelated values
    neuron, pool, pooled = SpikeNode(gamma=gamma, v0=v0), SMaxPool(2), SpikeNode(gamma=gamma,
                                                                                 v0=v0)
    for _ in range(16):
        assert torch.equal(pool(neuron(current)), pooled(max_pool(current, 2)))


@pytest.mark.parametrize("settings", [{}, {"gamma": 1, "v0": 0.0}, {"gamma": 4},
                                      {"readout": "spikes"}, {"norm": "channel"}])
def test_closed_form_and_stepped_paths_fire_the_same_spikes(trained, settings):
    checkpoint = load_checkpoint(trained)
    ann = lenet5.model_from_checkpoint(checkpoint)
    snn = lenet_convert.build_snn(checkpoint, ann, options.default_settings(
        checkpoint)._replace(**settings))
    assert constant_input.in_closed_form(snn)
    images = mnist.load_mnist(DATA, train=False)[0][:300].unsqueeze(1).float() / 255
    runs = {}
    for closed_form in (True, False):
        pooled = []  # what enters c3 at each step: the pool's spikes
        hook = snn.c3.register_forward_pre_hook(lambda _, x, pooled=pooled: pooled.append(x[0]))
        with torch.no_grad():
            outputs = torch.stack(list(lenet_convert.simulate(snn, images, 12, closed_form)))
        hook.remove()
        runs[closed_form] = outputs, torch.stack(pooled), {
            name: m.counts.clone() for name, m in counting_modules(snn).items()}
    (fast, fast_pooled, fast_counts), (stepped, stepped_pooled, stepped_counts) = runs.values()
    assert torch.equal(fast, stepped) and torch.equal(fast_pooled, stepped_pooled)
    assert fast_pooled.sum() > 0
    assert len(fast_counts["act1"]) == 1 and len(stepped_counts["act1"]) == 12  # all steps in one
    for name, counts in fast_counts.items():
        assert torch.equal(counts.sum(0), stepped_counts[name].sum(0)), name
        assert name == "act1" or torch.equal(counts, stepped_counts[name]), name


@pytest.mark.parametrize("settings", [{"reset": "zero"}, {"spicalib": 2},
                                      {"lateral_inhibition": False}])
def test_settings_outside_the_closed_form_step_every_layer(settings):
    snn = fuse_norm_replace(random_lenet(), dict.fromkeys((*HIDDEN, "out"), 1.0),
                            Settings(**settings))
    assert not constant_input.in_closed_form(snn)
    first, steps = constant_input.stages(snn)
    assert list(first) == [snn.c1] and list(steps) == list(snn)[1:]


# ----------------------------------------------------------------------------- results as a set


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device", "a file")


@pytest.mark.parametrize("argv, module, breaks", [
    ([], efficiency, "plot_efficiency"),  # after the first figure
    ([], cli, "write_json"),  # after both figures
    (["--exit-rule", "margin"], early_exit, "plot_early_exit"),  # after the three usual files
    (["--exit-rule", "margin"], cli.FileSet, "check"),  # when they are moved into place
])
def test_a_run_that_fails_while_writing_leaves_every_earlier_file(trained, tmp_path, monkeypatch,
                                                                   argv, module, breaks):
    out = tmp_path / "results"
    argv = ["--checkpoint", str(trained), "--limit", "60", "--timesteps", "4", "--data-dir",
            str(DATA), "--out-dir", str(out), *argv]
    lenet_convert.main(argv)  # an earlier, complete run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == (5 if "--exit-rule" in argv else 3)
    monkeypatch.setattr(module, breaks, _disk_full)
    with pytest.raises(SystemExit, match="No space left on device"):
        lenet_convert.main([*argv, "--timesteps", "5"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not one file replaced


def test_an_out_dir_file_that_is_a_folder_is_named_and_nothing_replaced(trained, tmp_path):
    out = tmp_path / "results"
    argv = ["--checkpoint", str(trained), "--limit", "60", "--timesteps", "4", "--data-dir",
            str(DATA), "--out-dir", str(out)]
    lenet_convert.main(argv)
    (out / "snn_accuracy.json").unlink()
    (out / "snn_accuracy.json").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match="snn_accuracy.json is a folder where this run writes"):
        lenet_convert.main([*argv, "--timesteps", "5"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _memory_entries(trained, tmp):
    """Every command that simulates or records: (its main, its arguments), small runs all."""
    import bench_snn
    import energy
    import recipes
    import seeds
    convert = ["--checkpoint", str(trained), "--data-dir", str(DATA), "--out-dir", str(tmp / "o")]
    study = ["--seeds", "1", "--limit-train", "1000", "--epochs", "1", "--workers", "0",
             "--data-dir", str(DATA), "--checkpoint-dir", str(tmp / "ck"), "--out-dir",
             str(tmp / "o")]
    return {
        "plain": (lenet_convert.main, convert),
        "compare": (lenet_convert.main, [*convert, "--compare"]),
        "early exit": (lenet_convert.main, [*convert, "--exit-rule", "margin"]),
        "look inside": (lenet_convert.main, [*convert, "--look-inside", "0", "--limit", "1"]),
        "benchmark": (bench_snn.main, ["--checkpoint", str(trained), "--data-dir", str(DATA),
                                       "--out", str(tmp / "o" / "b.json"), "--timesteps", "2"]),
        "seeds study": (seeds.main, [*study, "--timesteps", "2", "--limit", "100"]),
        "energy study": (energy.main, [*study, "--timesteps", "2", "--limit", "100"]),
        "recipes study": (recipes.main, study),
    }


@pytest.mark.parametrize("entry", ["plain", "compare", "early exit", "look inside", "benchmark",
                                   "seeds study", "energy study", "recipes study"])
def test_every_command_that_simulates_checks_its_memory_first(entry, trained, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.setattr(cli, "available_memory", lambda: 2**20)  # any simulation needs more
    main, argv = _memory_entries(trained, tmp_path)[entry]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert re.fullmatch(r"\S+\.py: error: \d+ steps over \d+ images? needs about [\d.]+ GB of "
                        r"memory, but this machine has 0.0 GB free", exit_info.value.code)
    out = capsys.readouterr().out
    assert "simulating" not in out and "training" not in out  # refused before either began
    assert not (tmp_path / "o").exists() and not (tmp_path / "ck").exists()


def test_the_memory_estimate_grows_with_the_steps_a_look_inside_keeps(trained, tmp_path,
                                                                     monkeypatch, capsys):
    """--look-inside keeps every step of what it draws: the issue's T = 100000 is refused."""
    monkeypatch.setattr(cli, "available_memory", lambda: 16 * 2**30)
    argv = ["--checkpoint", str(trained), "--data-dir", str(DATA), "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="100000 steps over 1 image needs about"):
        lenet_convert.main([*argv, "--look-inside", "0", "--limit", "1", "--timesteps", "100000"])
    assert lenet_convert.main([*argv, "--limit", "1", "--timesteps", "100000"])  # a plain run
    # keeps its counts only: the same T fits


def test_integer_options_state_their_range_in_the_help(capsys):
    with pytest.raises(SystemExit):
        lenet_convert.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "simulation steps T; 1 to 100000 (default: 64)" in help_text
    assert "; 1 to 1024" in help_text  # --gamma


def test_qcfs_network_converts_with_percentiles_per_channel(qcfs, tmp_path):
    """The pair --norm channel --percentile that the error for --norm channel alone proposes."""
    checkpoint = load_checkpoint(qcfs)
    ann = lenet5.model_from_checkpoint(checkpoint)
    scales = activation_scales(checkpoint, "99", per_channel=layer_scales.per_channel_layers(
        ann, "channel"))
    assert scales["act1"].shape == (6,)
    normalised = normalise(fold_batchnorm(ann), scales)
    images = torch.rand(16, 1, 32, 32)
    with torch.no_grad():  # lambda over the channel's scale: the same function
        assert torch.allclose(normalised(images), ann(images), atol=1e-4)
    result = lenet_convert.main(["--checkpoint", str(qcfs), "--norm", "channel", "--percentile",
                                 "99", "--limit", "60", "--timesteps", "4", "--data-dir",
                                 str(DATA), "--out-dir", str(tmp_path)])
    assert result["settings"]["norm"] == "channel" and result["settings"]["percentile"] == "99"
