"""The memory-inclusive energy and the bit-matched QNN (energy_models.py) against hand counts."""

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from helpers import DATA

import efficiency
import energy_models
import lenet_convert
from energy_models import Hardware, Layer, access_pj, ann_energy, layers_of, snn_energy
from lenet5 import evaluate
from lenet_convert import SpikeNode, build_snn, evaluate_snn, load_ann, neuron_names
from mnist import IMAGE_SHAPE, Batches, load_mnist
from options import default_settings


def tiny():
    """4 inputs -> 3 neurons (gamma 2) -> 2 outputs: every memory under 8 KB, so a 32-bit access
    costs 10 / 2 = 5 pJ, an 8-bit one 1.25 pJ, a 2-bit one 0.3125 pJ."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        [("c", nn.Linear(4, 3)), ("act", SpikeNode(gamma=2)), ("out", nn.Linear(3, 2))]))


def test_an_access_costs_horowitz_energy_by_the_size_of_its_memory():
    assert [access_pj(64, size) for size in (8 * 1024, 32 * 1024, 1024 * 1024)] == \
        pytest.approx([10.0, 20.0, 100.0])
    assert access_pj(64, 1) == access_pj(64, 8 * 1024)  # flat outside Horowitz's sizes
    assert access_pj(64, 10**9) == pytest.approx(100.0)
    assert access_pj(64, 16 * 1024) == pytest.approx(10 * 2**0.5)  # log-log half way
    assert access_pj(32, 100) == pytest.approx(5.0)


def test_the_layers_as_the_models_see_them():
    assert layers_of(tiny(), (4,)) == [Layer("c", "weighted", 4, 3, 12, 3),
                                       Layer("act", "neuron", 3, 3, gamma=2),
                                       Layer("out", "weighted", 3, 2, 6, 2)]


def test_the_snn_by_hand():
    """8 MACs on non-zero inputs of the analog first layer, 4 and 6 SynOps into `out`, 3 and 1
    spikes, in two steps."""
    parts = snn_energy(layers_of(tiny(), (4,)), Hardware(), {"out": [4, 6]}, {"act": [3, 1]}, 8)
    first = 8 * (3.7 + 0.9 + 5 + 1.25) + 3 * 5  # MACs, weight and pixel reads; currents written
    event = 0.9 + 5 + 2 * 5  # an accumulate, its weight, its target's potential read and written
    neuron = 2 * 5 + 0.9 + 5  # its potential read and written, an add, its current read
    spike = 2 * 0.3125  # a 2-bit address written and read
    assert parts["c"][1] == pytest.approx([first, first]) and parts["c"][0] == [0, 0]
    assert parts["out"][0] == pytest.approx([4 * event, 10 * event])
    assert parts["act"][1] == pytest.approx([3 * neuron, 6 * neuron])
    assert parts["act"][0] == pytest.approx([3 * spike, 4 * spike])


def test_the_float_ann_and_the_qnn_by_hand():
    layers = layers_of(tiny(), (4,))
    ann = ann_energy(layers, Hardware(8), {"c": 12, "out": 6})  # float: its weights float32
    assert ann["c"] == pytest.approx((12 * 4.6, 12 * 4.6 + 12 * (5 + 1.25) + 3 * 5))
    assert ann["out"] == pytest.approx((6 * 4.6, 6 * 4.6 + 6 * (5 + 5) + 2 * 5))
    qnn = ann_energy(layers, Hardware(), {"c": 8, "out": 4}, steps=1)  # 2-bit activations
    c = 8 * (3.7 * 8 / 24 + 0.9)  # an 8-bit pixel times a float32 weight, and the add
    assert qnn["c"] == pytest.approx((c, c + 8 * (5 + 1.25) + 3 * 0.3125))
    out = 4 * (3.7 * 2 / 24 + 0.9)
    assert qnn["out"] == pytest.approx((out, out + 4 * (5 + 0.3125) + 2 * 5))
    int8 = ann_energy(layers, Hardware(8), {"c": 8, "out": 4}, steps=1)
    assert int8["out"][0] == pytest.approx(4 * (0.2 * 2 / 8 + 0.1))
    assert int8["out"][1] - int8["out"][0] == pytest.approx(4 * (1.25 + 0.3125) + 2 * 5)
    dram = ann_energy(layers, Hardware(32, "dram"), {"c": 8, "out": 4}, steps=1)
    assert dram["out"][1] - qnn["out"][1] == pytest.approx(4 * (32 / 64 * 1300 - 5))


@pytest.fixture(scope="module")
def measured(qcfs):
    """The QCFS network (gamma = L) simulated for 4 steps on 300 test images, its efficiency
    and its three energies."""
    checkpoint, ann = load_ann(qcfs, "cpu")
    snn = build_snn(checkpoint, ann, default_settings(checkpoint))
    images, labels = load_mnist(DATA, train=False)
    batches = Batches(images[:300], labels[:300], batch_size=100)
    accuracy, counts = evaluate_snn(snn, batches, 4, "cpu")
    eff = efficiency.efficiency(snn, counts, 300, 4, neuron_names(snn),
                                efficiency.input_shapes(ann))
    models = energy_models.energies(snn, eff, counts, 300, batches, "cpu", IMAGE_SHAPE, also=3)
    return ann, batches, accuracy, eff, models, snn, counts


def test_the_bit_matched_qnn_of_a_qcfs_network_is_its_ann(measured):
    ann, batches, accuracy, _, models, _, _ = measured
    first = models["qnn"][0]
    assert first["t"] == 1 and set(first["bits"].values()) == {2}  # L = 2: 3 levels, 2 bits
    assert first["accuracy"] == evaluate(ann, batches, "cpu") == accuracy[0]
    assert [q["t"] for q in models["qnn"]] == [1, 2, 3, 4]


def test_the_compute_only_figures_are_efficiencys_and_the_float_anns_compute_matches(measured):
    _, _, _, eff, models, _, _ = measured
    assert models["ann_compute_pj"] == pytest.approx(eff["ann_energy_pj"], rel=1e-12)
    assert models["snn_over_ann_compute"] == [e / eff["ann_energy_pj"]
                                              for e in eff["snn_energy_pj"]]


def _snn_parts(layers, eff, counts, first, scale=1.0):
    """snn_energy of the measured run with every spike and SynOp scaled by `scale`, the layers
    counted in closed form spread over the steps as `energies` does."""
    synops = {name: [scale * (b - a) for a, b in zip([0, *ops], ops, strict=False)]
              for name, ops in eff["synops_by_layer"].items()}
    spikes = {}
    for layer in [layer for layer in layers if layer.kind != "weighted"]:
        fired = scale * counts[layer.name].flatten(1).sum(1).double() / 300
        spikes[layer.name] = (fired if len(fired) == 4 else fired.sum().expand(4) / 4).tolist()
    return snn_energy(layers, Hardware(), synops, spikes, first)


def test_at_the_break_even_spike_rate_the_snn_costs_what_its_qnn_costs(measured):
    """Every spike (and so every SynOp) scaled to the break-even rate: the SNN's memory-inclusive
    energy is then the QNN's; and layer by layer, the events into a weighted layer scaled by its
    own factor cost what the QNN's layer does."""
    _, _, _, eff, models, snn, counts = measured
    layers, checked = layers_of(snn, IMAGE_SHAPE), 0
    first = models["qnn"][0]["nonzero_macs_by_layer"]["c1"] if eff["first_layer_macs"] else 0
    unscaled = _snn_parts(layers, eff, counts, first)
    for q in models["qnn"]:
        t = q["t"]
        for name, factor in q["break_even_factor_by_layer"].items():
            scaled, fixed = unscaled[name][0][t - 1], unscaled[name][1][t - 1]
            assert q["memory_by_layer_pj"][name] == pytest.approx(factor * scaled + fixed)
        assert set(q["break_even_factor_by_layer"]) == set(eff["synops_by_layer"])
        if q["break_even_spike_rate"] is None:
            continue
        parts = _snn_parts(layers, eff, counts, first,
                           q["break_even_spike_rate"] / q["spike_rate"])
        assert sum(s[t - 1] + f[t - 1] for s, f in parts.values()) == pytest.approx(
            q["memory_pj"], rel=1e-9)
        checked += 1
    assert checked


def test_the_hardware_is_asked_on_the_command_line_and_leaves_the_compute_count(trained, tmp_path):
    common = ["--checkpoint", str(trained), "--limit", "200", "--timesteps", "2", "--device",
              "cpu", "--data-dir", str(DATA)]
    default = lenet_convert.main([*common, "--out-dir", str(tmp_path / "a")])
    asked = lenet_convert.main([*common, "--out-dir", str(tmp_path / "b"), "--weight-bits", "8",
                                "--weights-in", "dram"])
    assert default["energy_models"]["hardware"] == {"weight_bits": 32, "weights_in": "sram"}
    assert asked["energy_models"]["hardware"] == {"weight_bits": 8, "weights_in": "dram"}
    assert asked["efficiency"] == default["efficiency"]  # the compute-only count, unchanged
    assert asked["energy_models"]["snn_memory_pj"] != default["energy_models"]["snn_memory_pj"]
    saved = json.loads((tmp_path / "b" / "snn_accuracy.json").read_text())
    assert saved["energy_models"]["hardware"]["weights_in"] == "dram"
