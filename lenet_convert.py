"""Convert the trained LeNet5 into a spiking neural network and measure it after every time step.

The conversion (docs/method.md) is three steps, each returning a new network: fold BatchNorm into
the convolutions, normalise each layer by the activation scale recorded in the checkpoint, and
replace ReLU by integrate-and-fire neurons (SpikeNode) and max-pooling by a spiking max-pool
(SMaxPool). The spiking network sees the analog image as a constant current at every step; the
output layer's currents are summed over time (or its spikes counted) and read out by argmax.

Example:
    python lenet_convert.py                          # checkpoints/lenet5_best.pt, T = 64
    python lenet_convert.py --v0 0 --gamma 2 --percentile 99.9 --no-lateral-inhibition
                                                     # BrainCog's reference setting
    python lenet_convert.py --compare checkpoints/lenet5_qcfs_best.pt   # every setting

Writes (into --out-dir, default results/):
    snn_accuracy.png    accuracy against time step, the ANN's as a line
    snn_efficiency.png  firing rates, synaptic operations and energy against time step
    snn_accuracy.json   the numbers of both, the settings and the checkpoint used
    compare.png, compare.json, compare.csv   with --compare, instead of the three above
"""

import copy
import math
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
    positive_int,
    remeasure_percentiles,
    resolve_device,
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
READOUT_NODE = "readout"  # the SpikeNode appended after the output layer for a spiking read-out
AT_ANN_LEVEL = f"first_step_within_{100 * ANN_LEVEL:g}pp"  # result key: first step at that level
GIVEN, BRAINCOG = "as given", "BrainCog reference"  # labels of compare mode's main runs


class Settings(NamedTuple):
    """How a checkpoint is converted; `percentile` None means a QCFS network's trained lambda."""

    percentile: str | None
    gamma: int = GAMMA
    v0: float = V0
    lateral_inhibition: bool = LATERAL_INHIBITION
    readout: str = READOUT
    norm: str = NORM
    reset: str = RESET
    spicalib: int = SPICALIB


BRAINCOG_SETTINGS = Settings("99.9", gamma=2, v0=0.0, lateral_inhibition=False, readout="analog")


# ----------------------------------------------------------------------------- spiking modules


class Counting(nn.Module):
    """A module with state across steps that counts its output spikes per step and unit.

    The counts live in one buffer that doubles when full: a small tensor kept from every step
    would fragment the heap between the large per-step tensors and make memory grow with T.
    """

    signed = False  # whether the output can be negative; then |output| is counted

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

    def __init__(self, threshold=1.0, gamma=1, v0=0.5, reset=RESET, allowance=SPICALIB):
        super().__init__()
        self.threshold, self.gamma, self.v0 = threshold, gamma, v0
        self.reset_mode, self.allowance = reset, allowance
        self.signed = allowance > 0
        self.reset()

    def restart(self):
        super().restart()
        self.mem = None
        self.last = None  # spike calibration's state, from the first step on

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
        scale_out = scale_out.view(-1, *[1] * (weight.dim() - 1))
    else:
        layer.bias.div_(scale_out)
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


def run(planned, batches, timesteps, device):
    """Convert and simulate one `planned` conversion on `batches`; the result dict (JSON-ready)."""
    snn = build_snn(planned.checkpoint, planned.ann, planned.settings).to(device)
    activation = planned.checkpoint.get("activation", "relu")
    settings = planned.settings._asdict() | {  # and the network they apply to
        "activation": activation,
        "levels": planned.checkpoint.get("levels") if activation == "qcfs" else None}
    print(f"simulating {len(batches.labels)} test images for {timesteps} steps on {device}: "
          f"{planned.path}, {settings_text(settings)}")
    start = time.perf_counter()
    snn_accuracy, counts = evaluate_snn(snn, batches, timesteps, device)
    seconds = time.perf_counter() - start
    ann_accuracy = evaluate(planned.ann, batches, device)
    return {
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

    Every entry's scales are checked first, so a bad setting fails before any data is loaded.
    """
    for planned in plan:
        if planned.settings.norm != "layer":
            add_channel_percentiles(planned, data_dir, device)
        activation_scales(planned.checkpoint, planned.settings.percentile, 1,
                          per_channel_layers(planned.ann, planned.settings.norm))
    images, labels = load_mnist(data_dir, train=False)
    if limit and limit > len(labels):
        raise UserError(f"--limit {limit}: the test set has only {len(labels)} images")
    batches = Batches(images[:limit], labels[:limit], batch_size)
    return [run(planned, batches, timesteps, device) for planned in plan]


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
            + (f", spike calibration {settings['spicalib']}" if settings.get("spicalib") else ""))


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


# ----------------------------------------------------------------------------- compare mode


def compare_settings(settings, percentiles, every_knob=True):
    """(label, Settings) pairs: `settings`, then one knob changed at a time, then BrainCog's.

    With every_knob=False, only the burst limits gamma of COMPARE_GAMMAS are varied.
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
        variants.append((BRAINCOG, BRAINCOG_SETTINGS))
    return variants


def compare_rows(results):
    """One table row per result: accuracy at 1, 2, 4, ... steps, SynOps and energy."""
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
        rows.append(row)
    return rows


def plot_compare(results, path):
    """Accuracy per step of every run overlaid; accuracy against energy of the main runs.

    Runs of --checkpoint are solid lines, those of further checkpoints dashed. The energy panel
    shows each checkpoint's run as given and BrainCog's reference, to stay readable.
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
    axes[1].legend(fontsize=7, loc="lower right")
    axes[1].set_title("accuracy against estimated energy per image (memory traffic ignored)")
    fig.suptitle(f"LeNet5 SNN settings compared on {results[0]['test_images']} MNIST test images, "
                 f"T = {timesteps}", fontsize=10)
    save_figure(fig, path)


def print_compare(rows):
    steps = [key for key in rows[0] if key.startswith("t=")]
    print(f"{'setting':42s} " + " ".join(f"{s:>6}" for s in steps) + f" {'ANN':>6} "
          f"{'at ANN':>8} {'µJ there':>8}")
    for row in rows:
        name = f"{Path(row['checkpoint']).stem}: {row['setting']}"[:42]
        there = row[AT_ANN_LEVEL]
        print(f"{name:42s} " + " ".join(f"{row[s]:6.2f}" for s in steps) + f" {row['ann']:6.2f} "
              f"{there or '-':>8} {row['energy_there_uJ'] or '-':>8}")


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
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="simulate the first N test images only (default: all 10,000)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder holding MNIST/")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR,
                        help="where the plots and the JSON go")
    return parser.parse_args(argv)


def load_ann(path, device):
    """(checkpoint, its ANN on `device`) from a file written by lenet5.py."""
    checkpoint = load_checkpoint(path)
    return checkpoint, model_from_checkpoint(checkpoint, path).to(device)


def settings_from(args, checkpoint):
    """The Settings the command line asks for, applied to `checkpoint`."""
    return Settings(scaling_percentile(checkpoint, args.percentile), args.gamma, args.v0,
                    args.lateral_inhibition, args.readout, args.norm, args.reset, args.spicalib)


def convert_and_simulate(args, device):
    """One run: load, convert, simulate; write the plots and the JSON; return the result."""
    checkpoint, ann = load_ann(args.checkpoint, device)
    planned = Planned(GIVEN, args.checkpoint, checkpoint, ann, settings_from(args, checkpoint))
    result, = run_all([planned], args.data_dir, args.limit, args.batch_size, args.timesteps,
                      device)
    plot_accuracy(result, args.out_dir / "snn_accuracy.png")
    plot_efficiency(result, args.out_dir / "snn_efficiency.png")
    write_json(args.out_dir / "snn_accuracy.json", result)
    print_table(result)
    print(f"wrote snn_accuracy.png, snn_efficiency.png and snn_accuracy.json in {args.out_dir} "
          f"(simulation {result['simulation_seconds']:.0f}s)")
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
