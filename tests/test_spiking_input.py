"""The image as spikes: the input layer, its closed form, training on its levels, its energy."""

import json
from fractions import Fraction

import pytest
import torch
from helpers import DATA, HIDDEN, check_refused, random_lenet

import constant_input
import efficiency
import lenet5
import lenet_convert
from checkpoint import MAX_INPUT_LEVELS, load_checkpoint, save_checkpoint
from cli import UserError
from layer_scales import activation_scales
from lenet_convert import (
    INPUT_NODE,
    SpikeNode,
    SpikingInput,
    build_snn,
    evaluate_snn,
    load_ann,
    simulate,
)
from mnist import Batches, load_mnist
from options import INPUT_LEVELS, Settings, default_settings

PIXELS = torch.arange(256, dtype=torch.float32) / 255  # every value an MNIST pixel takes
LEVELS = (1, 2, 3, 4, 5, 7, 8, 16, 100, MAX_INPUT_LEVELS)


def _stepped(neuron, image, steps):
    """The cumulative spikes of `neuron` after each of `steps` steps on `image`: [T, ...]."""
    return torch.stack([neuron(image) for _ in range(steps)]).cumsum(0)


@pytest.mark.parametrize("levels", LEVELS)
def test_first_step_spikes_are_the_image_on_its_levels(levels):
    """At t = 1 each pixel fires floor(x L_in + 1/2), bit for bit, which is x rounded to the
    nearest of L_in levels in exact arithmetic (no pixel value lies half-way)."""
    first = SpikingInput(levels)(PIXELS)
    assert torch.equal(first, torch.floor(PIXELS * levels + 0.5))
    assert torch.equal(first, efficiency.input_spikes(PIXELS, levels))
    exact = [int(Fraction(k, 255) * levels + Fraction(1, 2)) for k in range(256)]
    assert first.tolist() == exact
    assert first.max() == levels  # a white pixel fires the burst limit


@pytest.mark.parametrize("levels", LEVELS)
def test_the_input_layers_closed_form_is_stepping_it(levels):
    """The input layer is a SpikeNode fed the constant x L_in, so its counts have the closed
    form of constant_input.py: equal to stepping it bit for bit, every step, every pixel value;
    and its rate tracks the pixel."""
    images = torch.cat([PIXELS, torch.rand(768)]).view(1, 1, 32, 32)
    neuron, steps = SpikingInput(levels), 40
    stepped = _stepped(neuron, images, steps)
    for t in range(1, steps + 1):
        closed = constant_input.constant_input_spikes(images * levels, t,
                                                      SpikeNode(gamma=levels, v0=0.5))
        assert torch.equal(closed, stepped[t - 1]), t
    assert (stepped[-1] / (steps * levels) - images).abs().max() <= 1 / (steps * levels)


def test_the_snn_takes_the_image_as_spikes_and_c1_is_stepped():
    snn = lenet_convert.fuse_norm_replace(random_lenet(), dict.fromkeys((*HIDDEN, "out"), 1.0),
                                          Settings(input_levels=4))
    assert isinstance(snn[0], SpikingInput) and list(snn._modules)[:2] == [INPUT_NODE, "c1"]
    assert not constant_input.in_closed_form(snn)
    first, steps = constant_input.stages(snn)
    assert len(first) == 0 and list(steps) == list(snn)
    analog = lenet_convert.fuse_norm_replace(random_lenet(), dict.fromkeys((*HIDDEN, "out"), 1.0))
    assert torch.equal(snn.c1.weight, analog.c1.weight / 4)  # a spike is 1/4 of a pixel
    assert torch.equal(snn.c1.bias, analog.c1.bias)


@pytest.mark.parametrize("levels, input_levels", [(2, 1), (4, 3), (4, 8), (8, 16)])
def test_qcfs_network_on_its_input_levels_is_exact_after_one_step(levels, input_levels):
    """With gamma = L and the input layer's L_in the network was trained with, the first step's
    output is the ANN's logits: the input spikes are the image's levels, every layer's its QCFS
    levels."""
    ann = random_lenet(activation="qcfs", levels=levels)
    ann.input_levels = input_levels
    for act, threshold in zip((ann.act1, ann.act3, ann.act5, ann.act6), (0.5, 1.0, 0.3, 0.1),
                              strict=True):
        act.threshold.data.fill_(threshold)
    images = torch.rand(256, 1, 32, 32)
    checkpoint = {"thresholds": lenet5.thresholds(ann), "percentiles": {"out": {"99": 1.0}}}
    snn = lenet_convert.fuse_norm_replace(ann, activation_scales(checkpoint, gamma=levels),
                                          Settings(gamma=levels, input_levels=input_levels))
    with torch.no_grad():
        logits, first = ann(images), next(simulate(snn, images, 1))
    assert torch.allclose(first, logits, atol=1e-5)
    assert not torch.allclose(first, random_lenet(activation="qcfs", levels=levels)(images))


@pytest.fixture(scope="module")
def on_levels(trained, tmp_path_factory):
    """A QCFS network (L = 4) fine-tuned from `trained` on the image rounded to 4 levels."""
    path = tmp_path_factory.mktemp("on_levels") / "qcfs.pt"
    lenet5.main(["--activation", "qcfs", "--levels", "4", "--input-levels", "4", "--init-from",
                 str(trained), "--epochs", "1", "--limit-train", "1000", "--val-size", "500",
                 "--device", "cpu", "--data-dir", str(DATA), "--checkpoint", str(path),
                 "--energy-weight", "0.05"])
    return path


def test_training_estimate_is_the_simulators_count_with_spiking_input(on_levels):
    """The first-step energy lenet5.py trains against counts the input spikes' accumulates into
    C1, not its MACs: what the simulator counts at t = 1, layer by layer."""
    checkpoint, ann = load_ann(on_levels, "cpu")
    assert checkpoint["input_levels"] == 4 and ann.input_levels == 4
    settings = default_settings(checkpoint)
    assert settings.input_levels == 4 and settings.gamma == 4  # as it was trained
    images, labels = load_mnist(DATA, train=False)
    batches = Batches(images[:300], labels[:300], batch_size=100)
    snn = build_snn(checkpoint, ann, settings)
    _, counts = evaluate_snn(snn, batches, 1, "cpu")
    counted = efficiency.efficiency(snn, counts, 300, 1, lenet_convert.neuron_names(snn),
                                    efficiency.input_shapes(ann))
    assert counted["first_layer_macs"] == 0 and "input" in counted["firing_rate"]
    fanouts, x = efficiency.fan_outs(ann), torch.cat([batch for batch, _ in batches])
    with torch.no_grad():
        _, spikes = efficiency.first_step_spikes(ann.eval(), x)
        energy = efficiency.first_step_energy(ann, x, fanouts)[1]
    assert set(spikes) == set(counted["synops_by_layer"]) == {"c1", "c3", "c5", "f6", "out"}
    assert torch.equal(spikes["c1"], efficiency.input_spikes(x, 4))
    assert torch.equal(counts[INPUT_NODE][0], spikes["c1"].sum(0))  # the same input spikes
    for name, ops in counted["synops_by_layer"].items():
        estimated = efficiency.synops_of({name: spikes[name]}, fanouts).mean().item()
        assert estimated == pytest.approx(ops[0], rel=1e-6), name
    assert energy.mean().item() == pytest.approx(counted["snn_energy_pj"][0], rel=1e-6)
    assert counted["snn_energy_pj"][0] < 0.5 * counted["ann_energy_pj"]


def test_a_run_with_spiking_input_records_the_input_layer(trained, tmp_path, capsys):
    """An analog-trained network converted with --input spikes: a note says so; the JSON records
    the input layer's neurons, its firing rate and its SynOps into C1, and no MACs."""
    out = tmp_path / "out"
    result = lenet_convert.main(["--checkpoint", str(trained), "--input", "spikes",
                                 "--timesteps", "16", "--limit", "300", "--device", "cpu",
                                 "--data-dir", str(DATA), "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert (f"{trained} was trained on the analog image and is converted to take the image as "
            f"spikes (L_in = {INPUT_LEVELS})") in printed
    saved = json.loads((out / "snn_accuracy.json").read_text())
    settings, eff = saved["settings"], saved["efficiency"]
    assert settings["input_levels"] == INPUT_LEVELS and settings["trained_input_levels"] is None
    assert settings["input_neuron"] == {"threshold": 1 / INPUT_LEVELS, "gamma": INPUT_LEVELS,
                                        "v0": 0.5}
    assert list(eff["firing_rate"])[0] == "input" and eff["first_layer_macs"] == 0
    assert list(eff["synops_by_layer"]) == ["c1", "c3", "c5", "f6", "out"]
    assert saved["first_layer_in_closed_form"] is False and result["snn_accuracy"][-1] > 0.8
    assert eff["ann_energy_pj"] == pytest.approx(416_520 * 4.6)  # the analog ANN's, always


def test_a_network_trained_on_levels_converts_to_spikes_unless_told(on_levels, tmp_path, capsys):
    common = ["--checkpoint", str(on_levels), "--timesteps", "2", "--limit", "100",
              "--device", "cpu", "--data-dir", str(DATA)]
    spiking = lenet_convert.main([*common, "--out-dir", str(tmp_path / "a")])
    assert "note:" not in capsys.readouterr().out
    assert spiking["settings"]["input_levels"] == 4
    analog = lenet_convert.main([*common, "--input", "analog", "--out-dir", str(tmp_path / "b")])
    assert ("was trained on the image as spikes (L_in = 4) and is converted to take the analog "
            "image") in capsys.readouterr().out
    assert analog["settings"]["input_levels"] is None
    assert analog["efficiency"]["first_layer_macs"] == 117_600


def test_early_exit_and_look_inside_take_the_image_as_spikes(trained, tmp_path):
    common = ["--checkpoint", str(trained), "--input-levels", "2", "--timesteps", "8",
              "--device", "cpu", "--data-dir", str(DATA)]
    early = lenet_convert.main([*common, "--limit", "200", "--exit-rule", "margin",
                                "--exit-threshold", "2", "--out-dir", str(tmp_path / "e")])
    assert early["settings"]["input_levels"] == 2 and early["early_exit"]["mean_steps"] >= 1
    lenet_convert.main([*common, "--look-inside", "0", "--out-dir", str(tmp_path / "i")])
    inside = json.loads((tmp_path / "i" / "inside_0.json").read_text())
    assert inside["spikes_per_layer_and_step"]["input"][0] == efficiency.input_spikes(
        load_mnist(DATA, train=False)[0][0].float() / 255, 2).sum()
    assert (tmp_path / "i" / "inside_0.png").stat().st_size > 0


@pytest.mark.parametrize("value", ["0", "-1", "2.5", str(MAX_INPUT_LEVELS + 1), "many"])
def test_bad_input_levels_are_refused_in_one_line(value, capsys):
    check_refused(lenet_convert.main, ["--input-levels", value], "--input-levels", capsys)
    check_refused(lenet5.main, ["--input-levels", value], "--input-levels", capsys)


def test_input_levels_with_analog_input_is_refused(capsys):
    check_refused(lenet_convert.main, ["--input", "analog", "--input-levels", "4"],
                  "not with --input analog", capsys)


@pytest.mark.parametrize("spoiled", [0, MAX_INPUT_LEVELS + 1, 2.5, "4", True, 10**400])
def test_a_spoiled_input_level_count_in_a_checkpoint_is_named(on_levels, tmp_path, spoiled):
    checkpoint = load_checkpoint(on_levels)
    checkpoint["input_levels"] = spoiled
    path = tmp_path / "spoiled.pt"
    save_checkpoint(checkpoint, path)
    with pytest.raises(UserError, match="input_levels is"):
        load_checkpoint(path)
