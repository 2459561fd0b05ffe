"""Convert the trained LeNet5 into a spiking neural network and measure it after every time step.

The conversion (docs/method.md) is three steps, each returning a new network: fold BatchNorm into
the convolutions, normalise each layer by the activation scale recorded in the checkpoint, and
replace ReLU by integrate-and-fire neurons (SpikeNode) and max-pooling by a spiking max-pool
(SMaxPool). The spiking network sees the analog image as a constant current at every step; the
output layer's currents are summed over time (or its spikes counted) and read out by argmax.
With --exit-rule, each image stops as soon as its answer is settled (docs/method.md §9).

Example:
    python lenet_convert.py                          # checkpoints/lenet5_best.pt, T = 64
    python lenet_convert.py --v0 0 --gamma 2 --percentile 99.9 --no-lateral-inhibition
                                                     # BrainCog's reference setting
    python lenet_convert.py --compare checkpoints/lenet5_qcfs_best.pt   # every setting
    python lenet_convert.py --norm neuron --reset zero --spicalib 4   # BrainCog's other options
    python lenet_convert.py --checkpoint checkpoints/lenet5_qcfs_best.pt --exit-rule margin

Writes (into --out-dir, default results/):
    snn_accuracy.png    accuracy against time step, the ANN's as a line
    snn_efficiency.png  firing rates, synaptic operations and energy against time step
    snn_accuracy.json   the numbers of both, the settings and the checkpoint used
    snn_early_exit.png, snn_early_exit.json   with --exit-rule, besides: per-image early exit
    compare.png, compare.json, compare.csv   with --compare, instead of the three above
"""

import copy
import math
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import matplotlib
import matplotlib.ticker
import torch
import torch.nn as nn
from tqdm import tqdm

from lenet5 import (
    IMAGE_SHAPE,
    OUTPUT_LAYER,
    QCFS,
    ArgumentParser,
    Batches,
    UserError,
    atomic_path,
    check_writable_dir,
    evaluate,
    fraction,
    load_checkpoint,
    load_mnist,
    model_from_checkpoint,
    non_negative_int,
    percentile_arg,
    percentile_key,
    positive_float,
    positive_int,
    quantiles_of,
    remeasure_percentiles,
    resolve_device,
    split_train_val,
    write_csv,
    write_json,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

# ----------------------------------------------------------------------------- defaults
CHECKPOINT = Path("checkpoints/lenet5_best.pt")  # written by lenet5.py
OUT_DIR = Path("results")  # plots and JSON
TIMESTEPS = 64  # simulation steps T
BATCH_SIZE = 500  # test images simulated at once: a layer's state stays in the CPU's cache
GAMMA = 2  # burst limit, the most spikes a neuron fires per step (BrainCog's)
V0 = 0.5  # initial potential in units of the threshold: turns the rate's floor into a rounding
LATERAL_INHIBITION = True  # the exact spiking max-pool
READOUT = "analog"  # sum the output layer's currents; "spikes": count a SpikeNode's spikes
NORM = "layer"  # one activation scale per layer; "channel", "neuron": see NORMS
RESET = "subtract"  # after spiking, lose s thresholds; "zero": the potential goes to 0
SPICALIB = 0  # spike calibration's allowance in steps; 0: off
COMPARE_SPICALIBS = (2, 4)  # the spike calibration allowances --compare tries
EXIT_RULE = "none"  # per-image early exit: "margin" or "confidence" of the averaged output
COMPARE_EXIT_RULE = "margin"  # the rule --compare tries
EXIT_GRID = 200  # thresholds tried on the validation split (quantiles of the recorded values)
HARDEST = 16  # test images shown in the early-exit figure: those that ran longest
EXIT_PARK = 0.25  # a batch down to this fraction of its images waits to merge with the others
EXIT_TIMING_REPEATS = 5  # early exit and its fixed-T comparison are each timed this many times
ANN_LEVEL = 0.001  # "at the ANN's level": accuracy within 0.1 percentage points of the ANN's
POOL_K = 1000.0  # BrainCog's weight of the accumulated input in the pool without inhibition
COMPARE_GAMMAS = (1, 2, 4)  # burst limits every compared checkpoint is run with
PJ_PER_MAC, PJ_PER_AC = 4.6, 0.9  # energy of a 32-bit float MAC and AC at 45 nm (Horowitz, 2014)
ENERGY_MODEL = ("45 nm: 4.6 pJ per MAC, 0.9 pJ per accumulate (AC). The first layer's analog "
                "input costs MACs, counted once since the image is constant; every spike costs one "
                "AC per synapse it crosses (SynOps). Memory traffic and membrane updates are "
                "ignored.")

READOUTS = ("analog", "spikes")
NORMS = ("layer", "channel", "neuron")  # per layer; per convolution channel; and per neuron
RESETS = ("subtract", "zero")
EXIT_RULES = ("none", "margin", "confidence")
READOUT_NODE = "readout"  # the SpikeNode appended after the output layer for a spiking read-out
AT_ANN_LEVEL = f"first_step_within_{100 * ANN_LEVEL:g}pp"  # result key: first step at that level
GIVEN, BRAINCOG = "as given", "BrainCog reference"  # labels of compare mode's main runs


class Settings(NamedTuple):
    """How a checkpoint is converted and simulated.

    `percentile` None means a QCFS network's trained lambda; `exit_threshold` None means chosen
    on the validation split, as the fewest mean steps within `exit_margin` of the ANN there,
    with `exit_deadline` (the step by which every image stops; None: chosen with it, or T when
    the threshold is given).
    """

    percentile: str | None
    gamma: int = GAMMA
    v0: float = V0
    lateral_inhibition: bool = LATERAL_INHIBITION
    readout: str = READOUT
    norm: str = NORM
    reset: str = RESET
    spicalib: int = SPICALIB
    exit_rule: str = EXIT_RULE
    exit_threshold: float | None = None
    exit_margin: float = ANN_LEVEL
    exit_deadline: int | None = None


BRAINCOG_SETTINGS = Settings("99.9", gamma=2, v0=0.0, lateral_inhibition=False, readout="analog")


# ----------------------------------------------------------------------------- spiking modules


class Counting(nn.Module):
    """A module with state across steps that counts its output spikes per step and unit.

    The counts live in one buffer that doubles when full: a small tensor kept from every step
    would fragment the heap between the large per-step tensors and make memory grow with T.
    """

    signed = False  # whether the output can be negative; then |output| is counted
    state = ()  # names of the per-image state tensors (batch first), for `keep`

    def reset(self):
        """Forget the state and the counts: a new batch of images."""
        self.buffer, self.length = None, 0  # [capacity, *units], steps counted
        self.restart()

    def restart(self):
        """Forget the state but keep the counts: more images whose spikes add to the same steps."""
        self.step = 0

    def keep(self, index):
        """Keep the state of the images at `index` of the batch only: the others have stopped."""
        for name in self.state:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])

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

    @property
    def counts(self):
        """Spikes (events, if signed) per step and unit since the last reset: [steps, *units]."""
        return self.buffer[:self.length] if self.buffer is not None else torch.zeros(0)


class SpikeNode(Counting):
    """Integrate-and-fire neuron (docs/method.md §4).

    Each step: V <- V + I;  s = clamp(floor(V / threshold), 0, gamma);  then the reset, by
    subtraction (V <- V - s * threshold) or to zero (V <- 0 wherever s > 0); output s. gamma = 1
    is a plain IF neuron, gamma > 1 a burst neuron. The potential starts at v0 * threshold
    (v0 = 0.5 turns the rate's floor into a rounding). With `allowance` > 0, spike calibration
    (`calibrate`) may turn the output negative; then |output| is what is counted.
    """

    state = ("mem", "last", "interval", "fired", "total")

    def __init__(self, threshold=1.0, gamma=1, v0=0.5, reset=RESET, allowance=SPICALIB):
        super().__init__()
        self.threshold, self.gamma, self.v0 = threshold, gamma, v0
        self.reset_mode, self.allowance = reset, allowance
        self.signed = allowance > 0
        self.reset()

    def restart(self):
        super().restart()
        self.mem = None
        # spike calibration's state, from the first step on
        self.last = self.interval = self.fired = self.total = None

    def forward(self, current):
        if self.mem is None:
            self.mem = torch.full_like(current, self.v0 * self.threshold)
        self.mem.add_(current)
        scaled = self.mem if self.threshold == 1 else self.mem / self.threshold  # skip a pass
        spikes = torch.floor(scaled).clamp_(0, self.gamma)
        if self.reset_mode == "zero":
            self.mem.masked_fill_(spikes > 0, 0)
        else:
            self.mem.sub_(spikes, alpha=self.threshold)
        if self.allowance:
            spikes = self.calibrate(spikes)
        self.count(spikes.unsqueeze(0))
        return spikes

    def calibrate(self, spikes):
        """Spike calibration (BrainCog's SpiCalib, docs/method.md §4) of this step's `spikes`.

        Each neuron keeps the step of its last spike and the mean interval between its spikes
        (the first counted from step 0). A neuron silent for longer than that mean plus the
        allowance emits -1 this step; a neuron whose running total of what it would emit has
        reached -1 or less emits 0 instead. The potential is not touched.
        """
        t = self.step
        if self.last is None:
            self.last, self.interval, self.fired, self.total = (
                torch.zeros_like(spikes) for _ in range(4))
        fired = spikes > 0
        self.fired += fired
        self.interval = torch.where(
            fired, (t - self.last + self.interval * (self.fired - 1)) / self.fired, self.interval)
        self.last.masked_fill_(fired, t)
        out = spikes - (t - self.last > self.interval + self.allowance).to(spikes.dtype)
        self.total += out
        return out.masked_fill_(self.total <= -1, 0)

    def extra_repr(self):
        return (f"threshold={self.threshold}, gamma={self.gamma}, v0={self.v0}, "
                f"reset={self.reset_mode}" + (f", allowance={self.allowance}"
                                              if self.allowance else ""))


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


class SMaxPool(Counting):
    """Spiking max-pool over the accumulated input C of each unit (docs/method.md §5).

    With lateral inhibition (exact): out_t = maxpool(C_t) - maxpool(C_{t-1}). Without
    (BrainCog's form): out_t = maxpool(x + K*C_t) - maxpool(K*C_t), which over-estimates a little.
    """

    state = ("acc", "pooled")

    def __init__(self, kernel_size=2, lateral_inhibition=True, k=POOL_K, signed=False):
        super().__init__()
        self.kernel_size, self.lateral_inhibition, self.k = kernel_size, lateral_inhibition, k
        self.signed = signed  # its input can be negative (spike calibration)
        self.reset()

    def restart(self):
        super().restart()
        self.acc = None  # C_t, the input summed over the steps so far
        self.pooled = None  # maxpool(C_{t-1})

    def forward(self, x):
        self.acc = x.clone() if self.acc is None else self.acc.add_(x)
        k = self.kernel_size
        if not self.lateral_inhibition:
            out = max_pool(x + self.k * self.acc, k) - max_pool(self.k * self.acc, k)
        else:
            pooled = max_pool(self.acc, k)
            out = pooled if self.pooled is None else pooled - self.pooled
            self.pooled = pooled
        self.count(out.unsqueeze(0))
        return out

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, lateral_inhibition={self.lateral_inhibition}"


def clean_mem_spike(model):
    """Reset every stateful module (potentials, spike counts, pooling sums) before a new batch."""
    for module in model.modules():
        if isinstance(module, Counting):
            module.reset()


# ----------------------------------------------------------------------------- conversion


@torch.no_grad()
def fuse(conv, bn):
    """A new Conv2d equal to conv -> bn in eval mode (docs/method.md §2).

    W' = W * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta, per channel.
    """
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused.to(conv.weight.device)


def fold_batchnorm(model):
    """Step 1: a copy of `model` with every BatchNorm2d folded into the Conv2d before it."""
    children = list(model.named_children())
    layers = OrderedDict()
    for (name, layer), (_, after) in zip(children, children[1:] + [(None, None)], strict=True):
        if isinstance(after, nn.BatchNorm2d):
            layers[name] = fuse(layer, after)
        elif not isinstance(layer, nn.BatchNorm2d):
            layers[name] = copy.deepcopy(layer)
    return nn.Sequential(layers).eval()


@torch.no_grad()
def normalise(model, scales, spiking_readout=False):
    """Step 2: a copy of a BatchNorm-free `model` with each activation divided by its scale.

    Each weighted layer: W[i, j] <- W[i, j] * lambda_in[j] / lambda[i], b[i] <- b[i] / lambda[i]
    (docs/method.md §3), with one scale per layer or one per channel (a tensor); the output layer
    is divided by its own scale only for a spiking read-out. QCFS thresholds are divided too
    (per layer only), so the copy gives the ANN's outputs (over the output's scale for spikes).
    """
    model = copy.deepcopy(model)
    scale_in, weighted = 1.0, None
    for name, layer in model.named_children():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weighted = layer
        elif isinstance(layer, (nn.ReLU, QCFS)):
            scale = scales.get(name)
            if scale is None or not torch.all(torch.as_tensor(scale) > 0):
                raise UserError(f"activation scale of {name} is {scale}: cannot normalise by it "
                                "(a dead layer?)")
            if torch.is_tensor(scale) and len(scale) != len(weighted.weight):
                raise UserError(f"{name} has {len(scale)} per-channel percentiles, not one per "
                                f"channel ({len(weighted.weight)})")
            _scale_layer(weighted, scale_in, scale)
            if isinstance(layer, QCFS):
                layer.threshold.div_(scale)
            scale_in, weighted = scale, None
    _scale_layer(weighted, scale_in, scales[OUTPUT_LAYER] if spiking_readout else 1.0)
    return model


def _scale_layer(layer, scale_in, scale_out):
    """W[i, j] <- W[i, j] * scale_in[j] / scale_out[i], b[i] <- b[i] / scale_out[i].

    A scale is a number or a tensor with one value per channel; after flattening, a channel's
    scale applies to all of its positions.
    """
    weight = layer.weight
    if torch.is_tensor(scale_in):
        scale_in = scale_in.repeat_interleave(weight.shape[1] // len(scale_in))
        scale_in = scale_in.view(1, -1, *[1] * (weight.dim() - 2)).to(weight)
    if torch.is_tensor(scale_out):
        scale_out = scale_out.to(weight)
    layer.bias.div_(scale_out)
    if torch.is_tensor(scale_out):
        scale_out = scale_out.view(-1, *[1] * (weight.dim() - 1))
    weight.mul_(scale_in / scale_out)


def replace_by_spiking(model, gamma=GAMMA, v0=V0, lateral_inhibition=LATERAL_INHIBITION,
                       spiking_readout=False, reset=RESET, spicalib=SPICALIB):
    """Step 3: a copy of a normalised `model` with spiking neurons and pools.

    Every ReLU or QCFS becomes a SpikeNode of threshold 1 (with spike calibration if `spicalib`
    > 0), every MaxPool2d an SMaxPool; for a spiking read-out a SpikeNode named READOUT_NODE
    (never calibrated) follows the output layer.
    """
    layers = OrderedDict()
    for name, layer in model.named_children():
        if isinstance(layer, (nn.ReLU, QCFS)):
            layers[name] = SpikeNode(gamma=gamma, v0=v0, reset=reset, allowance=spicalib)
        elif isinstance(layer, nn.MaxPool2d):
            layers[name] = SMaxPool(layer.kernel_size, lateral_inhibition, signed=spicalib > 0)
        else:
            layers[name] = copy.deepcopy(layer)
    if spiking_readout:
        layers[READOUT_NODE] = SpikeNode(gamma=gamma, v0=v0, reset=reset)
    return nn.Sequential(layers).eval()


def fuse_norm_replace(model, scales, gamma=GAMMA, v0=V0, lateral_inhibition=LATERAL_INHIBITION,
                      readout=READOUT, reset=RESET, spicalib=SPICALIB):
    """Convert an ANN into a spiking copy; `model` itself is left untouched.

    Args:
        model: a LeNet5 (an nn.Sequential of named layers, ReLU or QCFS) in eval mode.
        scales: {activation layer: lambda (a number, or a tensor with one per channel),
            OUTPUT_LAYER: lambda}, e.g. from `activation_scales`.
        gamma, v0: the SpikeNodes' burst limit and initial potential (in units of threshold 1).
        lateral_inhibition: the SMaxPool variant.
        readout: "analog" (the output layer's currents are summed) or "spikes".
        reset: "subtract" or "zero"; spicalib: spike calibration's allowance in steps (0: off).
    """
    spiking_readout = readout == "spikes"
    normalised = normalise(fold_batchnorm(model), scales, spiking_readout)
    return replace_by_spiking(normalised, gamma, v0, lateral_inhibition, spiking_readout, reset,
                              spicalib)


def scaling_percentile(checkpoint, asked=None):
    """The percentile key that sets the scales, or None for a QCFS network's trained lambda.

    The one asked for, if any; else a QCFS checkpoint uses its thresholds and a ReLU checkpoint
    the percentile it was trained to be converted with.
    """
    if asked is not None:
        return percentile_key(asked)
    return None if checkpoint.get("activation") == "qcfs" else checkpoint.get("percentile", "99")


def activation_scales(checkpoint, percentile=None, gamma=1, per_channel=()):
    """{layer: what one spike stands for}: the recorded `percentile` of each layer's activations.

    With `percentile` None (a QCFS network), each layer's trained lambda divided by `gamma`, so
    the gamma spikes of a step share [0, lambda] (docs/method.md §6). The output layer's scale
    (for a spiking read-out) is always a percentile, the checkpoint's own for a QCFS network.
    The layers in `per_channel` get a tensor, one scale per channel or neuron (see
    `per_channel_layers`); a channel silent on the calibration images keeps the layer's scale.
    """
    recorded = checkpoint.get("percentiles")
    if not recorded:
        raise UserError("the checkpoint holds no activation percentiles; retrain it with "
                        "`python lenet5.py`")
    key = percentile or checkpoint.get("percentile", "99")
    try:
        scales = {layer: float(values[key]) for layer, values in recorded.items()}
    except KeyError:
        available = ", ".join(next(iter(recorded.values()), {}))
        raise UserError(f"the checkpoint has no {key}th percentile (it has: {available}); "
                        f"choose one of those or retrain with `--percentile {key}`") from None
    trained = checkpoint.get("thresholds", {}) if percentile is None else {}
    if per_channel and trained:
        raise UserError("--norm channel and neuron need activation percentiles: a QCFS network "
                        "is converted with its trained threshold per layer (add --percentile)")
    for layer in per_channel:
        try:
            channels = checkpoint.get("channel_percentiles", {})[layer][key]
        except KeyError:
            raise UserError(f"the checkpoint has no per-channel {key}th percentile of "
                            f"{layer}") from None
        channels = torch.tensor(channels, dtype=torch.float64)
        scales[layer] = torch.where(channels > 0, channels, scales[layer])
    return scales | {layer: value / gamma for layer, value in trained.items()}


def per_channel_layers(ann, norm):
    """The activation layers scaled per channel under `norm` (docs/method.md §3).

    None for "layer"; for "channel" those after a convolution, one scale per output channel
    (BrainCog's channelnorm); for "neuron" also those after a linear layer, one per neuron.
    """
    names, weighted = set(), None
    for name, layer in ann.named_children():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weighted = layer
        elif isinstance(layer, (nn.ReLU, QCFS)) and (
                norm == "neuron" or norm == "channel" and isinstance(weighted, nn.Conv2d)):
            names.add(name)
    return names


def build_snn(checkpoint, ann, settings):
    """The spiking network of `ann` (loaded from `checkpoint`) converted with `settings`.

    The one builder: the script, its compare mode and the benchmark all call it.
    """
    scales = activation_scales(checkpoint, settings.percentile, settings.gamma,
                               per_channel_layers(ann, settings.norm))
    return fuse_norm_replace(ann, scales, settings.gamma, settings.v0,
                             settings.lateral_inhibition, settings.readout, settings.reset,
                             settings.spicalib)


# ----------------------------------------------------------------------------- simulation


def simulate(snn, images, timesteps):
    """Yield the SNN's output at each of `timesteps` steps for the analog `images`, from reset.

    The first layer's input is the same image every step, so its output is computed once.
    """
    clean_mem_spike(snn)
    current = snn[0](images)
    rest = snn[1:]
    for _ in range(timesteps):
        yield rest(current)


def predict(total, readout):
    """Class with the largest summed output; for a spiking read-out ties go to the potential."""
    if readout is None:
        return total.argmax(1)
    top = total == total.max(1, keepdim=True).values
    return torch.where(top, readout.mem, torch.tensor(-math.inf, device=total.device)).argmax(1)


@torch.no_grad()
def evaluate_snn(snn, batches, timesteps, device, simulator=simulate):
    """Accuracy after each step and spike counts of `snn` over all samples of `batches`.

    Returns (accuracy: a list, element t-1 for step t, weighted by samples; counts: {counting
    module: its spikes per step and unit over all samples, [T, *units]}). `simulator` is
    `simulate` or any function that yields the same outputs.
    """
    snn.eval()
    readout = getattr(snn, READOUT_NODE, None)
    counting = {name: m for name, m in snn.named_modules() if isinstance(m, Counting)}
    correct = torch.zeros(timesteps, dtype=torch.float64, device=device)
    counts, seen = {}, 0
    with tqdm(total=len(batches) * timesteps, desc="simulating", unit="step", leave=False,
              disable=None) as bar:
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            total = 0
            for t, output in enumerate(simulator(snn, images, timesteps)):
                total = total + output
                correct[t] += (predict(total, readout) == labels).sum()
                bar.update()
            seen += len(labels)
            for name, module in counting.items():
                counts[name] = counts.get(name, 0) + module.counts.cpu()
    return (correct / seen).tolist(), counts


# ----------------------------------------------------------------------------- early exit


def settledness(total, t, rule):
    """How settled each image's answer is after t steps (docs/method.md §9).

    margin: top-1 minus top-2 of the time-averaged output total / t; confidence: its largest
    softmax probability. An image stops once this reaches the threshold.
    """
    mean = total / t
    if rule == "margin":
        top = mean.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    return mean.softmax(1).amax(1)


@torch.no_grad()
def record_settledness(snn, batches, timesteps, device, rule):
    """Every image's settledness and prediction after each step: ([T, N], [T, N], labels [N]).

    All images run all T steps, so any threshold's exit steps follow from this one pass.
    """
    readout = getattr(snn.eval(), READOUT_NODE, None)
    values, predictions, labels = [], [], []
    for images, batch_labels in tqdm(batches, desc=f"recording the {rule}", unit="batch",
                                     leave=False, disable=None):
        steps, total = [], 0
        for t, output in enumerate(simulate(snn, images.to(device), timesteps), 1):
            total = total + output
            steps.append((settledness(total, t, rule), predict(total, readout)))
        values.append(torch.stack([v for v, _ in steps]).cpu())
        predictions.append(torch.stack([p for _, p in steps]).cpu())
        labels.append(batch_labels)
    return torch.cat(values, 1), torch.cat(predictions, 1), torch.cat(labels)


def exit_steps(values, threshold, deadline=None):
    """Each image's exit step (1-based): the first whose settledness reaches `threshold`, or
    the `deadline` (default: the last step recorded) if that comes first."""
    reached = values >= threshold
    reached[(deadline or len(values)) - 1:] = True
    return reached.to(torch.uint8).argmax(0) + 1


def exit_table(values, predictions, labels, thresholds):
    """Accuracy and mean steps of early exit for every threshold and deadline, from a recording.

    Returns two tensors [thresholds, T]: element [i, D - 1] for thresholds[i] and deadline D.
    """
    right = predictions == labels  # [T, N]
    deadlines = torch.arange(1, len(values) + 1)[:, None]
    accuracy, steps = [], []
    for threshold in thresholds:
        first = exit_steps(values, threshold)
        right_there = right.gather(0, (first - 1)[None])[0]
        stopped = first[None] <= deadlines  # [D, N]: stopped by the rule before the deadline
        accuracy.append(torch.where(stopped, right_there[None], right).double().mean(1))
        steps.append(torch.minimum(first[None], deadlines).double().mean(1))
    return torch.stack(accuracy), torch.stack(steps)


def exit_curve(table, thresholds, deadline):
    """[{threshold, accuracy, mean_steps}] at one deadline, from `exit_table`'s output."""
    accuracy, steps = table
    return [{"threshold": threshold, "accuracy": accuracy[i, deadline - 1].item(),
             "mean_steps": steps[i, deadline - 1].item()} for i, threshold in enumerate(thresholds)]


def choose_exit(table, thresholds, ann_accuracy, margin, deadlines):
    """(threshold, deadline, whether within): the fewest mean steps within `margin` of the ANN.

    Over every threshold and each deadline in `deadlines`; ties go to the higher accuracy. If
    none is within the margin, the most accurate one is taken.
    """
    accuracy, steps = table
    candidates = [(steps[i, d - 1].item(), -accuracy[i, d - 1].item(), i, d)
                  for i in range(len(thresholds)) for d in deadlines]
    within = [c for c in candidates if -c[1] >= ann_accuracy - margin - 1e-12]
    best = min(within) if within else min(candidates, key=lambda c: (c[1], c[0]))
    return thresholds[best[2]], best[3], bool(within)


def threshold_grid(values, size=EXIT_GRID):
    """Thresholds to try: quantiles of the recorded settledness, and one no image reaches."""
    q = torch.linspace(0, 1, size, dtype=torch.float64)
    grid = quantiles_of(values.flatten().double(), q, torch.Generator().manual_seed(0))
    return sorted(set(grid)) + [math.inf]


class _Group(NamedTuple):
    """Images running together: global indices, labels, first-layer current, summed output,
    steps done, and (while parked) every stateful module's state."""

    index: torch.Tensor
    labels: torch.Tensor
    current: torch.Tensor
    total: torch.Tensor | int
    t: int
    state: dict | None = None

    def keep(self, rows):
        return self._replace(index=self.index[rows], labels=self.labels[rows],
                             current=self.current[rows], total=self.total[rows])

    @staticmethod
    def merge(groups):
        """One group of `groups` (all at the same step, parked with their state)."""
        def cat(tensors):
            return None if tensors[0] is None else torch.cat(tensors)
        first = groups[0]
        state = {name: {key: cat([g.state[name][key] for g in groups]) for key in keys}
                 for name, keys in first.state.items()}
        return first._replace(state=state, **{k: cat([getattr(g, k) for g in groups])
                                              for k in ("index", "labels", "current", "total")})


def _module_states(counting):
    return {name: {key: getattr(m, key) for key in m.state} for name, m in counting.items()}


def _set_module_states(counting, states, t):
    for name, module in counting.items():
        for key, value in states[name].items():
            setattr(module, key, value)
        module.step = t


@torch.no_grad()
def evaluate_early_exit(snn, batches, timesteps, device, rule, threshold, deadline=None,
                        park=EXIT_PARK):
    """Simulate each image only until its answer is settled, or the deadline (default T).

    docs/method.md §9.
    At each step the images whose settledness reaches `threshold` stop: their prediction is
    frozen and they leave the batch, with their state in every module, so later steps simulate
    only the images still running and the spike counts hold only the steps each image ran.
    When a batch is down to `park` of its images, they are set aside with their state and
    continue later together with those of the other batches at the same step, so that a few
    slow images per batch do not each cost a nearly empty step up to T (up to a batch's worth of
    images run together, the size that keeps a layer's state in the cache).
    Returns (accuracy with the steps capped at t = 1..T, counts as from `evaluate_snn`, each
    image's exit step [N], each image's prediction [N]).
    """
    snn.eval()
    readout = getattr(snn, READOUT_NODE, None)
    counting = {name: m for name, m in snn.named_modules() if isinstance(m, Counting)}
    rest = snn[1:]
    right = torch.zeros(timesteps, dtype=torch.float64)  # right answers of running images
    right_stopped = torch.zeros(timesteps, dtype=torch.float64)  # ... of those stopping at t
    exits, counts, parked, seen, most = [], {}, [], 0, 0

    def advance(group):
        """One step of `group`; the group of its images still running, or None."""
        t = group.t + 1
        total = group.total + rest(group.current)
        prediction = predict(total, readout)
        hits = prediction == group.labels
        right[t - 1] += hits.sum().item()
        stop = (settledness(total, t, rule) >= threshold if t < (deadline or timesteps)
                else torch.ones_like(hits))
        group = group._replace(total=total, t=t)
        if not stop.any():
            return group
        exits.append((group.index[stop].cpu(), t, prediction[stop].cpu()))
        right_stopped[t - 1] += hits[stop].sum().item()
        if stop.all():
            return None
        rows = (~stop).nonzero()[:, 0]
        for module in counting.values():
            module.keep(rows)
        return group.keep(rows)

    def add_counts():
        for name, module in counting.items():
            if module.buffer is None:  # nothing ran since the reset
                continue
            padded = torch.zeros(timesteps, *module.counts.shape[1:])
            padded[:len(module.counts)] = module.counts.cpu()
            counts[name] = counts.get(name, 0) + padded

    for images, labels in tqdm(batches, desc="early exit", unit="batch", leave=False,
                               disable=None):
        images, labels = images.to(device), labels.to(device)
        most = max(most, len(labels))  # a pool of parked images runs up to a batch at once
        clean_mem_spike(snn)
        index = torch.arange(seen, seen + len(labels), device=device)
        group, seen = _Group(index, labels, snn[0](images), 0, 0), seen + len(labels)
        while group is not None:
            if 0 < group.t and len(group.index) <= park * len(labels):
                parked.append(group._replace(state=_module_states(counting)))
                break
            group = advance(group)
        add_counts()
    clean_mem_spike(snn)  # the parked images, merged by step
    parked.sort(key=lambda g: g.t)
    pool = None
    while parked or pool is not None:  # merge those at the same step, up to a batch at once
        if pool is None or (parked and parked[0].t == pool.t
                            and len(pool.index) + len(parked[0].index) <= most):
            same = [] if pool is None else [pool._replace(state=_module_states(counting))]
            t = parked[0].t if pool is None else pool.t
            while parked and parked[0].t == t and (
                    not same or sum(len(g.index) for g in same) + len(parked[0].index) <= most):
                same.append(parked.pop(0))
            pool = _Group.merge(same)
            _set_module_states(counting, pool.state, t)
        pool = advance(pool)
    add_counts()
    steps = torch.full((seen,), timesteps)
    predictions = torch.empty(seen, dtype=torch.long)
    for index, t, prediction in exits:
        steps[index], predictions[index] = t, prediction
    stopped_before = torch.cat([torch.zeros(1, dtype=torch.float64),
                                right_stopped.cumsum(0)[:-1]])
    return ((right + stopped_before) / seen).tolist(), counts, steps, predictions


def first_step_within(snn_accuracy, ann_accuracy, margin=ANN_LEVEL):
    """The first step t (1-based) whose accuracy is at least the ANN's minus `margin`, or None."""
    return next((t for t, acc in enumerate(snn_accuracy, 1)
                 if acc >= ann_accuracy - margin - 1e-12), None)


# ----------------------------------------------------------------------------- efficiency


@torch.no_grad()
def input_shapes(ann, image_shape=IMAGE_SHAPE):
    """{Conv2d/Linear layer name: the shape of one sample's input to it}, from one ANN pass."""
    shapes, x = {}, torch.zeros(1, *image_shape, device=next(ann.parameters()).device)
    for name, layer in ann.eval().named_children():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            shapes[name] = tuple(x.shape[1:])
        x = layer(x)
    return shapes


def fan_out(layer, input_shape):
    """Synapses leaving each input unit of a Conv2d or Linear layer: a tensor of `input_shape`.

    The gradient of the summed output with every weight set to 1, so border effects, strides and
    groups count exactly. Summed over the units, it is the layer's MACs per image.
    """
    params = {"weight": torch.ones_like(layer.weight)}
    if layer.bias is not None:
        params["bias"] = torch.zeros_like(layer.bias)
    x = torch.ones(1, *input_shape, device=layer.weight.device, requires_grad=True)
    with torch.enable_grad():
        torch.func.functional_call(layer, params, (x,)).sum().backward()
    return x.grad[0]


def efficiency(snn, counts, images, timesteps, shapes):
    """Firing rates, synaptic operations and energy per image from spike counts (docs/method.md §7).

    Args:
        snn: the converted network; counts: {module: spikes [T, *units] over all images}, from
        `evaluate_snn`; images: how many images the counts are summed over; timesteps: T;
        shapes: {weighted layer: one sample's input shape}, from `input_shapes` of the ANN.
    """
    fanouts = {name: fan_out(getattr(snn, name), shape).cpu() for name, shape in shapes.items()}
    macs = {name: round(f.sum().item()) for name, f in fanouts.items()}
    first = next(iter(shapes))
    synops, source = {}, None  # source: the module whose spikes enter the next weighted layer
    for name, _ in snn.named_children():
        if name in counts:
            source = name
        elif name in fanouts and name != first:
            per_step = counts[source].flatten(1).double() @ fanouts[name].flatten().double()
            synops[name] = (per_step.cumsum(0) / images).tolist()
    total = [sum(ops[t] for ops in synops.values()) for t in range(timesteps)]
    rates = {name: counts[name].sum().item() / (images * counts[name][0].numel() * timesteps)
             for name, module in snn.named_children() if isinstance(module, SpikeNode)}
    return {
        "firing_rate": rates,
        "ann_macs_per_image": sum(macs.values()),
        "ann_macs_by_layer": macs,
        "first_layer_macs": macs[first],
        "synops_per_image": total,
        "synops_by_layer": synops,
        "ann_energy_pj": sum(macs.values()) * PJ_PER_MAC,
        "snn_energy_pj": [macs[first] * PJ_PER_MAC + ops * PJ_PER_AC for ops in total],
        "energy_model": ENERGY_MODEL,
    }


def at_ann_level(result):
    """(t, SynOps, energy in pJ) per image at the first step at the ANN's level, or None."""
    t = result[AT_ANN_LEVEL]
    if t is None:
        return None
    eff = result["efficiency"]
    return t, eff["synops_per_image"][t - 1], eff["snn_energy_pj"][t - 1]


# ----------------------------------------------------------------------------- one run


class Planned(NamedTuple):
    """One conversion to run: a loaded checkpoint, its ANN and the settings."""

    label: str
    path: Path
    checkpoint: dict
    ann: nn.Module
    settings: Settings


def run(planned, batches, timesteps, device, validation=None):
    """Convert and simulate one `planned` conversion on `batches`; the result dict (JSON-ready).

    With an exit rule, `validation` (Batches) chooses the threshold unless the settings give one.
    """
    snn = build_snn(planned.checkpoint, planned.ann, planned.settings).to(device)
    activation = planned.checkpoint.get("activation", "relu")
    settings = planned.settings._asdict() | {  # and the network they apply to
        "activation": activation,
        "levels": planned.checkpoint.get("levels") if activation == "qcfs" else None}
    print(f"simulating {len(batches.labels)} test images for {timesteps} steps on {device}: "
          f"{planned.path}, {settings_text(settings)}")
    early = None
    if planned.settings.exit_rule == "none":
        start = time.perf_counter()
        snn_accuracy, counts = evaluate_snn(snn, batches, timesteps, device)
        seconds = time.perf_counter() - start
    else:
        snn_accuracy, counts, seconds, early = run_early_exit(
            snn, planned, batches, validation, timesteps, device)
    ann_accuracy = evaluate(planned.ann, batches, device)
    result = {
        "ann_accuracy": ann_accuracy,
        "snn_accuracy": snn_accuracy,
        "timesteps": timesteps,
        AT_ANN_LEVEL: first_step_within(snn_accuracy, ann_accuracy),
        "settings": settings,
        "checkpoint": str(planned.path),
        "test_images": len(batches.labels),
        "device": str(device),
        "simulation_seconds": round(seconds, 2),
        "efficiency": efficiency(snn, counts, len(batches.labels), timesteps,
                                 input_shapes(planned.ann)),
    }
    if early:
        eff = result["efficiency"]
        result["early_exit"] = early | {"synops_per_image": eff["synops_per_image"][-1],
                                        "energy_pj_per_image": eff["snn_energy_pj"][-1]}
    return result


def run_early_exit(snn, planned, batches, validation, timesteps, device):
    """Early exit of `snn` on `batches`, its threshold chosen on `validation` if not given.

    Returns (accuracy with the steps capped at t, counts, the early-exit simulation's seconds,
    the record for snn_early_exit.json without the energy). Also simulates every test image
    for all T steps (the curve over thresholds and the fixed-T accuracy) and for the fixed T
    that first reaches early exit's accuracy, timed in the same run.
    """
    rule, threshold = planned.settings.exit_rule, planned.settings.exit_threshold
    deadline = planned.settings.exit_deadline
    record = {"rule": rule, "threshold": threshold, "deadline": deadline or timesteps,
              "chosen_on": "given"}
    grid = [threshold]
    if threshold is None:
        values, predictions, labels = record_settledness(snn, validation, timesteps, device, rule)
        grid = threshold_grid(values)
        table = exit_table(values, predictions, labels, grid)
        val_ann = evaluate(planned.ann, validation, device)
        threshold, deadline, within = choose_exit(
            table, grid, val_ann, planned.settings.exit_margin,
            [deadline] if deadline else range(1, timesteps + 1))
        curve = exit_curve(table, grid, deadline)
        chosen = next(c for c in curve if c["threshold"] == threshold)
        record |= {"threshold": threshold, "deadline": deadline, "chosen_on": "validation",
                   "curve": curve, "validation_images": len(labels),
                   "validation_ann_accuracy": val_ann, "validation_accuracy": chosen["accuracy"],
                   "validation_mean_steps": chosen["mean_steps"], "within_margin": within}
    deadline = record["deadline"]
    values, predictions, labels = record_settledness(snn, batches, timesteps, device, rule)
    fixed = (predictions == labels).double().mean(1).tolist()
    test_curve = exit_curve(exit_table(values, predictions, labels, grid), grid, deadline)
    accuracy, counts, steps, chosen = evaluate_early_exit(snn, batches, timesteps, device, rule,
                                                          threshold, deadline)
    fixed_t = first_step_within(fixed, accuracy[-1], margin=0) or timesteps
    times = {"early exit": [], "fixed": []}  # after that warm-up, alternating: a fair median
    for _ in range(EXIT_TIMING_REPEATS):
        for name, simulate_them in (
                ("fixed", lambda: evaluate_snn(snn, batches, fixed_t, device)),
                ("early exit", lambda: evaluate_early_exit(snn, batches, timesteps, device, rule,
                                                           threshold, deadline))):
            start = time.perf_counter()
            simulate_them()
            times[name].append(time.perf_counter() - start)
    seconds, fixed_seconds = (statistics.median(times[k]) for k in ("early exit", "fixed"))
    settled = values.gather(0, (steps - 1)[None])[0]  # each image's value when it stopped
    order = sorted(range(len(steps)), key=lambda i: (-steps[i].item(), settled[i].item()))
    order = order[:HARDEST]  # the longest runs, the least settled first
    record |= {
        "test_accuracy": accuracy[-1],
        "mean_steps": steps.double().mean().item(),
        "exit_steps": torch.bincount(steps - 1, minlength=timesteps).tolist(),
        "seconds": round(seconds, 3),
        "fixed_timesteps": fixed_t,
        "fixed_accuracy": fixed[fixed_t - 1],
        "fixed_seconds": round(fixed_seconds, 3),
        "timing": f"median of {EXIT_TIMING_REPEATS} runs of each, alternating, after a warm-up",
        "fixed_accuracy_per_step": fixed,
        "test_curve": test_curve,
        "hardest": [{"index": i, "label": labels[i].item(), "prediction": chosen[i].item(),
                     "exit_step": steps[i].item(), rule: settled[i].item()} for i in order],
    }
    return accuracy, counts, seconds, record


def validation_split(planned, train_images, train_labels, batch_size):
    """The validation images lenet5.py held out for `planned`'s checkpoint, from its seed."""
    args = planned.checkpoint.get("args", {})
    _, index = split_train_val(len(train_labels), args["val_size"], planned.checkpoint["seed"])
    return Batches(train_images[index], train_labels[index], batch_size)


def needs_validation(planned):
    """Whether `planned` chooses an exit threshold; an error if its checkpoint has no split."""
    if planned.settings.exit_rule == "none" or planned.settings.exit_threshold is not None:
        return False
    args = planned.checkpoint.get("args")
    if not (isinstance(args, dict) and isinstance(args.get("val_size"), int)
            and args["val_size"] > 0 and isinstance(planned.checkpoint.get("seed"), int)):
        raise UserError(f"{planned.path} records no validation split (seed and val_size) to "
                        "choose the exit threshold on: give --exit-threshold")
    return True


def add_channel_percentiles(planned, data_dir, device):
    """Give a checkpoint written before they were recorded its per-channel percentiles.

    They are measured as lenet5.py does, on the same training images (in memory only; the file
    is not changed).
    """
    if "channel_percentiles" in planned.checkpoint:
        return
    print(f"{planned.path} has no per-channel percentiles: measuring them on the training images "
          "its per-layer ones came from")
    planned.checkpoint["channel_percentiles"] = remeasure_percentiles(
        planned.checkpoint, planned.ann, data_dir, device)[1]


def run_all(plan, data_dir, limit, batch_size, timesteps, device):
    """`run` every entry of `plan` on the same test images (the first `limit`, or all).

    Every entry's scales and validation split are checked first, so a bad setting fails before
    anything is simulated.
    """
    validated = [needs_validation(planned) for planned in plan]
    for planned in plan:
        if planned.settings.norm != "layer":
            add_channel_percentiles(planned, data_dir, device)
        activation_scales(planned.checkpoint, planned.settings.percentile, 1,
                          per_channel_layers(planned.ann, planned.settings.norm))
    images, labels = load_mnist(data_dir, train=False)
    if limit and limit > len(labels):
        raise UserError(f"--limit {limit}: the test set has only {len(labels)} images")
    batches = Batches(images[:limit], labels[:limit], batch_size)
    train = load_mnist(data_dir, train=True) if any(validated) else None
    return [run(planned, batches, timesteps, device,
                validation_split(planned, *train, batch_size) if needed else None)
            for planned, needed in zip(plan, validated, strict=True)]


# ----------------------------------------------------------------------------- reporting


def report_steps(timesteps):
    """The steps the table shows: 1, 2, 4, 8, ... and the last."""
    steps = [2**i for i in range(int(math.log2(timesteps)) + 1)]
    return steps if steps[-1] == timesteps else steps + [timesteps]


def settings_text(settings):
    scaling = (f"θ=λ/γ (QCFS, L={settings['levels']})" if settings["percentile"] is None
               else f"p={settings['percentile']}")
    return (f"{scaling} per {settings.get('norm', NORM)}, γ={settings['gamma']}, "
            f"V0={settings['v0']:g}θ, reset "
            f"{'to 0' if settings.get('reset', RESET) == 'zero' else 'by subtraction'}, "
            f"lateral inhibition {'on' if settings['lateral_inhibition'] else 'off'}, "
            f"{settings['readout']} read-out"
            + (f", spike calibration {settings['spicalib']}" if settings.get("spicalib") else "")
            + exit_text(settings))


def exit_text(settings):
    rule = settings.get("exit_rule", EXIT_RULE)
    if rule == "none":
        return ""
    threshold, deadline = settings.get("exit_threshold"), settings.get("exit_deadline")
    text = f", early exit at {rule} ≥ " + ("X" if threshold is None else f"{threshold:.5g}")
    text += f" by step {deadline}" if deadline else ""
    if threshold is None:
        text += " (X chosen on validation)" if deadline else " (X, deadline on validation)"
    return text


def step_axis(ax, timesteps):
    ax.set_xscale("log", base=2)
    ax.set_xticks(report_steps(timesteps))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("time step t")
    ax.grid(True, which="both", alpha=0.3)


def save_figure(fig, path):
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_accuracy(result, path):
    """SNN accuracy per step (log step axis), the ANN as a line; full range and a zoom."""
    steps = range(1, result["timesteps"] + 1)
    snn = [100 * a for a in result["snn_accuracy"]]
    ann = 100 * result["ann_accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, zoom in zip(axes, (False, True), strict=True):
        ax.plot(steps, snn, marker=".", label="SNN")
        ax.axhline(ann, color="tab:red", linestyle="--", label=f"ANN ({ann:.2f} %)")
        step_axis(ax, result["timesteps"])
        ax.set_ylabel("test accuracy after t steps (%)")
        if zoom:
            ax.set_ylim(ann - 2, min(100, ann + 0.5))
            ax.set_title("zoom near the ANN")
        else:
            ax.set_ylim(0, 100)
            ax.set_title("full range")
        ax.legend(loc="lower right")
    fig.suptitle(f"LeNet5 SNN on {result['test_images']} MNIST test images: "
                 f"{settings_text(result['settings'])}", fontsize=10)
    save_figure(fig, path)


def plot_energy_axis(ax, results, labels, styles):
    """Accuracy against estimated energy per image: one curve per result, the ANN(s) as points."""
    for result, label, style in zip(results, labels, styles, strict=True):
        eff = result["efficiency"]
        ax.plot([e / 1e6 for e in eff["snn_energy_pj"]], [100 * a for a in result["snn_accuracy"]],
                marker=".", markersize=3, label=label, **style)
        ax.plot(eff["ann_energy_pj"] / 1e6, 100 * result["ann_accuracy"], marker="*",
                markersize=14, linestyle="none", color=style["color"], markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xticks([0.25, 0.5, 0.6, 0.8, 1, 1.5, 2, 3, 4, 6, 8, 16, 32])
    ax.set_xlim(min(min(r["efficiency"]["snn_energy_pj"]) for r in results) / 1e6 * 0.9,
                max(max(r["efficiency"]["snn_energy_pj"]) for r in results) / 1e6 * 1.1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("estimated energy per image (µJ; ★ = the ANN)")
    ax.set_ylabel("test accuracy (%)")
    ann = 100 * results[0]["ann_accuracy"]
    ax.set_ylim(ann - 3, min(100, ann + 0.5))
    ax.grid(True, which="both", alpha=0.3)


def plot_efficiency(result, path):
    """Firing rate per layer, SynOps per image against T, accuracy against energy per image."""
    eff, timesteps = result["efficiency"], result["timesteps"]
    steps = range(1, timesteps + 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rates = eff["firing_rate"]
    axes[0].bar(list(rates), list(rates.values()))
    axes[0].set_ylabel(f"firing rate (spikes / neuron / step, T = {timesteps})")
    axes[0].set_title("firing rate per layer")
    for name, ops in eff["synops_by_layer"].items():
        axes[1].plot(steps, ops, label=f"into {name}")
    axes[1].plot(steps, eff["synops_per_image"], color="k", label="all layers")
    axes[1].axhline(eff["ann_macs_per_image"], color="tab:red", linestyle="--",
                    label=f"ANN MACs ({eff['ann_macs_per_image'] / 1e3:.0f}k)")
    step_axis(axes[1], timesteps)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("synaptic operations per image after t steps")
    axes[1].set_title("SynOps against time")
    axes[1].legend(fontsize=8)
    plot_energy_axis(axes[2], [result], ["SNN, one point per step"], [{"color": "tab:blue"}])
    axes[2].set_title("accuracy against energy (memory traffic ignored)")
    axes[2].legend(loc="lower right")
    fig.suptitle(f"LeNet5 SNN efficiency on {result['test_images']} MNIST test images: "
                 f"{settings_text(result['settings'])}", fontsize=10)
    save_figure(fig, path)


def print_table(result):
    ann = result["ann_accuracy"]
    print(f"{'t':>5}  {'SNN':>7}  {'SNN - ANN':>9}  {'SynOps':>8}  {'energy':>9}")
    eff = result["efficiency"]
    for t in report_steps(result["timesteps"]):
        acc = result["snn_accuracy"][t - 1]
        print(f"{t:>5}  {acc:7.2%}  {100 * (acc - ann):+8.2f}pp  "
              f"{eff['synops_per_image'][t - 1] / 1e3:7.0f}k  "
              f"{eff['snn_energy_pj'][t - 1] / 1e6:6.3f} µJ")
    print(f"  ANN  {ann:7.2%}  {'':9}  {eff['ann_macs_per_image'] / 1e3:7.0f}k  "
          f"{eff['ann_energy_pj'] / 1e6:6.3f} µJ   (the ANN's: MACs, not SynOps)")
    reached = at_ann_level(result)
    level = f"first step within {100 * ANN_LEVEL:g} pp of the ANN"
    if reached:
        t, ops, energy = reached
        print(f"{level}: {t} ({ops / 1e3:.0f}k SynOps, "
              f"{energy / eff['ann_energy_pj']:.2f} × the ANN's energy per image)")
    else:
        print(f"{level}: not within {result['timesteps']} steps")
    print("firing rates: " + ", ".join(f"{name} {rate:.3f}"
                                       for name, rate in eff["firing_rate"].items()))


def early_exit_record(result):
    """snn_early_exit.json: the early-exit record of `result` and what it was run on."""
    return result["early_exit"] | {
        key: result[key] for key in ("ann_accuracy", "checkpoint", "settings", "test_images",
                                     "timesteps", "device")} | {
        "accuracy_with_steps_capped": result["snn_accuracy"],
        "synops_with_steps_capped": result["efficiency"]["synops_per_image"]}


def print_early_exit(record):
    chosen = ("chosen on validation" if record["chosen_on"] == "validation" else "given")
    ratio = record["seconds"] / record["fixed_seconds"]
    print(f"early exit, {record['rule']} ≥ {record['threshold']:.5g} by step "
          f"{record['deadline']} ({chosen}): "
          f"{record['test_accuracy']:.2%} at {record['mean_steps']:.2f} steps on average "
          f"({record['synops_per_image'] / 1e3:.0f}k SynOps, "
          f"{record['energy_pj_per_image'] / 1e6:.3f} µJ per image); fixed T reaches that "
          f"accuracy at t = {record['fixed_timesteps']}; time {record['seconds']:.2f}s against "
          f"{record['fixed_seconds']:.2f}s for fixed T = {record['fixed_timesteps']} "
          f"({ratio:.2f}×, {record['timing']})")
    if record.get("within_margin") is False:
        print("  (no threshold came within --exit-margin of the ANN on validation: the most "
              "accurate one was taken)")


def plot_early_exit(fixed, record, images, path):
    """Accuracy against mean steps (fixed T and early exit), exit-step histogram, hardest images."""
    fig = plt.figure(figsize=(16, 5.2))
    grid = fig.add_gridspec(1, 3, width_ratios=(1.3, 1, 1))
    ax = fig.add_subplot(grid[0])
    timesteps = fixed["timesteps"]
    fixed_accuracy = [100 * a for a in record["fixed_accuracy_per_step"]]
    ax.plot(range(1, timesteps + 1), fixed_accuracy, marker=".", label="fixed T (test)")
    for curve, label, style in ((record.get("curve"), "early exit, validation", ":"),
                                (record["test_curve"], "early exit, test", "-")):
        if curve and len(curve) > 1:
            ax.plot([c["mean_steps"] for c in curve], [100 * c["accuracy"] for c in curve],
                    linestyle=style, label=f"{label} (one point per threshold, deadline "
                                           f"{record['deadline']})")
    ax.plot(record["mean_steps"], 100 * record["test_accuracy"], marker="*", markersize=15,
            color="tab:red", linestyle="none", markeredgecolor="k",
            label=f"chosen: {record['rule']} ≥ {record['threshold']:.5g} by step "
                  f"{record['deadline']}")
    ann = 100 * fixed["ann_accuracy"]
    margin = 100 * fixed["settings"].get("exit_margin", ANN_LEVEL)
    ax.axhspan(ann - margin, ann, color="tab:gray", alpha=0.25,
               label=f"ANN ({ann:.2f} %) minus {margin:g} pp")
    step_axis(ax, timesteps)
    ax.set_xlabel("time steps (mean over the test images)")
    ax.set_ylim(ann - 3, min(100, ann + 0.5))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against steps")
    ax.legend(fontsize=7, loc="lower right")
    ax = fig.add_subplot(grid[1])
    counts = record["exit_steps"]
    ax.bar(range(1, len(counts) + 1), counts)
    ax.set_xlim(0.4, record["deadline"] + 0.6)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("exit step")
    ax.set_ylabel("test images")
    ax.set_title(f"exit steps (mean {record['mean_steps']:.2f})")
    hardest = record["hardest"]
    cells = grid[2].subgridspec(4, 4, wspace=0.05, hspace=0.45)
    for k, entry in enumerate(hardest):
        cell = fig.add_subplot(cells[k // 4, k % 4])
        cell.imshow(images[entry["index"]].numpy(), cmap="gray_r")
        cell.set_axis_off()
        colour = "k" if entry["label"] == entry["prediction"] else "tab:red"
        cell.set_title(f"{entry['label']}→{entry['prediction']} t={entry['exit_step']}",
                       fontsize=7, color=colour)
    settings = record["settings"] | {"exit_threshold": record["threshold"],
                                     "exit_deadline": record["deadline"]}
    fig.suptitle(f"LeNet5 SNN early exit on {fixed['test_images']} MNIST test images: "
                 f"{settings_text(settings)} ({record['chosen_on']})\nright: the {len(hardest)} "
                 f"test images that ran longest, the least settled first (label→prediction, exit "
                 f"step; red: wrong)",
                 fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- compare mode


def compare_settings(settings, percentiles, every_knob=True):
    """(label, Settings) pairs: `settings`, then one knob changed at a time, then BrainCog's.

    With every_knob=False, only the burst limits gamma of COMPARE_GAMMAS and early exit.
    """
    variants = [(GIVEN, settings)]

    def vary(label, **change):
        variants.append((label, settings._replace(**change)))
    if every_knob:
        vary("lateral inhibition " + ("off" if settings.lateral_inhibition else "on"),
             lateral_inhibition=not settings.lateral_inhibition)
        vary("V0 = " + ("0" if settings.v0 else "θ/2"), v0=0.0 if settings.v0 else V0)
    for gamma in COMPARE_GAMMAS:
        if gamma != settings.gamma:
            vary(f"γ = {gamma}", gamma=gamma)
    if every_knob:
        for key in percentiles:
            if key != settings.percentile:
                vary(f"p = {key}", percentile=key)
        other = next(r for r in READOUTS if r != settings.readout)
        vary(f"read-out {other}", readout=other)
        if settings.percentile is not None:  # a QCFS network's trained lambda is per layer
            for norm in NORMS:
                if norm != settings.norm:
                    vary(f"norm per {norm}", norm=norm)
        vary("reset " + ("to 0" if settings.reset == "subtract" else "by subtraction"),
             reset=next(r for r in RESETS if r != settings.reset))
        for allowance in (0, *COMPARE_SPICALIBS):
            if allowance != settings.spicalib:
                vary(f"spike calibration {allowance or 'off'}", spicalib=allowance)
    if settings.exit_rule == "none":
        vary(f"early exit ({COMPARE_EXIT_RULE})", exit_rule=COMPARE_EXIT_RULE)
    else:
        vary("early exit off", exit_rule="none", exit_threshold=None, exit_deadline=None)
    if every_knob:
        variants.append((BRAINCOG, BRAINCOG_SETTINGS))
    return variants


def compare_rows(results):
    """One table row per result: accuracy at 1, 2, 4, ... steps, SynOps and energy.

    For early exit, the steps are a cap (docs/method.md §9); `early_exit_*` give its own
    accuracy, mean steps and energy per image with the cap at T.
    """
    rows = []
    for result in results:
        row = {"checkpoint": result["checkpoint"], "setting": result["label"],
               "ann": round(100 * result["ann_accuracy"], 2)}
        row |= {f"t={t}": round(100 * result["snn_accuracy"][t - 1], 2)
                for t in report_steps(result["timesteps"])}
        reached = at_ann_level(result)
        eff = result["efficiency"]
        row |= {AT_ANN_LEVEL: reached[0] if reached else None,
                "synops_there": round(reached[1]) if reached else None,
                "energy_there_uJ": round(reached[2] / 1e6, 3) if reached else None,
                "ann_energy_uJ": round(eff["ann_energy_pj"] / 1e6, 3)}
        early = result.get("early_exit")
        row |= {"early_exit_accuracy": round(100 * early["test_accuracy"], 2) if early else None,
                "early_exit_mean_steps": round(early["mean_steps"], 3) if early else None,
                "early_exit_energy_uJ": round(early["energy_pj_per_image"] / 1e6, 3)
                if early else None}
        rows.append(row)
    return rows


def plot_compare(results, path):
    """Accuracy per step of every run overlaid; accuracy against energy of the main runs.

    Runs of --checkpoint are solid lines, those of further checkpoints dashed. The energy panel
    shows each checkpoint's run as given and BrainCog's reference, to stay readable, and each
    early-exit run as one point.
    """
    labels = [f"{Path(r['checkpoint']).stem}: {r['label']}" for r in results]
    first = results[0]["checkpoint"]
    styles = [{"color": plt.cm.tab20(i % 20), "linestyle": "-" if r["checkpoint"] == first
               else "--"} for i, r in enumerate(results)]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    timesteps = results[0]["timesteps"]
    for result, label, style in zip(results, labels, styles, strict=True):
        axes[0].plot(range(1, timesteps + 1), [100 * a for a in result["snn_accuracy"]],
                     marker=".", markersize=3, label=label, **style)
    for ann in sorted({r["ann_accuracy"] for r in results}):
        axes[0].axhline(100 * ann, color="k", linestyle=":", linewidth=1)
    step_axis(axes[0], timesteps)
    best_ann = 100 * max(r["ann_accuracy"] for r in results)
    axes[0].set_ylim(best_ann - 4, min(100, best_ann + 0.5))
    axes[0].set_ylabel("test accuracy after t steps (%; dotted: the ANNs)")
    axes[0].set_title("accuracy per time step")
    axes[0].legend(fontsize=7, loc="lower right")
    main = [i for i, r in enumerate(results) if r["label"] in (GIVEN, BRAINCOG)]
    plot_energy_axis(axes[1], [results[i] for i in main], [labels[i] for i in main],
                     [styles[i] for i in main])
    for result, label, style in zip(results, labels, styles, strict=True):
        if "early_exit" in result:  # one point: its accuracy and energy per image
            early = result["early_exit"]
            axes[1].plot(early["energy_pj_per_image"] / 1e6, 100 * early["test_accuracy"],
                         marker="X", markersize=10, linestyle="none", color=style["color"],
                         markeredgecolor="k", label=f"{label} ({early['mean_steps']:.2f} steps)")
    axes[1].legend(fontsize=7, loc="lower right")
    axes[1].set_title("accuracy against estimated energy per image (memory traffic ignored)")
    fig.suptitle(f"LeNet5 SNN settings compared on {results[0]['test_images']} MNIST test images, "
                 f"T = {timesteps}", fontsize=10)
    save_figure(fig, path)


def print_compare(rows):
    steps = [key for key in rows[0] if key.startswith("t=")]
    print(f"{'setting':42s} " + " ".join(f"{s:>6}" for s in steps) + f" {'ANN':>6} "
          f"{'at ANN':>8} {'µJ there':>8}   early exit: accuracy at mean steps")
    for row in rows:
        name = f"{Path(row['checkpoint']).stem}: {row['setting']}"[:42]
        there = row[AT_ANN_LEVEL]
        early = (f"   {row['early_exit_accuracy']:.2f} at {row['early_exit_mean_steps']:.2f}"
                 if row["early_exit_mean_steps"] is not None else "")
        print(f"{name:42s} " + " ".join(f"{row[s]:6.2f}" for s in steps) + f" {row['ann']:6.2f} "
              f"{there or '-':>8} {row['energy_there_uJ'] or '-':>8}{early}")


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Convert the trained LeNet5 into a spiking network, simulate it on the MNIST "
                    "test set and plot its accuracy, spikes and estimated energy per time step "
                    f"against the ANN. BrainCog's reference setting: --v0 {BRAINCOG_SETTINGS.v0:g} "
                    f"--gamma {BRAINCOG_SETTINGS.gamma} --percentile {BRAINCOG_SETTINGS.percentile}"
                    " --no-lateral-inhibition.")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                        help="checkpoint written by lenet5.py (ReLU or QCFS)")
    parser.add_argument("--compare", nargs="*", type=Path, default=None, metavar="CHECKPOINT",
                        help="compare settings instead of one run: the given settings, each knob "
                             "changed alone and BrainCog's reference on --checkpoint, plus each "
                             "CHECKPOINT listed (e.g. a QCFS one) at the given settings and with "
                             "γ = 1, 2, 4; writes compare.png, .json and .csv")
    parser.add_argument("--timesteps", type=positive_int, default=TIMESTEPS,
                        help="simulation steps T")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help="test images simulated at once")
    parser.add_argument("--percentile", type=percentile_arg, default=None,
                        help="activation percentile that sets each layer's scale (one the "
                             "checkpoint recorded: 99, 99.9, 99.99, 100); default: a QCFS "
                             "checkpoint's trained thresholds, else the checkpoint's percentile")
    parser.add_argument("--gamma", type=positive_int, default=GAMMA,
                        help="most spikes a neuron may fire per step (1: plain IF; 2: burst)")
    parser.add_argument("--v0", type=fraction, default=V0,
                        help="initial membrane potential in units of the threshold, in [0, 1)")
    parser.add_argument("--no-lateral-inhibition", dest="lateral_inhibition",
                        action="store_false", help="use BrainCog's max-pool without lateral "
                        "inhibition (the default pools exactly, with it)")
    parser.add_argument("--readout", choices=READOUTS, default=READOUT,
                        help="sum the output layer's currents, or count its spikes")
    parser.add_argument("--norm", choices=NORMS, default=NORM,
                        help="one activation scale per layer; per output channel of each "
                             "convolution (BrainCog's channelnorm); or that and per neuron of "
                             "each linear layer (Spiking-YOLO). Needs percentiles, not a QCFS "
                             "network's thresholds")
    parser.add_argument("--reset", choices=RESETS, default=RESET,
                        help="after firing s spikes a neuron's potential loses s thresholds, or "
                             "goes to 0")
    parser.add_argument("--spicalib", type=non_negative_int, default=SPICALIB, metavar="STEPS",
                        help="spike calibration's allowance: a neuron silent for longer than its "
                             "mean interval between spikes plus STEPS emits -1 (0: off)")
    parser.add_argument("--exit-rule", choices=EXIT_RULES, default=EXIT_RULE,
                        help="stop each image once its answer is settled: margin = top-1 minus "
                             "top-2 of its time-averaged output, confidence = the largest "
                             "softmax of it; writes snn_early_exit.json and .png besides")
    parser.add_argument("--exit-threshold", type=float, default=None, metavar="X",
                        help="stop where the rule's value reaches X (margin: X > 0; "
                             "confidence: 0 < X < 1); default: chosen on the checkpoint's "
                             "validation split, the fewest mean steps within --exit-margin of "
                             "the ANN there")
    parser.add_argument("--exit-deadline", type=positive_int, default=None, metavar="D",
                        help="the step by which every image stops (at most --timesteps); "
                             "default: chosen on validation with the threshold, or --timesteps "
                             "when --exit-threshold is given")
    parser.add_argument("--exit-margin", type=positive_float, default=100 * ANN_LEVEL,
                        metavar="PP", help="percentage points below the ANN's validation "
                        "accuracy the chosen threshold may lose")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="simulate the first N test images only (default: all 10,000)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder holding MNIST/")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR,
                        help="where the plots and the JSON go")
    args = parser.parse_args(argv)
    threshold = args.exit_threshold
    if args.exit_deadline is not None and args.exit_rule == "none":
        parser.error("argument --exit-deadline: needs --exit-rule margin or confidence")
    if (args.exit_deadline or 0) > args.timesteps:
        parser.error(f"argument --exit-deadline: {args.exit_deadline} is beyond --timesteps "
                     f"{args.timesteps}")
    if threshold is not None:
        if args.exit_rule == "none":
            parser.error("argument --exit-threshold: needs --exit-rule margin or confidence")
        if not math.isfinite(threshold) or threshold <= 0 or (
                args.exit_rule == "confidence" and threshold >= 1):
            parser.error(f"argument --exit-threshold: {args.exit_rule} needs "
                         f"{'0 < X < 1' if args.exit_rule == 'confidence' else 'X > 0'}, "
                         f"got {threshold:g}")
    return args


def load_ann(path, device):
    """(checkpoint, its ANN on `device`) from a file written by lenet5.py."""
    checkpoint = load_checkpoint(path)
    return checkpoint, model_from_checkpoint(checkpoint, path).to(device)


def settings_from(args, checkpoint):
    """The Settings the command line asks for, applied to `checkpoint`."""
    return Settings(scaling_percentile(checkpoint, args.percentile), args.gamma, args.v0,
                    args.lateral_inhibition, args.readout, args.norm, args.reset, args.spicalib,
                    args.exit_rule, args.exit_threshold, args.exit_margin / 100,
                    args.exit_deadline)


def convert_and_simulate(args, device):
    """One run: load, convert, simulate; write the plots and the JSON; return the result."""
    checkpoint, ann = load_ann(args.checkpoint, device)
    settings = settings_from(args, checkpoint)
    plan = [Planned(GIVEN, args.checkpoint, checkpoint, ann, settings._replace(exit_rule="none"))]
    if settings.exit_rule != "none":
        plan.append(Planned("early exit", args.checkpoint, checkpoint, ann, settings))
    result, *early = run_all(plan, args.data_dir, args.limit, args.batch_size, args.timesteps,
                             device)
    plot_accuracy(result, args.out_dir / "snn_accuracy.png")
    plot_efficiency(result, args.out_dir / "snn_efficiency.png")
    write_json(args.out_dir / "snn_accuracy.json", result)
    print_table(result)
    written = "snn_accuracy.png, snn_efficiency.png and snn_accuracy.json"
    if early:
        record = early_exit_record(early[0])
        images = load_mnist(args.data_dir, train=False)[0]
        plot_early_exit(result, record, images, args.out_dir / "snn_early_exit.png")
        write_json(args.out_dir / "snn_early_exit.json", record)
        print_early_exit(record)
        written = written.replace(" and ", ", ") + ", snn_early_exit.png and .json"
        result = result | {"early_exit": record}
    print(f"wrote {written} in {args.out_dir} (simulation {result['simulation_seconds']:.0f}s)")
    return result


def compare(args, device):
    """Compare mode: `compare_settings` on --checkpoint and on each extra one; one figure."""
    plan = []
    for i, path in enumerate([args.checkpoint, *args.compare]):
        checkpoint, ann = load_ann(path, device)
        recorded = list(checkpoint.get("percentiles", {}).get(OUTPUT_LAYER, {}))
        plan += [Planned(label, path, checkpoint, ann, variant) for label, variant in
                 compare_settings(settings_from(args, checkpoint), recorded, every_knob=i == 0)]
    results = [result | {"label": planned.label} for planned, result in zip(
        plan, run_all(plan, args.data_dir, args.limit, args.batch_size, args.timesteps, device),
        strict=True)]
    rows = compare_rows(results)
    plot_compare(results, args.out_dir / "compare.png")
    write_json(args.out_dir / "compare.json", {"runs": results, "table": rows})
    write_csv(args.out_dir / "compare.csv", rows)
    print_compare(rows)
    print(f"wrote compare.png, compare.json and compare.csv in {args.out_dir}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        check_writable_dir(args.out_dir)
        return (compare if args.compare is not None else convert_and_simulate)(args, device)
    except UserError as e:
        sys.exit(f"lenet_convert.py: error: {e}")


if __name__ == "__main__":
    main()
