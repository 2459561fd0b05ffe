"""Running planned conversions, one or many on the same test images, and compare mode.

A plan is a list of `Planned` conversions (a checkpoint, its ANN and the settings); `run_all`
checks every entry before it simulates any, then `run` converts (`lenet_convert.build_snn`),
simulates and measures each: the result is the dict that snn_accuracy.json holds. Compare mode
(`lenet_convert.py --compare`) plans the given settings, each knob changed alone and BrainCog's
reference, and draws them in one figure and one table.

Example:
    python lenet_convert.py --compare checkpoints/lenet5_qcfs_best.pt --out-dir results/compare
"""

import time
from pathlib import Path
from typing import NamedTuple

import torch.nn as nn

import cli
import early_exit
import efficiency
from checkpoint import OUTPUT_LAYER
from lenet5 import evaluate, remeasure_percentiles
from lenet_convert import (
    AT_ANN_LEVEL,
    NORMS,
    QCFS_DEFAULT,
    READOUTS,
    RESETS,
    V0,
    Settings,
    build_snn,
    default_settings,
    evaluate_snn,
    first_step_within,
    load_ann,
    plot_accuracy,
    settings_from,
)
from mnist import Batches, load_mnist
from plots import plt, report_steps, save_figure, settings_text, step_axis

COMPARE_GAMMAS = (1, 2, 4)  # burst limits every compared checkpoint is run with
COMPARE_SPICALIBS = (2, 4)  # the spike calibration allowances compare mode tries
COMPARE_EXIT_RULE = "margin"  # the early-exit rule compare mode tries
GIVEN, BRAINCOG = "as given", "BrainCog reference"  # labels of the main runs
BRAINCOG_SETTINGS = Settings("99.9", gamma=2, v0=0.0, lateral_inhibition=False, readout="analog")


class Planned(NamedTuple):
    """One conversion to run: a loaded checkpoint, its ANN and the settings."""

    label: str
    path: Path
    checkpoint: dict
    ann: nn.Module
    settings: Settings


# ----------------------------------------------------------------------------- running a plan


def run(planned, batches, timesteps, device, validation=None):
    """Convert and simulate one `planned` conversion on `batches`; the result dict (JSON-ready).

    With an exit rule, `validation` (Batches) chooses the threshold unless the settings give one.
    """
    snn = build_snn(planned.checkpoint, planned.ann, planned.settings).to(device)
    activation = planned.checkpoint.get("activation", "relu")
    settings = planned.settings._asdict() | {  # and the network they apply to
        "activation": activation,
        "levels": planned.checkpoint.get("levels") if activation == "qcfs" else None}
    if activation == "qcfs" and planned.settings == default_settings(planned.checkpoint):
        settings["default"] = QCFS_DEFAULT  # what the default is, and why
    print(f"simulating {len(batches.labels)} test images for {timesteps} steps on {device}: "
          f"{planned.path}, {settings_text(settings)}")
    early = None
    if planned.settings.exit_rule == "none":
        start = time.perf_counter()
        snn_accuracy, counts = evaluate_snn(snn, batches, timesteps, device)
        seconds = time.perf_counter() - start
    else:
        snn_accuracy, counts, seconds, early = early_exit.run_early_exit(
            snn, planned.ann, planned.settings, batches, validation, timesteps, device)
    ann_accuracy = evaluate(planned.ann, batches, device)
    result = {
        "ann_accuracy": ann_accuracy,
        "snn_accuracy": snn_accuracy,
        "timesteps": timesteps,
        AT_ANN_LEVEL: first_step_within(snn_accuracy, ann_accuracy),
        "settings": settings,
        "checkpoint": str(planned.path),
        "test_images": len(batches.labels),
        "device": str(device),
        "simulation_seconds": round(seconds, 2),
        "efficiency": efficiency.efficiency(snn, counts, len(batches.labels), timesteps,
                                            efficiency.input_shapes(planned.ann)),
    }
    if early:
        eff = result["efficiency"]
        result["early_exit"] = early | {"synops_per_image": eff["synops_per_image"][-1],
                                        "energy_pj_per_image": eff["snn_energy_pj"][-1]}
    return result


def add_channel_percentiles(planned, data_dir, device):
    """Give a checkpoint written before they were recorded its per-channel percentiles.

    They are measured as lenet5.py does, on the same training images (in memory only; the file
    is not changed).
    """
    if "channel_percentiles" in planned.checkpoint:
        return
    print(f"{planned.path} has no per-channel percentiles: measuring them on the training images "
          "its per-layer ones came from")
    planned.checkpoint["channel_percentiles"] = remeasure_percentiles(
        planned.checkpoint, planned.ann, data_dir, device)[1]


def run_all(plan, data_dir, limit, batch_size, timesteps, device):
    """`run` every entry of `plan` on the same test images (the first `limit`, or all).

    Every entry is built and its validation split checked first, so a bad setting fails before
    anything is simulated.
    """
    validated = [early_exit.needs_validation(p.checkpoint, p.settings, p.path) for p in plan]
    for planned in plan:
        if planned.settings.norm != "layer":
            add_channel_percentiles(planned, data_dir, device)
        build_snn(planned.checkpoint, planned.ann, planned.settings)
    images, labels = load_mnist(data_dir, train=False)
    if limit and limit > len(labels):
        raise cli.UserError(f"--limit {limit}: the test set has only {len(labels)} images")
    batches = Batches(images[:limit], labels[:limit], batch_size)
    train = load_mnist(data_dir, train=True) if any(validated) else None
    return [run(planned, batches, timesteps, device,
                early_exit.validation_split(planned.checkpoint, *train, batch_size)
                if needed else None)
            for planned, needed in zip(plan, validated, strict=True)]


# ----------------------------------------------------------------------------- the two modes


def single(args, device):
    """One run: load, convert, simulate; write the plots and the JSON; return the result."""
    checkpoint, ann = load_ann(args.checkpoint, device)
    settings = settings_from(args, checkpoint)
    plan = [Planned(GIVEN, args.checkpoint, checkpoint, ann, settings._replace(exit_rule="none"))]
    if settings.exit_rule != "none":
        plan.append(Planned("early exit", args.checkpoint, checkpoint, ann, settings))
    result, *early = run_all(plan, args.data_dir, args.limit, args.batch_size, args.timesteps,
                             device)
    plot_accuracy(result, args.out_dir / "snn_accuracy.png")
    efficiency.plot_efficiency(result, args.out_dir / "snn_efficiency.png")
    cli.write_json(args.out_dir / "snn_accuracy.json", result)
    efficiency.print_table(result)
    written = "snn_accuracy.png, snn_efficiency.png and snn_accuracy.json"
    if early:
        record = early_exit.write(result, early[0], args.data_dir, args.out_dir)
        written = written.replace(" and ", ", ") + ", snn_early_exit.png and .json"
        result = result | {"early_exit": record}
    print(f"wrote {written} in {args.out_dir} (simulation {result['simulation_seconds']:.0f}s)")
    return result


def compare(args, device):
    """Compare mode: `compare_settings` on --checkpoint and on each extra one; one figure."""
    plan = []
    for i, path in enumerate([args.checkpoint, *args.compare]):
        checkpoint, ann = load_ann(path, device)
        recorded = list(checkpoint.get("percentiles", {}).get(OUTPUT_LAYER, {}))
        plan += [Planned(label, path, checkpoint, ann, variant) for label, variant in
                 compare_settings(settings_from(args, checkpoint), recorded, every_knob=i == 0)]
    results = [result | {"label": planned.label} for planned, result in zip(
        plan, run_all(plan, args.data_dir, args.limit, args.batch_size, args.timesteps, device),
        strict=True)]
    rows = compare_rows(results)
    plot_compare(results, args.out_dir / "compare.png")
    cli.write_json(args.out_dir / "compare.json", {"runs": results, "table": rows})
    cli.write_csv(args.out_dir / "compare.csv", rows)
    print_compare(rows)
    print(f"wrote compare.png, compare.json and compare.csv in {args.out_dir}")
    return results


# ----------------------------------------------------------------------------- compare mode's parts


def compare_settings(settings, percentiles, every_knob=True):
    """(label, Settings) pairs: `settings`, then one knob changed at a time, then BrainCog's.

    With every_knob=False, only the burst limits gamma of COMPARE_GAMMAS and early exit.
    """
    variants = [(GIVEN, settings)]

    def vary(label, **change):
        variants.append((label, settings._replace(**change)))
    if every_knob:
        vary("lateral inhibition " + ("off" if settings.lateral_inhibition else "on"),
             lateral_inhibition=not settings.lateral_inhibition)
        vary("V0 = " + ("0" if settings.v0 else "θ/2"), v0=0.0 if settings.v0 else V0)
    for gamma in COMPARE_GAMMAS:
        if gamma != settings.gamma:
            vary(f"γ = {gamma}", gamma=gamma)
    if every_knob:
        for key in percentiles:
            if key != settings.percentile:
                vary(f"p = {key}", percentile=key)
        other = next(r for r in READOUTS if r != settings.readout)
        vary(f"read-out {other}", readout=other)
        if settings.percentile is not None:  # a QCFS network's trained lambda is per layer
            for norm in NORMS:
                if norm != settings.norm:
                    vary(f"norm per {norm}", norm=norm)
        vary("reset " + ("to 0" if settings.reset == "subtract" else "by subtraction"),
             reset=next(r for r in RESETS if r != settings.reset))
        for allowance in (0, *COMPARE_SPICALIBS):
            if allowance != settings.spicalib:
                vary(f"spike calibration {allowance or 'off'}", spicalib=allowance)
    if settings.exit_rule == "none":
        vary(f"early exit ({COMPARE_EXIT_RULE})", exit_rule=COMPARE_EXIT_RULE)
    else:
        vary("early exit off", exit_rule="none", exit_threshold=None, exit_deadline=None)
    if every_knob:
        variants.append((BRAINCOG, BRAINCOG_SETTINGS))
    return variants


def compare_rows(results):
    """One table row per result: accuracy at 1, 2, 4, ... steps, SynOps and energy.

    For early exit, the steps are a cap (docs/method.md §9); `early_exit_*` give its own
    accuracy, mean steps and energy per image with the cap at T.
    """
    rows = []
    for result in results:
        row = {"checkpoint": result["checkpoint"], "setting": result["label"],
               "ann": round(100 * result["ann_accuracy"], 2)}
        row |= {f"t={t}": round(100 * result["snn_accuracy"][t - 1], 2)
                for t in report_steps(result["timesteps"])}
        reached = efficiency.at_ann_level(result)
        eff = result["efficiency"]
        row |= {AT_ANN_LEVEL: reached[0] if reached else None,
                "synops_there": round(reached[1]) if reached else None,
                "energy_there_uJ": round(reached[2] / 1e6, 3) if reached else None,
                "ann_energy_uJ": round(eff["ann_energy_pj"] / 1e6, 3)}
        early = result.get("early_exit")
        row |= {"early_exit_accuracy": round(100 * early["test_accuracy"], 2) if early else None,
                "early_exit_mean_steps": round(early["mean_steps"], 3) if early else None,
                "early_exit_energy_uJ": round(early["energy_pj_per_image"] / 1e6, 3)
                if early else None}
        rows.append(row)
    return rows


def plot_compare(results, path):
    """Accuracy per step of every run overlaid; accuracy against energy of the main runs.

    Runs of --checkpoint are solid lines, those of further checkpoints dashed. The energy panel
    shows each checkpoint's run as given and BrainCog's reference, to stay readable, and each
    early-exit run as one point.
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
    main = [i for i, r in enumerate(results) if r["label"] in (GIVEN, BRAINCOG)]
    efficiency.plot_energy_axis(axes[1], [results[i] for i in main], [labels[i] for i in main],
                     [styles[i] for i in main])
    for result, label, style in zip(results, labels, styles, strict=True):
        if "early_exit" in result:  # one point: its accuracy and energy per image
            early = result["early_exit"]
            axes[1].plot(early["energy_pj_per_image"] / 1e6, 100 * early["test_accuracy"],
                         marker="X", markersize=10, linestyle="none", color=style["color"],
                         markeredgecolor="k", label=f"{label} ({early['mean_steps']:.2f} steps)")
    axes[1].legend(fontsize=7, loc="lower right")
    axes[1].set_title("accuracy against estimated energy per image (memory traffic ignored)")
    fig.suptitle(f"LeNet5 SNN settings compared on {results[0]['test_images']} MNIST test images, "
                 f"T = {timesteps}", fontsize=10)
    save_figure(fig, path)


def print_compare(rows):
    steps = [key for key in rows[0] if key.startswith("t=")]
    print(f"{'setting':42s} " + " ".join(f"{s:>6}" for s in steps) + f" {'ANN':>6} "
          f"{'at ANN':>8} {'µJ there':>8}   early exit: accuracy at mean steps")
    for row in rows:
        name = f"{Path(row['checkpoint']).stem}: {row['setting']}"[:42]
        there = row[AT_ANN_LEVEL]
        early = (f"   {row['early_exit_accuracy']:.2f} at {row['early_exit_mean_steps']:.2f}"
                 if row["early_exit_mean_steps"] is not None else "")
        print(f"{name:42s} " + " ".join(f"{row[s]:6.2f}" for s in steps) + f" {row['ann']:6.2f} "
              f"{there or '-':>8} {row['energy_there_uJ'] or '-':>8}{early}")
