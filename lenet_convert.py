"""Convert the trained LeNet5 into a spiking neural network and measure its accuracy per time step.

The method follows BrainCog's ANN->SNN conversion (see docs/ and README): fold BatchNorm into the
convolutions, replace ReLU by integrate-and-fire neurons (SpikeNode) and max-pooling by a spiking
max-pool (SMaxPool), and scale each layer by the activation percentile recorded in the checkpoint so
that rates of at most one spike per step carry the ANN's activations. The analog image is fed as a
constant current; the output layer's currents are summed over time and read out by argmax.

Example:
    python lenet_convert.py                          # checkpoints/lenet5_best.pt, T = 64
    python lenet_convert.py --v0 0 --gamma 2 --percentile 99.9 --no-lateral-inhibition
                                                     # BrainCog's reference setting

Writes (into --out-dir, default results/):
    snn_accuracy.png    SNN accuracy against time step, the ANN's as a line
    snn_accuracy.json   the same numbers, the settings and the checkpoint used
"""

import argparse
import copy
import csv
import math
import sys
import time
from collections import OrderedDict
from pathlib import Path

import matplotlib
import matplotlib.ticker
import torch
import torch.nn as nn
from tqdm import tqdm

from lenet5 import (
    QCFS,
    ArgumentParser,
    Batches,
    UserError,
    atomic_path,
    check_writable_dir,
    evaluate,
    load_checkpoint,
    load_mnist,
    model_from_checkpoint,
    percentile,
    percentile_key,
    positive_int,
    resolve_device,
    write_json,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

BRAINCOG_REFERENCE = "--v0 0 --gamma 2 --percentile 99.9 --no-lateral-inhibition"
BRAINCOG_SETTINGS = {"percentile": "99.9", "gamma": 2, "v0": 0.0, "lateral_inhibition": False,
                     "readout": "analog"}
WITHIN = 0.001  # "reached the ANN": accuracy at least the ANN's minus 0.1 percentage points


# ----------------------------------------------------------------------------- spiking modules


class Counting(nn.Module):
    """A module with state across steps that counts the spikes it outputs, per step and unit.

    `counts[t]` is the output at step t summed over the batch (shape: one sample's output) since
    the last `reset`, for firing rates and synaptic operations. `step` is the next step's index.
    The counts live in one buffer that doubles when full: a small tensor kept from every step
    would fragment the heap between the large per-step tensors and make memory grow with T.
    """

    def reset(self):
        self.buffer = None  # [capacity, *units]
        self.length = 0  # steps counted
        self.step = 0

    def count(self, out):
        """Add `out` ([steps, batch, ...], from step `self.step` on) to the counts."""
        per_step = out.sum(1)
        end = self.step + len(per_step)
        if self.buffer is None or end > len(self.buffer):
            grown = per_step.new_zeros(max(end, 2 * self.length, 16), *per_step.shape[1:])
            if self.buffer is not None:
                grown[:self.length] = self.buffer[:self.length]
            self.buffer = grown
        self.buffer[self.step:end] += per_step  # another chunk of the batch adds to its steps
        self.length, self.step = max(self.length, end), end

    @property
    def counts(self):
        """Spikes per step and unit since the last reset: a tensor [steps, *units]."""
        return self.buffer[:self.length] if self.buffer is not None else torch.zeros(0)

    @property
    def spike_count(self):
        """Spikes output since the last reset, over the batch and all units and steps."""
        return self.counts.sum()


class SpikeNode(Counting):
    """Integrate-and-fire neuron with reset by subtraction (conversion.md §5).

    Each step: V <- V + I;  s = clamp(floor(V / threshold), 0, gamma);  V <- V - s * threshold;
    output s. gamma = 1 is a plain IF neuron, gamma > 1 a burst neuron. The potential starts at
    v0 * threshold (v0 = 0.5 turns the rate's floor into a rounding). Spikes are counted so
    firing rates can be reported.
    """

    def __init__(self, threshold=1.0, gamma=1, v0=0.5):
        super().__init__()
        self.threshold, self.gamma, self.v0 = threshold, gamma, v0
        self.reset()

    def reset(self):
        super().reset()
        self.mem = None

    def forward(self, current):
        if self.mem is None:
            self.mem = torch.full_like(current, self.v0 * self.threshold)
        self.mem.add_(current)
        scaled = self.mem if self.threshold == 1 else self.mem / self.threshold  # skip a pass
        spikes = torch.floor(scaled).clamp_(0, self.gamma)
        self.mem.sub_(spikes, alpha=self.threshold)
        self.count(spikes.unsqueeze(0))
        return spikes

    def extra_repr(self):
        return f"threshold={self.threshold}, gamma={self.gamma}, v0={self.v0}"


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
    """Spiking max-pool over the accumulated input C of each unit (conversion.md §6).

    With lateral inhibition (exact): out_t = maxpool(C_t) - maxpool(C_{t-1}), the same as passing
    maxpool(S) and subtracting it from every unit of its window; the summed output equals the
    max-pool of the summed input. Without (BrainCog's form): out_t = maxpool(x + K*C_t) -
    maxpool(K*C_t), which passes the current input of the unit that has received most, and
    slightly over-estimates the max.
    """

    def __init__(self, kernel_size=2, lateral_inhibition=True, k=1000.0):
        super().__init__()
        self.kernel_size, self.lateral_inhibition, self.k = kernel_size, lateral_inhibition, k
        self.reset()

    def reset(self):
        super().reset()
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
    """A new Conv2d equal to conv -> bn in eval mode (BatchNorm folded into weights and bias)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def activation_scales(checkpoint, key=None, gamma=1):
    """{layer: what one spike stands for} from a checkpoint.

    The activation percentile `key`; or by default, for a QCFS checkpoint, its trained lambda
    divided by `gamma`, and otherwise the checkpoint's own percentile. A QCFS activation never
    exceeds lambda, so rather than carry values above it, the gamma spikes a neuron may fire per
    step share [0, lambda]: theta = lambda / gamma (gamma = 1: Bu et al.'s theta = lambda).
    The output layer's scale (used by a spiking read-out) is always a percentile.
    """
    recorded = checkpoint.get("percentiles")
    if not isinstance(recorded, dict) or not recorded:
        raise UserError("the checkpoint holds no activation percentiles; retrain it with "
                        "`python lenet5.py`")
    trained = {} if key else checkpoint.get("thresholds") or {}
    key = key or checkpoint.get("percentile", "99")
    try:
        scales = {layer: float(values[key]) for layer, values in recorded.items()}
    except (KeyError, TypeError):
        available = ", ".join(next(iter(recorded.values()), {}))
        raise UserError(f"the checkpoint has no {key}th percentile (it has: {available}); "
                        f"choose one of those or retrain with `--percentile {key}`") from None
    return scales | {layer: value / gamma for layer, value in trained.items()}


@torch.no_grad()
def scale_layer(layer, scale_in, scale_out):
    """Data-based normalisation: W <- W * scale_in / scale_out, b <- b / scale_out."""
    layer.weight.mul_(scale_in / scale_out)
    layer.bias.div_(scale_out)


def fuse_norm_replace(model, scales, spiking=True, gamma=1, v0=0.5, lateral_inhibition=True,
                      readout="analog"):
    """Convert an ANN into a spiking copy; `model` itself is left untouched.

    Args:
        model: a LeNet5 (an nn.Sequential of named layers, ReLU or QCFS) in eval mode.
        scales: {activation layer name: lambda, "out": lambda}, e.g. from `activation_scales`.
        spiking: False keeps the activations and MaxPool: the normalised ANN, whose outputs equal
            the ANN's (divided by lambda_out with a spiking read-out).
        gamma, v0: the SpikeNodes' burst limit and initial potential (in units of threshold 1).
        lateral_inhibition: the SMaxPool variant.
        readout: "analog" (the output layer's currents are summed) or "spikes" (a SpikeNode after
            the output layer, normalised by lambda_out).

    Returns:
        An nn.Sequential with the same layer names (BatchNorm folded away; "readout" appended for
        a spiking read-out), in eval mode.
    """
    children = list(model.named_children())
    layers, scale, pending = OrderedDict(), 1.0, None
    for i, (name, layer) in enumerate(children):
        after = children[i + 1][1] if i + 1 < len(children) else None
        if isinstance(layer, nn.BatchNorm2d):
            continue  # folded into the convolution before it
        if isinstance(layer, nn.Conv2d) and isinstance(after, nn.BatchNorm2d):
            layer, pending = fuse(layer, after), name
        elif isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer, pending = copy.deepcopy(layer), name
        elif isinstance(layer, (nn.ReLU, QCFS)):
            if not scales.get(name, 0) > 0:
                raise UserError(f"activation scale of {name} is {scales.get(name)}: cannot "
                                "normalise by it (a dead layer?)")
            scale_layer(layers[pending], scale, scales[name])
            scale, pending = scales[name], None
            if spiking:
                layer = SpikeNode(gamma=gamma, v0=v0)
            elif isinstance(layer, QCFS):  # the same function of the normalised input
                layer = copy.deepcopy(layer)
                layer.threshold.data.div_(scale)
        elif isinstance(layer, nn.MaxPool2d) and spiking:
            layer = SMaxPool(layer.kernel_size, lateral_inhibition)
        else:
            layer = copy.deepcopy(layer)
        layers[name] = layer
    spiking_readout = readout == "spikes"
    scale_layer(layers[pending], scale, scales["out"] if spiking_readout else 1.0)
    if spiking and spiking_readout:
        layers["readout"] = SpikeNode(gamma=gamma, v0=v0)
    return nn.Sequential(layers).eval()


# ----------------------------------------------------------------------------- simulation


def simulate(snn, images, timesteps):
    """Yield the SNN's output at each of `timesteps` steps for the analog `images`.

    The state is reset first. The first layer's input is the same image every step, so its output
    current is computed once.
    """
    clean_mem_spike(snn)
    current = snn[0](images)
    rest = snn[1:]
    for _ in range(timesteps):
        yield rest(current)


def simulate_layerwise(snn, images, timesteps, chunk_elements=2**23):
    """Yield the same outputs as `simulate`, computed layer by layer over all steps at once.

    The network has no recurrence between layers, so each layer can take the whole [T, batch, ...]
    output of the layer before: weighted layers run as one large batched call, SpikeNodes run
    their own step-by-step update (the same arithmetic, so the same spikes), and max-pooling
    works on cumulative spike counts (integers, so exact in float32). Images are taken in chunks
    so that one layer's [T, chunk, ...] tensor stays near `chunk_elements` floats. A spiking
    read-out is stepped last, as in `simulate`, so its potential is there for `predict`.
    """
    clean_mem_spike(snn)
    readout = getattr(snn, "readout", None)
    layers = list(snn)[:-1] if readout else list(snn)
    widest = max(snn[0](images[:1]).numel(), 1)  # the first layer's output is the largest here
    chunk = max(1, chunk_elements // (widest * timesteps))
    currents = torch.cat([_layers_over_time(layers, part, timesteps)
                          for part in images.split(chunk)], dim=1)
    for current in currents:
        yield readout(current) if readout else current


def _layers_over_time(layers, images, timesteps):
    """Outputs [T, batch, ...] of `layers` for a constant analog input (see simulate_layerwise)."""
    x = layers[0](images).unsqueeze(0)  # the same current at every step: [1, batch, ...]
    for layer in layers[1:]:
        if isinstance(layer, SpikeNode):
            layer.mem, layer.step = None, 0  # a fresh chunk of images; counts keep adding up
            x = torch.stack([layer(x[min(t, len(x) - 1)]) for t in range(timesteps)])
        elif isinstance(layer, SMaxPool):
            x = _pool_over_time(layer, x)
        else:  # stateless (weighted layers, flatten): one batched call over all steps
            x = layer(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return x.expand(timesteps, *x.shape[1:])


def _pool_over_time(pool, spikes):
    """SMaxPool over all steps from the cumulative input counts C_t (conversion.md §6)."""
    steps, k = spikes.shape[:2], pool.kernel_size
    cumulative = spikes.cumsum(0).flatten(0, 1)
    if pool.lateral_inhibition:  # o_t = MP(C_t) - MP(C_{t-1})
        pooled = max_pool(cumulative, k).unflatten(0, steps)
        out = torch.diff(pooled, dim=0, prepend=torch.zeros_like(pooled[:1]))
    else:  # o_t = MP(x_t + K*C_t) - MP(K*C_t)
        current = spikes.flatten(0, 1)
        out = max_pool(current + pool.k * cumulative, k) - max_pool(pool.k * cumulative, k)
        out = out.unflatten(0, steps)
    pool.step = 0  # a fresh chunk of images: its counts add to the same steps
    pool.count(out)
    return out


SIMULATORS = {"step": simulate, "layerwise": simulate_layerwise}


def predict(total, readout):
    """Class with the largest summed output; for a spiking read-out ties go to the potential."""
    if readout is None:
        return total.argmax(1)
    top = total == total.max(1, keepdim=True).values
    return torch.where(top, readout.mem, torch.tensor(-math.inf, device=total.device)).argmax(1)


@torch.no_grad()
def evaluate_snn(snn, batches, timesteps, device, simulator=simulate, counts=None):
    """Accuracy after each step t = 1..T over all samples (a list, element t-1 for step t).

    Weighted by samples, so a partial last batch counts by its size. `simulator` is `simulate`
    (step by step) or `simulate_layerwise`: both give the same outputs. If `counts` is a dict,
    each counting module's spikes per step and unit, summed over all samples, are added to it:
    {module name: tensor [T, *unit shape]}.
    """
    snn.eval()
    readout = getattr(snn, "readout", None)  # the spiking read-out's SpikeNode, if any
    counting = {name: m for name, m in snn.named_modules() if isinstance(m, Counting)}
    correct = torch.zeros(timesteps, dtype=torch.float64, device=device)
    seen = 0
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
            if counts is not None:
                for name, module in counting.items():
                    counts[name] = counts.get(name, 0) + module.counts.cpu()
    return (correct / seen).tolist()


def first_step_within(snn_accuracy, ann_accuracy, margin=WITHIN):
    """The first step t (1-based) whose accuracy is at least the ANN's minus `margin`, or None."""
    return next((t for t, acc in enumerate(snn_accuracy, 1)
                 if acc >= ann_accuracy - margin - 1e-12), None)


def report_steps(timesteps):
    """The steps the table shows: 1, 2, 4, 8, ... and the last."""
    steps = [2**i for i in range(int(math.log2(timesteps)) + 1)]
    return steps if steps[-1] == timesteps else steps + [timesteps]


# ----------------------------------------------------------------------------- efficiency

PJ_PER_MAC, PJ_PER_AC = 4.6, 0.9  # 32-bit float at 45 nm (Horowitz, ISSCC 2014)
ENERGY_MODEL = ("45 nm: 4.6 pJ per MAC, 0.9 pJ per accumulate (AC). The first layer's analog "
                "input costs MACs, counted once since the image is constant; every spike costs one "
                "AC per synapse it crosses (SynOps). Memory traffic and membrane updates are "
                "ignored.")


@torch.no_grad()
def input_shapes(model, image_shape=(1, 32, 32)):
    """{Conv2d/Linear layer name: the shape of one sample's input to it}, from a dummy pass."""
    shapes, x = {}, torch.zeros(1, *image_shape, device=next(model.parameters()).device)
    for name, layer in model.named_children():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            shapes[name] = tuple(x.shape[1:])
        x = layer(x)
    clean_mem_spike(model)
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


def efficiency(snn, counts, images, timesteps, image_shape=(1, 32, 32)):
    """Firing rates, synaptic operations and energy per image from spike counts (conversion.md §10).

    Args:
        snn: the converted network; counts: {module: spikes [T, *units] over all images}, from
        `evaluate_snn`; images: how many images the counts are summed over; timesteps: T;
        image_shape: one input's shape.
    """
    shapes = input_shapes(snn, image_shape)
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
    """(t, SynOps, energy in pJ) per image at the first step within 0.1 pp of the ANN, or None."""
    t = result["first_step_within_0.1pp"]
    if t is None:
        return None
    eff = result["efficiency"]
    return t, eff["synops_per_image"][t - 1], eff["snn_energy_pj"][t - 1]


# ----------------------------------------------------------------------------- output


def settings_text(settings):
    scaling = (f"θ=λ/γ (QCFS, L={settings['levels']})" if settings["percentile"] is None
               else f"p={settings['percentile']}")
    return (f"{scaling}, γ={settings['gamma']}, V0={settings['v0']}θ, "
            f"lateral inhibition {'on' if settings['lateral_inhibition'] else 'off'}, "
            f"{settings['readout']} read-out")


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
    if reached:
        t, ops, energy = reached
        print(f"first step within 0.1 pp of the ANN: {t} ({ops / 1e3:.0f}k SynOps, "
              f"{energy / eff['ann_energy_pj']:.2f} × the ANN's energy per image)")
    else:
        print(f"first step within 0.1 pp of the ANN: not within {result['timesteps']} steps")
    print("firing rates: " + ", ".join(f"{name} {rate:.3f}"
                                       for name, rate in eff["firing_rate"].items()))


# ----------------------------------------------------------------------------- compare mode


COMPARE_GAMMAS = (1, 2, 4)


def compare_settings(settings, percentiles, every_knob=True):
    """(label, settings) pairs: `settings`, then one knob changed at a time, then BrainCog's.

    With every_knob=False, only the burst limits gamma of COMPARE_GAMMAS are varied.
    """
    variants = [("as given", settings)]

    def vary(label, **change):
        variants.append((label, settings | change))
    if every_knob:
        vary("lateral inhibition " + ("off" if settings["lateral_inhibition"] else "on"),
             lateral_inhibition=not settings["lateral_inhibition"])
        vary("V0 = " + ("0" if settings["v0"] else "θ/2"), v0=0.0 if settings["v0"] else 0.5)
    for gamma in COMPARE_GAMMAS:
        if gamma != settings["gamma"]:
            vary(f"γ = {gamma}", gamma=gamma)
    if every_knob:
        for key in percentiles:
            if key != settings["percentile"]:
                vary(f"p = {key}", percentile=key)
        vary("read-out " + ("spikes" if settings["readout"] == "analog" else "analog"),
             readout="spikes" if settings["readout"] == "analog" else "analog")
        variants.append(("BrainCog reference", settings | BRAINCOG_SETTINGS))
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
        row |= {"within_0.1pp_at": reached[0] if reached else None,
                "synops_there": round(reached[1]) if reached else None,
                "energy_there_uJ": round(reached[2] / 1e6, 3) if reached else None,
                "ann_energy_uJ": round(eff["ann_energy_pj"] / 1e6, 3)}
        rows.append(row)
    return rows


def write_csv(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


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
    main = [i for i, r in enumerate(results) if r["label"] in ("as given", "BrainCog reference")]
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
          f"{'0.1pp at':>8} {'µJ there':>8}")
    for row in rows:
        name = f"{Path(row['checkpoint']).stem}: {row['setting']}"[:42]
        there = row["within_0.1pp_at"]
        print(f"{name:42s} " + " ".join(f"{row[s]:6.2f}" for s in steps) + f" {row['ann']:6.2f} "
              f"{there or '-':>8} {row['energy_there_uJ'] or '-':>8}")


# ----------------------------------------------------------------------------- command line


def v0_value(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (0.0, 0.5):
        raise argparse.ArgumentTypeError(f"must be 0 or 0.5 (units of the threshold), got {text}")
    return value


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Convert the trained LeNet5 into a spiking network, simulate it on the MNIST "
                    "test set and plot its accuracy, spikes and estimated energy per time step "
                    f"against the ANN. BrainCog's reference setting: {BRAINCOG_REFERENCE}.")
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/lenet5_best.pt"),
                        help="checkpoint written by lenet5.py (ReLU or QCFS)")
    parser.add_argument("--compare", nargs="*", type=Path, default=None, metavar="CHECKPOINT",
                        help="compare settings instead of one run: the given settings, each knob "
                             "changed alone and BrainCog's reference on --checkpoint, plus each "
                             "CHECKPOINT listed (e.g. a QCFS one) at the given settings and with "
                             "γ = 1, 2, 4; writes compare.png, .json and .csv")
    parser.add_argument("--timesteps", type=positive_int, default=64, help="simulation steps T")
    parser.add_argument("--batch-size", type=positive_int, default=500,
                        help="test images simulated at once (500 keeps a layer's state in the "
                             "CPU's cache better than 1,000)")
    parser.add_argument("--percentile", type=percentile, default=None,
                        help="activation percentile that sets each layer's scale (one the "
                             "checkpoint recorded: 99, 99.9, 99.99, 100); default: a QCFS "
                             "checkpoint's trained thresholds, else the checkpoint's percentile")
    parser.add_argument("--gamma", type=positive_int, default=2,
                        help="most spikes a neuron may fire per step (1: plain IF; 2: burst)")
    parser.add_argument("--v0", type=v0_value, default=0.5,
                        help="initial membrane potential in units of the threshold (0 or 0.5)")
    parser.add_argument("--no-lateral-inhibition", dest="lateral_inhibition",
                        action="store_false", help="use BrainCog's max-pool without lateral "
                        "inhibition (the default pools exactly, with it)")
    parser.add_argument("--readout", choices=("analog", "spikes"), default="analog",
                        help="sum the output layer's currents, or count its spikes")
    parser.add_argument("--simulator", choices=SIMULATORS, default="step",
                        help="step: all layers one time step after another; layerwise: each "
                             "layer over all steps at once (same results)")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="simulate the first N test images only (default: all 10,000)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder holding MNIST/")
    parser.add_argument("--out-dir", type=Path, default=Path("results"),
                        help="where the plots and the JSON go")
    return parser.parse_args(argv)


def load_ann(path, device):
    checkpoint = load_checkpoint(path)
    return checkpoint, model_from_checkpoint(checkpoint, path).to(device)


def settings_for(args, checkpoint):
    """The run's settings from the arguments; percentile None means a QCFS net's thresholds."""
    qcfs = checkpoint.get("activation") == "qcfs"
    key = percentile_key(args.percentile) if args.percentile else None
    return {"percentile": key or (None if qcfs else checkpoint.get("percentile", "99")),
            "gamma": args.gamma, "v0": args.v0, "lateral_inhibition": args.lateral_inhibition,
            "readout": args.readout, "activation": checkpoint.get("activation", "relu"),
            "levels": checkpoint.get("levels") if qcfs else None}


def run(path, checkpoint, ann, settings, batches, args, device):
    """Convert `ann` with `settings`, simulate it on `batches`; the result dict (JSON-ready)."""
    scales = activation_scales(checkpoint, settings["percentile"], settings["gamma"])
    snn = fuse_norm_replace(ann, scales, gamma=settings["gamma"], v0=settings["v0"],
                            lateral_inhibition=settings["lateral_inhibition"],
                            readout=settings["readout"]).to(device)
    print(f"simulating {len(batches.labels)} test images for {args.timesteps} steps on {device}: "
          f"{path}, {settings_text(settings)}")
    start = time.perf_counter()
    counts = {}
    snn_accuracy = evaluate_snn(snn, batches, args.timesteps, device,
                                SIMULATORS[args.simulator], counts)
    seconds = time.perf_counter() - start
    ann_accuracy = evaluate(ann, batches, device)
    return {
        "ann_accuracy": ann_accuracy,
        "snn_accuracy": snn_accuracy,
        "timesteps": args.timesteps,
        "first_step_within_0.1pp": first_step_within(snn_accuracy, ann_accuracy),
        "settings": settings,
        "checkpoint": str(path),
        "test_images": len(batches.labels),
        "device": str(device),
        "simulation_seconds": round(seconds, 2),
        "efficiency": efficiency(snn, counts, len(batches.labels), args.timesteps),
    }


def run_all(plan, args, device):
    """`run` each (path, checkpoint, ann, settings) of `plan` on the same test images.

    Every setting's scales are checked first, so a bad one fails before any data is loaded.
    """
    for _, checkpoint, _, settings in plan:
        activation_scales(checkpoint, settings["percentile"])
    images, labels = load_mnist(args.data_dir, train=False)
    if args.limit and args.limit > len(labels):
        raise UserError(f"--limit {args.limit}: the test set has only {len(labels)} images")
    batches = Batches(images[:args.limit], labels[:args.limit], args.batch_size)
    return [run(*planned, batches, args, device) for planned in plan]


def convert_and_simulate(args):
    """One run: load, convert, simulate; write the plots and the JSON; return the result."""
    device = resolve_device(args.device)
    check_writable_dir(args.out_dir)
    checkpoint, ann = load_ann(args.checkpoint, device)
    result, = run_all([(args.checkpoint, checkpoint, ann, settings_for(args, checkpoint))],
                      args, device)
    plot_accuracy(result, args.out_dir / "snn_accuracy.png")
    plot_efficiency(result, args.out_dir / "snn_efficiency.png")
    write_json(args.out_dir / "snn_accuracy.json", result)
    print_table(result)
    print(f"wrote snn_accuracy.png, snn_efficiency.png and snn_accuracy.json in {args.out_dir} "
          f"(simulation {result['simulation_seconds']:.0f}s)")
    return result


def compare(args):
    """Compare mode: `compare_settings` on --checkpoint and on each extra one; one figure."""
    device = resolve_device(args.device)
    check_writable_dir(args.out_dir)
    loaded = [(path, *load_ann(path, device)) for path in [args.checkpoint, *args.compare]]
    labels, plan = [], []
    for i, (path, checkpoint, ann) in enumerate(loaded):
        settings = settings_for(args, checkpoint)
        recorded = list(checkpoint.get("percentiles", {}).get("out", {}))
        for label, setting in compare_settings(settings, recorded, every_knob=i == 0):
            labels.append(label)
            plan.append((path, checkpoint, ann, setting))
    results = [result | {"label": label}
               for result, label in zip(run_all(plan, args, device), labels, strict=True)]
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
        return compare(args) if args.compare is not None else convert_and_simulate(args)
    except UserError as e:
        sys.exit(f"lenet_convert.py: error: {e}")


if __name__ == "__main__":
    main()
