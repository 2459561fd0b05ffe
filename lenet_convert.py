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
WITHIN = 0.001  # "reached the ANN": accuracy at least the ANN's minus 0.1 percentage points


# ----------------------------------------------------------------------------- spiking modules


class SpikeNode(nn.Module):
    """Integrate-and-fire neuron with reset by subtraction (conversion.md §5).

    Each step: V <- V + I;  s = clamp(floor(V / threshold), 0, gamma);  V <- V - s * threshold;
    output s. gamma = 1 is a plain IF neuron, gamma > 1 a burst neuron. The potential starts at
    v0 * threshold (v0 = 0.5 turns the rate's floor into a rounding). Spikes are counted
    (`spike_count`, over the batch since the last reset) so firing rates can be reported.
    """

    def __init__(self, threshold=1.0, gamma=1, v0=0.5):
        super().__init__()
        self.threshold, self.gamma, self.v0 = threshold, gamma, v0
        self.reset()

    def reset(self):
        self.mem = None
        self.spike_count = 0
        self.steps = 0

    def forward(self, current):
        if self.mem is None:
            self.mem = torch.full_like(current, self.v0 * self.threshold)
        self.mem.add_(current)
        scaled = self.mem if self.threshold == 1 else self.mem / self.threshold  # skip a pass
        spikes = torch.floor(scaled).clamp_(0, self.gamma)
        self.mem.sub_(spikes, alpha=self.threshold)
        self.spike_count = self.spike_count + spikes.sum()
        self.steps += 1
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


class SMaxPool(nn.Module):
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
        self.acc = None  # C_t, the input summed over the steps so far
        self.pooled = None  # maxpool(C_{t-1})

    def forward(self, x):
        self.acc = x.clone() if self.acc is None else self.acc.add_(x)
        k = self.kernel_size
        if not self.lateral_inhibition:
            return max_pool(x + self.k * self.acc, k) - max_pool(self.k * self.acc, k)
        pooled = max_pool(self.acc, k)
        out = pooled if self.pooled is None else pooled - self.pooled
        self.pooled = pooled
        return out

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, lateral_inhibition={self.lateral_inhibition}"


def clean_mem_spike(model):
    """Reset every stateful module (potentials, spike counts, pooling sums) before a new batch."""
    for module in model.modules():
        if isinstance(module, (SpikeNode, SMaxPool)):
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


def activation_scales(checkpoint, key=None):
    """{layer: lambda} at percentile `key` (default: the checkpoint's own) from a checkpoint."""
    recorded = checkpoint.get("percentiles")
    if not isinstance(recorded, dict) or not recorded:
        raise UserError("the checkpoint holds no activation percentiles; retrain it with "
                        "`python lenet5.py`")
    key = key or checkpoint.get("percentile", "99")
    try:
        scales = {layer: float(values[key]) for layer, values in recorded.items()}
    except (KeyError, TypeError):
        available = ", ".join(next(iter(recorded.values()), {}))
        raise UserError(f"the checkpoint has no {key}th percentile (it has: {available}); "
                        f"choose one of those or retrain with `--percentile {key}`") from None
    return scales


@torch.no_grad()
def scale_layer(layer, scale_in, scale_out):
    """Data-based normalisation: W <- W * scale_in / scale_out, b <- b / scale_out."""
    layer.weight.mul_(scale_in / scale_out)
    layer.bias.div_(scale_out)


def fuse_norm_replace(model, scales, spiking=True, gamma=1, v0=0.5, lateral_inhibition=True,
                      readout="analog"):
    """Convert an ANN into a spiking copy; `model` itself is left untouched.

    Args:
        model: a LeNet5 (an nn.Sequential of named layers) in eval mode.
        scales: {activation layer name: lambda, "out": lambda}, e.g. from `activation_scales`.
        spiking: False keeps ReLU and MaxPool: the normalised ANN, whose outputs equal the ANN's
            (divided by lambda_out with a spiking read-out).
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
        elif isinstance(layer, nn.ReLU):
            if not scales.get(name, 0) > 0:
                raise UserError(f"activation scale of {name} is {scales.get(name)}: cannot "
                                "normalise by it (a dead layer?)")
            scale_layer(layers[pending], scale, scales[name])
            scale, pending = scales[name], None
            layer = SpikeNode(gamma=gamma, v0=v0) if spiking else nn.ReLU()
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
            layer.mem = None  # a fresh chunk of images; spike counts keep adding up
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
        return torch.diff(pooled, dim=0, prepend=torch.zeros_like(pooled[:1]))
    current = spikes.flatten(0, 1)  # o_t = MP(x_t + K*C_t) - MP(K*C_t)
    out = max_pool(current + pool.k * cumulative, k) - max_pool(pool.k * cumulative, k)
    return out.unflatten(0, steps)


SIMULATORS = {"step": simulate, "layerwise": simulate_layerwise}


def predict(total, readout):
    """Class with the largest summed output; for a spiking read-out ties go to the potential."""
    if readout is None:
        return total.argmax(1)
    top = total == total.max(1, keepdim=True).values
    return torch.where(top, readout.mem, torch.tensor(-math.inf, device=total.device)).argmax(1)


@torch.no_grad()
def evaluate_snn(snn, batches, timesteps, device, simulator=simulate):
    """Accuracy after each step t = 1..T over all samples (a list, element t-1 for step t).

    Weighted by samples, so a partial last batch counts by its size. `simulator` is `simulate`
    (step by step) or `simulate_layerwise`: both give the same outputs.
    """
    snn.eval()
    readout = getattr(snn, "readout", None)  # the spiking read-out's SpikeNode, if any
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
    return (correct / seen).tolist()


def first_step_within(snn_accuracy, ann_accuracy, margin=WITHIN):
    """The first step t (1-based) whose accuracy is at least the ANN's minus `margin`, or None."""
    return next((t for t, acc in enumerate(snn_accuracy, 1)
                 if acc >= ann_accuracy - margin - 1e-12), None)


def report_steps(timesteps):
    """The steps the table shows: 1, 2, 4, 8, ... and the last."""
    steps = [2**i for i in range(int(math.log2(timesteps)) + 1)]
    return steps if steps[-1] == timesteps else steps + [timesteps]


# ----------------------------------------------------------------------------- output


def settings_text(settings):
    return (f"p={settings['percentile']}, γ={settings['gamma']}, V0={settings['v0']}θ, "
            f"lateral inhibition {'on' if settings['lateral_inhibition'] else 'off'}, "
            f"{settings['readout']} read-out")


def plot_accuracy(result, path):
    """SNN accuracy per step (log step axis), the ANN as a line; full range and a zoom."""
    steps = range(1, result["timesteps"] + 1)
    snn = [100 * a for a in result["snn_accuracy"]]
    ann = 100 * result["ann_accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, zoom in zip(axes, (False, True), strict=True):
        ax.plot(steps, snn, marker=".", label="SNN")
        ax.axhline(ann, color="tab:red", linestyle="--", label=f"ANN ({ann:.2f} %)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(report_steps(result["timesteps"]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("time step t")
        ax.set_ylabel("test accuracy after t steps (%)")
        ax.grid(True, which="both", alpha=0.3)
        if zoom:
            ax.set_ylim(ann - 2, min(100, ann + 0.5))
            ax.set_title("zoom near the ANN")
        else:
            ax.set_ylim(0, 100)
            ax.set_title("full range")
        ax.legend(loc="lower right")
    fig.suptitle(f"LeNet5 SNN on {result['test_images']} MNIST test images: "
                 f"{settings_text(result['settings'])}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def print_table(result):
    ann = result["ann_accuracy"]
    print(f"{'t':>5}  {'SNN':>7}  {'SNN - ANN':>9}")
    for t in report_steps(result["timesteps"]):
        acc = result["snn_accuracy"][t - 1]
        print(f"{t:>5}  {acc:7.2%}  {100 * (acc - ann):+8.2f}pp")
    print(f"  ANN  {ann:7.2%}")
    first = result["first_step_within_0.1pp"]
    print("first step within 0.1 pp of the ANN: "
          + (str(first) if first else f"not within {result['timesteps']} steps"))


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
                    "test set and plot its accuracy per time step against the ANN. "
                    f"BrainCog's reference setting: {BRAINCOG_REFERENCE}.")
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/lenet5_best.pt"),
                        help="checkpoint written by lenet5.py")
    parser.add_argument("--timesteps", type=positive_int, default=64, help="simulation steps T")
    parser.add_argument("--batch-size", type=positive_int, default=500,
                        help="test images simulated at once (500 keeps a layer's state in the "
                             "CPU's cache better than 1,000)")
    parser.add_argument("--percentile", type=percentile, default=None,
                        help="activation percentile that sets each layer's scale (one the "
                             "checkpoint recorded: 99, 99.9, 99.99, 100); default: the "
                             "checkpoint's own")
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
                        help="where the plot and the JSON go")
    return parser.parse_args(argv)


def convert_and_simulate(args):
    """Load, convert, simulate; return the result dict written to JSON."""
    device = resolve_device(args.device)
    check_writable_dir(args.out_dir)
    checkpoint = load_checkpoint(args.checkpoint)
    ann = model_from_checkpoint(checkpoint, args.checkpoint).to(device)
    key = percentile_key(args.percentile) if args.percentile else None
    scales = activation_scales(checkpoint, key)
    settings = {"percentile": key or checkpoint.get("percentile", "99"), "gamma": args.gamma,
                "v0": args.v0, "lateral_inhibition": args.lateral_inhibition,
                "readout": args.readout}
    snn = fuse_norm_replace(ann, scales, gamma=args.gamma, v0=args.v0,
                            lateral_inhibition=args.lateral_inhibition,
                            readout=args.readout).to(device)
    images, labels = load_mnist(args.data_dir, train=False)
    if args.limit and args.limit > len(labels):
        raise UserError(f"--limit {args.limit}: the test set has only {len(labels)} images")
    batches = Batches(images[:args.limit], labels[:args.limit], args.batch_size)
    print(f"simulating {len(batches.labels)} test images for {args.timesteps} steps on {device}: "
          f"{settings_text(settings)}")
    start = time.perf_counter()
    snn_accuracy = evaluate_snn(snn, batches, args.timesteps, device, SIMULATORS[args.simulator])
    ann_accuracy = evaluate(ann, batches, device)
    return {
        "ann_accuracy": ann_accuracy,
        "snn_accuracy": snn_accuracy,
        "timesteps": args.timesteps,
        "first_step_within_0.1pp": first_step_within(snn_accuracy, ann_accuracy),
        "settings": settings,
        "checkpoint": str(args.checkpoint),
        "test_images": len(batches.labels),
        "device": str(device),
        "simulation_seconds": round(time.perf_counter() - start, 2),
    }


def main(argv=None):
    args = parse_args(argv)
    try:
        result = convert_and_simulate(args)
        plot_accuracy(result, args.out_dir / "snn_accuracy.png")
        write_json(args.out_dir / "snn_accuracy.json", result)
    except UserError as e:
        sys.exit(f"lenet_convert.py: error: {e}")
    print_table(result)
    print(f"wrote {args.out_dir / 'snn_accuracy.png'} and {args.out_dir / 'snn_accuracy.json'} "
          f"(simulation {result['simulation_seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
