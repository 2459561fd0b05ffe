"""Convert the trained LeNet5 into a spiking neural network and measure it after every time step.

The conversion (docs/method.md) is three steps, each returning a new network: fold BatchNorm into
the convolutions, normalise each layer by the activation scale recorded in the checkpoint, and
replace ReLU by integrate-and-fire neurons (SpikeNode) and max-pooling by a spiking max-pool
(SMaxPool). The spiking network sees the analog image as a constant current at every step (or,
with --input spikes, an input layer of neurons turns it into spikes: SpikingInput); the
output layer's currents are summed over time (or its spikes counted) and read out by argmax.
This file holds that core, top to bottom: the spiking modules, the conversion, the simulation,
one run and its report, and `main`, which tells the plain run step by step. What it builds on
has a module each, none importing this file: options.py (every option and its default),
layer_scales.py (the scales), constant_input.py (the first neuron layer, whose input never
changes, counted in closed form: the same spikes, docs/method.md §8), counting.py and
efficiency.py (spike counts, SynOps, energy). The features are handed over to from `main` when
asked for: early_exit.py, compare.py and look_inside.py.

Examples:
    python lenet_convert.py                          # checkpoints/lenet5_best.pt, T = 64
    python lenet_convert.py --v0 0 --percentile 99.9 --no-lateral-inhibition   # BrainCog's
    python lenet_convert.py --compare checkpoints/lenet5_qcfs_best.pt   # every setting
    python lenet_convert.py --norm neuron --reset zero --spicalib 4   # BrainCog's other options
    python lenet_convert.py --checkpoint checkpoints/lenet5_qcfs_best.pt --exit-rule margin
    python lenet_convert.py --look-inside 0 late     # one digit's spikes, layer by layer
    python lenet_convert.py --input spikes           # the image as spikes: C1 costs no MAC

Writes (into --out-dir, default results/):
    snn_accuracy.png    accuracy against time step, the ANN's as a line
    snn_efficiency.png  firing rates, synaptic operations and energy against time step
    snn_accuracy.json   the numbers of both, the settings and the checkpoint used
    snn_early_exit.png, snn_early_exit.json   with --exit-rule, besides: per-image early exit
    compare.png, compare.json, compare.csv   with --compare, instead of the three above
    inside_N.png, .gif, .json   with --look-inside, instead: test image N, layer by layer
"""

import cli  # first: see its docstring

# isort: split
import copy
import math
import textwrap
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from tqdm import tqdm

import efficiency
import energy_models
from checkpoint import OUTPUT_LAYER, load_checkpoint
from cli import UserError
from constant_input import in_closed_form, stages
from counting import Counting, max_pool
from layer_scales import conversion_scales
from lenet5 import QCFS, LeNet5, evaluate, model_from_checkpoint
from mnist import IMAGE_SHAPE, Batches, load_mnist
from options import (
    ANN_MARGIN,
    DEFAULT_SETTINGS,
    RESET,
    SPICALIB,
    V0,
    Settings,
    input_text,
    parse_args,
    settings_from,
    settings_record,
)
from plots import plt, report_steps, save_figure, settings_text, step_axis
from recorded import check_recorded_maxima, remeasure_percentiles

# ----------------------------------------------------------------------------- constants
# Every option's default is in options.py, with its flag; these are the method's own.
POOL_ACCUMULATED_WEIGHT = 1000.0  # BrainCog's K: the pool without inhibition weighs C_t by it
READOUT_NODE = "readout"  # the SpikeNode appended after the output layer for a spiking read-out
INPUT_NODE = "input"  # the SpikingInput before the first layer, where the image enters as spikes
AT_ANN_LEVEL_KEY = f"first_step_within_{100 * ANN_MARGIN:g}pp"  # result key: the first step there


# ----------------------------------------------------------------------------- spiking modules


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
        if self.mem is None:  # V0 plus the first step's input, in one pass
            self.mem = current + self.v0 * self.threshold
        else:
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


class SpikingInput(SpikeNode):
    """The image as spikes (docs/method.md §4): one integrate-and-fire neuron per pixel, of
    threshold 1/L_in, V0 half of it and burst limit L_in, fed the pixel x in [0, 1] every step.

    In units of its threshold, as every neuron here, it is a SpikeNode fed x * L_in: in the first
    step it fires floor(x * L_in + 1/2) spikes (the image on L_in levels), and its rate tracks x
    after. A spike stands for 1/L_in of a pixel; `normalise` folds that into C1's weights.
    """

    def __init__(self, levels):
        super().__init__(gamma=levels, v0=V0)  # reset by subtraction, never calibrated
        self.levels = levels

    def forward(self, image):
        return super().forward(image * self.levels)

    def extra_repr(self):
        return f"levels={self.levels}: threshold 1/{self.levels} of a pixel, gamma={self.gamma}"


class SMaxPool(Counting):
    """Spiking max-pool over the accumulated input C of each unit (docs/method.md §5).

    With lateral inhibition (exact): out_t = maxpool(C_t) - maxpool(C_{t-1}). Without
    (BrainCog's form): out_t = maxpool(x + K*C_t) - maxpool(K*C_t), which over-estimates a little.
    """

    state = ("acc", "pooled")

    def __init__(self, kernel_size=2, lateral_inhibition=True,
                 accumulated_weight=POOL_ACCUMULATED_WEIGHT, signed=False):
        super().__init__()
        self.kernel_size, self.lateral_inhibition = kernel_size, lateral_inhibition
        self.accumulated_weight = accumulated_weight  # K of the form without inhibition
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
            weighted = self.accumulated_weight * self.acc
            out = max_pool(x + weighted, k) - max_pool(weighted, k)
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
def normalise(model, scales, spiking_readout=False, input_levels=None):
    """Step 2: a copy of a BatchNorm-free `model` with each activation divided by its scale.

    Each weighted layer: W[i, j] <- W[i, j] * lambda_in[j] / lambda[i], b[i] <- b[i] / lambda[i]
    (docs/method.md §3), with one scale per layer or one per channel (a tensor); the output layer
    is divided by its own scale only for a spiking read-out; the first layer's lambda_in is 1 for
    the analog image, 1/L_in for the image as spikes (`input_levels`). QCFS thresholds are
    divided too, so the copy gives the ANN's outputs (over the output's scale for spikes) on the
    image, or on its spikes.
    """
    model = copy.deepcopy(model)
    scale_in, weighted = 1.0 / (input_levels or 1), None
    for name, layer in model.named_children():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weighted = layer
        elif isinstance(layer, (nn.ReLU, QCFS)):
            scale = scales.get(name)
            if scale is None or not torch.all(torch.as_tensor(scale) > 0):
                raise UserError(f"activation scale of {name} is {scale}: cannot normalise "
                                    "by it (a dead layer?)")
            if torch.is_tensor(scale) and len(scale) != len(weighted.weight):
                raise UserError(f"{name} has {len(scale)} per-channel percentiles, not one per "
                                f"channel ({len(weighted.weight)})")
            _scale_layer(weighted, scale_in, scale)
            if isinstance(layer, QCFS):  # per channel, if either lambda or the scale is
                layer.threshold = nn.Parameter(
                    layer.threshold / torch.as_tensor(scale).to(layer.threshold))
            scale_in, weighted = scale, None
    if spiking_readout and not scales[OUTPUT_LAYER] > 0:
        raise UserError(f"the output layer's scale is {scales[OUTPUT_LAYER]:g}: a spiking "
                        "read-out needs a positive one (use --readout analog)")
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


def replace_by_spiking(model, settings=DEFAULT_SETTINGS):
    """Step 3: a copy of a normalised `model` with spiking neurons and pools.

    Every ReLU or QCFS becomes a SpikeNode of threshold 1 with the settings' burst limit,
    initial potential, reset and spike calibration; every MaxPool2d an SMaxPool; for a spiking
    read-out a SpikeNode named READOUT_NODE (never calibrated) follows the output layer; for the
    image as spikes a SpikingInput named INPUT_NODE comes first.
    """
    neuron = {"gamma": settings.gamma, "v0": settings.v0, "reset": settings.reset}
    layers = OrderedDict()
    if settings.input_levels:
        layers[INPUT_NODE] = SpikingInput(settings.input_levels)
    for name, layer in model.named_children():
        if isinstance(layer, (nn.ReLU, QCFS)):
            layers[name] = SpikeNode(**neuron, allowance=settings.spicalib)
        elif isinstance(layer, nn.MaxPool2d):
            layers[name] = SMaxPool(layer.kernel_size, settings.lateral_inhibition,
                                    signed=settings.spicalib > 0)
        else:
            layers[name] = copy.deepcopy(layer)
    if settings.readout == "spikes":
        layers[READOUT_NODE] = SpikeNode(**neuron)
    return nn.Sequential(layers).eval()


def fuse_norm_replace(model, scales, settings=DEFAULT_SETTINGS):
    """Convert an ANN into a spiking copy; `model` itself is left untouched.

    Args:
        model: a LeNet5 (an nn.Sequential of named layers, ReLU or QCFS) in eval mode.
        scales: {activation layer: lambda (a number, or a tensor with one per channel),
            OUTPUT_LAYER: lambda}, e.g. from `activation_scales`.
        settings: the neurons' burst limit gamma, initial potential v0 (in units of threshold
            1), reset and spike calibration; the pools' lateral inhibition; the read-out,
            "analog" (the output layer's currents are summed) or "spikes"; the input, the analog
            image or its spikes (input_levels).
    """
    folded = fold_batchnorm(model)
    normalised = normalise(folded, scales, settings.readout == "spikes", settings.input_levels)
    return replace_by_spiking(normalised, settings)


def build_snn(checkpoint, ann, settings):
    """The spiking network of `ann` (loaded from `checkpoint`) converted with `settings`.

    The one builder: every spiking network a command simulates is built here.
    """
    return fuse_norm_replace(ann, conversion_scales(checkpoint, ann, settings), settings)


# ----------------------------------------------------------------------------- simulation


def readout_node(snn):
    """The spiking read-out's SpikeNode, or None for the analog read-out."""
    return getattr(snn, READOUT_NODE, None)


def counting_modules(snn):
    """{name: module} of every module that counts its spikes (SpikeNode, SMaxPool)."""
    return {name: m for name, m in snn.named_modules() if isinstance(m, Counting)}


def neuron_names(snn):
    """The names of the SpikeNode layers of `snn`, in order."""
    return [name for name, m in snn.named_children() if isinstance(m, SpikeNode)]


def simulate(snn, images, timesteps, closed_form=True):
    """Yield the SNN's output at each of `timesteps` steps for the analog `images`, from reset.

    The first layer's input is the same image every step, so its output is computed once (where
    it takes the analog image: an input layer is stepped with the rest, `stages`); and
    where `in_closed_form` allows (and `closed_form`), the first neuron layer and its pool run
    as one SpikeNode on the pooled current (`constant_input.stages`). Either way the spikes are
    the same, and once all steps are run every module holds its counts.
    """
    clean_mem_spike(snn)
    first, steps = stages(snn, closed_form)
    current = first(images)
    for _ in range(timesteps):
        yield steps(current)
    for name, module in (counting_modules(first) | counting_modules(steps)).items():
        module.leave(None, timesteps)
        if snn.get_submodule(name) is not module:
            snn.get_submodule(name).take_counts(module)


def predictions(snn, images, timesteps, simulator=simulate):
    """Yield (t, the output summed over steps 1..t, the prediction after t steps)."""
    readout, total = readout_node(snn), 0
    for t, output in enumerate(simulator(snn, images, timesteps), 1):
        total = total + output
        yield t, total, predict(total, readout)


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
    counting = counting_modules(snn)
    correct = torch.zeros(timesteps, dtype=torch.float64, device=device)
    counts, seen = {}, 0
    with tqdm(total=len(batches) * timesteps, desc="simulating", unit="step", leave=False,
              disable=None) as bar:
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            for t, _, prediction in predictions(snn, images, timesteps, simulator):
                correct[t - 1] += (prediction == labels).sum()
                bar.update()
            seen += len(labels)
            for name, module in counting.items():
                counts[name] = counts.get(name, 0) + module.counts.cpu()
    return (correct / seen).tolist(), counts


def within(accuracy, ann_accuracy, margin=ANN_MARGIN):
    """Whether `accuracy` is at least the ANN's minus `margin` (up to float rounding)."""
    return accuracy >= ann_accuracy - margin - 1e-12


def first_step_within(snn_accuracy, ann_accuracy, margin=ANN_MARGIN):
    """The first step t (1-based) whose accuracy is `within` the ANN's `margin`, or None."""
    return next((t for t, acc in enumerate(snn_accuracy, 1)
                 if within(acc, ann_accuracy, margin)), None)


# ----------------------------------------------------------------------------- one run


class Conversion(NamedTuple):
    """A checkpoint (where it came from, what it holds, its ANN) and the settings to convert it
    with: what one run of the simulation is about."""

    path: Path
    checkpoint: dict
    ann: nn.Module
    settings: Settings


def load_ann(path, device, data_dir=None):
    """(checkpoint, its ANN on `device`) from a file written by lenet5.py; given the data, its
    recorded activation maxima are checked against its calibration images too
    (`recorded.check_recorded_maxima`)."""
    checkpoint = load_checkpoint(path)
    ann = model_from_checkpoint(checkpoint, path).to(device)
    if data_dir is not None:
        check_recorded_maxima(checkpoint, ann, path, data_dir, device)
    return checkpoint, ann


def convert(conversion, data_dir, device):
    """`build_snn` of `conversion`, on `device`.

    A checkpoint written before per-channel percentiles were recorded gets them measured first
    where the settings need them, on the training images its per-layer ones came from (in
    memory; the file is not changed).
    """
    checkpoint, levels = conversion.checkpoint, conversion.settings.input_levels
    if checkpoint.get("input_levels") != levels:
        print(f"note: {conversion.path} was trained on {input_text(checkpoint.get('input_levels'))}"
              f" and is converted to take {input_text(levels)}")
    if conversion.settings.norm != "layer" and "channel_percentiles" not in checkpoint:
        print(f"{conversion.path} has no per-channel percentiles: measuring them on the training "
              "images its per-layer ones came from")
        checkpoint["channel_percentiles"] = remeasure_percentiles(
            checkpoint, conversion.ann, data_dir, device)[1]
    return build_snn(checkpoint, conversion.ann, conversion.settings).to(device)


def load_test_set(data_dir, limit, batch_size):
    """The first `limit` MNIST test images (all if None), in batches of `batch_size`."""
    images, labels = load_mnist(data_dir, train=False)
    if limit and limit > len(labels):
        raise UserError(f"--limit {limit}: the test set has only {len(labels)} images")
    return Batches(images[:limit], labels[:limit], batch_size)


def counted_units(snn):
    """{name: units} of every module of `snn` that counts its spikes, from a one-image step;
    `snn` None: any LeNet5 converted here, with a spiking read-out (the most units)."""
    if snn is None:
        ann = LeNet5()
        snn = fuse_norm_replace(ann, {name: 1.0 for name, m in ann.named_children()
                                      if isinstance(m, nn.ReLU)} | {OUTPUT_LAYER: 1.0},
                                DEFAULT_SETTINGS._replace(readout="spikes"))
    with torch.no_grad():
        probe = next(iter(snn.parameters())).new_zeros(1, *IMAGE_SHAPE)
        list(simulate(snn, probe, 1, closed_form=False))
        units = {name: m.counts[0].numel() for name, m in counting_modules(snn).items()}
        clean_mem_spike(snn)
    return units


def check_memory(snn, timesteps, batch_size, images, early_exit_images=0, per_step=0):
    """Refuse a run that would need more memory than the machine has free, before it starts.

    An estimate from above: the spike counts per step and unit (kept on the device, summed on
    the CPU, and a buffer that doubles), a batch's state, for early exit every image's
    settledness and prediction at every step (the test and the validation images), and
    `per_step` bytes more per step that the caller keeps. `snn` None: before a network exists
    (`counted_units`).
    """
    units = sum(counted_units(snn).values())
    needed = 4 * (4 * timesteps * units + 8 * batch_size * units) + (
        36 * timesteps * early_exit_images) + per_step * timesteps
    cli.check_memory(needed, f"{timesteps} steps over {images} image{'s' * (images != 1)}")


def run(conversion, snn, batches, timesteps, device):
    """Simulate `snn`, the spiking network of `conversion`, on `batches` for `timesteps` steps
    and measure it: the result that snn_accuracy.json holds."""
    announce(conversion, len(batches.labels), timesteps, device)
    start = time.perf_counter()
    accuracy, counts = evaluate_snn(snn, batches, timesteps, device)
    return result_of(conversion, snn, batches, device, accuracy, counts,
                     time.perf_counter() - start)


def announce(conversion, images, timesteps, device):
    print(f"simulating {images} test images for {timesteps} steps on {device}: "
          f"{conversion.path}, {settings_text(settings_record(conversion))}")


def result_of(conversion, snn, batches, device, accuracy, counts, seconds, qnn_step=None):
    """The result of a simulation of `conversion`'s `snn` on `batches` (JSON-ready): its
    accuracy per step (a list over T steps) beside the ANN's, the settings, and the firing
    rates, SynOps and energy from its spike `counts` ({module: [T, *units]}); the QNN of step
    `qnn_step` (default: the first at the ANN's level) is run besides those of 1, 2, 4, ..."""
    ann_accuracy = evaluate(conversion.ann, batches, device)
    images, timesteps = len(batches.labels), len(accuracy)
    eff = efficiency.efficiency(snn, counts, images, timesteps, neuron_names(snn),
                                efficiency.input_shapes(conversion.ann))
    level = first_step_within(accuracy, ann_accuracy)
    return {
        "ann_accuracy": ann_accuracy,
        "snn_accuracy": accuracy,
        "timesteps": timesteps,
        AT_ANN_LEVEL_KEY: level,
        "settings": settings_record(conversion),
        "first_layer_in_closed_form": in_closed_form(snn),  # how it was simulated (`stages`)
        "checkpoint": str(conversion.path),
        "test_images": images,
        "device": str(device),
        "simulation_seconds": round(seconds, 2),
        "efficiency": eff,
        "energy_models": energy_models.energies(
            snn, eff, counts, images, batches, device, IMAGE_SHAPE, energy_models.Hardware(
                conversion.settings.weight_bits, conversion.settings.weights_in),
            qnn_step or level),
    }


def at_ann_level(result):
    """(t, SynOps, energy in pJ) per image at the first step at the ANN's level, or None."""
    t = result[AT_ANN_LEVEL_KEY]
    if t is None:
        return None
    eff = result["efficiency"]
    return t, eff["synops_per_image"][t - 1], eff["snn_energy_pj"][t - 1]


# ----------------------------------------------------------------------------- reporting


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
    fig.suptitle(textwrap.fill(f"LeNet5 SNN on {result['test_images']} MNIST test images: "
                               f"{settings_text(result['settings'])}", 150), fontsize=10)
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
    level = f"first step within {100 * ANN_MARGIN:g} pp of the ANN"
    if reached:
        t, ops, energy = reached
        print(f"{level}: {t} ({ops / 1e3:.0f}k SynOps, "
              f"{energy / eff['ann_energy_pj']:.2f} × the ANN's energy per image, operations "
              "only)")
    else:
        print(f"{level}: not within {result['timesteps']} steps")
    print("firing rates: " + ", ".join(f"{name} {rate:.3f}"
                                       for name, rate in eff["firing_rate"].items()))
    print(energy_models.summary(result["energy_models"], reached[0] if reached else 1))


# ----------------------------------------------------------------------------- main


def main(argv=None):
    """The plain run, step by step: load, convert, simulate and measure, plot, write.

    `--compare`, `--look-inside` and `--exit-rule` hand over to their modules (compare.py,
    look_inside.py, early_exit.py), imported only when asked for: they build on this module,
    which never needs them.
    """
    args = parse_args(argv, __doc__)

    def body():
        device = cli.resolve_device(args.device)
        cli.check_writable(args.out_dir, folder=True)
        if args.compare is not None:  # many conversions side by side, instead
            import compare
            return compare.main(args, device)
        if args.look_inside is not None:  # a few images, every layer drawn, instead
            import look_inside
            return look_inside.main(args, device)
        checkpoint, ann = load_ann(args.checkpoint, device, args.data_dir)
        conversion = Conversion(args.checkpoint, checkpoint, ann, settings_from(args, checkpoint))
        exit_rule, validation = conversion.settings.exit_rule != "none", None
        if exit_rule:  # per-image early exit, besides: its validation split is checked now
            import early_exit
            validation = early_exit.validation_batches(
                conversion, load_mnist(args.data_dir, train=True), args.batch_size)
        snn = convert(conversion, args.data_dir, device)
        batches = load_test_set(args.data_dir, args.limit, args.batch_size)
        recorded = len(batches.labels) + (len(validation.labels) if validation else 0)
        check_memory(snn, args.timesteps, args.batch_size, len(batches.labels),
                     recorded if exit_rule else 0)
        fixed = conversion._replace(settings=conversion.settings._replace(exit_rule="none"))
        result = run(fixed, snn, batches, args.timesteps, device)
        if exit_rule:
            early = early_exit.run(conversion, snn, batches, validation, args.timesteps, device)
        with cli.file_set(args.out_dir) as files:
            plot_accuracy(result, files.path("snn_accuracy.png"))
            efficiency.plot_efficiency(result, files.path("snn_efficiency.png"),
                                       energy_models.plot_memory_axis)
            cli.write_json(files.path("snn_accuracy.json"), result)
            if exit_rule:
                record = early_exit.write(result, early, batches.images, files)
        print_table(result)
        if exit_rule:
            early_exit.print_early_exit(record)
            result = result | {"early_exit": record}
        print(f"wrote {cli.and_list(files.names)} in {args.out_dir} "
              f"(simulation {result['simulation_seconds']:.0f}s)")
        return result
    return cli.run("lenet_convert.py", body, f"earlier results in {args.out_dir} are untouched")


if __name__ == "__main__":  # hand over to the imported module, which the features share
    import lenet_convert

    lenet_convert.main()
