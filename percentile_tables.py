"""The activation percentile tables a checkpoint records, from the activations lenet5.py's hook
recorded.

lenet5.py records, with every network it saves, the 99th to 100th percentiles of each activation
layer and of the output layer over a fixed set of calibration images from the training split,
per layer and per channel; the conversion scales the spiking network by them (docs/method.md §3).
Here are the calibration set, the quantiles (seeded where a layer has too many values) and
`check_tables`, that a checkpoint's tables fit its network; recorded.py checks their values
against its own weights.
"""

import torch
import torch.nn as nn

from checkpoint import percentile_key
from cli import UserError
from mnist import Batches

PERCENTILES = (99.0, 99.9, 99.99, 100.0)  # recorded for every hooked layer
CALIBRATION_IMAGES = 2048  # training images the percentiles are measured on
QUANTILE_MAX_VALUES = 2**24  # torch.quantile refuses larger inputs: subsample (seeded) above this


def quantiles_of(values, q, generator):
    """The quantiles q (fractions) of a 1-D tensor (a seeded subsample if it is too large)."""
    if values.numel() > QUANTILE_MAX_VALUES:
        values = values[torch.randint(values.numel(), (QUANTILE_MAX_VALUES,), generator=generator)]
    return torch.quantile(values, torch.as_tensor(q, dtype=values.dtype)).tolist()


def percentiles_of(values, percentiles, generator):
    """The given percentiles of a 1-D tensor (a seeded subsample if it is too large)."""
    return quantiles_of(values, [p / 100 for p in percentiles], generator)


def percentile_tables(values, percentiles=PERCENTILES, seed=0):
    """The percentile tables of recorded activations `values` ({layer: its outputs [samples,
    channels, ...]}, from lenet5.record_activations).

    Returns (per layer, per channel): {layer: {percentile key: value}} over all of a layer's
    outputs, and {layer: {percentile key: [value per channel]}}, a channel being a convolution's
    output channel or a linear layer's neuron (docs/method.md §3).
    """
    keys = [percentile_key(p) for p in percentiles]
    generator = torch.Generator().manual_seed(seed)
    per_layer = {name: dict(zip(keys, percentiles_of(v.flatten(), percentiles, generator),
                                strict=True)) for name, v in values.items()}
    generator = torch.Generator().manual_seed(seed)
    per_channel = {}
    for name, v in values.items():
        rows = v.transpose(0, 1).reshape(v.shape[1], -1)  # [channels, samples * positions]
        columns = [percentiles_of(row, percentiles, generator) for row in rows]
        per_channel[name] = {key: list(values) for key, values in
                             zip(keys, zip(*columns, strict=True), strict=True)}
    return per_layer, per_channel


def calibration_set(images, labels, train_index, n=None):
    """The images the percentiles are measured on: the first n (default CALIBRATION_IMAGES, or
    all if fewer) of the training split."""
    index = train_index[:n or CALIBRATION_IMAGES]
    return Batches(images[index], labels[index], batch_size=1000)


def check_tables(checkpoint, model, hooked, path):
    """The percentile tables of `checkpoint` name each recorded layer of `model` (`hooked`, no
    more), and a per-channel one holds one value per channel of each (checkpoint.py checks their
    values)."""
    channels, weighted = {}, None
    for name, layer in model.named_children():
        weighted = layer if isinstance(layer, (nn.Conv2d, nn.Linear)) else weighted
        if name in hooked:
            channels[name] = len(weighted.weight)
    for table in ("percentiles", "channel_percentiles"):
        recorded = checkpoint.get(table, channels)
        if set(recorded) != set(channels):
            raise UserError(f"{path}: {table} names the layers {sorted(recorded)}, not "
                            f"{sorted(channels)}")
    for layer, values in checkpoint.get("channel_percentiles", {}).items():
        lengths = {len(v) for v in values.values()}
        if lengths != {channels[layer]}:
            raise UserError(f"{path}: channel_percentiles[{layer!r}] has {min(lengths)} values "
                            f"per percentile, not one per channel ({channels[layer]})")


def recorded_percentile(checkpoint, name, key, per_channel, path):
    """The `key` percentile of layer `name` (a list per channel, where a silent channel takes
    the layer's), to start a QCFS lambda from."""
    try:
        value = float(checkpoint["percentiles"][name][key])
        if per_channel:
            return [v if v > 0 else value
                    for v in checkpoint["channel_percentiles"][name][key]]
    except (KeyError, TypeError):
        raise UserError(f"{path} has no {key}th percentile of {name} to start its QCFS "
                        "threshold from") from None
    return value
