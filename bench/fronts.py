"""The accuracy-energy fronts of the seeds study (bench/seeds.py): every network and
conversion's mean accuracy against its mean energy per image, by operations only and with
memory traffic (energy_models.py), the points no other beats on both, and their figure.
"""

from plots import plt, save_figure  # (the caller put the project on the path)

RELU, RELU_BRAINCOG = "relu", "relu_braincog_reference"  # two networks of a study's summary
ENERGY_STEPS = 16  # steps along each curve of the accuracy-energy figure
MEASURES = {  # what a point's energy is: (a curve's key, early exit's, the ANN's; the axis)
    "operations": ("energy_pj_mean", "energy_pj_per_image", "ann_energy_pj",
                   "estimated energy per image, operations only (µJ; memory traffic ignored)"),
    "memory": ("memory_pj_mean", "memory_pj_per_image", "ann_memory_pj",
               "estimated energy per image with memory traffic (µJ)")}


def energy_points(study, measure="operations"):
    """Every network and conversion's (mean energy per image in µJ by `measure`, one of
    MEASURES, mean accuracy in %, its name, t) for t = 1 .. ENERGY_STEPS, early exit's as t =
    None, the ANN's as t = 0; and the curves, {name: its summary}, in order."""
    summary, points = study["summary"], []
    curve_key, exit_key, ann_key, _ = MEASURES[measure]
    curves = {"ReLU, default": summary[RELU], "ReLU, BrainCog's reference": summary[RELU_BRAINCOG]}
    for levels, rules in study["levels"].items():
        runs = [entry["run"] for entry in rules.values()]
        for rule, entry in rules.items():  # L = 2: gamma = 2 and gamma = L are one run, one curve
            shared = runs.count(entry["run"]) > 1
            if not shared or rule == "gamma = L":
                curves[f"QCFS {levels}, {rule}" + (" = 2" if shared else "")] = entry
    for name, entry in curves.items():
        points += [(energy / 1e6, 100 * accuracy, name, t) for t, (energy, accuracy) in enumerate(
            zip(entry[curve_key], entry["snn_mean"], strict=True), 1) if t <= ENERGY_STEPS]
    for knob, entry in study["early_exit"].items():
        points.append((entry[exit_key]["mean"] / 1e6, 100 * entry["test_accuracy"]["mean"],
                       exit_name(knob), None))
    points.append((summary[RELU][ann_key] / 1e6, 100 * summary[RELU]["ann_mean"], "ReLU ANN", 0))
    return points, curves


def exit_name(knob):
    """The name a point of early exit gets, from its knob in the study's early_exit."""
    network, _, rule = knob.rpartition(": ")  # "qcfs L=4: early exit (...)" or "early exit"
    return f"{network.replace('qcfs', 'QCFS') or 'ReLU'}, {rule}"


def pareto_front(points):
    """The points no other beats on both axes (less energy, more accuracy), by energy."""
    front, best = [], -1.0
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def with_ratios(point, energy, memory, qnn, ann_energy, ann_memory):
    """A front `point` ({name, t, accuracy}) with its energies per image in µJ (`energy` by
    operations, `memory` with memory traffic, in pJ) and the SNN's three ratios: to the float
    ANN (`ann_energy`, `ann_memory`) both ways, and to its bit-matched QNN (`qnn`, with memory
    traffic); None where a figure is not known."""
    known = memory is not None
    return point | {"energy_uj": energy / 1e6, "memory_uj": memory / 1e6 if known else None,
                    "over_ann_compute": energy / ann_energy,
                    "over_ann_memory": memory / ann_memory if known else None,
                    "over_qnn_memory": memory / qnn if known and qnn else None}


def fronts(study):
    """The front by each of MEASURES, each point with its energies and the SNN's three ratios
    (of the means over the seeds): to the float ANN by operations and with memory traffic, and
    to the bit-matched QNN with memory traffic (early exit: the QNN of the fixed T reaching its
    accuracy; None where that step's QNN was not run on every seed, and for the ANN)."""
    curves, ann, made = energy_points(study)[1], study["summary"][RELU], {}
    exits = {exit_name(knob): entry for knob, entry in study["early_exit"].items()}
    for measure in MEASURES:
        made[measure] = []
        for _, accuracy, name, t in pareto_front(energy_points(study, measure)[0]):
            if t is None:  # early exit
                energy, memory, qnn = (exits[name][k]["mean"] for k in (
                    "energy_pj_per_image", "memory_pj_per_image", "qnn_memory_pj"))
            elif t == 0:
                energy, memory, qnn = ann["ann_energy_pj"], ann["ann_memory_pj"], None
            else:
                entry = curves[name]
                energy, memory = entry["energy_pj_mean"][t - 1], entry["memory_pj_mean"][t - 1]
                qnn = entry["qnn_memory_pj_mean"].get(str(t))
            made[measure].append(with_ratios({"name": name, "t": t, "accuracy": accuracy},
                                             energy, memory, qnn, ann["ann_energy_pj"],
                                             ann["ann_memory_pj"]))
    return made


def plot_energy(study, path):
    """Mean accuracy against mean energy per image of every network and conversion: by
    operations only, and with memory traffic."""
    fig, axes = plt.subplots(1, 2, figsize=(20, 7.5))
    for ax, (measure, (*_, label)) in zip(axes, MEASURES.items(), strict=True):
        points, curves = energy_points(study, measure)
        networks = list(dict.fromkeys(name.partition(", ")[0] for name in curves))
        for name in curves:  # one hue per network: dark for its default conversion, light and
            network, _, conversion = name.partition(", ")  # dashed for the other
            other = conversion in ("BrainCog's reference", "gamma = 2")
            curve = [p for p in points if p[2] == name]
            ax.plot([p[0] for p in curve], [p[1] for p in curve], marker=".", markersize=4,
                    color=plt.cm.tab20((2 * networks.index(network) + other) % 20),
                    linestyle="--" if other else "-", label=name)
            for x, y, _, t in curve:
                if t in (1, 2, 4, 8, 16):
                    ax.annotate(f"{t}", (x, y), fontsize=6, xytext=(2, 2),
                                textcoords="offset points")
        for x, y, name, t in points:
            if t is None or t == 0:  # early exit in its network's hue; the ANN in gold
                network = name.partition(", ")[0]
                color = plt.cm.tab20(2 * networks.index(network)) if t is None else "gold"
                ax.plot(x, y, marker="X" if t is None else "*", markersize=11 if t is None else 15,
                        linestyle="none", color=color, markeredgecolor="k", label=name)
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="k", linewidth=2, alpha=0.5,
                zorder=0, label="no other point has both less energy and more accuracy")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel(label + ", mean over the seeds")
        ax.set_ylabel("test accuracy, mean over the seeds (%)")
        top = max(p[1] for p in points)
        ax.set_ylim(top - 3, top + 0.3)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{measure.replace('memory', 'with memory traffic')}: the ANN is the float "
                     "ANN", fontsize=10)
    axes[1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(f"Accuracy against energy over {len(study['seeds'])} seeds: each curve a "
                 f"network and conversion after t = 1 .. {ENERGY_STEPS} steps (numbers: t)",
                 fontsize=10)
    save_figure(fig, path)
