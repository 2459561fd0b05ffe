import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from helpers import DATA

import efficiency
import lenet5
from checkpoint import history_path, load_checkpoint
from lenet5 import LeNet5
from lenet_convert import SpikeNode, build_snn, evaluate_snn, load_ann, neuron_names
from mnist import Batches, load_mnist
from options import default_settings


def test_fan_out_counts_every_synapse():
    fan = efficiency.fan_out(nn.Conv2d(2, 3, 3), (2, 4, 4))  # a 2x2 output of 3 channels
    assert fan[0, 0, 0] == 3 and fan[1, 1, 1] == 3 * 4 and fan[0, 0, 1] == 3 * 2
    assert fan.sum() == 2 * 3 * 9 * 4  # the layer's MACs
    assert torch.equal(efficiency.fan_out(nn.Linear(5, 7), (5,)), torch.full((5,), 7.0))
    shapes = efficiency.input_shapes(LeNet5())
    assert shapes == {"c1": (1, 32, 32), "c3": (6, 14, 14), "c5": (400,), "f6": (120,),
                      "out": (84,)}
    macs = {name: efficiency.fan_out(getattr(LeNet5(), name), shape).sum().item()
            for name, shape in shapes.items()}
    assert macs == {"c1": 117_600, "c3": 240_000, "c5": 48_000, "f6": 10_080, "out": 840}


def test_spike_counts_synops_and_energy_by_hand():
    """Two neurons in, three IF neurons (currents 1, 0.5, 0; V0 = 0), two out, over 2 steps."""
    snn = nn.Sequential(OrderedDict(
        c1=nn.Linear(2, 3), act1=SpikeNode(gamma=1, v0=0.0), out=nn.Linear(3, 2)))
    with torch.no_grad():
        snn.c1.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]]))
        snn.c1.bias.zero_()
    images = torch.tensor([[1.0, 3.0]] * 4)  # a batch of four identical images
    batches = [(images[:3], torch.zeros(3, dtype=torch.long)),
               (images[3:], torch.zeros(1, dtype=torch.long))]
    _, counts = evaluate_snn(snn, batches, 2, "cpu")
    # act1: neuron 0 fires at steps 1 and 2, neuron 1 at step 2 (V = 0.5, then 1), neuron 2 never
    assert counts["act1"].tolist() == [[4, 0, 0], [4, 4, 0]]
    eff = efficiency.efficiency(snn, counts, images=4, timesteps=2, neurons=["act1"],
                                shapes={"c1": (2,), "out": (3,)})
    assert eff["firing_rate"] == {"act1": pytest.approx(3 / (3 * 2))}
    assert eff["ann_macs_by_layer"] == {"c1": 6, "out": 6} and eff["first_layer_macs"] == 6
    assert eff["synops_by_layer"] == {"out": [2.0, 6.0]}  # 1 then 2 spikes, 2 synapses each
    assert eff["synops_per_image"] == [2.0, 6.0]
    assert eff["snn_energy_pj"] == pytest.approx([6 * 4.6 + 2 * 0.9, 6 * 4.6 + 6 * 0.9])
    assert eff["ann_energy_pj"] == pytest.approx(12 * 4.6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_first_step_energy_is_what_the_simulator_counts_at_t1(trained, tmp_path, per_channel):
    """With gamma = L the estimate lenet5.py trains on is the SNN's own count at t = 1: per layer
    and in all, on the same images, for one lambda per layer and one per channel."""
    path = tmp_path / "qcfs.pt"
    lenet5.main(["--activation", "qcfs", "--levels", "5", "--init-from", str(trained),
                 "--epochs", "1", "--limit-train", "500", "--val-size", "500", "--device", "cpu",
                 "--data-dir", str(DATA), "--checkpoint", str(path), "--energy-weight", "0.05",
                 "--input-levels", "analog"] + ["--channel-thresholds"] * per_channel)
    checkpoint, ann = load_ann(path, "cpu")
    images, labels = load_mnist(DATA, train=False)
    batches = Batches(images[:300], labels[:300], batch_size=100)
    snn = build_snn(checkpoint, ann, default_settings(checkpoint))
    _, counts = evaluate_snn(snn, batches, 1, "cpu")
    counted = efficiency.efficiency(snn, counts, 300, 1, neuron_names(snn),
                                    efficiency.input_shapes(ann))
    fanouts, x = efficiency.fan_outs(ann), torch.cat([batch for batch, _ in batches])
    with torch.no_grad():
        _, spikes = efficiency.first_step_spikes(ann.eval(), x)
        energy = efficiency.first_step_energy(ann, x, fanouts)[1]
    for name, ops in counted["synops_by_layer"].items():
        estimated = efficiency.synops_of({name: spikes[name]}, fanouts).mean().item()
        assert estimated == pytest.approx(ops[0], rel=1e-6), name
        assert torch.allclose(spikes[name], spikes[name].round(), atol=1e-4)  # whole spikes
    assert set(spikes) == set(counted["synops_by_layer"]) == {"c3", "c5", "f6", "out"}
    assert energy.mean().item() == pytest.approx(counted["snn_energy_pj"][0], rel=1e-6)
    assert efficiency.first_step_energy_uj(ann, batches, "cpu", fanouts) == pytest.approx(
        counted["snn_energy_pj"][0] / 1e6, rel=1e-6)


def test_the_energy_weight_buys_fewer_spikes_and_is_recorded(trained, tmp_path, capsys):
    """Same seed, same start: the penalised run's SNN spends less; history, checkpoint and the
    progress line say how much."""
    def run(name, weight):
        path = tmp_path / name
        lenet5.main(["--activation", "qcfs", "--levels", "8", "--init-from", str(trained),
                     "--epochs", "2", "--limit-train", "1000", "--val-size", "500",
                     "--device", "cpu", "--data-dir", str(DATA), "--checkpoint", str(path),
                     "--energy-weight", weight])
        return load_checkpoint(path), json.loads(history_path(path).read_text())
    (plain, _), (penalised, history) = run("plain.pt", "0"), run("less.pt", "10")
    assert penalised["args"]["energy_weight"] == 10 and plain["args"]["energy_weight"] == 0
    assert penalised["val_energy_uj"] < 0.8 * plain["val_energy_uj"]
    assert all(h["train_energy_uj"] > 0 and h["val_energy_uj"] > 0 for h in history)
    best = next(h for h in history if h["epoch"] == penalised["epoch"])
    assert best["val_energy_uj"] == penalised["val_energy_uj"]
    assert f"energy {history[-1]['val_energy_uj']:.3f} µJ" in capsys.readouterr().out
