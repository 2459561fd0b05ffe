"""How much the results move between seeds: train, convert and compare over several seeds.

For each seed: train the ReLU LeNet5 (`lenet5.py --seed S`) and, from it, a QCFS network for
each of --levels (`lenet5.py --activation qcfs --levels L --init-from ...`), reusing a
checkpoint already in --checkpoint-dir when it was made with the same arguments; convert the
ReLU network with the default settings, with every knob of `lenet_convert.py --compare` changed
alone and with BrainCog's reference setting; the QCFS network of the default levels with its
default settings, the other burst limits of compare mode and early exit; and every other level
with its default settings, gamma = 2 and gamma = L. A conversion already in an earlier
seed<S>.json is reused when nothing it depends on changed (checkpoint file, settings, T, test
images, batch size; not the code: after changing what a conversion computes, delete those
files). Then summarise: the mean, standard deviation (n - 1 in the denominator), minimum and
maximum over the seeds of each accuracy; for each knob the paired difference to the default
(same seed, same network), which removes the seed-to-seed spread that the networks themselves
have; for each level, how soon it comes within 0.1 and 0.05 pp of the same seed's ReLU ANN and
at what energy, paired against the default level; and for early exit its accuracy, mean steps
and time against fixed T.

Every training and every conversion is a task (`studies.py`): on a local Ray by default, one
per core, or on the Ray cluster at --address; --workers 0 runs them one after another in this
process, without Ray. A QCFS network starts once its ReLU network is there, a conversion once
its network is; the results do not depend on where or in which order the tasks ran.

Example:
    pip install -r requirements-study.txt             # Ray, besides the project's requirements
    python bench/seeds.py --seeds 1 2 3 4 5           # hours on 2 CPU cores (docs/results.md)
    python bench/seeds.py --seeds 1 2 --limit-train 1000 --epochs 2 --limit 500   # a quick look
    python bench/seeds.py --address 10.0.0.1:6379     # on a Ray cluster started by 'ray start'

Writes (into --out-dir, default results/seeds/):
    seed<S>.json       every conversion of one seed, rewritten as each one is done
    seeds.json         the runs, their summary, the paired differences, the levels, the
                       energies with memory traffic and the fronts (bench/fronts.py)
    seeds.csv          one row per network (or knob) and step
    seeds.png          accuracy per step (mean, +-1 std, min-max) and the paired differences
    seeds_energy.png   mean accuracy against mean energy per image of every network and
                       conversion, by operations only and with memory traffic, the points no
                       other beats on both joined
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/seeds.py
import cli  # noqa: E402  (first: see its docstring)

# isort: split
import math  # noqa: E402
import statistics  # noqa: E402

import fronts  # noqa: E402
import studies  # noqa: E402
from fronts import RELU, RELU_BRAINCOG  # noqa: E402
from studies import argv_path, training_argv  # noqa: E402

import early_exit  # noqa: E402
import energy_models  # noqa: E402
import lenet5  # noqa: E402
import options  # noqa: E402
from checkpoint import MAX_LEVELS, OUTPUT_LAYER, load_checkpoint  # noqa: E402
from cli import Number, is_number, positive_int, write_csv, write_json  # noqa: E402
from compare import BRAINCOG, GIVEN, compare_settings, run_all  # noqa: E402
from lenet_convert import (  # noqa: E402
    AT_ANN_LEVEL_KEY,
    Conversion,
    at_ann_level,
    first_step_within,
    load_ann,
)
from mnist import TEST_IMAGES  # noqa: E402
from options import EXIT_RULES, MAX_GAMMA, MAX_TIMESTEPS, Settings, default_settings  # noqa: E402
from plots import plt, report_steps, save_figure, step_axis  # noqa: E402

# ----------------------------------------------------------------------------- defaults
SEEDS = (1, 2, 3, 4, 5)
LEVELS = (2, 4, 8, 16)  # QCFS networks trained and converted for the levels trade-off
OUT_DIR = Path("results/seeds")
MARGINS = (0.001, 0.0005)  # "within 0.1 and 0.05 pp of the ReLU ANN"
OUTPUTS = ("seeds.json", "seeds.csv", "seeds.png", "seeds_energy.png")  # written as one set

QCFS = "qcfs"  # the networks summarised: RELU, RELU_BRAINCOG and this

# What a cached conversion (a seed<S>.json entry, `convert`'s result and how it was run) must
# hold, all the way down, to be reused: every field the study reads, of its kind and range.
FRACTION, AMOUNT = Number(0, 1), Number(0, math.inf)  # an accuracy; SynOps, pJ, seconds
STEP, IMAGES = Number(1, MAX_TIMESTEPS, integer=True), Number(1, TEST_IMAGES, integer=True)
PER_LAYER = lambda v: isinstance(v, dict) and all(AMOUNT(x) for x in v.values())  # noqa: E731
CACHED = {
    "run": {"checkpoint_sha256": lambda v: isinstance(v, str),
            "settings": lambda v: isinstance(v, dict) and set(v) <= set(Settings._fields),
            "timesteps": STEP, "limit": IMAGES._replace(empty=True), "batch_size": IMAGES},
    "settings": {"gamma": Number(1, MAX_GAMMA, integer=True), "exit_rule": EXIT_RULES.__contains__,
                 "levels": Number(1, MAX_LEVELS, integer=True, empty=True)},
    "ann_accuracy": FRACTION, "snn_accuracy": [FRACTION], "ann_energy_pj": AMOUNT,
    "snn_energy_pj": [AMOUNT], AT_ANN_LEVEL_KEY: STEP._replace(empty=True),
    "energy_pj_at_ann_level": AMOUNT._replace(empty=True), "test_images": IMAGES,
    "checkpoint": lambda v: isinstance(v, str),
    "synops_by_layer": lambda v: isinstance(v, dict) and all(
        cli.conforms(x, [AMOUNT]) for x in v.values()),
    "energy_models": {"snn_memory_pj": [AMOUNT], "ann_memory_pj": AMOUNT,
                      "snn_over_ann_compute": [AMOUNT], "snn_over_ann_memory": [AMOUNT],
                      "qnn": [{"t": STEP, "memory_pj": AMOUNT, "snn_over_qnn_memory": AMOUNT,
                               "spike_rate": AMOUNT,
                               "break_even_spike_rate": AMOUNT._replace(empty=True),
                               **dict.fromkeys(("memory_by_layer_pj", "snn_memory_by_layer_pj",
                                                "break_even_factor_by_layer"), PER_LAYER)}]},
}
CACHED_EARLY_EXIT = dict.fromkeys(early_exit.SUMMARY_KEYS, AMOUNT) | {
    "deadline": STEP, "fixed_timesteps": STEP, "mean_steps": Number(1, MAX_TIMESTEPS),
    "fixed_seconds": lambda v: is_number(v) and v > 0} | dict.fromkeys(
    ("validation_accuracy", "validation_ann_accuracy", "test_accuracy", "fixed_accuracy"),
    FRACTION)


# ----------------------------------------------------------------------------- one seed


def qcfs_prefix(levels):
    """The prefix of the names of a QCFS network's conversions in a seed's results."""
    return f"qcfs L={levels}: "


def network_plan(levels, checkpoint):
    """The conversions of one network of a seed (`levels` None: the ReLU one), the default first:
    {name in the seed's results: (label, Settings)}."""
    settings = default_settings(checkpoint)
    recorded = list(checkpoint["percentiles"][OUTPUT_LAYER])
    if levels in (None, lenet5.LEVELS):  # every knob, or the QCFS ones
        variants = compare_settings(settings, recorded, every_knob=levels is None)
    else:  # the levels trade-off: the default conversion, gamma = 2 and gamma = L
        variants = [(GIVEN, settings)] + [(f"γ = {gamma}", settings._replace(gamma=gamma))
                                          for gamma in dict.fromkeys((2, levels))
                                          if gamma != settings.gamma]
    prefix = "" if levels is None else qcfs_prefix(levels)
    return {prefix + label: (label, variant) for label, variant in variants}


def convert(start, path, label, settings, run):
    """A task: convert the checkpoint bytes `start` (the file `path`, as the result names it)
    with `settings` and simulate it as `run` says (data_dir, limit, batch_size, timesteps,
    device); what the study keeps of the result."""
    path = Path(path)
    data_dir, device = studies.on_this_node(run["data_dir"]), cli.resolve_device(run["device"])
    with studies.checkpoint_files({path.name: start}) as (_, files):
        checkpoint, ann = load_ann(files[path.name], device, data_dir)
        (result,) = run_all([(label, Conversion(path, checkpoint, ann, settings))], data_dir,
                            run["limit"], run["batch_size"], run["timesteps"], device)
    kept = {key: result[key] for key in ("ann_accuracy", "snn_accuracy", AT_ANN_LEVEL_KEY,
                                         "settings", "checkpoint", "test_images")}
    kept |= {"energy_pj_at_ann_level": (at_ann_level(result) or (None,) * 3)[2],
             "snn_energy_pj": result["efficiency"]["snn_energy_pj"],
             "synops_by_layer": result["efficiency"]["synops_by_layer"],
             "ann_energy_pj": result["efficiency"]["ann_energy_pj"]}
    if "energy_models" in result:  # with memory traffic, against the QNN (not early exit's)
        kept["energy_models"] = {k: v for k, v in result["energy_models"].items() if k != "table"}
    if "early_exit" in result:
        kept["early_exit"] = {key: result["early_exit"][key] for key in early_exit.SUMMARY_KEYS}
    return kept


def schedule_seed(seed, args, tasks, made):
    """Add the tasks of `seed`: its ReLU network, a QCFS network of each of args.levels from it,
    and each network's conversions (`network_plan`) once the network is there. `made(seed,
    {name: result})` after each conversion, with the seed's results so far in the plan's order;
    returns the function that gives those.

    A conversion already in the seed's earlier seed<S>.json is reused when its checkpoint file,
    settings, steps, test images and batch size are the same.
    """
    earlier = studies.read_cache(args.out_dir / f"seed{seed}.json", _conversions) or {}
    networks, plans, results = [None, *args.levels], {}, {}
    run = {"data_dir": str(studies.task_path(args.data_dir)), "limit": args.limit,
           "batch_size": args.batch_size, "timesteps": args.timesteps, "device": args.device}

    def so_far():
        return {name: results[name] for levels in networks for name in plans.get(levels, ())
                if name in results}

    def converted(name, inputs, result):
        results[name] = result | {"run": inputs}
        tasks.say(f"seed {seed}, {name}: simulated, {result['snn_accuracy'][-1]:.2%} after "
                  f"{args.timesteps} steps (ANN {result['ann_accuracy']:.2%})")
        made(seed, so_far())

    def network_made(levels, path):
        plans[levels] = network_plan(levels, load_checkpoint(path))
        fingerprint, start, reused = studies.sha256(path), None, 0
        for name, (label, settings) in plans[levels].items():
            inputs = {"checkpoint_sha256": fingerprint, "settings": settings._asdict(),
                      "timesteps": args.timesteps, "limit": args.limit,
                      "batch_size": args.batch_size}  # what a conversion's result depends on
            result = cached(earlier, name, inputs, args.out_dir / f"seed{seed}.json", tasks.say)
            if result is not None:
                results[name] = result
                reused += 1
                continue
            start = start or tasks.share(path.read_bytes())
            tasks.add(f"seed {seed}, {name}", "seeds", "convert",
                      (start, str(path), label, settings, run),
                      lambda result, name=name, inputs=inputs: converted(name, inputs, result))
        if reused:
            tasks.say(f"seed {seed}: reusing {reused} conversions of {path} from "
                      f"{args.out_dir}/seed{seed}.json")

    relu_argv = training_argv(seed, args, "relu")
    relu_path = argv_path(relu_argv, "--checkpoint")

    def relu_made(trained):
        network_made(None, relu_path)
        for levels in args.levels:
            argv = training_argv(seed, args, "qcfs", relu_path, levels)
            path = argv_path(argv, "--checkpoint")
            studies.network(tasks, f"seed {seed}, qcfs L={levels}", argv, args.retrain or trained,
                            lambda _, levels=levels, path=path: network_made(levels, path))
    studies.network(tasks, f"seed {seed}, relu", relu_argv, args.retrain, relu_made)
    return so_far


def _conversions(table):
    """A seed<S>.json: {name: a conversion's result}."""
    return isinstance(table, dict)


def _same_run(earlier, inputs):
    """Whether an earlier result was run with `inputs`; a setting added since was at its default."""
    run = earlier["run"]
    return run | {"settings": Settings._field_defaults | run.get("settings", {})} == inputs


def _result(entry):
    """Whether a cached conversion holds what `convert` makes and the study reads (CACHED), all
    the way down: one value per step wherever there are steps, early exit where it ran."""
    if not cli.conforms(entry, CACHED):
        return False
    steps = entry["run"]["timesteps"]
    models = entry["energy_models"]
    per_step = [entry["snn_accuracy"], entry["snn_energy_pj"], *entry["synops_by_layer"].values(),
                *(models[key] for key in ("snn_memory_pj", "snn_over_ann_compute",
                                          "snn_over_ann_memory"))]
    exits = entry["settings"]["exit_rule"] != "none"
    return (all(len(values) == steps for values in per_step)
            and {1, entry[AT_ANN_LEVEL_KEY] or 1} <= {q["t"] for q in models["qnn"]}
            and (entry[AT_ANN_LEVEL_KEY] or 0) <= steps and exits == ("early_exit" in entry)
            and (not exits or cli.conforms(entry["early_exit"], CACHED_EARLY_EXIT)))


def cached(earlier, name, inputs, where, say):
    """The earlier result of conversion `name` (from the seed<S>.json at `where`) if it reads as
    this study writes it and was run with `inputs`; else None (`say`ing so if it was spoiled):
    it is simulated again."""
    if name not in earlier:
        return None
    if not _result(earlier[name]):
        say(f"{where}: {name!r} does not read as this study writes it: simulating it again")
        return None
    return earlier[name] if _same_run(earlier[name], inputs) else None


# ----------------------------------------------------------------------------- summary

NAMES = {RELU: GIVEN, RELU_BRAINCOG: BRAINCOG,  # name: run of a seed
         QCFS: qcfs_prefix(lenet5.LEVELS) + GIVEN}


def _stats(rows):
    """Per step: (mean, std, min, max) over the rows (one per seed)."""
    columns = list(zip(*rows, strict=True))
    std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    return ([statistics.fmean(c) for c in columns], std, [min(c) for c in columns],
            [max(c) for c in columns])


def summarise(seeds, per_seed, timesteps):
    """seeds.json's content from {seed: the seed's results by name (schedule_seed)}."""
    runs = {name: _runs([per_seed[s][label] for s in seeds]) for name, label in NAMES.items()}
    summary = {name: _summary(run) for name, run in runs.items()}
    paired = {}
    for knob in per_seed[seeds[0]]:
        base = knob.rpartition(": ")[0] + (": " if ": " in knob else "") + GIVEN
        if knob == base:
            continue
        diffs = [[a - b for a, b in zip(per_seed[s][knob]["snn_accuracy"],
                                        per_seed[s][base]["snn_accuracy"], strict=True)]
                 for s in seeds]
        mean, std, low, high = _stats(diffs)
        paired[knob] = {"against": base, "per_seed": diffs, "mean": mean, "std": std,
                        "min": low, "max": high}
    exits = {}
    for knob, result in per_seed[seeds[0]].items():
        if "early_exit" in result:
            records = [per_seed[s][knob]["early_exit"] for s in seeds]
            rows = {key: [r[key] for r in records] for key in early_exit.SUMMARY_KEYS} | {
                "time_ratio": [r["seconds"] / r["fixed_seconds"] for r in records]}
            exits[knob] = {key: {"per_seed": values} | dict(zip(
                ("mean", "std", "min", "max"), (v[0] for v in _stats([[x] for x in values])),
                strict=True)) for key, values in rows.items()}
    test_images = per_seed[seeds[0]][GIVEN]["test_images"]
    return {"seeds": list(seeds), "timesteps": timesteps, "test_images": test_images,
            "runs": runs, "summary": summary, "paired": paired, "early_exit": exits,
            "levels": levels_summary(seeds, per_seed), "memory": energy_models.over_seeds(
                {n: [per_seed[s][x] for s in seeds] for n, x in NAMES.items()}, AT_ANN_LEVEL_KEY),
            "std": "sample standard deviation over the seeds (n - 1)"}


def _runs(results):
    """One network's results over the seeds, key by key."""
    return {"ann": [r["ann_accuracy"] for r in results],
            "snn": [r["snn_accuracy"] for r in results],
            "energy_pj": [r["snn_energy_pj"] for r in results],
            "ann_energy_pj": [r["ann_energy_pj"] for r in results],
            AT_ANN_LEVEL_KEY: [r[AT_ANN_LEVEL_KEY] for r in results],
            "energy_pj_at_ann_level": [r["energy_pj_at_ann_level"] for r in results],
            "memory_pj": [r["energy_models"]["snn_memory_pj"] for r in results],
            "ann_memory_pj": [r["energy_models"]["ann_memory_pj"] for r in results],
            "qnn_memory_pj": [{str(q["t"]): q["memory_pj"] for q in r["energy_models"]["qnn"]}
                              for r in results]}


def _summary(run, relu_ann=None):
    """Mean, std, min and max over the seeds of `run` (see `_runs`); with the ReLU ANN's
    accuracy of each seed, also the first step within each of MARGINS of it, and its energy."""
    mean, std, low, high = _stats(run["snn"])
    (ann_mean,), (ann_std,), _, _ = _stats([[a] for a in run["ann"]])
    summary = {"ann_mean": ann_mean, "ann_std": ann_std, "snn_mean": mean, "snn_std": std,
               "snn_min": low, "snn_max": high, "energy_pj_mean": _stats(run["energy_pj"])[0],
               "ann_energy_pj": run["ann_energy_pj"][0], "memory_pj_mean": _stats(
                   run["memory_pj"])[0], "ann_memory_pj": statistics.fmean(run["ann_memory_pj"]),
               "qnn_memory_pj_mean": {t: statistics.fmean(q[t] for q in run["qnn_memory_pj"])
                                      for t in run["qnn_memory_pj"][0]
                                      if all(t in q for q in run["qnn_memory_pj"])}}
    reached = {AT_ANN_LEVEL_KEY: run[AT_ANN_LEVEL_KEY],
               "energy_pj_at_ann_level": run["energy_pj_at_ann_level"]}
    for margin in MARGINS if relu_ann else ():
        steps = [first_step_within(snn, ann, margin)
                 for snn, ann in zip(run["snn"], relu_ann, strict=True)]
        key = f"first_step_within_{100 * margin:g}pp_of_relu_ann"
        reached[key] = steps
        reached[f"energy_pj_there_{100 * margin:g}pp"] = [
            energy[t - 1] if t else None for t, energy in zip(steps, run["energy_pj"],
                                                             strict=True)]
    for key, values in reached.items():
        summary[key] = values
        if None not in values:  # else some seed never got there: no mean to give
            (value_mean,), (value_std,), _, _ = _stats([[v] for v in values])
            summary |= {f"{key}_mean": value_mean, f"{key}_std": value_std}
    return summary


def levels_summary(seeds, per_seed):
    """For each QCFS level and each of its gamma rules (gamma = 2, gamma = L): `_summary` against
    the same seed's ReLU ANN, and the difference to the default level with the same rule."""
    relu_ann = [per_seed[s][GIVEN]["ann_accuracy"] for s in seeds]
    names = {}  # (levels, rule): the run's name in per_seed
    for name, result in per_seed[seeds[0]].items():
        levels = result["settings"].get("levels")
        if name.startswith("qcfs L=") and "early_exit" not in result:
            gamma = result["settings"]["gamma"]
            for rule in [r for r, g in (("gamma = 2", 2), ("gamma = L", levels)) if g == gamma]:
                names.setdefault((levels, rule), name)
    table = {}
    for (levels, rule), name in sorted(names.items()):
        run = _runs([per_seed[s][name] for s in seeds])
        entry = {"run": name} | _summary(run, relu_ann)
        base = names.get((lenet5.LEVELS, rule))
        if base:
            ann = [per_seed[s][name]["ann_accuracy"] - per_seed[s][base]["ann_accuracy"]
                   for s in seeds]
            snn = [[a - b for a, b in zip(per_seed[s][name]["snn_accuracy"],
                                          per_seed[s][base]["snn_accuracy"], strict=True)]
                   for s in seeds]
            entry["minus_default_levels"] = {"ann": ann, "ann_mean": statistics.fmean(ann),
                                             "ann_std": _stats([[a] for a in ann])[1][0],
                                             "snn_mean": _stats(snn)[0],
                                             "snn_std": _stats(snn)[1]}
        table.setdefault(f"L={levels}", {})[rule] = entry
    return table


def table_rows(study):
    rows = []
    levels = {f"qcfs {levels}, {rule}": entry for levels, rules in study["levels"].items()
              for rule, entry in rules.items()}
    for kind, entries in (("accuracy", study["summary"] | levels),
                          ("paired difference", study["paired"])):
        for name, entry in entries.items():
            prefix = "snn_" if kind == "accuracy" else ""
            for t in range(study["timesteps"]):
                row = {"kind": kind, "name": name, "t": t + 1}
                row |= {stat: round(100 * entry[prefix + stat][t], 3)
                        for stat in ("mean", "std", "min", "max")}
                if kind == "accuracy":
                    row |= {"ann_mean": round(100 * entry["ann_mean"], 3),
                            "ann_std": round(100 * entry["ann_std"], 3)}
                else:
                    row |= {"ann_mean": None, "ann_std": None}
                rows.append(row)
    return rows


def plot_study(study, path):
    """Accuracy per step of each network over the seeds; the paired differences of each knob."""
    steps = range(1, study["timesteps"] + 1)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    colours = dict(zip(study["summary"], ("tab:blue", "tab:gray", "tab:green"), strict=True))
    for name, entry in study["summary"].items():
        colour = colours[name]
        mean = [100 * m for m in entry["snn_mean"]]
        std = [100 * s for s in entry["snn_std"]]
        axes[0].fill_between(steps, [100 * m for m in entry["snn_min"]],
                             [100 * m for m in entry["snn_max"]], color=colour, alpha=0.12)
        axes[0].fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                             [m + s for m, s in zip(mean, std, strict=True)], color=colour,
                             alpha=0.3)
        axes[0].plot(steps, mean, color=colour, marker=".", markersize=3,
                     label=f"{name} (ANN {100 * entry['ann_mean']:.2f} ± "
                           f"{100 * entry['ann_std']:.2f} %)")
        ann, ann_std = 100 * entry["ann_mean"], 100 * entry["ann_std"]
        axes[0].axhspan(ann - ann_std, ann + ann_std, color=colour, alpha=0.15)
        axes[0].axhline(ann, color=colour, linestyle=":", linewidth=1)
    step_axis(axes[0], study["timesteps"])
    top = 100 * max(e["ann_mean"] for e in study["summary"].values())
    axes[0].set_ylim(top - 4, min(100, top + 0.6))
    axes[0].set_ylabel("test accuracy after t steps (%)")
    axes[0].set_title("mean over seeds; bands: ±1 std and min–max; "
                      "horizontal: each ANN's mean ± std", fontsize=9)
    axes[0].legend(loc="lower right", fontsize=8)
    shown = {k: e for k, e in study["paired"].items()  # the knobs, not the levels trade-off
             if ": " not in k or k.startswith(qcfs_prefix(lenet5.LEVELS))}
    for i, (knob, entry) in enumerate(shown.items()):
        colour = plt.cm.tab20(i % 20)
        mean = [100 * m for m in entry["mean"]]
        std = [100 * s for s in entry["std"]]
        axes[1].fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                             [m + s for m, s in zip(mean, std, strict=True)], color=colour,
                             alpha=0.2)
        axes[1].plot(steps, mean, color=colour, label=knob)
    axes[1].axhline(0, color="k", linewidth=1)
    step_axis(axes[1], study["timesteps"])
    axes[1].set_ylim(-3, 2)
    axes[1].set_ylabel("accuracy minus the default's, same seed (pp)")
    axes[1].set_title("paired differences: mean ± 1 std over seeds (clipped to [-3, 2] pp)",
                      fontsize=9)
    axes[1].legend(loc="lower right", fontsize=7, ncol=2)
    fig.suptitle(f"LeNet5 SNN over {len(study['seeds'])} seeds "
                 f"({', '.join(map(str, study['seeds']))}), {study['test_images']} MNIST test "
                 f"images, T = {study['timesteps']}", fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = studies.study_parser(__doc__, SEEDS, OUT_DIR)
    parser.add_argument("--levels", type=positive_int(MAX_LEVELS), nargs="+",
                        default=list(LEVELS),
                        help="QCFS levels L to train and convert (lenet5.py's default among "
                             f"them: {lenet5.LEVELS})")
    parser.add_argument("--timesteps", type=positive_int(options.MAX_TIMESTEPS),
                        default=options.TIMESTEPS,
                        help="simulation steps T")
    parser.add_argument("--batch-size", type=positive_int(TEST_IMAGES),
                        default=options.BATCH_SIZE,
                        help="test images simulated at once")
    parser.add_argument("--limit", type=positive_int(TEST_IMAGES), default=None, metavar="N",
                        help="simulate the first N test images only (default: all 10,000)")
    args = studies.parse_study_args(parser, argv)
    if lenet5.LEVELS not in args.levels:
        parser.error(f"argument --levels: must include lenet5.py's default, {lenet5.LEVELS}")
    return args


def main(argv=None):
    args = parse_args(argv)

    def body():
        images = args.limit or TEST_IMAGES  # and the compare plans' early exit, on validation
        tasks = studies.start(args, [f"seed{s}.json" for s in args.seeds] + list(OUTPUTS),
                              args.checkpoint_dir, (args.timesteps, args.batch_size, images,
                                                    images + lenet5.VAL_SIZE))

        def made(seed, results):
            write_json(args.out_dir / f"seed{seed}.json", results)
        results = {seed: schedule_seed(seed, args, tasks, made) for seed in args.seeds}
        tasks.run()
        study = summarise(args.seeds, {seed: results[seed]() for seed in args.seeds},
                          args.timesteps) | {"threads": args.threads,
                                             "task_seconds": tasks.seconds}
        made = fronts.fronts(study)
        study["pareto_front"], study["memory_pareto_front"] = made["operations"], made["memory"]
        with cli.file_set(args.out_dir) as files:
            json_file, csv_file, figure, energy_figure = (files.path(name) for name in OUTPUTS)
            write_json(json_file, study)
            write_csv(csv_file, table_rows(study))
            plot_study(study, figure)
            fronts.plot_energy(study, energy_figure)
        print_summary(study)
        print(f"wrote {cli.and_list(OUTPUTS)} in {args.out_dir}")
        return study

    return cli.run("seeds.py", body, lambda: studies.kept(args))


def print_summary(study):
    steps = report_steps(study["timesteps"])

    def cell(mean, std, sign=""):
        return f"{100 * mean:{sign}8.2f} ±{100 * std:4.2f}"
    print(f"mean ± std over seeds {study['seeds']} (accuracy %, paired differences pp)")
    print(f"{'':34s}" + "".join(f"{'t=' + str(t):>14s}" for t in steps) + f"{'ANN':>14s}")
    for name, e in study["summary"].items():
        print(f"{name:34s}" + "".join(cell(e["snn_mean"][t - 1], e["snn_std"][t - 1])
                                      for t in steps) + cell(e["ann_mean"], e["ann_std"]))
    for knob, e in study["paired"].items():
        print(f"{knob[:34]:34s}" + "".join(cell(e["mean"][t - 1], e["std"][t - 1], "+")
                                           for t in steps))
    for knob, e in study["early_exit"].items():
        print(f"{knob}: test accuracy {cell(e['test_accuracy']['mean'], e['test_accuracy']['std'])}"
              f" % at {e['mean_steps']['mean']:.2f} ± {e['mean_steps']['std']:.2f} steps on "
              f"average; time {e['time_ratio']['mean']:.2f} ± {e['time_ratio']['std']:.2f} × the "
              f"fixed T reaching the same accuracy ({e['fixed_timesteps']['per_seed']} steps)")
    print("QCFS levels: ANN, SNN at t = 1, 2, 4, 8, first step within 0.1 / 0.05 pp of the "
          "same seed's ReLU ANN (mean, or per seed if some never got there) and µJ there")
    for levels, rules in study["levels"].items():
        for rule, e in rules.items():
            there = [_mean_or_list(e, f"first_step_within_{100 * m:g}pp_of_relu_ann")
                     for m in MARGINS]
            energy = _mean_or_list(e, f"energy_pj_there_{100 * MARGINS[-1]:g}pp", 1e6)
            print(f"{levels:>5} {rule:10s} {cell(e['ann_mean'], e['ann_std'])}"
                  + "".join(cell(e["snn_mean"][t - 1], e["snn_std"][t - 1]) for t in (1, 2, 4, 8)
                            if t <= study["timesteps"])
                  + f"   {there[0]} / {there[1]} steps, {energy} µJ")
    print(energy_models.over_seeds_text(study["memory"]))


def _mean_or_list(entry, key, scale=1):
    """'mean ± std' of entry[key] over the seeds, or the per-seed values if some are missing."""
    if f"{key}_mean" in entry:
        return f"{entry[f'{key}_mean'] / scale:.2f} ± {entry[f'{key}_std'] / scale:.2f}"
    return str([None if v is None else round(v / scale, 2) for v in entry[key]])


if __name__ == "__main__":
    main()
