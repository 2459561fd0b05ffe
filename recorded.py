"""A checkpoint's recorded activation tables checked against its own weights.

lenet5.py records, with each network, the activation percentiles of every layer on a fixed set of
calibration images. Here those images are rebuilt from what the checkpoint records (seed, split,
calibration size), the percentiles are measured again (for checkpoints made before a table was
recorded), and the recorded maxima are compared with the weights' own, so a table edited by hand
or taken from another network is refused in one line. lenet_convert.py calls it on loading.
"""

import reprlib

import torch

import lenet5
from checkpoint import percentile_key
from cli import UserError
from mnist import load_mnist, split_train_val
from percentile_tables import QUANTILE_MAX_VALUES, calibration_set


def recorded_calibration(checkpoint, data_dir):
    """The calibration images `checkpoint`'s percentiles were measured on, rebuilt from its seed,
    split and calibration size."""
    args = checkpoint.get("args", {})
    images, labels = load_mnist(data_dir, train=True)
    train_index, _ = split_train_val(len(labels), args.get("val_size", lenet5.VAL_SIZE),
                                     checkpoint.get("seed", lenet5.SEED), args.get("limit_train"))
    return calibration_set(images, labels, train_index, checkpoint.get("calibration_images"))


def remeasure_percentiles(checkpoint, model, data_dir, device):
    """`percentile_activations` of `model` on the training images `checkpoint`'s were measured on.

    For checkpoints written before per-channel percentiles were recorded: the per-layer table
    comes out as recorded and the per-channel one as lenet5.py records it today.
    """
    percentiles = [float(key) for key in next(iter(checkpoint["percentiles"].values()))]
    return lenet5.percentile_activations(model, recorded_calibration(checkpoint, data_dir),
                                         device, percentiles, checkpoint.get("seed", lenet5.SEED))


@torch.no_grad()
def check_recorded_maxima(checkpoint, model, path, data_dir, device):
    """Refuse a percentile table that does not belong to `model`'s weights (edited by hand, say).

    Its 100th percentiles are each layer's (and each channel's) largest activation on the
    calibration images: measured again (one pass, no quantiles), they must agree to float
    rounding; where a layer had more values than `quantiles_of` takes, its recorded maximum is
    a subsample's, so it need only lie between half the largest and the largest. With the checks
    of checkpoint.py (the other percentiles increase with p, up to these, and are not
    implausibly small) this anchors every recorded scale.
    """
    key = percentile_key(100)
    tables = {name: checkpoint[name] for name in ("percentiles", "channel_percentiles")
              if name in checkpoint and all(key in t for t in checkpoint[name].values())}
    if not tables or "seed" not in checkpoint or "val_size" not in checkpoint.get("args", {}):
        return  # nothing to check, or no record of which images to check it on
    calibration = recorded_calibration(checkpoint, data_dir)
    maxima, values = dict.fromkeys(lenet5.hooked_layers(model)), dict.fromkeys(
        lenet5.hooked_layers(model), 0)

    def hook(name, output):
        value = output.transpose(0, 1).flatten(1).amax(1)  # per channel
        maxima[name] = value if maxima[name] is None else torch.maximum(maxima[name], value)
        values[name] += output.numel()
    lenet5.run_with_hooks(model, calibration, device, list(maxima), hook)
    for name, table in tables.items():
        for layer, per_channel in maxima.items():
            measured = per_channel.cpu().double()
            recorded = torch.tensor(table[layer][key], dtype=torch.float64)
            if recorded.dim() == 0:
                measured = measured.max()
            subsampled = values[layer] / (len(measured) if measured.dim() else 1) > (
                QUANTILE_MAX_VALUES)
            low = measured - measured.abs() / 2 if subsampled else measured
            if not ((recorded >= low - 1e-3 * low.abs() - 1e-6).all() and (
                    recorded <= measured + 1e-3 * measured.abs() + 1e-6).all()):
                raise UserError(
                    f"{path}: {name}[{layer!r}]['100'] is {reprlib.repr(recorded.tolist())}, "
                    f"but the largest activation on its {len(calibration.labels)} calibration "
                    f"images is {reprlib.repr(measured.tolist())}: the table does not belong "
                    "to these weights")
