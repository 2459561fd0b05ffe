"""Per-image early exit: each image stops as soon as its answer is settled (docs/method.md §9).

The rule (`settledness`: the margin or the softmax confidence of the time-averaged output) and
its threshold X, with a deadline D by which every image stops, chosen on the checkpoint's
validation split from one recording of every image and step (`record_settledness`,
`exit_table`, `choose_exit`); the simulation that drops stopped images from every state
(`evaluate_early_exit`); the run that times it against the fixed T reaching the same accuracy
(`run_early_exit`); and its record and figure (snn_early_exit.json and .png).
"""

import math
from typing import NamedTuple

import matplotlib.ticker
import torch

import cli
import energy_models
from constant_input import stages
from lenet5 import evaluate
from lenet_convert import (
    announce,
    clean_mem_spike,
    counting_modules,
    evaluate_snn,
    first_step_within,
    predict,
    predictions,
    readout_node,
    result_of,
    within,
)
from mnist import Batches, split_train_val
from options import ANN_MARGIN
from percentile_tables import quantiles_of
from plots import plt, save_figure, settings_text, step_axis

EXIT_GRID = 200  # thresholds tried on the validation split (quantiles of the recorded values)
HARDEST = 16  # test images shown in the figure: those that ran longest
EXIT_TIMING_REPEATS = 5  # early exit and its fixed-T comparison are each timed this many times
EXIT_MERGE = 0.25  # groups shrunk below this fraction of a batch are merged (see _regroup)
SUMMARY_KEYS = ("threshold", "deadline", "validation_accuracy", "validation_ann_accuracy",
                "test_accuracy", "mean_steps", "fixed_timesteps", "fixed_accuracy", "seconds",
                "fixed_seconds", "synops_per_image", "energy_pj_per_image",
                "memory_pj_per_image", "over_ann_memory", "qnn_memory_pj",
                "over_qnn_memory")  # for a study


# ----------------------------------------------------------------------------- the rule


def settledness(total, t, rule):
    """How settled each image's answer is after t steps.

    margin: top-1 minus top-2 of the time-averaged output total / t; confidence: its largest
    softmax probability. An image stops once this reaches the threshold.
    """
    mean = total / t
    if rule == "margin":
        top = mean.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    return mean.softmax(1).amax(1)


@torch.no_grad()
def record_settledness(snn, batches, timesteps, device, rule):
    """Every image's settledness and prediction after each step: ([T, N], [T, N], labels [N]).

    All images run all T steps, so any threshold's exit steps follow from this one pass.
    """
    snn.eval()
    values, predicted, labels = [], [], []
    for images, batch_labels in batches:
        steps = [(settledness(total, t, rule), prediction)
                 for t, total, prediction in predictions(snn, images.to(device), timesteps)]
        values.append(torch.stack([v for v, _ in steps]).cpu())
        predicted.append(torch.stack([p for _, p in steps]).cpu())
        labels.append(batch_labels)
    return torch.cat(values, 1), torch.cat(predicted, 1), torch.cat(labels)


# ----------------------------------------------------------------------------- the choice


def exit_steps(values, threshold, deadline=None):
    """Each image's exit step (1-based): the first whose settledness reaches `threshold`, or
    the `deadline` (default: the last step recorded) if that comes first."""
    reached = values >= threshold
    reached[(deadline or len(values)) - 1:] = True
    return reached.to(torch.uint8).argmax(0) + 1


def exit_table(values, predicted, labels, thresholds):
    """Accuracy and mean steps of early exit for every threshold and deadline, from a recording.

    Returns two tensors [thresholds, T]: element [i, D - 1] for thresholds[i] and deadline D.
    """
    right = predicted == labels  # [T, N]
    deadlines = torch.arange(1, len(values) + 1)[:, None]
    accuracy, steps = [], []
    for threshold in thresholds:
        first = exit_steps(values, threshold)
        right_there = right.gather(0, (first - 1)[None])[0]
        stopped = first[None] <= deadlines  # [D, N]: stopped by the rule before the deadline
        accuracy.append(torch.where(stopped, right_there[None], right).double().mean(1))
        steps.append(torch.minimum(first[None], deadlines).double().mean(1))
    return torch.stack(accuracy), torch.stack(steps)


def exit_curve(table, thresholds, deadline):
    """[{threshold, accuracy, mean_steps}] at one deadline, from `exit_table`'s output."""
    accuracy, steps = table
    return [{"threshold": threshold, "accuracy": accuracy[i, deadline - 1].item(),
             "mean_steps": steps[i, deadline - 1].item()} for i, threshold in enumerate(thresholds)]


def choose_exit(table, thresholds, ann_accuracy, margin, deadlines):
    """(threshold, deadline, whether within): the fewest mean steps within `margin` of the ANN.

    Over every threshold and each deadline in `deadlines`; ties go to the higher accuracy. If
    none is within the margin, the most accurate one is taken.
    """
    accuracy, steps = table
    candidates = [(steps[i, d - 1].item(), -accuracy[i, d - 1].item(), i, d)
                  for i in range(len(thresholds)) for d in deadlines]
    close = [c for c in candidates if within(-c[1], ann_accuracy, margin)]
    best = min(close) if close else min(candidates, key=lambda c: (c[1], c[0]))
    return thresholds[best[2]], best[3], bool(close)


def threshold_grid(values, size=EXIT_GRID):
    """Thresholds to try: quantiles of the recorded settledness, and one no image reaches."""
    q = torch.linspace(0, 1, size, dtype=torch.float64)
    grid = quantiles_of(values.flatten().double(), q, torch.Generator().manual_seed(0))
    return sorted(set(grid)) + [math.inf]


def validation_batches(conversion, train, batch_size):
    """The validation images lenet5.py held out for `conversion`'s checkpoint, rebuilt from its
    seed and split out of `train` (the training images and labels), if its settings choose
    the exit threshold there (else None); an error if the checkpoint records no split."""
    checkpoint, settings = conversion.checkpoint, conversion.settings
    if settings.exit_rule == "none" or settings.exit_threshold is not None:
        return None
    if not isinstance(checkpoint.get("args"), dict) or "val_size" not in checkpoint["args"] or (
            "seed" not in checkpoint):
        raise cli.UserError(f"{conversion.path} records no validation split (seed and val_size) "
                            "to choose the exit threshold on: give --exit-threshold")
    return validation_split(checkpoint, *train, batch_size)


def validation_split(checkpoint, train_images, train_labels, batch_size):
    """The validation images lenet5.py held out for `checkpoint`, from its seed and split."""
    _, index = split_train_val(len(train_labels), checkpoint["args"]["val_size"],
                               checkpoint["seed"])
    return Batches(train_images[index], train_labels[index], batch_size)


def choose_on_validation(snn, ann, settings, validation, timesteps, device):
    """(threshold, deadline, the record of the choice) on the `validation` batches."""
    values, predicted, labels = record_settledness(snn, validation, timesteps, device,
                                                     settings.exit_rule)
    grid = threshold_grid(values)
    table = exit_table(values, predicted, labels, grid)
    val_ann = evaluate(ann, validation, device)
    deadlines = [settings.exit_deadline] if settings.exit_deadline else range(1, timesteps + 1)
    threshold, deadline, within = choose_exit(table, grid, val_ann, settings.exit_margin,
                                              deadlines)
    curve = exit_curve(table, grid, deadline)
    chosen = next(c for c in curve if c["threshold"] == threshold)
    return threshold, deadline, {
        "chosen_on": "validation", "grid": grid, "curve": curve,
        "validation_images": len(labels), "validation_ann_accuracy": val_ann,
        "validation_accuracy": chosen["accuracy"], "validation_mean_steps": chosen["mean_steps"],
        "within_margin": within}


# ----------------------------------------------------------------------------- the simulation


class _Group(NamedTuple):
    """Images that step together: their indices in the test set, labels, the first layer's
    current (or, before their first step, the images), summed output, and every stateful
    module's state (None before the first step)."""

    index: torch.Tensor
    labels: torch.Tensor
    current: torch.Tensor
    total: torch.Tensor | int = 0
    state: dict | None = None

    def keep(self, rows, state):
        return _Group(self.index[rows], self.labels[rows], self.current[rows], self.total[rows],
                      {name: {key: None if value is None else value[rows]
                              for key, value in values.items()}
                       for name, values in state.items()})


def _merge(groups):
    """One group of `groups` (all after the same step)."""
    def cat(tensors):
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    state = {name: {key: None if value is None else cat([g.state[name][key] for g in groups])
                    for key, value in values.items()}
             for name, values in groups[0].state.items()}
    return _Group(*(cat([g[i] for g in groups]) for i in range(4)), state)


def _regroup(groups, size):
    """Merge the groups of fewer than EXIT_MERGE * `size` images into groups of up to `size`.

    A step of a few images costs about as much as one of many (the per-call overhead), but
    merging copies every state tensor of the images merged: only small groups are worth it.
    """
    small = [g for g in groups if len(g.index) < EXIT_MERGE * size]
    merged, pending = [g for g in groups if len(g.index) >= EXIT_MERGE * size], []
    for group in small:
        if pending and sum(len(g.index) for g in pending) + len(group.index) > size:
            merged.append(_merge(pending))
            pending = []
        pending.append(group)
    return merged + ([_merge(pending)] if pending else [])


@torch.no_grad()
def evaluate_early_exit(snn, batches, timesteps, device, rule, threshold, deadline=None):
    """Simulate each image only until its answer is settled, or the deadline (default T).

    Step by step over all images: at each step the images whose settledness reaches `threshold`
    stop; their prediction is frozen and they leave their group, with their state in every
    module, so later steps simulate only the images still running and the spike counts hold only
    the steps each image ran. After each step the shrunken groups are merged up to a batch's
    size, so a few slow images per batch do not each pay for a nearly empty step.
    Returns (accuracy with the steps capped at t = 1..T, counts as from `evaluate_snn`, each
    image's exit step [N], each image's prediction [N]).
    """
    snn.eval()
    readout = readout_node(snn)
    first, rest = stages(snn)
    counting = counting_modules(first) | counting_modules(rest)
    deadline = deadline or timesteps
    right = torch.zeros(timesteps, dtype=torch.float64)  # right answers of running images
    right_stopped = torch.zeros(timesteps, dtype=torch.float64)  # ... of those stopping at t
    clean_mem_spike(snn)
    groups, seen, size = [], 0, 1
    for images, labels in batches:
        groups.append(_Group(torch.arange(seen, seen + len(labels)), labels.to(device),
                             images.to(device)))
        seen, size = seen + len(labels), max(size, len(labels))
    steps = torch.full((seen,), deadline)
    predicted = torch.empty(seen, dtype=torch.long)
    for t in range(1, deadline + 1):
        running = []
        for group in groups:
            for name, module in counting.items():
                module.restart()
                for key, value in (group.state or {}).get(name, {}).items():
                    setattr(module, key, value)
                module.step = t - 1  # its spikes count at step t
            current = first(group.current) if group.state is None else group.current
            total = group.total + rest(current)
            prediction = predict(total, readout)
            hits = prediction == group.labels
            right[t - 1] += hits.sum().item()
            stop = (settledness(total, t, rule) >= threshold if t < deadline
                    else torch.ones_like(hits))
            stopped = stop.nonzero()[:, 0]
            for module in counting.values():  # those counted when they leave
                module.leave(stopped, t)
            stopped = stopped.cpu()
            steps[group.index[stopped]] = t
            predicted[group.index[stopped]] = prediction[stopped].cpu()
            right_stopped[t - 1] += hits[stop].sum().item()
            if len(stopped) < len(stop):
                state = {name: {key: getattr(m, key) for key in m.state}
                         for name, m in counting.items()}
                group = group._replace(current=current, total=total, state=state)
                running.append(group.keep((~stop).nonzero()[:, 0], state))
        groups = _regroup(running, size)
    counts = {name: _padded(module.counts.cpu(), timesteps) for name, module in counting.items()}
    stopped_before = torch.cat([torch.zeros(1, dtype=torch.float64),
                                right_stopped.cumsum(0)[:-1]])
    return ((right + stopped_before) / seen).tolist(), counts, steps, predicted


def _padded(counts, timesteps):
    """Counts [steps, *units] padded with zeros to `timesteps` steps (later steps ran nothing)."""
    padded = torch.zeros(timesteps, *counts.shape[1:])
    padded[:len(counts)] = counts
    return padded


# ----------------------------------------------------------------------------- one run


def run(conversion, snn, batches, validation, timesteps, device):
    """Early exit of `snn`, the spiking network of `conversion`, on `batches`: the result (as
    `lenet_convert.run` gives it, with the accuracy when the steps are capped at t and the
    spikes of the steps each image ran) and under "early_exit" its record and energy.

    `validation` (Batches) chooses the threshold unless the settings give one.
    """
    announce(conversion, len(batches.labels), timesteps, device)
    accuracy, counts, seconds, record = run_early_exit(
        snn, conversion.ann, conversion.settings, batches, validation, timesteps, device)
    result = result_of(conversion, snn, batches, device, accuracy, counts, seconds,
                       record["fixed_timesteps"])
    eff = result["efficiency"]
    result["early_exit"] = record | {"synops_per_image": eff["synops_per_image"][-1],
                                     "energy_pj_per_image": eff["snn_energy_pj"][-1]} | (
        energy_models.early_exit(result["energy_models"], record["mean_steps"],
                                 record["fixed_timesteps"]))
    return result


def run_early_exit(snn, ann, settings, batches, validation, timesteps, device):
    """Early exit of `snn` on `batches`, its threshold chosen on `validation` if not given.

    Returns (accuracy with the steps capped at t, counts, the early-exit simulation's seconds,
    the record for snn_early_exit.json without the energy). Also simulates every test image
    for all T steps (the curve over thresholds and the fixed-T accuracy) and for the fixed T
    that first reaches early exit's accuracy, timed in the same run.
    """
    rule, threshold, deadline = settings.exit_rule, settings.exit_threshold, timesteps
    record = {"rule": rule, "chosen_on": "given"}
    grid = [threshold]
    if threshold is None:
        threshold, deadline, chosen = choose_on_validation(snn, ann, settings, validation,
                                                           timesteps, device)
        grid = chosen.pop("grid")
        record |= chosen
    deadline = settings.exit_deadline or deadline
    values, predicted, labels = record_settledness(snn, batches, timesteps, device, rule)
    fixed = (predicted == labels).double().mean(1).tolist()
    test_curve = exit_curve(exit_table(values, predicted, labels, grid), grid, deadline)
    accuracy, counts, steps, chosen = evaluate_early_exit(snn, batches, timesteps, device, rule,
                                                          threshold, deadline)
    fixed_t = first_step_within(fixed, accuracy[-1], margin=0) or timesteps
    seconds, _ = cli.median_seconds({
        "fixed": lambda: evaluate_snn(snn, batches, fixed_t, device),
        "early": lambda: evaluate_early_exit(snn, batches, timesteps, device, rule, threshold,
                                             deadline)}, EXIT_TIMING_REPEATS, warm_up=False)
    seconds, fixed_seconds = seconds["early"], seconds["fixed"]
    record = {"rule": rule, "threshold": threshold, "deadline": deadline} | record | {
        "test_accuracy": accuracy[-1],
        "mean_steps": steps.double().mean().item(),
        "exit_steps": torch.bincount(steps - 1, minlength=timesteps).tolist(),
        "seconds": round(seconds, 3),
        "fixed_timesteps": fixed_t,
        "fixed_accuracy": fixed[fixed_t - 1],
        "fixed_seconds": round(fixed_seconds, 3),
        "timing": f"median of {EXIT_TIMING_REPEATS} runs of each, alternating, after a warm-up",
        "fixed_accuracy_per_step": fixed,
        "test_curve": test_curve,
        "hardest": hardest(values, steps, labels, chosen, rule),
    }
    return accuracy, counts, seconds, record


def hardest(values, steps, labels, predicted, rule):
    """The HARDEST images that ran longest, the least settled first, for the figure."""
    settled = values.gather(0, (steps - 1)[None])[0]  # each image's value when it stopped
    order = sorted(range(len(steps)), key=lambda i: (-steps[i].item(), settled[i].item()))
    return [{"index": i, "label": labels[i].item(), "prediction": predicted[i].item(),
             "exit_step": steps[i].item(), rule: settled[i].item()} for i in order[:HARDEST]]


# ----------------------------------------------------------------------------- reporting


def early_exit_record(result):
    """snn_early_exit.json: the early-exit record of `result` and what it was run on."""
    return result["early_exit"] | {
        key: result[key] for key in ("ann_accuracy", "checkpoint", "settings", "test_images",
                                     "timesteps", "device")} | {
        "accuracy_with_steps_capped": result["snn_accuracy"],
        "synops_with_steps_capped": result["efficiency"]["synops_per_image"]}


def print_early_exit(record):
    chosen = ("chosen on validation" if record["chosen_on"] == "validation" else "given")
    ratio = record["seconds"] / record["fixed_seconds"]
    print(f"early exit, {record['rule']} ≥ {record['threshold']:.5g} by step "
          f"{record['deadline']} ({chosen}): "
          f"{record['test_accuracy']:.2%} at {record['mean_steps']:.2f} steps on average "
          f"({record['synops_per_image'] / 1e3:.0f}k SynOps, "
          f"{record['energy_pj_per_image'] / 1e6:.3f} µJ per image by operations only); fixed "
          "T reaches that "
          f"accuracy at t = {record['fixed_timesteps']}; time {record['seconds']:.2f}s against "
          f"{record['fixed_seconds']:.2f}s for fixed T = {record['fixed_timesteps']} "
          f"({ratio:.2f}×, {record['timing']})")
    print(f"  with memory traffic (docs/method.md §7): "
          f"{record['memory_pj_per_image'] / 1e6:.2f} µJ per image, "
          f"{record['over_ann_memory']:.2f} × the float ANN, {record['over_qnn_memory']:.2f} × "
          f"the QNN of fixed T = {record['fixed_timesteps']} "
          f"({record['qnn_memory_pj'] / 1e6:.2f} µJ)")
    if record.get("within_margin") is False:
        print("  (no threshold came within --exit-margin of the ANN on validation: the most "
              "accurate one was taken)")


def plot_early_exit(fixed, record, images, path):
    """Accuracy against mean steps (fixed T and early exit), exit-step histogram, hardest images."""
    fig = plt.figure(figsize=(16, 5.2))
    grid = fig.add_gridspec(1, 3, width_ratios=(1.3, 1, 1))
    ax = fig.add_subplot(grid[0])
    timesteps = fixed["timesteps"]
    fixed_accuracy = [100 * a for a in record["fixed_accuracy_per_step"]]
    ax.plot(range(1, timesteps + 1), fixed_accuracy, marker=".", label="fixed T (test)")
    for curve, label, style in ((record.get("curve"), "early exit, validation", ":"),
                                (record["test_curve"], "early exit, test", "-")):
        if curve and len(curve) > 1:
            ax.plot([c["mean_steps"] for c in curve], [100 * c["accuracy"] for c in curve],
                    linestyle=style, label=f"{label} (one point per threshold, deadline "
                                           f"{record['deadline']})")
    ax.plot(record["mean_steps"], 100 * record["test_accuracy"], marker="*", markersize=15,
            color="tab:red", linestyle="none", markeredgecolor="k",
            label=f"chosen: {record['rule']} ≥ {record['threshold']:.5g} by step "
                  f"{record['deadline']}")
    ann = 100 * fixed["ann_accuracy"]
    margin = 100 * fixed["settings"].get("exit_margin", ANN_MARGIN)
    ax.axhspan(ann - margin, ann, color="tab:gray", alpha=0.25,
               label=f"ANN ({ann:.2f} %) minus {margin:g} pp")
    step_axis(ax, timesteps)
    ax.set_xlabel("time steps (mean over the test images)")
    ax.set_ylim(ann - 3, min(100, ann + 0.5))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against steps")
    ax.legend(fontsize=7, loc="lower right")
    ax = fig.add_subplot(grid[1])
    counts = record["exit_steps"]
    ax.bar(range(1, len(counts) + 1), counts)
    ax.set_xlim(0.4, record["deadline"] + 0.6)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_yscale("log")
    ax.set_xlabel("exit step")
    ax.set_ylabel("test images")
    ax.set_title(f"exit steps (mean {record['mean_steps']:.2f})")
    hardest = record["hardest"]
    cells = grid[2].subgridspec(4, 4, wspace=0.05, hspace=0.45)
    for k, entry in enumerate(hardest):
        cell = fig.add_subplot(cells[k // 4, k % 4])
        cell.imshow(images[entry["index"]].numpy(), cmap="gray_r")
        cell.set_axis_off()
        colour = "k" if entry["label"] == entry["prediction"] else "tab:red"
        cell.set_title(f"{entry['label']}→{entry['prediction']} t={entry['exit_step']}",
                       fontsize=7, color=colour)
    settings = record["settings"] | {"exit_threshold": record["threshold"],
                                     "exit_deadline": record["deadline"]}
    fig.suptitle(f"LeNet5 SNN early exit on {fixed['test_images']} MNIST test images: "
                 f"{settings_text(settings)} ({record['chosen_on']})\nright: the {len(hardest)} "
                 f"test images that ran longest, the least settled first (label→prediction, exit "
                 f"step; red: wrong)",
                 fontsize=10)
    save_figure(fig, path)


def write(result, early, images, files):
    """Write snn_early_exit.json and .png of the `early` run beside the fixed-T `result` into
    `files` (a cli.FileSet); `images` are the test images ([N, H, W]); return the record."""
    record = early_exit_record(early)
    plot_early_exit(result, record, images, files.path("snn_early_exit.png"))
    cli.write_json(files.path("snn_early_exit.json"), record)
    return record
