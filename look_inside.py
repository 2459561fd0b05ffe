"""Look inside one digit: what each layer of the spiking network does, step by step.

`python lenet_convert.py --look-inside [WHICH ...]` converts the checkpoint with the options
given, simulates each chosen test image with every layer stepped, and draws one figure per image:
the digit and the answer after each step, the output's running vote, three neurons' membrane
potentials against the threshold, a raster of every spiking layer's spikes, and each neuron's
firing rate against its ANN activation over the layer's scale: the straight line the conversion
promises, its spread the conversion's error. WHICH is a test image's index, or `late` (the
first image the SNN gets wrong after one step and right after T), or `wrong` (the first it still
gets wrong after T); by default `late`, or image 0 where no image is.

Examples:
    python lenet_convert.py --look-inside                    # the first digit that settles late
    python lenet_convert.py --look-inside 0 wrong --timesteps 16
    python lenet_convert.py --checkpoint checkpoints/lenet5_qcfs_best.pt --look-inside 0

Writes (into --out-dir, for each image N):
    inside_N.png   the figure
    inside_N.gif   the spike maps of the two convolution layers, step by step (drawn by
                   matplotlib, one frame per step, saved by Pillow)
    inside_N.json  the numbers drawn: spikes per layer and step, the three neurons' potentials
                   and spikes, the votes, and every neuron's rate and ANN activation
"""

import functools
import math
import time

import numpy
import PIL.Image
import torch

import cli
from layer_scales import conversion_scales
from lenet5 import record_activations
from lenet_convert import (
    INPUT_NODE,
    READOUT_NODE,
    Conversion,
    SpikeNode,
    check_memory,
    convert,
    counted_units,
    counting_modules,
    fold_batchnorm,
    load_ann,
    load_test_set,
    normalise,
    predictions,
    simulate,
)
from options import settings_from, settings_record
from plots import plt, save_figure, settings_text, step_axis

DEFAULT = "late"  # the image looked at unless told: one whose answer changes as it settles
NEURONS_FROM = "act5"  # the layer whose neurons' potentials are drawn: the first linear one
MAPS = ("act1", "act3")  # the layers the GIF shows as spike maps, channel by channel
GIF_STEPS_PER_SECOND = 4
GIF_FIGSIZE = (3.2 * (1 + len(MAPS)), 3.3)  # inches: the digit and each layer's maps


# ----------------------------------------------------------------------------- choosing images


@torch.no_grad()
def pick(snn, batches, timesteps, which, device):
    """The index of the first test image of the kind `which` ("late" or "wrong"), or None."""
    seen = 0
    for images, labels in batches:
        labels = labels.to(device)
        right = torch.stack([prediction == labels for _, _, prediction in
                             predictions(snn, images.to(device), timesteps)])  # [T, batch]
        found = (~right[0] & right[-1]) if which == "late" else ~right[-1]
        if found.any():
            return seen + int(found.nonzero()[0, 0])
        seen += len(labels)
    return None


def chosen_images(snn, batches, timesteps, asked, device):
    """The indices asked for (indices and kinds), each once, in order; for the default, image 0
    where no image is of its kind."""
    indices = []
    for which in asked or [DEFAULT]:
        index = which if isinstance(which, int) else pick(snn, batches, timesteps, which, device)
        if index is None and not asked:
            print(f"no test image is of the kind {DEFAULT!r} here: looking at image 0")
            index = 0
        elif index is None:
            raise cli.UserError(f"--look-inside {which}: no test image of {len(batches.labels)} "
                                f"is of that kind after {timesteps} steps")
        indices.append(index)
    return list(dict.fromkeys(indices))


# ----------------------------------------------------------------------------- one image


@torch.no_grad()
def trace(snn, image, timesteps):
    """Simulate one image ([1, 32, 32]) with every layer stepped, and record at each step each
    spiking module's output, each neuron layer's potential once the step's input is in (before
    the reset, in thresholds), and the summed output and prediction."""
    modules = counting_modules(snn)
    spikes = {name: [] for name in modules}
    potential = {name: [] for name, m in modules.items() if isinstance(m, SpikeNode)}

    def before(module, inputs, name):
        start = module.mem if module.mem is not None else module.v0 * module.threshold
        potential[name].append(((start + inputs[0]) / module.threshold)[0].cpu())

    def after(module, inputs, output, name):
        spikes[name].append(output[0].cpu())
    handles = [m.register_forward_hook(functools.partial(after, name=name))
               for name, m in modules.items()]
    handles += [modules[name].register_forward_pre_hook(functools.partial(before, name=name))
                for name in potential]
    try:
        steps = list(predictions(snn, image[None], timesteps,
                                 functools.partial(simulate, closed_form=False)))
    finally:
        for handle in handles:
            handle.remove()
    return {"spikes": {name: torch.stack(s) for name, s in spikes.items()},  # [T, *units]
            "potential": {name: torch.stack(p) for name, p in potential.items()},
            "votes": torch.stack([total[0] for _, total, _ in steps]).cpu(),  # [T, classes]
            "prediction": [int(p[0]) for _, _, p in steps]}


@torch.no_grad()
def activations_over_scale(conversion, image, device):
    """Each activation layer's output for `image` in the normalised ANN: the ANN's activation
    over the layer's scale, what a neuron's rate per step stands for."""
    ann, settings = conversion.ann, conversion.settings
    normalised = normalise(fold_batchnorm(ann), conversion_scales(conversion.checkpoint, ann,
                                                                  settings),
                           spiking_readout=settings.readout == "spikes")
    names = [name for name in dict(normalised.named_children()) if name.startswith("act")]
    values = record_activations(normalised, [(image[None].to(device), None)], device, names)
    return {name: value[0] for name, value in values.items()}


def settled_at(predicted):
    """The first step from which the answer no longer changes."""
    t = len(predicted)
    while t > 1 and predicted[t - 2] == predicted[-1]:
        t -= 1
    return t


def chosen_neurons(record, layer=NEURONS_FROM):
    """[(unit, why)]: the busiest neuron of `layer`, the one firing least (but firing), and the
    one that never fires whose potential came closest to the threshold."""
    counts = record["spikes"][layer].abs().sum(0).flatten()
    peak = record["potential"][layer].flatten(1).amax(0)
    chosen = [(int(counts.argmax()), "the busiest")]
    firing = (counts > 0).nonzero()[:, 0]
    if len(firing):
        chosen.append((int(firing[counts[firing].argmin()]), "the one firing least"))
    silent = (counts == 0).nonzero()[:, 0]
    if len(silent):
        chosen.append((int(silent[peak[silent].argmax()]), "never fires, closest to it"))
    return list({unit: (unit, why) for unit, why in chosen}.values())


def summary(record, activations, conversion, index, label, ann_prediction):
    """inside_N.json: the numbers the figure draws."""
    timesteps = len(record["prediction"])
    neuron = record["potential"][NEURONS_FROM].flatten(1)
    fired = record["spikes"][NEURONS_FROM].flatten(1)
    return {
        "index": index, "label": label, "ann_prediction": ann_prediction,
        "snn_prediction_per_step": record["prediction"],
        "settled_at": settled_at(record["prediction"]), "timesteps": timesteps,
        "checkpoint": str(conversion.path), "settings": settings_record(conversion),
        "threshold": 1.0,
        "spikes_per_layer_and_step": {name: s.abs().flatten(1).sum(1).tolist()
                                      for name, s in record["spikes"].items()},
        "neurons": [{"layer": NEURONS_FROM, "unit": unit, "why": why,
                     "potential_before_reset": neuron[:, unit].tolist(),
                     "spikes": fired[:, unit].tolist()} for unit, why in chosen_neurons(record)],
        "votes_summed_per_step": record["votes"].tolist(),
        "rate_against_activation": {
            name: {"activation_over_scale": activations[name].flatten().tolist(),
                   "rate_per_step": (record["spikes"][name].sum(0) / timesteps).flatten().tolist()}
            for name in activations},
    }


# ----------------------------------------------------------------------------- drawing


def draw_digit(ax, image, facts):
    """The input digit, its label and the two networks' answers."""
    ax.imshow(image.squeeze().cpu().numpy(), cmap="gray_r")
    ax.set_axis_off()
    ax.set_title(f"test image {facts['index']}: a {facts['label']}\nANN's answer "
                 f"{facts['ann_prediction']}, SNN's after T = {facts['timesteps']} steps "
                 f"{facts['snn_prediction_per_step'][-1]}", fontsize=9)


def draw_answers(ax, facts):
    """The SNN's answer after each step, against the label."""
    steps = range(1, facts["timesteps"] + 1)
    ax.step(steps, facts["snn_prediction_per_step"], where="mid", marker=".", label="SNN")
    ax.axhline(facts["label"], color="tab:green", linestyle="--", label="label")
    ax.axvline(facts["settled_at"], color="k", linestyle=":",
               label=f"settled from t = {facts['settled_at']}")
    step_axis(ax, facts["timesteps"])
    ax.set_yticks(range(10))
    ax.set_ylim(-0.5, 9.5)
    ax.set_ylabel("answer (class) after t steps")
    ax.set_title("the SNN's answer after each step", fontsize=9)
    ax.legend(fontsize=7, loc="best")


def draw_votes(ax, facts):
    """Each class's output summed over the steps so far: the running vote."""
    votes = torch.tensor(facts["votes_summed_per_step"])
    steps = range(1, len(votes) + 1)
    for c in range(votes.shape[1]):
        winner = c == facts["snn_prediction_per_step"][-1]
        ax.plot(steps, votes[:, c], color=plt.cm.tab10(c), linewidth=2.5 if winner else 1,
                label=f"{c}" + (" (answer)" if winner else ""))
    ax.axvline(facts["settled_at"], color="k", linestyle=":")
    step_axis(ax, facts["timesteps"])
    readout = facts["settings"]["readout"]
    ax.set_ylabel("summed output after t steps" + (" (spikes)" if readout == "spikes" else
                                                     " (currents)"))
    ax.set_title("the running vote; dotted: the step the answer settles", fontsize=9)
    ax.legend(fontsize=6, ncol=2, title="class", title_fontsize=7)


def draw_potentials(ax, facts):
    """The chosen neurons' potentials once each step's input is in, the threshold, and their
    spikes (marker size: spikes that step)."""
    for k, neuron in enumerate(facts["neurons"]):
        steps = range(1, len(neuron["spikes"]) + 1)
        colour = plt.cm.Dark2(k)
        ax.plot(steps, neuron["potential_before_reset"], color=colour, marker=".", markersize=3,
                label=f"{neuron['layer']} unit {neuron['unit']}: {neuron['why']}")
        fired = [(t, v, s) for t, v, s in zip(steps, neuron["potential_before_reset"],
                                              neuron["spikes"], strict=True) if s]
        ax.scatter([t for t, _, _ in fired], [v for _, v, _ in fired], color=colour,
                   s=[20 + 20 * abs(s) for _, _, s in fired], marker="^", zorder=3)
    ax.axhline(facts["threshold"], color="tab:red", linestyle="--", label="threshold")
    step_axis(ax, facts["timesteps"])
    ax.set_ylabel("membrane potential before the reset (thresholds)")
    ax.set_title("three neurons (▲: a spike)", fontsize=9)
    ax.legend(fontsize=6)


def draw_raster(ax, spikes, name, gamma):
    """A layer's spikes: units (channel after channel) against steps, colour for the count."""
    data = spikes.flatten(1).T.numpy()  # [units, T]
    shown = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma",
                      vmin=min(0.0, float(data.min())), vmax=gamma,  # the same in every layer
                      extent=(0.5, len(spikes) + 0.5, data.shape[0], 0))
    if spikes.dim() == 4:  # a convolution layer: its channels
        per_channel = spikes[0, 0].numel()
        for c in range(1, spikes.shape[1]):
            ax.axhline(c * per_channel, color="w", linewidth=0.4)
        ax.set_ylabel(f"unit ({spikes.shape[1]} channels of {per_channel})")
    else:
        ax.set_ylabel("unit")
    ax.set_xlabel("time step t")
    ax.set_title(f"{name}: {int(spikes.abs().sum())} spikes from {data.shape[0]} units",
                 fontsize=9)
    plt.colorbar(shown, ax=ax, pad=0.01).set_label("spikes at that step", fontsize=7)


def draw_rates(ax, facts, gamma):
    """Every neuron's firing rate after T steps against its ANN activation over the scale."""
    top = 0.0
    for k, (name, points) in enumerate(facts["rate_against_activation"].items()):
        x, y = points["activation_over_scale"], points["rate_per_step"]
        ax.scatter(x, y, s=4, alpha=0.5, color=plt.cm.tab10(k), label=name)
        top = max(top, max(x), max(y))
    line = torch.linspace(0, max(top, 1.0), 100)
    ax.plot(line, line.clamp(0, gamma), color="k", linewidth=1,
            label=f"the promise: rate = activation, up to γ = {gamma}")
    ax.set_xlabel("ANN activation over the layer's scale (thresholds)")
    ax.set_ylabel(f"SNN firing rate after T = {facts['timesteps']} (spikes per step)")
    ax.set_title("each neuron's rate against its ANN activation", fontsize=9)
    ax.legend(fontsize=7, markerscale=3)


def plot_inside(image, record, facts, path):
    """One image's figure: the rows are the answers, the spiking layers (the input layer's
    first, where the image enters as spikes), and the rates."""
    layers = [name for name in record["spikes"] if name != READOUT_NODE]
    rows = 1 + math.ceil((len(layers) + 2) / 4)  # the rates take two places of the last row
    fig = plt.figure(figsize=(19, 4.2 + 4.9 * (rows - 1)))
    grid = fig.add_gridspec(rows, 4, height_ratios=(1, *[1.15] * (rows - 1)))
    draw_digit(fig.add_subplot(grid[0, 0]), image, facts)
    draw_answers(fig.add_subplot(grid[0, 1]), facts)
    draw_votes(fig.add_subplot(grid[0, 2]), facts)
    draw_potentials(fig.add_subplot(grid[0, 3]), facts)
    gamma, input_neuron = facts["settings"]["gamma"], facts["settings"]["input_neuron"]
    for k, name in enumerate(layers):
        draw_raster(fig.add_subplot(grid[1 + k // 4, k % 4]), record["spikes"][name], name,
                    input_neuron["gamma"] if name == INPUT_NODE else gamma)
    draw_rates(fig.add_subplot(grid[rows - 1, 2:]), facts, gamma)
    fig.suptitle(f"Inside the LeNet5 SNN, test image {facts['index']}: "
                 f"{settings_text(facts['settings'])}", fontsize=11)
    save_figure(fig, path)


def mosaic(maps, columns):
    """Channel maps [T, C, H, W] tiled into [T, rows * (H + 1) - 1, columns * (W + 1) - 1],
    a row of NaN (drawn blank) between them."""
    steps, channels, height, width = maps.shape
    rows = -(-channels // columns)
    tiled = torch.full((steps, rows * (height + 1) - 1, columns * (width + 1) - 1), float("nan"))
    for c in range(channels):
        top, left = (c // columns) * (height + 1), (c % columns) * (width + 1)
        tiled[:, top:top + height, left:left + width] = maps[:, c]
    return tiled


def animate(image, record, facts, path):
    """A GIF of the spike maps of MAPS at each step: each layer's channels side by side."""
    tiles = {name: mosaic(record["spikes"][name].float(), 3 if name == "act1" else 4)
             for name in MAPS}
    fig, axes = plt.subplots(1, 1 + len(MAPS), figsize=GIF_FIGSIZE)
    axes[0].imshow(image.squeeze().cpu().numpy(), cmap="gray_r")
    axes[0].set_title(f"test image {facts['index']}: a {facts['label']}", fontsize=9)
    top = facts["settings"]["gamma"]
    shown = []
    for ax, (name, tiled) in zip(axes[1:], tiles.items(), strict=True):
        shown.append(ax.imshow(tiled[0].numpy(), cmap="magma", vmin=0, vmax=top))
        channels = record["spikes"][name].shape[1]
        ax.set_title(f"{name}: its {channels} channels", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(shown[-1], ax=axes[1:], shrink=0.8).set_label("spikes at this step")
    title = fig.suptitle(" ", fontsize=10)
    fig.canvas.draw()  # everything that stays, once; each frame redraws the maps and title
    background = fig.canvas.copy_from_bbox(fig.bbox)
    frames = []
    for t in range(facts["timesteps"]):
        fig.canvas.restore_region(background)
        for im, tiled in zip(shown, tiles.values(), strict=True):
            im.set_data(tiled[t].numpy())
            fig.draw_artist(im)
        title.set_text(f"step t = {t + 1} of {facts['timesteps']}: answer so far "
                       f"{facts['snn_prediction_per_step'][t]}")
        fig.draw_artist(title)
        frames.append(PIL.Image.fromarray(numpy.asarray(fig.canvas.buffer_rgba())).convert("RGB"))
    plt.close(fig)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=1000 // GIF_STEPS_PER_SECOND)


def memory_per_step(units, images):
    """Bytes a look at `images` images keeps per step, from above: each image's record (every
    spiking module's output and every neuron layer's potential, listed, then stacked), and for
    the image being drawn its GIF frames (RGB, and a frame's RGBA buffer) and a raster of its
    largest layer (a few float64 copies inside matplotlib). `units`: `counted_units`."""
    record = 2 * 4 * 2 * sum(units.values())  # spikes and, fewer, potentials: float32, twice
    frame = 7 * plt.rcParams["figure.dpi"] ** 2 * GIF_FIGSIZE[0] * GIF_FIGSIZE[1]  # RGB + RGBA
    return images * record + int(frame) + 4 * 8 * max(units.values())


# ----------------------------------------------------------------------------- the hand-over


def main(args, device):
    """--look-inside: choose the images, trace each, write its figure, GIF and JSON."""
    checkpoint, ann = load_ann(args.checkpoint, device, args.data_dir)
    conversion = Conversion(args.checkpoint, checkpoint, ann, settings_from(args, checkpoint))
    snn = convert(conversion, args.data_dir, device)
    batches = load_test_set(args.data_dir, args.limit, args.batch_size)
    asked = args.look_inside
    if any(isinstance(i, int) and i >= len(batches.labels) for i in asked):
        raise cli.UserError(f"--look-inside: the test images here are 0 to "
                            f"{len(batches.labels) - 1}")
    check_memory(snn, args.timesteps, args.batch_size, len(batches.labels),  # the choice, and
                 per_step=memory_per_step(counted_units(snn), len(asked or [DEFAULT])))  # draws
    start, looked = time.perf_counter(), []
    for index in chosen_images(snn, batches, args.timesteps, asked, device):
        image = batches.images[index].float().div_(255)[None].to(device)
        label = int(batches.labels[index])
        with torch.no_grad():
            ann_prediction = int(ann(image[None]).argmax())
        record = trace(snn, image, args.timesteps)
        facts = summary(record, activations_over_scale(conversion, image, device), conversion,
                        index, label, ann_prediction)
        looked.append((index, image, record, facts))
    with cli.file_set(args.out_dir) as files:
        for index, image, record, facts in looked:
            plot_inside(image, record, facts, files.path(f"inside_{index}.png"))
            animate(image, record, facts, files.path(f"inside_{index}.gif"))
            cli.write_json(files.path(f"inside_{index}.json"), facts)
    for _, _, _, facts in looked:
        print(f"image {facts['index']} (a {facts['label']}): ANN {facts['ann_prediction']}, "
              f"SNN after each step {facts['snn_prediction_per_step'][:16]}"
              + (" ..." if facts["timesteps"] > 16 else "")
              + f", settled from t = {facts['settled_at']}")
    print(f"wrote {cli.and_list(files.names)} in {args.out_dir} "
          f"({time.perf_counter() - start:.1f}s)")
    return [facts for _, _, _, facts in looked]
