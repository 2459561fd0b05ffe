"""Spike counts into firing rates, synaptic operations and an energy estimate, and their figure.

A spike of unit j entering a weighted layer costs one accumulate per synapse leaving j, its exact
fan-out; the first layer takes the analog image, so it costs multiply-accumulates (MACs), once,
since the image is constant, unless the image enters as spikes (an input layer): then its spikes
cost accumulates like any others. The ANN's energy is always the analog ANN's. Energy is a 45 nm
estimate (docs/method.md §7). For a QCFS network converted with gamma = L, the first step's energy
is also a differentiable function of the network's activations (`first_step_energy`): what
lenet5.py --energy-weight trains against.
"""

import matplotlib.ticker
import torch
import torch.nn as nn

from mnist import IMAGE_SHAPE
from plots import plt, save_figure, settings_text, step_axis

PJ_PER_MAC, PJ_PER_AC = 4.6, 0.9  # energy of a 32-bit float MAC and AC at 45 nm (Horowitz, 2014)
ENERGY_MODEL = ("45 nm: 4.6 pJ per MAC, 0.9 pJ per accumulate (AC). The first layer's analog "
                "input costs MACs, counted once since the image is constant; every spike costs one "
                "AC per synapse it crosses (SynOps), the input layer's too where the image enters "
                "as spikes. The ANN's energy is the analog ANN's. Memory traffic and membrane "
                "updates are ignored.")


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


def fan_outs(ann, image_shape=IMAGE_SHAPE):
    """{weighted layer: the fan-out of each unit of one sample's input to it} (`fan_out`)."""
    return {name: fan_out(getattr(ann, name), shape)
            for name, shape in input_shapes(ann, image_shape).items()}


def energy_pj(first_layer_macs, synops):
    """The energy model: the first layer's MACs on the analog image, an accumulate per SynOp."""
    return first_layer_macs * PJ_PER_MAC + synops * PJ_PER_AC


def synops_of(spikes_in, fanouts):
    """SynOps per image: {weighted layer: the spikes entering it, [N, *its input]} each times the
    fan-out of the unit it leaves (`fan_outs`), summed. A tensor [N], differentiable."""
    return sum((spikes.flatten(1) * fanouts[name].flatten()).sum(1)
               for name, spikes in spikes_in.items())


def input_spikes(images, levels):
    """The spikes each pixel x of `images` fires in the first step as an input neuron with L_in =
    `levels` (threshold 1/L_in, V0 half of it, burst limit L_in): floor(x * L_in + 1/2), the image
    rounded to L_in levels (docs/method.md §4). lenet5.py trains on these over L_in."""
    return torch.floor(images * levels + 0.5)


def first_step_spikes(model, images):
    """A QCFS network's (lenet5.py) logits for `images`, and {weighted layer: the spikes that
    enter it per image} in the first step of its SNN converted with gamma = L: every weighted
    layer after the first, and the first too where the network takes the image as spikes.

    There each neuron fires its QCFS level k = h * L / lambda at once, and a max-pool passes its
    window's largest k. Differentiable through QCFS's straight-through floor.
    """
    spikes, x, per_spike = {}, images, None  # per_spike: what one spike of x stands for
    levels = getattr(model, "input_levels", None)
    for name, layer in model.named_children():
        if levels and not spikes:  # the first layer: L_in levels of the image, as spikes
            spikes[name] = input_spikes(images, levels)
            x = spikes[name] / levels
        elif isinstance(layer, (nn.Conv2d, nn.Linear)) and per_spike is not None:
            spikes[name] = x / per_spike
        if isinstance(layer, nn.Flatten) and per_spike is not None:
            per_spike = per_spike.expand(x.shape[1:]).flatten()
        x = layer(x)
        if hasattr(layer, "levels"):  # a QCFS layer (lenet5.QCFS)
            per_spike = (layer.threshold / layer.levels).view(-1, *[1] * (x.dim() - 2)) \
                if layer.threshold.dim() else layer.threshold / layer.levels
    return x, spikes


def first_step_energy(model, images, fanouts):
    """The logits, and the energy (pJ) per image of the SNN's first step with gamma = L
    (`first_step_spikes`), as `efficiency` counts it after a simulation; `fanouts` from
    `fan_outs`."""
    logits, spikes = first_step_spikes(model, images)
    first = next(iter(fanouts))
    return logits, energy_pj(0 if first in spikes else fanouts[first].sum(),
                             synops_of(spikes, fanouts))


@torch.no_grad()
def first_step_energy_uj(model, batches, device, fanouts):
    """The mean first-step energy per image (µJ) of a QCFS network's SNN over `batches`."""
    model.eval()
    total, seen = 0.0, 0
    for images, _ in batches:
        total += first_step_energy(model, images.to(device), fanouts)[1].sum().item()
        seen += len(images)
    return total / seen / 1e6


def efficiency(snn, counts, images, timesteps, neurons, shapes):
    """Firing rates, synaptic operations and energy per image from spike counts (docs/method.md §7).

    Args:
        snn: the converted network; counts: {module: spikes [T, *units] over all images}, from
        `evaluate_snn`; images: how many images the counts are summed over; timesteps: T;
        neurons: the names of its neuron layers, whose firing rates are given;
        shapes: {weighted layer: one sample's input shape}, from `input_shapes` of the ANN.
    """
    fanouts = {name: fan_out(getattr(snn, name), shape).cpu() for name, shape in shapes.items()}
    macs = {name: round(f.sum().item()) for name, f in fanouts.items()}
    first = next(iter(shapes))
    synops, source = {}, None  # source: the module whose spikes enter the next weighted layer
    for name, _ in snn.named_children():
        if name in counts:
            source = name
        elif name in fanouts and source is not None:  # the first too, after an input layer
            per_step = counts[source].flatten(1).double() @ fanouts[name].flatten().double()
            synops[name] = (per_step.cumsum(0) / images).tolist()
    total = [sum(ops[t] for ops in synops.values()) for t in range(timesteps)]
    analog = 0 if first in synops else macs[first]  # the first layer's MACs on the analog image
    rates = {name: counts[name].sum().item() / (images * counts[name][0].numel() * timesteps)
             for name in neurons}
    return {
        "firing_rate": rates,
        "ann_macs_per_image": sum(macs.values()),
        "ann_macs_by_layer": macs,
        "first_layer_macs": analog,
        "synops_per_image": total,
        "synops_by_layer": synops,
        "ann_energy_pj": sum(macs.values()) * PJ_PER_MAC,
        "snn_energy_pj": [energy_pj(analog, ops) for ops in total],
        "energy_model": ENERGY_MODEL,
    }


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


def plot_efficiency(result, path, extra=None):
    """Firing rate per layer, SynOps per image against T, accuracy against energy per image;
    `extra(ax, result)`, if given, draws a fourth panel."""
    eff, timesteps = result["efficiency"], result["timesteps"]
    steps = range(1, timesteps + 1)
    fig, axes = plt.subplots(1, 3 + bool(extra), figsize=(15 + 5 * bool(extra), 4.2))
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
    if extra:
        extra(axes[3], result)
    fig.suptitle(f"LeNet5 SNN efficiency on {result['test_images']} MNIST test images: "
                 f"{settings_text(result['settings'])}", fontsize=10)
    save_figure(fig, path)
