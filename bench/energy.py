"""Training against the SNN's own energy: QCFS networks trained with lenet5.py --energy-weight.

For each seed: the ReLU network (bench/seeds.py's, reused when it was made with the same
arguments) and, fine-tuned from it for --fine-tune-epochs, a QCFS network for each combination
of --levels, --weights, --input-levels and --distill (`lenet5.py --activation qcfs --levels L
--energy-weight W`, with `--input-levels L_in` for the image as spikes and `--teacher <the ReLU
network> --distill-weight A` for distillation). Each has its pair, always trained too: the same
seed, L, start and schedule on the analog image without penalty or teacher (`Recipe.pair`), so
every difference claimed is a paired one.

Validation chooses. With gamma = L a QCFS network's SNN gives its ANN's answers after one step,
and what that step costs is what lenet5.py trains on and records (its checkpoint's
val_energy_uj): for each network its best epoch's validation accuracy and energy per image,
mean and std over the seeds, paired against the same seed's network without the penalty and
against the same seed's ReLU network. The chosen network is the one of least mean energy among
those within MARGIN of the ReLU network's validation accuracy (paired mean over the seeds).

The test set reports. Each network is converted with its default settings (gamma = L) and
simulated for --timesteps steps on the test images (with --early-exit, also with early exit):
accuracy and energy per image after each step, mean and std over the seeds, paired against
the network without the penalty and compared with the same seed's ReLU ANN; the front of
accuracy against energy (the points no other beats on both), of this study's networks without
the penalty and with it, beside the levels study's front (--front, a seeds.json of
bench/seeds.py, or an energy.json of an earlier run of this study); and whether the target is
met: an SNN within MARGIN of the ReLU ANN's mean test accuracy by t = TARGET_STEPS at no more
than TARGET_ENERGY times the ANN's energy per image.

Tasks run on Ray or, with --workers 0, one after another in this process (see studies.py).

Example:
    python bench/energy.py --seeds 1 2 3              # the sweep: 3 x 15 networks, about an
                                                      # hour on 2 CPU cores (docs/results.md)
    python bench/energy.py --seeds 1 2 3 4 5 --levels 8 16 --weights 0 0.03 0.1 \\
        --out-dir results/energy5                     # the chosen ones over 5 seeds
    python bench/energy.py --seeds 1 2 3 --levels 8 --weights 0.03 0.1 --input-levels 4 8 \\
        --distill 0 1 --out-dir results/energy_spikes    # the image as spikes, distillation
    python bench/energy.py --seeds 1 --levels 2 --weights 10 --limit-train 2000 --epochs 2 \\
        --fine-tune-epochs 1 --limit 500 --timesteps 2    # a quick look (a minute)

Writes (into --out-dir, default results/energy/):
    seed<S>.json   one seed's networks on validation and their conversions, as each is done
    energy.json    the runs, the validation summary and choice, the test summary, the fronts
                   (each point with its energy with memory traffic and the SNN's three ratios)
    energy.csv     one row per conversion and step
    energy.png     mean test accuracy against mean energy per image, with the fronts
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/energy.py
import cli  # noqa: E402  (first: see its docstring)

# isort: split
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from typing import NamedTuple  # noqa: E402

import seeds  # noqa: E402
import studies  # noqa: E402
from fronts import pareto_front, with_ratios  # noqa: E402
from studies import argv_path  # noqa: E402

import energy_models  # noqa: E402
import lenet5  # noqa: E402
import lenet_convert  # noqa: E402
import options  # noqa: E402
from checkpoint import (  # noqa: E402
    MAX_DISTILL_WEIGHT,
    MAX_ENERGY_WEIGHT,
    MAX_LEVELS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    history_path,
    load_checkpoint,
)
from cli import positive_int, write_csv, write_json  # noqa: E402
from compare import COMPARE_EXIT_RULE  # noqa: E402
from mnist import TEST_IMAGES, Batches, load_mnist  # noqa: E402
from options import default_settings  # noqa: E402
from plots import plt, save_figure  # noqa: E402

# ----------------------------------------------------------------------------- defaults
SEEDS = (1, 2, 3)  # the validation sweep's; the test's are bench/seeds.py's five
LEVELS = (4, 8, 16)
WEIGHTS = (0.0, 0.01, 0.03, 0.1, 0.3)  # on µJ per image; 0: the pair without the penalty
FINE_TUNE_EPOCHS = lenet5.FINE_TUNING["epochs"]  # 8, since the sweep chose its recipe at 8
TIMESTEPS = 8
MARGIN = 0.0005  # "within 0.05 pp of the ReLU network"
TARGET_ENERGY = 0.15  # times the ANN's energy per image
TARGET_STEPS = 1  # ... by this step
DOMINANCE = (0.20, 1.30)  # µJ: the range where the new front is compared with the old
OUT_DIR = Path("results/energy")
LEVELS_FRONT = studies.ROOT / "docs/seeds/seeds.json"
OUTPUTS = ("energy.json", "energy.csv", "energy.png")
GAMMA_L, EARLY_EXIT = "gamma = L", "early exit"
BOTH = "levels study and this one"  # the front of an energy.json that --front reads
VALIDATION_READS = ("val_energy_uj",)  # what `validation_record` reads of a QCFS network, in
# its checkpoint and every epoch of its history, beyond what every network has


class Recipe(NamedTuple):
    """How one QCFS network of a seed is trained: its levels, energy weight, the image's levels
    (None: analog) and the weight of distillation from the seed's ReLU network (0: none)."""

    levels: int
    weight: float
    input_levels: int | None = None
    distill: float = 0.0

    @property
    def name(self):
        return (f"L={self.levels}, w={self.weight:g}"
                + (f", in={self.input_levels}" if self.input_levels else "")
                + (f", kd={self.distill:g}" if self.distill else ""))

    @property
    def pair(self):
        """The network it is paired with: the same L, no penalty, the analog image, no teacher."""
        return Recipe(self.levels, 0.0)


def recipes(args):
    """Every network of a seed: each combination of the levels, weights, input levels and
    distillation weights asked for, and each one's pair (`Recipe.pair`)."""
    asked = [Recipe(*r) for r in itertools.product(args.levels, args.weights, args.input_levels,
                                                   args.distill)]
    return list(dict.fromkeys(r for recipe in asked for r in (recipe.pair, recipe)))


def parse_name(key):
    """The Recipe of a network's name or a conversion's key ("<name>: <label>")."""
    fields = dict(part.split("=") for part in key.split(": ")[0].split(", "))
    return Recipe(int(fields["L"]), float(fields["w"]),
                  int(fields["in"]) if "in" in fields else None, float(fields.get("kd", 0)))


def unpenalised(key):
    """The name (or conversion key) of the network that `key` pairs with (`Recipe.pair`)."""
    return parse_name(key).pair.name + (": " + key.split(": ")[1] if ": " in key else "")


# ----------------------------------------------------------------------------- one seed


def qcfs_argv(seed, recipe, relu, args):
    """lenet5.py's command line for a seed's QCFS network of `recipe`, fine-tuned from `relu`
    (and taught by it, where the recipe distils)."""
    name = (f"qcfs_L{recipe.levels}_w{recipe.weight:g}"
            + (f"_in{recipe.input_levels}" if recipe.input_levels else "")
            + (f"_kd{recipe.distill:g}_T{args.temperature:g}" if recipe.distill else "")
            + f"_e{args.fine_tune_epochs}_seed{seed}.pt")
    argv = ["--seed", str(seed), "--device", args.device,
            "--data-dir", str(studies.task_path(args.data_dir)),
            "--checkpoint", str(args.checkpoint_dir / "energy" / name),
            "--activation", "qcfs", "--levels", str(recipe.levels), "--init-from", str(relu),
            "--energy-weight", f"{recipe.weight:g}", "--epochs", str(args.fine_tune_epochs),
            "--input-levels", str(recipe.input_levels or lenet5.ANALOG),
            "--distill-weight", f"{recipe.distill:g}"]
    if recipe.distill:
        argv += ["--teacher", str(relu), "--temperature", f"{args.temperature:g}"]
    return argv + (["--limit-train", str(args.limit_train)] if args.limit_train else [])


def validation_record(path):
    """What a network is judged by on validation, from its checkpoint and history."""
    checkpoint = load_checkpoint(path)
    history = json.loads(history_path(path).read_text())
    record = {"accuracy": checkpoint["val_accuracy"], "epoch": checkpoint["epoch"],
              "train_seconds": round(sum(h["seconds"] for h in history), 1)}
    if checkpoint.get("activation") == "qcfs":
        record["energy_uj"] = checkpoint["val_energy_uj"]
        record["per_epoch"] = {key: [h[key] for h in history]
                               for key in ("val_accuracy", "val_energy_uj")}
    return record


def schedule_seed(seed, args, tasks, made):
    """Add the tasks of `seed`: its ReLU network, each QCFS network from it, and each one's
    conversions on the test images once it is there; `made(seed, what so far)` after each.
    A conversion already in seed<S>.json is reused when nothing it depends on changed."""
    earlier = studies.read_cache(args.out_dir / f"seed{seed}.json", _seed_file) or {}
    earlier = earlier.get("test", {})
    record = {"validation": {}, "test": {}}
    run = {"data_dir": str(studies.task_path(args.data_dir)), "limit": args.limit,
           "batch_size": options.BATCH_SIZE, "timesteps": args.timesteps,
           "device": args.device}
    relu_argv = studies.training_argv(seed, args, "relu")
    relu = argv_path(relu_argv, "--checkpoint")

    def converted(name, inputs, result):
        record["test"][name] = result | {"run": inputs}
        tasks.say(f"seed {seed}, {name}: {result['snn_accuracy'][0]:.2%} at t = 1, "
                  f"{result['snn_energy_pj'][0] / 1e6:.3f} µJ")
        made(seed, record)

    def network_made(name, path):
        record["validation"][name] = validation_record(path)
        checkpoint, start = load_checkpoint(path), None
        variants = [(GAMMA_L, default_settings(checkpoint))]
        if args.early_exit:
            variants.append((EARLY_EXIT, variants[0][1]._replace(exit_rule=COMPARE_EXIT_RULE)))
        for label, settings in variants:
            key = f"{name}: {label}"
            inputs = {"checkpoint_sha256": studies.sha256(path), "settings": settings._asdict(),
                      "timesteps": args.timesteps, "limit": args.limit,
                      "batch_size": run["batch_size"]}
            result = seeds.cached(earlier, key, inputs, args.out_dir / f"seed{seed}.json",
                                  tasks.say)
            if result is not None:
                record["test"][key] = result
                continue
            start = start or tasks.share(path.read_bytes())
            tasks.add(f"seed {seed}, {key}", "seeds", "convert",
                      (start, str(path), label, settings, run),
                      lambda result, key=key, inputs=inputs: converted(key, inputs, result))
        made(seed, record)

    def relu_made(trained):
        record["relu"] = validation_record(relu)
        for recipe in recipes(args):
            argv = qcfs_argv(seed, recipe, relu, args)
            name, path = recipe.name, argv_path(argv, "--checkpoint")
            studies.network(tasks, f"seed {seed}, {name}", argv, args.retrain or trained,
                            lambda _, name=name, path=path: network_made(name, path),
                            reads=VALIDATION_READS)
    studies.network(tasks, f"seed {seed}, relu", relu_argv, args.retrain, relu_made)
    return relu, record


def _seed_file(table):
    return isinstance(table, dict) and isinstance(table.get("test", {}), dict)


# ----------------------------------------------------------------------------- summary


def stats(values):
    """{per_seed, mean, std} of one value per seed (std: n - 1 in the denominator)."""
    return {"per_seed": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise_validation(seed_list, per_seed, names):
    """Per network: validation accuracy and energy over the seeds, paired against the same
    seed's ReLU network and its network without the penalty; the choice and its rule."""
    table = {}
    for name in names:
        acc = [per_seed[s]["validation"][name]["accuracy"] for s in seed_list]
        energy = [per_seed[s]["validation"][name]["energy_uj"] for s in seed_list]
        relu = [per_seed[s]["relu"]["accuracy"] for s in seed_list]
        base = unpenalised(name)
        table[name] = {
            "accuracy": stats(acc), "energy_uj": stats(energy),
            "minus_relu": stats([a - r for a, r in zip(acc, relu, strict=True)]),
            "minus_unpenalised": {key: stats([v - per_seed[s]["validation"][base][key]
                                              for v, s in zip(values, seed_list, strict=True)])
                                  for key, values in (("accuracy", acc), ("energy_uj", energy))}}
    close = [n for n, e in table.items() if e["minus_relu"]["mean"] >= -MARGIN]
    return {"networks": table,
            "chosen": min(close, key=lambda n: table[n]["energy_uj"]["mean"], default=None),
            "rule": f"the least mean validation energy among the networks within "
                    f"{100 * MARGIN:g} pp of the same seed's ReLU network (paired mean)",
            "front": [name for _, _, name, _ in pareto_front(
                [(e["energy_uj"]["mean"], e["accuracy"]["mean"], n, 1)
                 for n, e in table.items()])]}


def summarise_test(seed_list, per_seed, relu_ann, ann_energy_pj):
    """Per conversion: `seeds._summary` against the same seed's ReLU ANN, per layer SynOps at
    t = 1, and the paired difference to the network without the penalty (accuracy and energy
    per step); whether it meets the target."""
    table = {}
    for key in per_seed[seed_list[0]]["test"]:
        results = [per_seed[s]["test"][key] for s in seed_list]
        entry = seeds._summary(seeds._runs(results), relu_ann)
        entry["synops_by_layer_t1_mean"] = {
            layer: statistics.fmean(r["synops_by_layer"][layer][0] for r in results)
            for layer in results[0]["synops_by_layer"]}
        base = unpenalised(key)
        if base != key and base in per_seed[seed_list[0]]["test"]:
            entry["minus_unpenalised"] = {
                what: dict(zip(("mean", "std"), seeds._stats(
                    [[a - b for a, b in zip(r[what], per_seed[s]["test"][base][what],
                                            strict=True)]
                     for r, s in zip(results, seed_list, strict=True)])[:2], strict=True))
                for what in ("snn_accuracy", "snn_energy_pj")}
        entry["memory"] = energy_models.over_seeds(
            {key: results}, lenet_convert.AT_ANN_LEVEL_KEY).get(key)
        if "early_exit" in results[0]:
            entry["early_exit"] = {k: stats([r["early_exit"][k] for r in results])
                                   for k in ("test_accuracy", "mean_steps", "energy_pj_per_image",
                                             "memory_pj_per_image", "qnn_memory_pj")}
        entry["meets_target_at"] = next(
            (t for t in range(1, min(TARGET_STEPS, len(entry["snn_mean"])) + 1)
             if entry["snn_mean"][t - 1] >= statistics.fmean(relu_ann) - MARGIN
             and entry["energy_pj_mean"][t - 1] <= TARGET_ENERGY * ann_energy_pj), None)
        table[key] = entry
    return table


def front_points(test, levels_study):
    """(energy µJ, accuracy %, name, t) of every conversion of this study at every step, early
    exit as t None; and the points of the levels study's front (name prefixed 'levels study')."""
    points = []
    for key, entry in test.items():
        if "early_exit" in entry:
            exit_ = entry["early_exit"]
            points.append((exit_["energy_pj_per_image"]["mean"] / 1e6,
                           100 * exit_["test_accuracy"]["mean"], key, None))
        else:
            points += [(e / 1e6, 100 * a, key, t) for t, (e, a) in enumerate(
                zip(entry["energy_pj_mean"], entry["snn_mean"], strict=True), 1)]
    old = [(p["energy_uj"], p["accuracy"], f"levels study: {p['name']}", p["t"])
           for p in levels_study]  # already in %
    return points, old


def best_below(front, energy):
    """The best accuracy of a front at no more than `energy` (None below its cheapest point)."""
    return max((a for e, a, _, _ in front if e <= energy), default=None)


def fronts(test, levels_study):
    """The fronts: this study without the penalty, with it, the levels study's, and all of them;
    and along DOMINANCE, each one's best accuracy at that energy."""
    points, old = front_points(test, levels_study)
    plain = [p for p in points if p[2] == unpenalised(p[2])]  # the pairs
    made = {"without the penalty": pareto_front(plain),
            "with the penalty": pareto_front(points),
            "levels study": pareto_front(old),
            BOTH: pareto_front(old + points)}
    grid = [round(DOMINANCE[0] + 0.01 * i, 2)
            for i in range(round((DOMINANCE[1] - DOMINANCE[0]) / 0.01) + 1)]
    along = {name: [best_below(front, e) for e in grid] for name, front in made.items()}
    given = {(f"levels study: {p['name']}", p["t"]): p for p in levels_study}
    return ({name: [given.get((n, t)) or front_point(test[n], n, t, a)
                    for _, a, n, t in front] for name, front in made.items()},
            {"energy_uj": grid} | along)


def front_point(entry, name, t, accuracy):
    """A point of this study's fronts: network `name` after `t` steps (None: early exit), with
    its energies and the SNN's three ratios (by operations and with memory traffic)."""
    if t is None:
        exit_ = entry["early_exit"]
        energy, memory, qnn = (exit_[k]["mean"] for k in (
            "energy_pj_per_image", "memory_pj_per_image", "qnn_memory_pj"))
    else:
        energy, memory = entry["energy_pj_mean"][t - 1], entry["memory_pj_mean"][t - 1]
        qnn = entry["qnn_memory_pj_mean"].get(str(t))
    return with_ratios({"name": name, "t": t, "accuracy": accuracy}, energy, memory, qnn,
                       entry["ann_energy_pj"], entry["ann_memory_pj"])


def table_rows(test):
    rows = []
    for key, entry in test.items():
        for t, (acc, std) in enumerate(zip(entry["snn_mean"], entry["snn_std"], strict=True), 1):
            diff = entry.get("minus_unpenalised")
            rows.append({"conversion": key, "t": t, "accuracy_mean": round(100 * acc, 3),
                         "accuracy_std": round(100 * std, 3),
                         "energy_uj_mean": round(entry["energy_pj_mean"][t - 1] / 1e6, 4),
                         "minus_unpenalised_pp_mean": round(
                             100 * diff["snn_accuracy"]["mean"][t - 1], 3) if diff else None,
                         "minus_unpenalised_pp_std": round(
                             100 * diff["snn_accuracy"]["std"][t - 1], 3) if diff else None})
    return rows


def plot_fronts(study, path):
    """Mean test accuracy against mean energy per image: each network's curve over the steps,
    early exit as crosses, and the fronts."""
    fig, ax = plt.subplots(figsize=(12, 7.5))
    levels = sorted({parse_name(k).levels for k in study["test"]})
    weights = sorted({parse_name(k).weight for k in study["test"]})
    for key, entry in study["test"].items():
        recipe = parse_name(key)  # colour: L and w; the line: the input and the teacher
        colour = plt.get_cmap(("Blues", "Oranges", "Greens", "Purples", "Reds")[
            levels.index(recipe.levels) % 5])(
                0.35 + 0.65 * (weights.index(recipe.weight) + 1) / len(weights))
        line = ("-" if recipe.input_levels is None else "--") if not recipe.distill else ":"
        if "early_exit" in entry:
            exit_ = entry["early_exit"]
            ax.plot(exit_["energy_pj_per_image"]["mean"] / 1e6,
                    100 * exit_["test_accuracy"]["mean"], marker="X", markersize=10,
                    color=colour, markeredgecolor="k", linestyle="none", label=key)
            continue
        energy = [e / 1e6 for e in entry["energy_pj_mean"]]
        ax.plot(energy, [100 * a for a in entry["snn_mean"]], marker=".", color=colour, label=key,
                linestyle=line)
        ax.annotate("t=1", (energy[0], 100 * entry["snn_mean"][0]), fontsize=6,
                    xytext=(2, -8), textcoords="offset points")
    given = study["front_file"]  # the front of "levels study": --front's
    styles = {"levels study": ("tab:gray", "--", f"front of {given}"),
              "without the penalty": ("k", ":", "front: the pairs (w = 0, analog, no teacher)"),
              BOTH: ("k", "-", f"front: {given}'s and this study's")}
    for name, (colour, line, label) in styles.items():
        front = study["fronts"][name]
        ax.plot([p["energy_uj"] for p in front], [p["accuracy"] for p in front], color=colour,
                linestyle=line, linewidth=2, alpha=0.6, drawstyle="steps-post", zorder=0,
                label=label)
    relu, ann_uj = study["relu_ann_accuracy"], study["ann_energy_pj"] / 1e6
    ax.axhline(100 * (relu["mean"] - MARGIN), color="tab:red", linewidth=1,
               label=f"ReLU ANN's mean - {100 * MARGIN:g} pp")
    ax.axvline(TARGET_ENERGY * ann_uj, color="tab:red", linestyle="--", linewidth=1,
               label=f"{TARGET_ENERGY:g} × the ANN's {ann_uj:.2f} µJ")
    ax.plot(ann_uj, 100 * relu["mean"], marker="*", markersize=15, color="gold",
            markeredgecolor="k", linestyle="none", label="ReLU ANN (mean)")
    ax.set_xscale("log")
    ax.set_xticks([0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.2, 1.5, 2, 3, 4])
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax.set_xlabel("estimated energy per image, mean over the seeds (µJ; memory traffic ignored)")
    ax.set_ylabel("test accuracy, mean over the seeds (%)")
    ax.set_xlim(right=1.1 * ann_uj)  # beyond the ANN's energy the SNN has no case
    ax.set_ylim(100 * relu["mean"] - 0.8, 100 * relu["mean"] + 0.3)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.set_title(f"QCFS networks trained with an energy weight w (µJ⁻¹): {len(study['seeds'])} "
                 f"seeds, {study['test_images']} test images, each curve t = 1 .. "
                 f"{study['timesteps']}, gamma = L", fontsize=10)
    save_figure(fig, path)


def print_study(study):
    val = study["validation"]
    print(f"validation over seeds {study['seeds']}: accuracy (%) and µJ per image at "
          "t = 1 (gamma = L), minus the ReLU network and minus w = 0 (same seed, pp and µJ)")
    for name, e in val["networks"].items():
        diff = e["minus_unpenalised"]
        print(f"{name:14s} {100 * e['accuracy']['mean']:6.2f} ± {100 * e['accuracy']['std']:.2f}"
              f"  {e['energy_uj']['mean']:.3f} ± {e['energy_uj']['std']:.3f} µJ"
              f"  {100 * e['minus_relu']['mean']:+.2f} ± {100 * e['minus_relu']['std']:.2f}"
              f"  {100 * diff['accuracy']['mean']:+.2f} ± {100 * diff['accuracy']['std']:.2f}"
              f"  {diff['energy_uj']['mean']:+.3f} µJ")
    print(f"chosen on validation: {val['chosen']} ({val['rule']}); front: {val['front']}")
    relu = study["relu_ann_accuracy"]
    print(f"test over seeds {study['seeds']}: ReLU ANN {100 * relu['mean']:.2f} ± "
          f"{100 * relu['std']:.2f} %, ANN {study['ann_energy_pj'] / 1e6:.2f} µJ; accuracy at "
          "t = 1, 2 and µJ at t = 1, minus w = 0 at t = 1 (pp)")
    for key, e in study["test"].items():
        if "early_exit" in e:
            x = e["early_exit"]
            print(f"{key:28s} {100 * x['test_accuracy']['mean']:.2f} ± "
                  f"{100 * x['test_accuracy']['std']:.2f} % at {x['mean_steps']['mean']:.2f} ± "
                  f"{x['mean_steps']['std']:.2f} steps, "
                  f"{x['energy_pj_per_image']['mean'] / 1e6:.3f} µJ")
            continue
        diff = e.get("minus_unpenalised")
        print(f"{key:28s}" + "".join(f" {100 * e['snn_mean'][t]:6.2f} ± {100 * e['snn_std'][t]:.2f}"
                                     for t in range(min(2, len(e["snn_mean"]))))
              + f"  {e['energy_pj_mean'][0] / 1e6:.3f} µJ"
              + (f"  {100 * diff['snn_accuracy']['mean'][0]:+.2f} ± "
                 f"{100 * diff['snn_accuracy']['std'][0]:.2f}" if diff else "")
              + (f"  meets the target at t = {e['meets_target_at']}" if e["meets_target_at"]
                 else ""))
    print(energy_models.over_seeds_text({key: e["memory"] for key, e in study["test"].items()
                                         if e.get("memory")}))


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = studies.study_parser(__doc__, SEEDS, OUT_DIR)
    parser.add_argument("--levels", type=positive_int(MAX_LEVELS), nargs="+",
                        default=list(LEVELS), help="QCFS levels L")
    parser.add_argument("--weights", type=cli.float_in(0, MAX_ENERGY_WEIGHT), nargs="+",
                        default=list(WEIGHTS), help="energy weights W (lenet5.py --energy-weight)")
    parser.add_argument("--input-levels", type=lenet5.input_levels_arg, nargs="+",
                        default=[lenet5.ANALOG],
                        metavar="L_IN", help="the image each network trains on and its SNN "
                        "takes: analog, or as spikes of L_in levels (lenet5.py --input-levels)")
    parser.add_argument("--distill", type=cli.float_in(0, MAX_DISTILL_WEIGHT), nargs="+",
                        default=[0.0], metavar="A", help="weights of distillation from the "
                        "seed's ReLU network (lenet5.py --teacher --distill-weight); 0: none")
    parser.add_argument("--temperature", type=cli.float_in(MIN_TEMPERATURE, MAX_TEMPERATURE),
                        default=lenet5.TEMPERATURE, help="distillation's temperature")
    parser.add_argument("--fine-tune-epochs", type=positive_int(lenet5.MAX_EPOCHS),
                        default=FINE_TUNE_EPOCHS,
                        help="epochs of each QCFS network (--epochs: the ReLU network's)")
    parser.add_argument("--timesteps", type=positive_int(options.MAX_TIMESTEPS),
                        default=TIMESTEPS, help="simulation steps T on the test images")
    parser.add_argument("--limit", type=positive_int(TEST_IMAGES), default=None, metavar="N",
                        help="simulate the first N test images only (default: all 10,000)")
    parser.add_argument("--early-exit", action="store_true",
                        help=f"also simulate each network with early exit ({COMPARE_EXIT_RULE} "
                             "rule, chosen on validation)")
    parser.add_argument("--front", type=cli.path_arg, default=LEVELS_FRONT,
                        help="a seeds.json of bench/seeds.py, or an energy.json of this "
                             "study, whose accuracy-energy front is drawn and compared (of an "
                             "energy.json: the front of both studies there); by default the "
                             "levels study's")
    args = studies.parse_study_args(parser, argv)
    args.input_levels = [None if n == lenet5.ANALOG else n for n in args.input_levels]
    try:
        args.levels_front = levels_front(args.front)
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"argument --front: no front of bench/seeds.py or of this study in "
                     f"{args.front} ({e})")
    return args


FRONT = [{  # what is read of each point; t: 0 for the ANN, None early exit
    "name": lambda v: isinstance(v, str), "t": seeds.STEP._replace(lowest=0, empty=True),
    "energy_uj": seeds.AMOUNT, "accuracy": cli.Number(0, 100)}]


def levels_front(path):
    """The front of a seeds.json (its pareto_front) or of an energy.json (its fronts[BOTH]):
    [{name, t, energy_uj, accuracy}], every point checked (FRONT) before any task runs."""
    study = json.loads(Path(path).read_text())
    front = study.get("pareto_front", study.get("fronts", {}).get(BOTH)) if isinstance(
        study, dict) and isinstance(study.get("fronts", {}), dict) else None
    if not cli.conforms(front, FRONT):
        raise ValueError("its front is not a list of points with a name, a step t, energy_uj "
                         "and an accuracy in %")
    return front


def relu_test_accuracy(paths, data_dir, limit):
    """Each ReLU network's ANN accuracy on the test images the conversions use."""
    images, labels = load_mnist(data_dir, train=False)
    batches = Batches(images[:limit], labels[:limit], batch_size=1000)
    return [lenet5.evaluate(lenet_convert.load_ann(p, "cpu")[1], batches, "cpu") for p in paths]


def main(argv=None):
    args = parse_args(argv)

    def body():
        images = args.limit or TEST_IMAGES
        tasks = studies.start(args, [f"seed{s}.json" for s in args.seeds] + list(OUTPUTS),
                              args.checkpoint_dir / "energy", (
                                  args.timesteps, options.BATCH_SIZE, images,
                                  args.early_exit * (images + lenet5.VAL_SIZE)))

        def made(seed, record):
            write_json(args.out_dir / f"seed{seed}.json", record)
        scheduled = {seed: schedule_seed(seed, args, tasks, made) for seed in args.seeds}
        tasks.run()
        names = [recipe.name for recipe in recipes(args)]
        per_seed = {}
        for seed, (_, record) in scheduled.items():  # in the order of the plan
            per_seed[seed] = record | {
                "validation": {n: record["validation"][n] for n in names},
                "test": {k: record["test"][k] for n in names for k in (
                    f"{n}: {GAMMA_L}", f"{n}: {EARLY_EXIT}") if k in record["test"]}}
        relu = relu_test_accuracy([p for p, _ in scheduled.values()], args.data_dir, args.limit)
        ann_pj = next(iter(per_seed[args.seeds[0]]["test"].values()))["ann_energy_pj"]
        test = summarise_test(args.seeds, per_seed, relu, ann_pj)
        study = {"seeds": args.seeds, "levels": args.levels, "weights": args.weights,
                 "input_levels": args.input_levels, "distill": args.distill,
                 "front_file": str(studies.task_path(args.front)),
                 "temperature": args.temperature,
                 "fine_tune_epochs": args.fine_tune_epochs, "timesteps": args.timesteps,
                 "test_images": args.limit or TEST_IMAGES, "relu_ann_accuracy": stats(relu),
                 "ann_energy_pj": ann_pj,
                 "validation": summarise_validation(args.seeds, per_seed, names),
                 "test": test, "per_seed": per_seed, "threads": args.threads,
                 "task_seconds": tasks.seconds}
        study["fronts"], study["dominance"] = fronts(test, args.levels_front)
        with cli.file_set(args.out_dir) as files:
            json_file, csv_file, figure = (files.path(name) for name in OUTPUTS)
            write_json(json_file, study)
            write_csv(csv_file, table_rows(test))
            plot_fronts(study, figure)
        print_study(study)
        print(f"wrote {cli.and_list(OUTPUTS)} in {args.out_dir}")
        return study

    return cli.run("energy.py", body, lambda: studies.kept(args))


if __name__ == "__main__":
    main()
