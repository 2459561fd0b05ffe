"""What one spike stands for in each layer: the activation scales a conversion normalises by.

Each layer's scale lambda is a percentile of its activations, recorded by lenet5.py on training
images (one per layer, or one per convolution channel or neuron with --norm channel or neuron),
or for a QCFS network its trained threshold divided by the burst limit gamma, so the gamma spikes
of a step share [0, lambda] (docs/method.md §3 and §6). `conversion_scales` gives what
lenet_convert.build_snn normalises by for a conversion's settings.
"""

import torch
import torch.nn as nn

from checkpoint import default_percentile
from cli import UserError
from lenet5 import QCFS


def activation_scales(checkpoint, percentile=None, gamma=1, per_channel=()):
    """{layer: what one spike stands for}: the recorded `percentile` of each layer's activations.

    With `percentile` None (a QCFS network), each layer's trained lambda (a tensor if one per
    channel) divided by `gamma`, so the gamma spikes of a step share [0, lambda] (docs/method.md
    §6). The output layer's scale (for a spiking read-out) is always a percentile, the
    checkpoint's own for a QCFS network. The layers in `per_channel` get a tensor, one scale per
    channel or neuron (see `per_channel_layers`); a channel silent on the calibration images
    keeps the layer's scale.
    """
    recorded = checkpoint["percentiles"]  # there, as checkpoint.check_checkpoint makes sure
    key = percentile or default_percentile(checkpoint)
    try:
        scales = {layer: float(values[key]) for layer, values in recorded.items()}
    except KeyError:
        available = ", ".join(next(iter(recorded.values()), {}))
        raise UserError(f"the checkpoint has no {key}th percentile (it has: {available}); "
                        f"choose one of those or retrain with `--percentile {key}`") from None
    trained = {layer: torch.tensor(value, dtype=torch.float64) if isinstance(value, list)
               else value for layer, value in checkpoint.get("thresholds", {}).items()
               } if percentile is None else {}
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


def conversion_scales(checkpoint, ann, settings):
    """The activation scales `build_snn` normalises `ann` by under `settings` (a
    options.Settings: its percentile, gamma and norm)."""
    return activation_scales(checkpoint, settings.percentile, settings.gamma,
                             per_channel_layers(ann, settings.norm))
