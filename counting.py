"""What every spiking module shares: state across time steps, and its spikes counted per step.

`Counting` is the base of the spiking neuron and pool (`lenet_convert.SpikeNode`, `SMaxPool`) and
of the closed-form first layer (`constant_input.ConstantInputLayer`): each keeps per-image state
between steps, forgets it for a new batch, and counts its output per step and unit, from which
efficiency.py makes firing rates, SynOps and energy. `max_pool` is the max-pooling they share.
"""

import torch
import torch.nn as nn


class Counting(nn.Module):
    """A module with state across steps that counts its output spikes per step and unit.

    The counts live in one buffer that doubles when full: a small tensor kept from every step
    would fragment the heap between the large per-step tensors and make memory grow with T.
    """

    signed = False  # whether the output can be negative; then |output| is counted
    state = ()  # names of the per-image state tensors (batch first)

    def reset(self):
        """Forget the state and the counts: a new batch of images."""
        self.buffer, self.length = None, 0  # [capacity, *units], steps counted
        self.restart()

    def restart(self):
        """Forget the state but keep the counts: more images whose spikes add to the same steps."""
        self.step = 0

    def count(self, out):
        """Add `out` ([steps, batch, ...], from step `self.step` on) to the counts."""
        per_step = (out.abs() if self.signed else out).sum(1)
        end = self.step + len(per_step)
        if self.buffer is None or end > len(self.buffer):
            grown = per_step.new_zeros(max(end, 2 * self.length, 16), *per_step.shape[1:])
            if self.buffer is not None:
                grown[:self.length] = self.buffer[:self.length]
            self.buffer = grown
        self.buffer[self.step:end] += per_step
        self.length, self.step = max(self.length, end), end

    def leave(self, rows, steps):
        """Images leave the simulation after `steps` steps: those in `rows` (None: all). A module
        that counts step by step has counted their spikes already."""

    def take_counts(self, other):
        """Take the counts of `other`, which simulated this module's spikes in its place."""
        self.buffer, self.length = other.buffer, other.length

    @property
    def counts(self):
        """Spikes (events, if signed) per step and unit since the last reset: [steps, *units]."""
        return self.buffer[:self.length] if self.buffer is not None else torch.zeros(0)



def max_pool(x, k):
    """k x k max-pooling with stride k over the last two dims: MaxPool2d(k)'s values.

    Taken as element-wise maxima of strided slices: on the CPU several times faster than
    F.max_pool2d, which also computes the argmax indices.
    """
    h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
    rows = x[..., 0:h:k, :w]
    for i in range(1, k):
        rows = torch.maximum(rows, x[..., i:h:k, :w])
    out = rows[..., 0::k]
    for j in range(1, k):
        out = torch.maximum(out, rows[..., j::k])
    return out
