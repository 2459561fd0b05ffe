"""Energy with memory traffic, and the bit-matched quantised ANN (docs/method.md §7).

efficiency.py counts operations only: MACs and accumulates, 4.6 and 0.9 pJ. Here every operation
also pays for the memory accesses it needs, each by the size of the memory that holds the data
(a read from a small SRAM is cheaper than one from a large one), and the SNN is compared with
two references: the float ANN, and the quantised ANN (QNN) that computes what the SNN computes
after t steps with ceil(log2(t * gamma + 1))-bit activations (`bit_matched_qnn`). For a QCFS
network converted with gamma = L, that QNN after one step is the QCFS ANN itself.

The model, per image (every constant in ENERGY_TABLE):
  SNN, each synaptic event: an accumulate, a read of its weight, a read and a write of its
      target's potential; each neuron, each step: a read of its potential and of its bias (the
      first layer's constant current, or the input layer's pixel), an add, a write; each pool
      unit, each step: a read and a write of its accumulated input; each spike: an address
      event written and read. A first layer on the analog image: its MACs once, each with a
      read of its weight and of its pixel, and each output written once.
  ANN (float) and QNN, each MAC: a multiply and an add, a read of its weight and of its input;
      each output: a write; each pool: its inputs read, its output written. The QNN skips MACs
      whose input is zero; the float ANN computes them all (as in efficiency.py).
"""

import itertools
import math
import statistics
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn

from counting import Counting
from efficiency import PJ_PER_AC, PJ_PER_MAC, fan_out

# Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm, 0.9 V), pJ
FP32_MULT, FP32_ADD = PJ_PER_MAC - PJ_PER_AC, PJ_PER_AC  # 3.7 + 0.9 = a float MAC
INT8_MULT, INT32_ADD = 0.2, 0.1
SRAM_PJ_PER_64_BITS = ((8 * 1024, 10.0), (32 * 1024, 20.0), (1024 * 1024, 100.0))  # bytes, pJ
DRAM_PJ_PER_64_BITS = 1300.0  # the low end of Horowitz's 1.3 to 2.6 nJ
STATE_BITS = 32  # potentials, biases, currents, sums, the float ANN's activations
IMAGE_BITS = 8  # an MNIST pixel
MANTISSA_BITS = 24  # a float32 multiply's cost is its 24 x 24-bit mantissa product
ENERGY_TABLE = {
    "float32 multiply / add (pJ)": [FP32_MULT, FP32_ADD],
    "int8 multiply / int32 add (pJ)": [INT8_MULT, INT32_ADD],
    "SRAM read of 64 bits (bytes, pJ), log-log between, flat outside": SRAM_PJ_PER_64_BITS,
    "DRAM read of 64 bits (pJ)": DRAM_PJ_PER_64_BITS,
    "a b-bit activation times a weight (pJ)": "the weight's multiply scaled by b / its width "
                                              "(float32: b / 24 of the mantissa product)",
    "a write": "as a read of the same memory",
    "source": "Horowitz, ISSCC 2014, 45 nm; the model's structure after Yan et al. 2024 "
              "(arXiv:2409.08290), Lemaire et al. 2022, Dampfhoffer et al. 2023",
}


class Hardware(NamedTuple):
    """What the models assume of the chip: the weights' width, where the weights live."""

    weight_bits: int = 32
    weights_in: str = "sram"

    @property
    def add_pj(self):
        """An accumulate into a sum or a potential (float32, or int32 for int8 weights)."""
        return FP32_ADD if self.weight_bits == 32 else INT32_ADD

    def mult_pj(self, bits):
        """A weight times a `bits`-bit activation."""
        if self.weight_bits == 32:
            return FP32_MULT * min(bits, MANTISSA_BITS) / MANTISSA_BITS
        return INT8_MULT * bits / 8

    def weight_read_pj(self, weights):
        """A read of one weight of a layer of `weights` weights."""
        if self.weights_in == "dram":
            return self.weight_bits / 64 * DRAM_PJ_PER_64_BITS
        return access_pj(self.weight_bits, weights * self.weight_bits / 8)


DEFAULT_HARDWARE = Hardware()


def access_pj(bits, size_bytes):
    """A read (or write) of `bits` bits from an SRAM of `size_bytes` bytes: Horowitz's energy per
    64 bits, interpolated linearly in log size between his sizes, flat beyond them."""
    size = min(max(size_bytes, SRAM_PJ_PER_64_BITS[0][0]), SRAM_PJ_PER_64_BITS[-1][0])
    for (s0, e0), (s1, e1) in itertools.pairwise(SRAM_PJ_PER_64_BITS):
        if size <= s1:
            return bits / 64 * e0 * (e1 / e0) ** (math.log(size / s0) / math.log(s1 / s0))
    raise AssertionError("unreachable: size is clamped")


def bits_for(levels):
    """The bits of an activation with `levels` + 1 values (0 to levels)."""
    return max(1, math.ceil(math.log2(levels + 1)))


# ----------------------------------------------------------------------------- the networks


def is_neuron(module):
    """A spiking neuron layer (lenet_convert.SpikeNode, recognised by what it holds)."""
    return isinstance(module, Counting) and hasattr(module, "gamma")


def is_pool(module):
    """A spiking max-pool (lenet_convert.SMaxPool)."""
    return isinstance(module, Counting) and hasattr(module, "kernel_size")


class Layer(NamedTuple):
    """A module of the network as the models see it."""

    name: str
    kind: str  # "weighted", "neuron", "pool"
    inputs: int  # units in, per image
    outputs: int  # units out
    weights: int = 0  # weighted: its weights
    channels: int = 0  # weighted: its biases (output channels)
    gamma: int = 1  # neuron: its burst limit


def layers_of(snn, image_shape):
    """The weighted layers, neurons and pools of `snn` in order, with their sizes (Layer)."""
    layers, x = [], torch.zeros(1, *image_shape, device=next(snn.parameters()).device)
    for name, module in snn.named_children():
        size = x[0].numel()
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            x = module(x)
            layers.append(Layer(name, "weighted", size, x[0].numel(), module.weight.numel(),
                                module.weight.shape[0]))
        elif is_neuron(module):
            layers.append(Layer(name, "neuron", size, size, gamma=module.gamma))
        elif is_pool(module):
            x = nn.functional.max_pool2d(x, module.kernel_size)
            layers.append(Layer(name, "pool", size, x[0].numel()))
        else:
            x = module(x)
    return layers


class Quantise(nn.Module):
    """A SpikeNode's count after t steps on a constant input, as an activation: y = theta / t *
    clamp(floor(t * gain * x / theta + v0), 0, t * gamma), (ceil(log2(t * gamma + 1)) bits): the
    C_t of constant_input.py in exact arithmetic (that one repairs float32 rounding to match a
    stepped neuron, which the QNN, a function of its own, does not need)."""

    def __init__(self, node, steps):
        super().__init__()
        self.threshold, self.v0, self.gamma = node.threshold, node.v0, node.gamma
        self.gain, self.steps = getattr(node, "levels", 1), steps  # the input layer: x * L_in

    def forward(self, x):
        t = self.steps
        count = torch.clamp(torch.floor(t * self.gain * x / self.threshold + self.v0), 0,
                            t * self.gamma)
        return count * (self.threshold / t)


def bit_matched_qnn(snn, steps):
    """The QNN that `snn` approximates after `steps` steps: its weighted layers, each neuron's
    count as a quantised activation (`Quantise`), each spiking max-pool a max-pool."""
    modules = []
    for name, module in snn.named_children():
        if is_neuron(module):
            module = Quantise(module, steps)
        elif is_pool(module):
            module = nn.MaxPool2d(module.kernel_size)
        modules.append((name, module))
    return nn.Sequential(OrderedDict(modules)).eval()


@torch.no_grad()
def qnn_counts(snn, steps, batches, device, image_shape):
    """Run the bit-matched QNN of `snn` after `steps` steps on `batches`: (its accuracy,
    {weighted layer: the MACs per image whose input is not zero})."""
    qnn = bit_matched_qnn(snn, steps)
    weighted = [n for n, m in qnn.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]
    nonzero, correct, seen, fanouts = dict.fromkeys(weighted, 0.0), 0, 0, {}
    for images, labels in batches:
        x = images.to(device)
        for name, module in qnn.named_children():
            if name in nonzero:
                if name not in fanouts:
                    fanouts[name] = fan_out(module, x.shape[1:]).flatten()
                nonzero[name] += ((x != 0).flatten(1).to(fanouts[name].dtype)
                                  @ fanouts[name]).sum().item()
            x = module(x)
        correct += (x.argmax(1).cpu() == labels).sum().item()
        seen += len(labels)
    return correct / seen, {name: ops / seen for name, ops in nonzero.items()}


# ----------------------------------------------------------------------------- the models


def _sources(layers):
    """Each weighted layer with the neuron or pool whose output it reads (None: the image)."""
    out, source = [], None
    for layer in layers:
        if layer.kind == "weighted":
            out.append((layer, source))
        else:
            source = layer
    return out


def activation_bits(layers, steps=None):
    """{neuron or pool: the bits of its output}: ceil(log2(steps * gamma + 1)) in the QNN that
    matches `steps` steps, a pool as its input; steps None: the float ANN's 32."""
    bits, last = {}, STATE_BITS
    for layer in layers:
        if layer.kind == "neuron":
            last = STATE_BITS if steps is None else bits_for(steps * layer.gamma)
        if layer.kind != "weighted":
            bits[layer.name] = last
    return bits


def ann_energy(layers, hw, macs, steps=None):
    """Energy per image (pJ) of an ANN on `layers` (the SNN's, without its input layer for the
    float ANN): {layer: (compute, memory-inclusive)}. steps None: the float ANN (float32 weights
    whatever `hw` says, every MAC: `macs` {weighted layer: MACs}); else the QNN matching that
    many steps (`activation_bits`), `macs` its MACs on a non-zero input."""
    if steps is None:
        hw = Hardware(32, hw.weights_in)
    bits, out = activation_bits(layers, steps), {}
    for layer, source in _sources(layers):
        in_bits = IMAGE_BITS if source is None else bits[source.name]
        after = layers[layers.index(layer) + 1:]
        out_bits = bits[after[0].name] if after and after[0].kind == "neuron" else STATE_BITS
        compute = macs[layer.name] * (hw.mult_pj(in_bits if steps else MANTISSA_BITS)
                                      + hw.add_pj)
        memory = (macs[layer.name] * (hw.weight_read_pj(layer.weights)
                                      + access_pj(in_bits, layer.inputs * in_bits / 8))
                  + layer.outputs * access_pj(out_bits, layer.outputs * out_bits / 8))
        out[layer.name] = (compute, compute + memory)
    for layer in layers:
        if layer.kind == "pool":
            b = bits[layer.name]
            out[layer.name] = (0.0, (layer.inputs + layer.outputs)
                               * access_pj(b, layer.inputs * b / 8))
    return out


def snn_energy(layers, hw, synops, spikes, first_macs):
    """Memory-inclusive energy per image (pJ) of the SNN after each step: {layer: (the part that
    scales with its spikes, the part that does not), each a list over steps, cumulative}.

    `synops` {weighted layer: SynOps per image at each step}, `spikes` {neuron or pool: spikes
    per image at each step} (both per step, not cumulative), `first_macs` the first layer's
    MACs where it takes the analog image (else 0)."""
    steps = len(next(iter(spikes.values())))
    cumulative = lambda per_step: torch.as_tensor(per_step, dtype=torch.float64).cumsum(0)  # noqa: E731
    ramp = torch.arange(1, steps + 1, dtype=torch.float64)
    zero = torch.zeros(steps, dtype=torch.float64)
    out, bias_memory = {}, {}
    for layer, _ in _sources(layers):
        potentials = access_pj(STATE_BITS, layer.outputs * STATE_BITS / 8)
        per_event = hw.add_pj + hw.weight_read_pj(layer.weights) + 2 * potentials
        once = 0.0
        if layer.name not in synops:  # the first layer, on the analog image: MACs, once
            once = first_macs * (hw.mult_pj(IMAGE_BITS if hw.weight_bits == 8 else MANTISSA_BITS)
                                 + hw.add_pj + hw.weight_read_pj(layer.weights)
                                 + access_pj(IMAGE_BITS, layer.inputs * IMAGE_BITS / 8)) \
                + layer.outputs * potentials  # its currents, written once
            bias_memory[layer.name] = layer.outputs  # each neuron reads its own current
        out[layer.name] = (cumulative(synops.get(layer.name, zero)) * per_event, zero + once)
    bias_of = {}  # neuron: (bits, bytes) of what it reads each step besides its potential
    for i, layer in enumerate(layers):
        if layer.kind == "neuron":
            before = layers[i - 1] if i else None
            if before is None:  # the input layer: its pixel
                bias_of[layer.name] = (IMAGE_BITS, layer.inputs * IMAGE_BITS / 8)
            else:
                units = bias_memory.get(before.name, before.channels)
                bias_of[layer.name] = (STATE_BITS, units * STATE_BITS / 8)
    for layer in layers:
        if layer.kind == "weighted":
            continue
        state = access_pj(STATE_BITS, layer.inputs * STATE_BITS / 8)
        per_step = layer.inputs * 2 * state  # a potential, or a pool's sum, read and written
        if layer.kind == "neuron":
            per_step += layer.inputs * (hw.add_pj + access_pj(*bias_of[layer.name]))
        address = bits_for(layer.outputs - 1)
        per_spike = 2 * access_pj(address, layer.outputs * address / 8)  # written, read
        out[layer.name] = (cumulative(spikes[layer.name]) * per_spike, ramp * per_step)
    return {name: ([float(v) for v in scaled], [float(v) for v in fixed])
            for name, (scaled, fixed) in out.items()}


def qnn_steps(timesteps):
    """The steps at which the QNN is run: 1, 2, 4, ... up to T, and T."""
    return sorted({2 ** k for k in range(timesteps.bit_length()) if 2 ** k <= timesteps}
                  | {timesteps})


def energies(snn, eff, counts, images, batches, device, image_shape, hw=DEFAULT_HARDWARE,
             also=None):
    """The three energies per image (pJ) of `snn` after each step and of its references, per
    layer and in all, from its efficiency result `eff` and spike `counts` ({module: [T,
    *units]} over `images` images); the QNN of each `qnn_steps` (and of step `also`) is run on
    `batches`. JSON-ready.
    """
    layers = layers_of(snn, image_shape)
    timesteps = len(eff["synops_per_image"])
    qnn_runs = {t: qnn_counts(snn, t, batches, device, image_shape)
                for t in sorted({*qnn_steps(timesteps), also or 1})}
    synops = {name: [b - a for a, b in zip([0.0, *ops], ops, strict=False)]
              for name, ops in eff["synops_by_layer"].items()}  # per step
    spikes, spread = {}, []
    for layer in layers:
        if layer.kind != "weighted":
            fired = counts[layer.name].flatten(1).sum(1).double() / images
            if len(fired) < timesteps:  # counted in closed form: all steps in one row
                fired, spread = fired.sum().expand(timesteps) / timesteps, [*spread, layer.name]
            spikes[layer.name] = fired.tolist()
    first = layers[0].name  # on the analog image, it skips zero pixels as the QNN does
    first_macs = qnn_runs[1][1][first] if eff["first_layer_macs"] else 0
    snn_parts = snn_energy(layers, hw, synops, spikes, first_macs)
    snn_memory = [sum(s[t] + f[t] for s, f in snn_parts.values()) for t in range(timesteps)]
    without_spikes = [sum(f[t] for _, f in snn_parts.values()) for t in range(timesteps)]
    analog = layers[1:] if layers[0].kind == "neuron" else layers  # the float ANN's input
    ann = ann_energy(analog, hw, eff["ann_macs_by_layer"])
    ann_memory = sum(m for _, m in ann.values())
    neurons = [layer for layer in layers if layer.kind == "neuron"]
    qnn = []
    for t, (accuracy, macs) in qnn_runs.items():
        parts = ann_energy(layers, hw, macs, t)
        memory = sum(m for _, m in parts.values())
        scaled = sum(s[t - 1] for s, _ in snn_parts.values())
        fixed = sum(f[t - 1] for _, f in snn_parts.values())
        rate = sum(sum(spikes[n.name][:t]) for n in neurons) / (sum(n.inputs for n in neurons) * t)
        qnn.append({
            "t": t, "bits": activation_bits(layers, t), "accuracy": accuracy,
            "nonzero_macs_by_layer": macs,
            "compute_pj": sum(c for c, _ in parts.values()), "memory_pj": memory,
            "memory_by_layer_pj": {name: m for name, (_, m) in parts.items()},
            "snn_memory_by_layer_pj": {name: s[t - 1] + f[t - 1]
                                       for name, (s, f) in snn_parts.items()},
            "snn_over_qnn_memory": snn_memory[t - 1] / memory,
            "spike_rate": rate,
            # the rate at which the SNN's memory-inclusive energy would equal the QNN's, all its
            # spike-driven costs scaled together; None: its spike-free costs alone exceed it
            "break_even_spike_rate": rate * (memory - fixed) / scaled
            if scaled > 0 and memory > fixed else None,
            # per weighted layer: the factor its incoming spikes would have to be scaled by for
            # their events to cost what the QNN's layer costs (above 1: they cost less already)
            "break_even_factor_by_layer": {
                name: (parts[name][1] - f[t - 1]) / s[t - 1]
                for name, (s, f) in snn_parts.items() if name in macs and s[t - 1] > 0},
        })
    return {
        "hardware": hw._asdict(),
        # layers counted in closed form (their total only): their spikes spread evenly over the
        # steps, exact at t = T
        "spikes_spread_evenly": spread,
        "snn_memory_pj": snn_memory,
        # its part that no spike causes: each step's potentials (once + t * per step)
        "snn_memory_without_spikes_pj": without_spikes,
        "ann_compute_pj": sum(c for c, _ in ann.values()),
        "ann_memory_pj": ann_memory,
        "snn_over_ann_compute": [e / eff["ann_energy_pj"] for e in eff["snn_energy_pj"]],
        "snn_over_ann_memory": [e / ann_memory for e in snn_memory],
        "qnn": qnn,
        "table": ENERGY_TABLE,
    }


def early_exit(models, mean_steps, fixed_steps):
    """Early exit's memory-inclusive energy per image, from `energies` of its simulation (whose
    spikes and SynOps are those of the steps each image ran): the spike-driven part as counted,
    the rest (`snn_memory_without_spikes_pj`, affine in the steps) for the `mean_steps` the
    images ran; against the float ANN and the QNN of `fixed_steps`, the fixed T that reaches
    early exit's accuracy (its time is compared with that T's too)."""
    memory, fixed = models["snn_memory_pj"], models["snn_memory_without_spikes_pj"]
    per_step = (fixed[-1] - fixed[0]) / (len(fixed) - 1) if len(fixed) > 1 else 0.0
    energy = memory[-1] - fixed[-1] + fixed[0] + (mean_steps - 1) * per_step
    qnn = next(q for q in models["qnn"] if q["t"] == fixed_steps)
    return {"memory_pj_per_image": energy, "over_ann_memory": energy / models["ann_memory_pj"],
            "qnn_memory_pj": qnn["memory_pj"], "over_qnn_memory": energy / qnn["memory_pj"]}


def summary(models, t=1):
    """One line on the three energies after step `t`, one of the QNN's (`energies`)."""
    at = next(q for q in models["qnn"] if q["t"] == t)
    rate = at["break_even_spike_rate"]
    return (f"with memory traffic (docs/method.md §7), t = {t}: SNN "
            f"{models['snn_memory_pj'][t - 1] / 1e6:.2f} µJ, float ANN "
            f"{models['ann_memory_pj'] / 1e6:.2f} µJ "
            f"({models['snn_over_ann_memory'][t - 1]:.2f} ×), "
            f"{'/'.join(map(str, dict.fromkeys(at['bits'].values())))}-bit QNN "
            f"{at['memory_pj'] / 1e6:.2f} µJ ({at['snn_over_qnn_memory']:.2f} ×); the SNN "
            f"fires {at['spike_rate']:.3f} spikes per neuron and step, "
            + (f"and would break even with the QNN at {rate:.3f}" if rate is not None else
               "and costs more than the QNN at any spike rate"))


def plot_memory_axis(ax, result):
    """Accuracy against memory-inclusive energy per image: the SNN after each step, the float
    ANN and the bit-matched QNN of each of its steps (`energies`)."""
    models, accuracy = result["energy_models"], result["snn_accuracy"]
    ax.plot([e / 1e6 for e in models["snn_memory_pj"]], [100 * a for a in accuracy], marker=".",
            markersize=3, label="SNN, one point per step")
    ax.plot(models["ann_memory_pj"] / 1e6, 100 * result["ann_accuracy"], marker="*",
            markersize=14, linestyle="none", color="tab:red", markeredgecolor="k",
            label="float ANN")
    qnn = models["qnn"]
    ax.plot([q["memory_pj"] / 1e6 for q in qnn], [100 * q["accuracy"] for q in qnn], marker="D",
            linestyle=":", color="tab:green", label="bit-matched QNN of step t")
    last = 0.0
    for q in qnn:  # a label where it does not sit on the one before (log axis: 30 % apart)
        if q["memory_pj"] > 1.3 * last:
            last = q["memory_pj"]
            ax.annotate(f"t={q['t']}", (last / 1e6, 100 * q["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -9))
    ax.set_xscale("log")
    ax.set_xlabel("energy per image with memory traffic (µJ)")
    ax.set_ylabel("test accuracy (%)")
    ann = 100 * result["ann_accuracy"]
    ax.set_ylim(ann - 3, min(100, ann + 0.5))
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("with memory traffic: SNN, float ANN, QNN")
    ax.legend(loc="lower right", fontsize=8)


def at_step(result, t):
    """The three energies of a result (lenet_convert.run, or a study's record of it) after
    step `t`, one of its QNN's steps: µJ per image and the SNN's ratios."""
    models = result["energy_models"]
    qnn = next(q for q in models["qnn"] if q["t"] == t)
    compute = result.get("snn_energy_pj") or result["efficiency"]["snn_energy_pj"]
    return {"t": t, "snn_compute_uj": compute[t - 1] / 1e6,
            "snn_memory_uj": models["snn_memory_pj"][t - 1] / 1e6,
            "ann_memory_uj": models["ann_memory_pj"] / 1e6, "qnn_memory_uj": qnn["memory_pj"] / 1e6,
            "over_ann_compute": models["snn_over_ann_compute"][t - 1],
            "over_ann_memory": models["snn_over_ann_memory"][t - 1],
            "over_qnn_memory": qnn["snn_over_qnn_memory"], "spike_rate": qnn["spike_rate"],
            "break_even_spike_rate": qnn["break_even_spike_rate"],
            "by_layer": {name: {"snn_memory_uj": snn / 1e6,
                                "qnn_memory_uj": qnn["memory_by_layer_pj"].get(name, 0.0) / 1e6,
                                "break_even_factor": qnn["break_even_factor_by_layer"].get(name)}
                         for name, snn in qnn["snn_memory_by_layer_pj"].items()}}


def over_seeds(runs, level_key):
    """{network: {"t=1" and "at ANN level": {figure: mean, std and per seed}}} of `at_step` over
    the seeds, from {network: its results, one per seed}; `level_key` names each result's first
    step within 0.1 pp of its ANN."""
    table = {}
    for name, results in runs.items():
        for where, steps in (("t=1", [1] * len(results)),
                             ("at ANN level", [r[level_key] for r in results])):
            if None in steps or any("energy_models" not in r for r in results):
                continue
            rows = [at_step(r, t) for r, t in zip(results, steps, strict=True)]
            table.setdefault(name, {})[where] = _spread(rows)
    return table


def _spread(rows):
    """{key: {per_seed, mean, std}} over `rows` (dicts alike, one per seed), nested dicts key by
    key; no mean where a seed has None."""
    if isinstance(rows[0], dict):
        return {key: _spread([row[key] for row in rows]) for key in rows[0]}
    return {"per_seed": rows} | ({} if None in rows else {
        "mean": statistics.fmean(rows), "std": statistics.stdev(rows) if len(rows) > 1 else 0.0})


def over_seeds_text(table):
    """Lines on `over_seeds`: where each network stands against each reference."""
    def cell(figure, digits=2):
        if "mean" not in figure:
            return str(figure["per_seed"])
        return f"{figure['mean']:.{digits}f} ± {figure['std']:.{digits}f}"
    lines = ["with memory traffic (mean ± std over the seeds): µJ per image, × the float ANN "
             "(compute only, with memory), × the bit-matched QNN, spike rate, break-even rate"]
    for name, places in table.items():
        for where, f in places.items():
            lines.append(
                f"{name:>24s} {where:>12s} (t {cell(f['t'], 1)}): {cell(f['snn_memory_uj'])} µJ, "
                f"× ANN {cell(f['over_ann_compute'])} / {cell(f['over_ann_memory'])}, × QNN "
                f"{cell(f['over_qnn_memory'])}, rate {cell(f['spike_rate'], 3)}, break-even "
                f"{cell(f['break_even_spike_rate'], 3)}")
            lines.append(f"{'':>37s}spikes into each layer must fall to (× today's): " + ", ".join(
                f"{layer} {cell(part['break_even_factor'])}"
                for layer, part in f["by_layer"].items() if part["break_even_factor"]["per_seed"]
                [0] is not None))
    return "\n".join(lines)
