"""Train LeNet5 with BatchNorm on MNIST and save a self-describing checkpoint for conversion.

The model is chosen on a validation split carved from the 60,000 training images (the test set
only reports). Every saved checkpoint also holds the activation percentiles (99, 99.9, 99.99 and
100) of each ReLU and of the output layer, per layer and per channel, recorded with forward hooks
on a fixed calibration subset of the training split (--calibration-images): `lenet_convert.py`
scales the spiking network with them.

Example:
    python lenet5.py                       # defaults: 3 to 6 minutes on 2 CPU cores
    python lenet5.py --epochs 1 --limit-train 2000   # a quick smoke run
    python lenet5.py --activation qcfs --init-from checkpoints/lenet5_best.pt
        # QCFS, L = 8, on the image rounded to 4 levels (its SNN takes it as spikes), against
        # its SNN's energy (W = 0.03), distilled from the ReLU network it starts from
    python lenet5.py --activation qcfs --levels 4 --energy-weight 0 --input-levels analog \\
        --distill-weight 0 --init-from checkpoints/lenet5_best.pt   # plain QCFS

Writes:
    checkpoints/lenet5_best.pt            best weights (by validation accuracy), percentiles, args
    checkpoints/lenet5_best_history.json  one record per epoch: loss, accuracies, time
    checkpoints/lenet5_best.prev.pt       the checkpoint a completed run replaced (and its history)
    checkpoints/lenet5_best.partial.pt    a run's best until it completes; an interrupted run
                                          leaves it there and the checkpoint untouched
    checkpoints/lenet5_best.lock          held while a run writes there: a second is refused
    data/MNIST/raw/*-ubyte                the shipped .gz files, extracted and MD5-checked once
"""

import cli  # first: see its docstring

# isort: split
import math
import random
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from checkpoint import (
    ACTIVATIONS,
    ARCH,
    MAX_DISTILL_WEIGHT,
    MAX_ENERGY_WEIGHT,
    MAX_EPOCHS,
    MAX_INPUT_LEVELS,
    MAX_LEVELS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    OUTPUT_LAYER,
    PERCENTILE,
    check_checkpoint,
    history_path,
    load_checkpoint,
    percentile_key,
    promote,
    save_checkpoint,
)
from cli import UserError, first_line, positive_int
from efficiency import fan_outs, first_step_energy, first_step_energy_uj, input_spikes
from mnist import TRAIN_IMAGES, Batches, load_mnist, split_train_val
from percentile_tables import (
    CALIBRATION_IMAGES,
    PERCENTILES,
    calibration_set,
    check_tables,
    percentile_tables,
    recorded_percentile,
)

# ----------------------------------------------------------------------------- defaults
TRAINING = {"epochs": 25, "lr": 0.05}  # from scratch: epochs, peak learning rate
FINE_TUNING = {"epochs": 8, "lr": 0.01}  # from --init-from, e.g. a ReLU net into QCFS
BATCH_SIZE = 128  # training batch size
WEIGHT_DECAY = 5e-4  # L2 weight decay of SGD
MAX_SHIFT = 2  # augmentation: random shift of each training image, in pixels
SEED = 1  # seed for everything: split, initialisation, shuffling, shifts
VAL_SIZE = 5000  # validation images carved from the 60,000 training images
# A QCFS network's recipe by default, the one the energy study chose on validation
# (bench/energy.py, docs/results.md): L = 8 levels, trained against its SNN's first-step energy
# with weight 0.03, on the image rounded to 4 levels (its SNN takes it as spikes) and, when
# fine-tuned, distilled from the network it starts from (weight 1, temperature 2), 8 epochs
LEVELS = 8  # QCFS quantisation levels L (at most MAX_LEVELS)
QCFS_ENERGY_WEIGHT, QCFS_INPUT_LEVELS = 0.03, 4
DISTILL_WEIGHT, TEMPERATURE = 1.0, 2.0  # knowledge distillation, when there is a teacher
QCFS_ONLY = ("levels", "channel_thresholds", "threshold_lr", "threshold_decay",
             "energy_weight")  # options a ReLU network does not depend on
ANALOG = "analog"  # --input-levels: the image as it is


# ----------------------------------------------------------------------------- model


class QCFS(nn.Module):
    """Quantisation-clip-floor-shift activation (Bu et al., ICLR 2022; docs/method.md §6).

    h(x) = lambda * clip(floor(x * L / lambda + 1/2) / L, 0, 1): L + 1 levels from 0 to lambda, the
    values an integrate-and-fire neuron with threshold lambda and V0 = lambda/2 can average to in
    L steps. lambda is trained (one per layer); floor passes the gradient straight through.
    """

    def __init__(self, levels=4, threshold=1.0, channels=None):
        super().__init__()
        self.levels = levels
        shape = () if channels is None else (channels,)  # one lambda, or one per channel
        self.threshold = nn.Parameter(torch.full(shape, float(threshold)))

    def forward(self, x):
        threshold = self.threshold
        if threshold.dim():  # per channel: channels are dim 1 of x
            threshold = threshold.view(-1, *[1] * (x.dim() - 2))
        y = torch.clamp(x / threshold, 0, 1) * self.levels + 0.5
        y = y + (torch.floor(y) - y).detach()  # floor forward, identity backward
        return y * (threshold / self.levels)

    def extra_repr(self):
        return f"levels={self.levels}"


class LeNet5(nn.Sequential):
    """LeNet5 with BatchNorm after each convolution, for 1x32x32 inputs (docs/method.md §1).

    A flat sequence of named layers, so that hooks and the conversion can find each one:
    c1 bn1 act1 s2 | c3 bn3 act3 s4 | flatten | c5 act5 | f6 act6 | out.
    The activations are ReLU, or QCFS with `levels` levels for conversion-aware training (with
    one trained lambda per layer, or per channel if `channel_thresholds`). With `input_levels`
    L_in, it sees each image rounded to L_in levels, floor(x * L_in + 1/2) / L_in: what a spiking
    input layer fires in the first step (`efficiency.input_spikes`).
    """

    def __init__(self, activation="relu", levels=4, channel_thresholds=False, input_levels=None):
        def act(channels):
            if activation == "relu":
                return nn.ReLU()
            return QCFS(levels, channels=channels if channel_thresholds else None)

        super().__init__(OrderedDict([
            ("c1", nn.Conv2d(1, 6, 5)), ("bn1", nn.BatchNorm2d(6)), ("act1", act(6)),
            ("s2", nn.MaxPool2d(2)),
            ("c3", nn.Conv2d(6, 16, 5)), ("bn3", nn.BatchNorm2d(16)), ("act3", act(16)),
            ("s4", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("c5", nn.Linear(400, 120)), ("act5", act(120)),
            ("f6", nn.Linear(120, 84)), ("act6", act(84)),
            (OUTPUT_LAYER, nn.Linear(84, 10)),
        ]))
        self.input_levels = input_levels

    def forward(self, x):
        levels = self.input_levels
        return super().forward(x if levels is None else input_spikes(x, levels) / levels)


def hooked_layers(model):
    """The layers whose outputs are recorded: every activation, then the output layer."""
    names = [name for name, m in model.named_children() if isinstance(m, (nn.ReLU, QCFS))]
    return names + [OUTPUT_LAYER]


def thresholds(model):
    """{activation layer: trained lambda (a list if per channel)} of a QCFS network (empty for
    ReLU)."""
    return {name: m.threshold.tolist() for name, m in model.named_children()
            if isinstance(m, QCFS)}


def set_seed(seed):
    """Seed random, numpy and torch; return a torch.Generator for shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_epoch(model, batches, optimizer, scheduler, device, desc="train", energy=None,
                teacher=None):
    """One epoch; returns (mean loss, accuracy, mean energy in µJ or None) over its samples.

    energy: None, or (weight, fanouts) for a QCFS network: its SNN's first-step energy per image
    (`first_step_energy`) is measured, and weight times it in µJ is added to the loss.
    teacher: None, or (a network, weight, temperature): weight times `distillation` from its
    outputs is added to the loss.
    """
    model.train()
    total_loss, correct, seen, total_uj = 0.0, 0, 0, 0.0
    bar = tqdm(batches, desc=desc, leave=False, disable=None)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        if energy is None:
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        else:
            logits, pj = first_step_energy(model, images, energy[1])
            uj = pj.mean() / 1e6
            loss = F.cross_entropy(logits, labels) + energy[0] * uj
            total_uj += uj.item() * len(labels)
        if teacher is not None:
            with torch.no_grad():
                taught = teacher[0](images)
            loss = loss + teacher[1] * distillation(logits, taught, teacher[2])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    return total_loss / seen, correct / seen, None if energy is None else total_uj / seen


def distillation(logits, teacher_logits, temperature):
    """Knowledge distillation (Hinton et al., 2015): the KL divergence of the network's outputs
    from the teacher's, both softened by `temperature`, times its square (which keeps the
    gradient's scale as the temperature changes); the mean over the images."""
    return F.kl_div(F.log_softmax(logits / temperature, 1),
                    F.log_softmax(teacher_logits / temperature, 1), reduction="batchmean",
                    log_target=True) * temperature**2


@torch.no_grad()
def evaluate(model, batches, device):
    """Accuracy (fraction) of `model` over all samples of `batches`."""
    model.eval()
    correct, seen = 0, 0
    for images, labels in batches:
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
        seen += len(labels)
    return correct / seen


def train(args):
    """Train; return the checkpoint with the best validation accuracy.

    The run's best checkpoint and its history go to their partial paths (`cli.partial_path`);
    `run` moves them onto args.checkpoint only once the run has completed. A loss that is no
    longer a number ends the run with a UserError.
    """
    device = cli.resolve_device(args.device)
    partial, history_file = cli.partial_path(args.checkpoint), history_path(args.checkpoint)
    for path in (args.checkpoint, history_file):  # and where the run and the backups go
        for where in (path, cli.partial_path(path), cli.previous_path(path)):
            cli.check_writable(where)
    generator = set_seed(args.seed)
    model = LeNet5(args.activation, args.levels, args.channel_thresholds, args.input_levels)
    if args.init_from:
        init_from(model, args.init_from, percentile_key(args.percentile))
    model = model.to(device)
    teacher = None if args.teacher is None else (
        model_from_checkpoint(load_checkpoint(args.teacher), args.teacher).to(device),
        args.distill_weight, args.temperature)
    images, labels = load_mnist(args.data_dir, train=True)
    test = Batches(*load_mnist(args.data_dir, train=False), batch_size=1000)
    train_index, val_index = split_train_val(len(labels), args.val_size, args.seed,
                                             args.limit_train)
    if (args.calibration_images or 0) > len(train_index):
        raise UserError(f"--calibration-images {args.calibration_images}: there are only "
                        f"{len(train_index)} training images")
    train_batches = Batches(images[train_index], labels[train_index], args.batch_size,
                            shuffle=True, max_shift=args.max_shift, generator=generator)
    val = Batches(images[val_index], labels[val_index], batch_size=1000)
    calibration = calibration_set(images, labels, train_index, args.calibration_images)
    optimizer, scheduler = optimiser(model, args, len(train_batches))
    fanouts = fan_outs(model) if args.activation == "qcfs" else None
    energy = None if fanouts is None else (args.energy_weight, fanouts)
    print(f"training on {len(train_index)} images, validating on {len(val_index)}, device {device}"
          + (f"; each image rounded to {args.input_levels} levels" if args.input_levels else "")
          + ("" if energy is None else f"; loss + {args.energy_weight:g} × the SNN's first-step "
             "energy per image (µJ, gamma = L)")
          + ("" if teacher is None else f"; + {args.distill_weight:g} × distillation from "
             f"{args.teacher} at temperature {args.temperature:g}"))
    best, history = None, []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        loss, train_acc, train_uj = train_epoch(model, train_batches, optimizer, scheduler,
                                                device, f"epoch {epoch}/{args.epochs}", energy,
                                                teacher)
        if not math.isfinite(loss):
            raise UserError(f"training diverged in epoch {epoch} (loss {loss}); {kept(args)}")
        val_acc, test_acc = evaluate(model, val, device), evaluate(model, test, device)
        measured = {} if energy is None else {
            "train_energy_uj": train_uj, "val_energy_uj": first_step_energy_uj(model, val,
                                                                             device, fanouts)}
        improved = best is None or val_acc > best["val_accuracy"]
        if improved:
            best = make_checkpoint(model, calibration, device, args, epoch, val_acc, test_acc)
            best |= {key: v for key, v in measured.items() if key == "val_energy_uj"}
            save_checkpoint(best, partial)
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "train_loss": loss, "train_accuracy": train_acc,
                        "val_accuracy": val_acc, "test_accuracy": test_acc, **measured,
                        "seconds": round(seconds, 2), "saved": improved})
        cli.write_json(cli.partial_path(history_file), history)
        print(f"epoch {epoch:2d}  loss {loss:.4f}  train {train_acc:.2%}  val {val_acc:.2%}  "
              f"test {test_acc:.2%}"
              + (f"  energy {measured['val_energy_uj']:.3f} µJ" if measured else "")
              + f"  {seconds:5.1f}s{'  saved' if improved else ''}")
    return best


def optimiser(model, args, steps_per_epoch):
    """SGD with Nesterov momentum and a one-cycle schedule; QCFS thresholds lambda may have
    their own peak learning rate and weight decay (--threshold-lr, --threshold-decay)."""
    named = dict(model.named_parameters())
    lam = [p for name, p in named.items() if name.endswith(".threshold")]
    groups = [{"params": [p for name, p in named.items() if not name.endswith(".threshold")],
               "lr": args.lr, "weight_decay": args.weight_decay}]
    if lam:
        groups.append({"params": lam, "lr": args.threshold_lr or args.lr,
                       "weight_decay": args.weight_decay if args.threshold_decay is None
                       else args.threshold_decay})
    optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], epochs=args.epochs,
        steps_per_epoch=steps_per_epoch)
    return optimizer, scheduler


def init_from(model, path, key):
    """Load a checkpoint's weights into `model`. A QCFS layer that was a ReLU there starts its
    lambda at the `key` percentile (per channel, if `model` has one lambda per channel); one
    lambda per layer there is copied to every channel."""
    checkpoint = load_checkpoint(path)
    source = model_from_checkpoint(checkpoint, path).state_dict()
    state = {k: source[k] for k in model.state_dict() if k in source}
    for name, layer in model.named_children():
        if not isinstance(layer, QCFS):
            continue
        lam = state.get(f"{name}.threshold")
        if lam is None:  # a ReLU there
            lam = torch.tensor(recorded_percentile(checkpoint, name, key,
                                                   layer.threshold.dim() > 0, path))
        if lam.dim() > layer.threshold.dim():
            raise UserError(f"{path} has one lambda per channel: it cannot start a network with "
                            "one per layer (add --channel-thresholds)")
        state[f"{name}.threshold"] = lam.expand_as(layer.threshold).clone()
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- the hook


@torch.no_grad()
def run_with_hooks(model, batches, device, names, hook):
    """Run `model` in eval mode over `batches` with `hook(name, output)` called on the output of
    each layer in `names` (forward hooks, removed before returning)."""
    modules = dict(model.named_children())
    handles = [modules[name].register_forward_hook(
        lambda _module, _input, output, name=name: hook(name, output)) for name in names]
    try:
        model.eval()
        for images, _ in batches:
            model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()


def record_activations(model, batches, device, names):
    """The outputs of each layer in `names` over `batches`: {name: tensor [samples, channels,
    ...]}."""
    values = {name: [] for name in names}
    run_with_hooks(model, batches, device, names,
                   lambda name, output: values[name].append(output.cpu()))
    return {name: torch.cat(chunks) for name, chunks in values.items()}


def percentile_activations(model, batches, device, percentiles=PERCENTILES, seed=0):
    """The activation percentiles of each activation layer and of the output layer over
    `batches`, recorded by the hook (`percentile_tables.percentile_tables`: per layer, per
    channel)."""
    values = record_activations(model, batches, device, hooked_layers(model))
    return percentile_tables(values, percentiles, seed)


# ----------------------------------------------------------------------------- checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """Rebuild the ANN (ReLU or QCFS) from a checkpoint; a clear error if it is not LeNet5's."""
    activation, levels = checkpoint.get("activation", "relu"), checkpoint.get("levels", 4)
    if activation not in ACTIVATIONS or not (isinstance(levels, int) and levels > 0):
        raise UserError(f"{path}: unknown activation {activation!r} with levels {levels!r}")
    model = LeNet5(activation, levels, checkpoint.get("channel_thresholds", False),
                   checkpoint.get("input_levels"))
    try:
        model.load_state_dict(checkpoint["model_state"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: its weights do not fit {ARCH} ({first_line(e)})") from None
    check_tables(checkpoint, model, hooked_layers(model), path)
    return model.eval()


def make_checkpoint(model, calibration, device, args, epoch, val_acc, test_acc):
    """A self-describing checkpoint of `model` with its activation percentiles."""
    percentiles = sorted(set(PERCENTILES) | {args.percentile})
    per_layer, per_channel = percentile_activations(model, calibration, device, percentiles,
                                                    args.seed)
    return {
        "arch": ARCH,
        "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "percentiles": per_layer,
        "channel_percentiles": per_channel,
        "calibration_images": len(calibration.labels),
        "percentile": percentile_key(args.percentile),
        "activation": args.activation,
        "levels": args.levels,
        "channel_thresholds": args.channel_thresholds,
        "input_levels": args.input_levels,
        "thresholds": thresholds(model),
        "epoch": epoch,
        "val_accuracy": val_acc,
        "test_accuracy": test_acc,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seed": args.seed,
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
    }


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = cli.ArgumentParser(
        description="Train LeNet5-BN on MNIST; save the best checkpoint (chosen on a validation "
                    "split) with activation percentiles for ANN->SNN conversion.")
    parser.add_argument("--epochs", type=positive_int(MAX_EPOCHS), default=None,
                        help=f"training epochs (default: {TRAINING['epochs']}; "
                             f"{FINE_TUNING['epochs']} when fine-tuning with --init-from)")
    parser.add_argument("--batch-size", type=positive_int(TRAIN_IMAGES), default=BATCH_SIZE,
                        help="training batch size")
    parser.add_argument("--lr", type=cli.positive_float, default=None,
                        help="peak learning rate of the one-cycle schedule, SGD with Nesterov "
                             f"momentum 0.9 (default: {TRAINING['lr']}; {FINE_TUNING['lr']} "
                             "when fine-tuning)")
    parser.add_argument("--weight-decay", type=cli.non_negative_float, default=WEIGHT_DECAY,
                        help="L2 weight decay")
    parser.add_argument("--max-shift", type=int, default=MAX_SHIFT, choices=range(0, 5),
                        metavar="{0..4}",
                        help="augmentation: random shift of each training image, in pixels")
    parser.add_argument("--seed", type=cli.seed_int, default=SEED, help="seed for everything")
    cli.add_device_and_data(parser)
    parser.add_argument("--checkpoint", type=cli.path_arg, default=None,
                        help="where the best checkpoint goes, history JSON beside it (default: "
                             "checkpoints/lenet5_best.pt, or lenet5_qcfs_best.pt for QCFS)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="relu",
                        help="relu, or qcfs: conversion-aware training with a trained "
                             "quantised clip per layer (an SNN that needs only a few steps)")
    parser.add_argument("--levels", type=positive_int(MAX_LEVELS), default=LEVELS,
                        help="QCFS quantisation levels L (the SNN matches the ANN in "
                             "expectation after L steps)")
    parser.add_argument("--input-levels", type=input_levels_arg, default=None,
                        metavar="L_IN", help="train on each image rounded to L_IN levels (1 to "
                        f"{MAX_INPUT_LEVELS}), as the "
                        "SNN's spiking input layer fires it in the first step (recorded: the "
                        f"conversion then takes the image as spikes), or '{ANALOG}' (default: "
                        f"{QCFS_INPUT_LEVELS} for QCFS, {ANALOG} for ReLU)")
    parser.add_argument("--channel-thresholds", action="store_true",
                        help="QCFS: one trained lambda per channel (a convolution's output "
                             "channel, a linear layer's neuron) instead of one per layer")
    parser.add_argument("--threshold-lr", type=cli.positive_float, default=None, metavar="LR",
                        help="QCFS: peak learning rate of the thresholds lambda (default: --lr)")
    parser.add_argument("--threshold-decay", type=cli.non_negative_float, default=None,
                        metavar="WD", help="QCFS: weight decay of the thresholds lambda "
                        "(default: --weight-decay)")
    parser.add_argument("--energy-weight", type=cli.float_in(0, MAX_ENERGY_WEIGHT), default=None,
                        metavar="W",
                        help="QCFS: add W times the converted SNN's energy per image in its "
                             "first step (µJ, gamma = L, as lenet_convert.py estimates it) to "
                             f"the loss: fewer spikes; 0: measured, not trained on (default: "
                             f"{QCFS_ENERGY_WEIGHT:g})")
    parser.add_argument("--teacher", type=cli.path_arg, default=None, metavar="CHECKPOINT",
                        help="knowledge distillation: add --distill-weight times the KL "
                             "divergence from this network's outputs, softened by "
                             "--temperature, to the loss (default: for QCFS with --init-from, "
                             "that network; else none)")
    parser.add_argument("--distill-weight", type=cli.float_in(0, MAX_DISTILL_WEIGHT),
                        default=None, metavar="A",
                        help=f"with a teacher: the distillation term's weight (default: "
                             f"{DISTILL_WEIGHT:g}); 0: no distillation")
    parser.add_argument("--temperature", type=cli.float_in(MIN_TEMPERATURE, MAX_TEMPERATURE),
                        default=None, metavar="T",
                        help=f"with a teacher: the softening temperature (default: "
                             f"{TEMPERATURE:g})")
    parser.add_argument("--init-from", type=cli.path_arg, default=None, metavar="CHECKPOINT",
                        help="start from this checkpoint's weights (fine-tuning); for QCFS each "
                             "layer's lambda starts at its --percentile activation there")
    parser.add_argument("--percentile", type=cli.percentile_arg, default=PERCENTILE,
                        help="the activation percentile the conversion uses by default "
                             f"(recorded always: {', '.join(map(percentile_key, PERCENTILES))})")
    parser.add_argument("--val-size", type=positive_int(TRAIN_IMAGES - 1), default=VAL_SIZE,
                        help="validation images carved from the 60,000 training images")
    parser.add_argument("--calibration-images", type=positive_int(TRAIN_IMAGES), default=None,
                        metavar="N",
                        help="training images the activation percentiles are measured on "
                             f"(BrainCog's batch_num times its batch size; default: "
                             f"{CALIBRATION_IMAGES}, or all if there are fewer)")
    parser.add_argument("--limit-train", type=positive_int(TRAIN_IMAGES), default=None,
                        metavar="N",
                        help="train on the first N training images only (quick runs, tests)")
    args = parser.parse_args(argv)
    for key, value in (FINE_TUNING if args.init_from else TRAINING).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.checkpoint is None:
        name = "lenet5_best.pt" if args.activation == "relu" else "lenet5_qcfs_best.pt"
        args.checkpoint = Path("checkpoints") / name
    qcfs = args.activation == "qcfs"
    if args.energy_weight and not qcfs:
        parser.error("--energy-weight needs --activation qcfs (a ReLU network's spikes are not "
                     "its activations)")
    if args.energy_weight is None:
        args.energy_weight = QCFS_ENERGY_WEIGHT if qcfs else 0.0
    if args.input_levels is None:
        args.input_levels = QCFS_INPUT_LEVELS if qcfs else None
    elif args.input_levels == ANALOG:
        args.input_levels = None
    if args.distill_weight == 0:  # no distillation, whoever would teach
        args.teacher, args.distill_weight = None, None
    elif args.teacher is None and qcfs and args.init_from:
        args.teacher = args.init_from  # a QCFS network learns from the one it starts from
    for option, default in (("distill_weight", DISTILL_WEIGHT), ("temperature", TEMPERATURE)):
        if args.teacher is None and getattr(args, option) is not None:
            parser.error(f"argument --{option.replace('_', '-')}: needs a teacher (--teacher, "
                         "or --init-from with --activation qcfs)")
        if getattr(args, option) is None and args.teacher is not None:
            setattr(args, option, default)
    if args.init_from and args.init_from.resolve() == args.checkpoint.resolve():
        parser.error(f"--init-from and --checkpoint are the same file ({args.checkpoint}): "
                     "training would overwrite its own starting point; choose another "
                     "--checkpoint")
    if args.teacher and args.teacher.resolve() == args.checkpoint.resolve():
        parser.error(f"--teacher and --checkpoint are the same file ({args.checkpoint}): "
                     "training would overwrite its own teacher")
    return args


def input_levels_arg(text):
    """An argparse type: 'analog' or an input level count L_in."""
    return ANALOG if text == ANALOG else positive_int(MAX_INPUT_LEVELS)(text)


def kept(args):
    """What a run that did not complete leaves: the checkpoint as it was, and its best so far."""
    partial = cli.partial_path(args.checkpoint)
    return f"{args.checkpoint} is untouched" + (
        f"; this run's best so far is in {partial}" if partial.exists() else "")


def better_than_chance(accuracy, images, classes=10):
    """Whether `accuracy` on `images` is above guessing by more than three standard errors."""
    chance = 1 / classes
    return accuracy > chance + 3 * math.sqrt(chance * (1 - chance) / images)


def run(args):
    """Train with `args`; once the run completes, move its best checkpoint onto args.checkpoint.
    The run holds the checkpoint's lock (`cli.held`) throughout: a second run into the same
    checkpoint is refused, so what a run reports as saved is what the file holds.

    Only a network that passes `check_checkpoint` and is better than chance on validation is
    promoted, with its history (`promote`). Returns the best checkpoint.
    """
    start = time.perf_counter()
    with cli.held(args.checkpoint):  # one run at a time into a checkpoint and its partial files
        best = train(args)
        partial = cli.partial_path(args.checkpoint)
        try:
            check_checkpoint(best, partial)
        except UserError as e:
            raise UserError(f"{e}; {kept(args)}") from None
        if not better_than_chance(best["val_accuracy"], args.val_size):
            raise UserError(f"this run's best network is no better than chance (validation "
                            f"{best['val_accuracy']:.2%}); {kept(args)}")
        keep, replaced = promote(args.checkpoint)
    print(f"best epoch {best['epoch']}: val {best['val_accuracy']:.2%}, "
          f"test {best['test_accuracy']:.2%}; saved {args.checkpoint} "
          f"({time.perf_counter() - start:.0f}s in all)"
          + (f"; the checkpoint it replaced is kept as {replaced}" if replaced else "")
          + ("" if keep else "; the file it replaced was no valid checkpoint and is not kept"))
    return best


def main(argv=None):
    args = parse_args(argv)
    return cli.run("lenet5.py", lambda: run(args), lambda: kept(args))


if __name__ == "__main__":
    main()
