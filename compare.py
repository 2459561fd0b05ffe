"""Compare mode (`lenet_convert.py --compare`): many conversions on the same test images.

A plan is a list of (label, `lenet_convert.Conversion`): the given settings, each knob changed
alone and BrainCog's reference on --checkpoint, and for every further checkpoint its own
defaults with the options given, the other burst limits and early exit (`compare_settings`).
`run_all` converts every entry and checks its validation split before it simulates any, then
runs each (`lenet_convert.run`, or `early_exit.run` for an early-exit entry); the results go
into one figure, one JSON and one table. The seeds study runs its plans with `run_all` too.

Example:
    python lenet_convert.py --compare checkpoints/lenet5_qcfs_best.pt --out-dir results/compare
"""

from pathlib import Path

import cli
import early_exit
import efficiency
import energy_models
import lenet_convert
from checkpoint import OUTPUT_LAYER
from lenet_convert import (
    AT_ANN_LEVEL_KEY,
    Conversion,
    at_ann_level,
    check_memory,
    clean_mem_spike,
    convert,
    load_ann,
    load_test_set,
)
from mnist import load_mnist
from options import INPUT_LEVELS, NORMS, READOUTS, RESETS, V0, Settings, settings_from
from plots import plt, report_steps, save_figure, step_axis

COMPARE_GAMMAS = (1, 2, 4)  # burst limits every compared checkpoint is run with
COMPARE_SPICALIBS = (2, 4)  # the spike calibration allowances compare mode tries
COMPARE_EXIT_RULE = "margin"  # the early-exit rule compare mode tries
GIVEN, BRAINCOG = "as given", "BrainCog reference"  # labels of the main runs
BRAINCOG_SETTINGS = Settings("99.9", gamma=2, v0=0.0, lateral_inhibition=False, readout="analog")


# ----------------------------------------------------------------------------- running a plan


def run_all(plan, data_dir, limit, batch_size, timesteps, device):
    """Run every conversion of `plan` ([(label, Conversion)]) on the same test images (the
    first `limit`, or all); the results, in order.

    Every entry is converted and its validation split checked first, so a bad setting fails
    before anything is simulated.
    """
    conversions = [conversion for _, conversion in plan]
    exits = any(c.settings.exit_rule != "none" for c in conversions)
    train = load_mnist(data_dir, train=True) if exits else None
    validations = [early_exit.validation_batches(c, train, batch_size) for c in conversions]
    snns = [convert(c, data_dir, device) for c in conversions]
    batches = load_test_set(data_dir, limit, batch_size)
    n, most = len(batches.labels), max((len(v.labels) for v in validations if v), default=0)
    check_memory(snns[0], timesteps, batch_size, n, exits * (n + most))
    results = []
    for conversion, snn, validation in zip(conversions, snns, validations, strict=True):
        if conversion.settings.exit_rule == "none":
            results.append(lenet_convert.run(conversion, snn, batches, timesteps, device))
        else:
            results.append(early_exit.run(conversion, snn, batches, validation, timesteps,
                                          device))
        clean_mem_spike(snn)  # its state and counts are in the result now
    return results


def main(args, device):
    """Compare mode: `compare_settings` on --checkpoint and on each extra one; one figure, one
    JSON and one table."""
    plan = []
    for i, path in enumerate([args.checkpoint, *args.compare]):
        checkpoint, ann = load_ann(path, device, args.data_dir)
        recorded = list(checkpoint.get("percentiles", {}).get(OUTPUT_LAYER, {}))
        plan += [(label, Conversion(path, checkpoint, ann, variant)) for label, variant in
                 compare_settings(settings_from(args, checkpoint), recorded, every_knob=i == 0)]
    results = [result | {"label": label} for (label, _), result in zip(
        plan, run_all(plan, args.data_dir, args.limit, args.batch_size, args.timesteps, device),
        strict=True)]
    rows = compare_rows(results)
    with cli.file_set(args.out_dir) as files:
        plot_compare(results, files.path("compare.png"))
        cli.write_json(files.path("compare.json"), {"runs": results, "table": rows})
        cli.write_csv(files.path("compare.csv"), rows)
    print_compare(rows)
    print(f"wrote {cli.and_list(files.names)} in {args.out_dir}")
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
        if settings.input_levels:
            vary("analog input", input_levels=None)
        else:
            vary(f"input as spikes (L_in = {INPUT_LEVELS})", input_levels=INPUT_LEVELS)
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


MEMORY_COLUMNS = ("snn_memory_uj", "over_ann_compute", "over_ann_memory", "over_qnn_memory")


def compare_rows(results):
    """One table row per result: accuracy at 1, 2, 4, ... steps, SynOps and energy; at the
    first step within 0.1 pp of the ANN, the energies with memory traffic (energy_models.py).

    For early exit, the steps are a cap (docs/method.md §9); `early_exit_*` give its own
    accuracy, mean steps and energy per image with the cap at T.
    """
    rows = []
    for result in results:
        row = {"checkpoint": result["checkpoint"], "setting": result["label"],
               "ann": round(100 * result["ann_accuracy"], 2)}
        row |= {f"t={t}": round(100 * result["snn_accuracy"][t - 1], 2)
                for t in report_steps(result["timesteps"])}
        reached = at_ann_level(result)
        eff = result["efficiency"]
        row |= {AT_ANN_LEVEL_KEY: reached[0] if reached else None,
                "synops_there": round(reached[1]) if reached else None,
                "energy_there_uJ": round(reached[2] / 1e6, 3) if reached else None,
                "ann_energy_uJ": round(eff["ann_energy_pj"] / 1e6, 3)}
        there = energy_models.at_step(result, reached[0]) if reached else {}
        row |= {key: round(there[key], 3) if there else None for key in MEMORY_COLUMNS}
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
    headline = [i for i, r in enumerate(results) if r["label"] in (GIVEN, BRAINCOG)]
    efficiency.plot_energy_axis(axes[1], [results[i] for i in headline],
                                [labels[i] for i in headline], [styles[i] for i in headline])
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
          f"{'at ANN':>8} {'µJ there':>8} {'× ANN':>6} {'memory: µJ':>10} {'× ANN':>6} "
          f"{'× QNN':>6}   early exit: accuracy at mean steps")
    for row in rows:
        name = f"{Path(row['checkpoint']).stem}: {row['setting']}"[:42]
        there = row[AT_ANN_LEVEL_KEY]
        early = (f"   {row['early_exit_accuracy']:.2f} at {row['early_exit_mean_steps']:.2f}"
                 if row["early_exit_mean_steps"] is not None else "")
        memory = [row[key] or "-" for key in MEMORY_COLUMNS]
        print(f"{name:42s} " + " ".join(f"{row[s]:6.2f}" for s in steps) + f" {row['ann']:6.2f} "
              f"{there or '-':>8} {row['energy_there_uJ'] or '-':>8} {memory[1]:>6} "
              f"{memory[0]:>10} {memory[2]:>6} {memory[3]:>6}{early}")
