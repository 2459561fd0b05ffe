"""Networks and paths the tests share (imported as `helpers`: pytest puts tests/ on the path)."""

import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lenet5 import QCFS, LeNet5
from lenet_convert import SpikeNode, fuse_norm_replace
from options import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
HIDDEN = ("act1", "act3", "act5", "act6")  # LeNet5's activation layers


def random_lenet(seed=0, activation="relu", levels=4, channel_thresholds=False):
    """A LeNet5 in eval mode with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = LeNet5(activation, levels, channel_thresholds)
    for act in model.children():
        if isinstance(act, QCFS):
            act.threshold.data.uniform_(0.5, 2.0)
    for bn in (model.bn1, model.bn3):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2)
    return model.eval()


def dyadic_snn(**settings):
    """A converted random LeNet5 whose weights and biases are multiples of 1/64.

    Every sum of spikes times weights is then exact in float32 whatever the order of the terms
    or the size of the batch, so two correct simulators must agree bit for bit.
    """
    torch.manual_seed(0)
    scales = {name: 1.0 for name in (*HIDDEN, "out")}
    snn = fuse_norm_replace(LeNet5().eval(), scales, Settings(**settings))
    with torch.no_grad():
        for layer in snn.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight.copy_(torch.round(layer.weight * 192) / 64)
                layer.bias.copy_(torch.round(layer.bias * 64) / 64 + 0.25)
    return snn


class BatchSizes(nn.Module):
    """Passes its input on and notes how many images each call carried."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        return x


def two_class_snn():
    """first (once) -> IF neuron (V0 = 0) -> spy: after t steps the class scores are
    floor(t * a) for an input a, so the margin of the averaged output is floor(t * a) / t."""
    return nn.Sequential(OrderedDict(first=nn.Identity(), act=SpikeNode(gamma=1, v0=0.0),
                                     spy=BatchSizes()))


TIMINGS = ("simulation_seconds", "seconds", "fixed_seconds", "time_ratio",  # all that may
           "task_seconds")  # differ between runs


def without_timings(value):
    """A result (JSON) without the keys in TIMINGS, at any depth: what must be reproducible."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def check_refused(main, argv, message, capsys):
    """`main(argv)` refuses its arguments: exit status 2 and one line on stderr, no traceback,
    that matches the regular expression `message`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


def run_command(*argv, timeout=300):
    """Run a project command as a user does, in a fresh Python process from the project root."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
