from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import efficiency
from lenet5 import LeNet5
from lenet_convert import SpikeNode, evaluate_snn


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
