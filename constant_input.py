"""The first spiking layer in closed form: its input never changes, so it need not be stepped.

C1 sees the same current I at every step. An integrate-and-fire neuron with threshold 1, initial
potential v0, burst limit gamma and reset by subtraction, fed a constant I, has fired
C_t(I) = clamp(floor(v0 + t I), 0, gamma t) spikes after t steps, a non-decreasing function of I;
so the exact spiking max-pool over such neurons fires, step by step, what one neuron fed
maxpool(I) fires. `stages` uses that to run the first neuron layer and its pool as one neuron
layer on the pooled current (a quarter the size, no pool state), and `ConstantInputLayer` counts
the first layer's own spikes from the closed form, repaired where float32 rounding could make it
differ from stepping (`constant_input_spikes`). The proof, the float analysis and what it does
not cover: docs/method.md §8. lenet_convert.simulate calls `stages`; the path that steps every
layer stays the reference, and the tests hold the two to the same spikes bit for bit.

The neuron and pool are lenet_convert's SpikeNode and SMaxPool, recognised by what they hold, and
new neurons are made as `type(neuron)(...)`: this module builds on counting.py alone.
"""

from collections import OrderedDict

import torch
import torch.nn as nn

from counting import Counting, max_pool


def in_closed_form(snn):
    """Whether `simulate` runs the first neuron layer of `snn` and its pool in closed form: with
    threshold 1, reset by subtraction, no spike calibration, and the exact pool (lateral
    inhibition); not where a neuron's output depends on more than its summed input, nor where the
    image enters as spikes (C1's input then changes from step to step)."""
    if len(snn) < 3 or not takes_the_image(snn):
        return False
    neuron, pool = snn[1], snn[2]
    return (getattr(neuron, "reset_mode", None) == "subtract" and not neuron.allowance
            and neuron.threshold == 1 and getattr(pool, "lateral_inhibition", False) is True)


def takes_the_image(snn):
    """Whether the first layer of `snn` is a weighted layer fed the analog image (else an input
    layer of neurons is, and only it sees a constant input)."""
    return isinstance(snn[0], (nn.Conv2d, nn.Linear))


def stages(snn, closed_form=True):
    """`snn` as `simulate` runs it: (the layers run once on the images, those run every step).

    Normally the first layer, then the rest; where the image enters as spikes, nothing, then
    all (its input layer is a SpikeNode, stepped: its closed form is the same,
    `constant_input_spikes`, but C1 needs its spikes step by step). In closed form
    (`in_closed_form`), the first layer's current I is pooled once, and one neuron layer fed
    maxpool(I) takes the place of the first neuron layer and its pool: a neuron's spikes after t
    steps grow with its constant input, so the pool's output, the step differences of maxpool
    of those counts, is what a neuron fed the window's largest input fires. The neuron layer's
    own spikes feed only the pool; they are counted from the closed form (`ConstantInputLayer`).
    The modules taking another's place carry its name, so their counts are that module's.
    """
    names = list(snn._modules)
    if not takes_the_image(snn):  # an input layer first: everything is stepped
        return nn.Sequential(), snn
    if not (closed_form and in_closed_form(snn)):
        return snn[:1], snn[1:]
    neuron, pool = snn[1], snn[2]
    first = nn.Sequential(OrderedDict([
        (names[0], snn[0]), (names[1], ConstantInputLayer(neuron, pool.kernel_size))]))
    pooled = type(neuron)(neuron.threshold, neuron.gamma, neuron.v0)
    return first, nn.Sequential(OrderedDict([(names[2], pooled), *list(snn.named_children())[3:]]))


class ConstantInputLayer(Counting):
    """A layer of integrate-and-fire neurons fed the same current every step: counted, not
    simulated.

    Called once with the current I, it keeps I and passes on maxpool(I) (see `stages`). When
    images leave after t steps (`leave`), their spikes are counted in closed form
    (`constant_input_spikes`): all steps in one row of its counts.
    """

    state = ("current",)

    def __init__(self, neuron, kernel_size):
        super().__init__()
        self.v0, self.gamma, self.kernel_size = neuron.v0, neuron.gamma, kernel_size
        self.neuron_kind = type(neuron)  # the class, not a submodule: it counts nothing here
        self.reset()

    def restart(self):
        super().restart()
        self.current = None

    def forward(self, current):
        self.current = current
        return max_pool(current, self.kernel_size)

    def leave(self, rows, steps):
        if rows is not None and not len(rows):
            return
        everyone = rows is None or len(rows) == len(self.current)
        current = self.current if everyone else self.current[rows]
        self.step = 0
        neuron = self.neuron_kind(gamma=self.gamma, v0=self.v0)
        self.count(constant_input_spikes(current, steps, neuron).unsqueeze(0))


def constant_input_spikes(current, steps, neuron):
    """The spikes a neuron like `neuron` (a SpikeNode: threshold 1, reset by subtraction) fires
    from rest in `steps` steps (a number, or one per image) of the constant `current`, element
    by element, without stepping it; `neuron` itself is left as it is.

    In exact arithmetic they are C_t(I) = clamp(floor(v0 + t I), 0, gamma t). SpikeNode adds in
    float32, and so does this, so the two can differ only where v0 + t I lies within their
    rounding of a whole number; those few elements are stepped as such a neuron steps them. So the
    result is SpikeNode's count exactly.
    """
    v0, gamma = neuron.v0, neuron.gamma
    if torch.is_tensor(steps):  # one per image
        t = steps.to(current).view(-1, *[1] * (current.dim() - 1))
        longest = int(steps.max())
    else:  # a number: much faster in torch's scalar forms
        t = longest = int(steps)
    value = current.add(v0) if isinstance(t, int) and t == 1 else current.mul(t).add_(v0)
    spikes = value.floor() if longest > 1 else value.floor_()  # value is needed on, or not
    near = ()
    if longest > 1:  # at t = 1 both compute fl(I + v0): no rounding apart
        # |value - (v0 + t I)| + |SpikeNode's accumulated rounding| (docs/method.md §8), twice
        margin = (4 * (gamma * longest + 1) + 2 * longest * (gamma + 1)) * 2.0**-24
        distance = value.sub_(spikes).sub_(0.5).abs_().view(len(current), -1)  # to 1/2
        rows = (distance.amax(1) > 0.5 - margin).nonzero()[:, 0]  # the few images with any
        units = (distance[rows] > 0.5 - margin).nonzero()
        near = rows[units[:, 0]] * distance.shape[1] + units[:, 1]  # flat indices
    spikes = (spikes.clamp_(0, gamma * t) if isinstance(t, int)
              else torch.minimum(spikes.clamp_(min=0), gamma * t))
    if len(near):
        its_steps = (steps.to(near)[near // current[0].numel()] if torch.is_tensor(steps)
                     else torch.full_like(near, t))
        spikes.view(-1)[near] = _stepped(current.reshape(-1)[near], its_steps, neuron)
    return spikes


def _stepped(current, steps, neuron):
    """Each element's spikes after its own number of `steps`, stepping a neuron like `neuron`."""
    neuron, total = type(neuron)(gamma=neuron.gamma, v0=neuron.v0), torch.zeros_like(current)
    counted = torch.empty(int(steps.max()), *current.shape, dtype=current.dtype,
                          device=current.device)
    for t in range(len(counted)):
        total = total + neuron(current)
        counted[t] = total
    return counted.gather(0, (steps - 1)[None])[0]
