"""Choices made on validation: the QCFS training recipe, and how a QCFS network is converted.

For each seed, each recipe trains a plain QCFS network with lenet5.py (L = 4 unless it says,
no energy term, the analog image, no teacher: PLAIN), from the seed's ReLU network
(the one bench/seeds.py trains, reused when it was made with the same arguments) or from
scratch, in one or more stages (each starting from the one before); every network trained with
the same arguments before is reused. The recipes are judged on the 5,000 validation images
only, never on the test set: for each recipe, the validation accuracy of its best epoch (mean
and standard deviation over the seeds), and its difference to the baseline recipe on the same
seed (paired), which removes the seed-to-seed spread of the networks themselves. With L = 4
and gamma = L the spiking network gives exactly its ANN's outputs after one step, so the ANN's
accuracy is the one-step SNN's.

Then, for the QCFS network lenet5.py trains by default (the one bench/seeds.py studies), each
conversion setting of CONVERSIONS (burst limit gamma, initial potential V0) is simulated on the
validation images: the first step at which it comes within 0.05 pp of the same seed's ReLU
ANN's validation accuracy, and its energy there. lenet_convert.py converts a QCFS network by
default with the setting that gets there in the fewest steps (then the least energy).

Every training and the conversions of each seed are tasks, run on Ray or, with --workers 0,
one after another in this process, as in bench/seeds.py (see studies.py).

Example:
    python bench/recipes.py --seeds 1 2 3     # 80 to 160 minutes on 2 CPU cores (one after
                                              # another), given the ReLU networks of seeds.py
Writes (into --out-dir, default results/recipes/): recipes.json, recipes.csv
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/recipes.py
import cli  # noqa: E402  (first: see its docstring)

# isort: split
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402

import studies  # noqa: E402

import lenet5  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from cli import write_csv, write_json  # noqa: E402
from early_exit import validation_split  # noqa: E402
from efficiency import efficiency, input_shapes  # noqa: E402
from lenet_convert import (  # noqa: E402
    build_snn,
    evaluate_snn,
    first_step_within,
    load_ann,
    neuron_names,
)
from mnist import load_mnist  # noqa: E402
from options import BATCH_SIZE, Settings  # noqa: E402

# ----------------------------------------------------------------------------- defaults
SEEDS = (1, 2, 3)
OUT_DIR = Path("results/recipes")
BASELINE = "fine-tune 20 epochs"
RECIPES = {  # name: stages, each (its code, lenet5.py's arguments); the first stage starts from
    # the seed's ReLU network unless its arguments hold "scratch", every other from the stage
    # before it
    BASELINE: [("A", ["--epochs", "20"])],
    "lambda without weight decay": [("B", ["--epochs", "20", "--threshold-decay", "0"])],
    "lambda per channel": [("E", ["--epochs", "20", "--channel-thresholds"])],
    "fine-tune 40 epochs": [("C", ["--epochs", "40"])],
    "levels 16 -> 8 -> 4 (10, 10, 20 epochs)": [
        ("G16", ["--levels", "16", "--epochs", "10"]), ("G8", ["--levels", "8", "--epochs", "10"]),
        ("G", ["--epochs", "20"])],
    "from scratch, 40 epochs": [("F", ["scratch", "--epochs", "40"])],
    "lambda learning rate 0.1": [("D", ["--epochs", "20", "--threshold-lr", "0.1"])],
}
PLAIN = ["--levels", "4", "--energy-weight", "0", "--input-levels", lenet5.ANALOG,
         "--distill-weight", "0"]  # the recipes are of plain QCFS, L = 4, as when they were run
CONVERSIONS = [(gamma, v0) for gamma in (1, 2, "L", "2L") for v0 in (0.5, 0.25)]  # gamma, V0
CONVERSION_STEPS = 8  # steps simulated on validation for each conversion
CONVERSION_MARGIN = 0.0005  # "within 0.05 pp of the ReLU ANN"


def stage_argv(seed, code, extra, init_from, args):
    """lenet5.py's command line for one stage of a recipe, for one seed."""
    argv = ["--seed", str(seed), "--device", args.device,
            "--data-dir", str(studies.task_path(args.data_dir)),
            "--checkpoint", str(args.checkpoint_dir / "recipes" / f"{code}_seed{seed}.pt"),
            "--activation", "qcfs", *PLAIN]
    if "scratch" not in extra:
        argv += ["--init-from", str(init_from)]
    argv += [a for a in extra if a != "scratch"]
    if args.limit_train:
        argv += ["--limit-train", str(args.limit_train)]
    return argv + (["--epochs", str(args.epochs)] if args.epochs else [])


def train_recipe(seed, stages, args, tasks, then, trained=False):
    """Train (or reuse) every stage of a recipe for `seed`, each once the one before is there
    (the first once the seed's ReLU network is, `trained` if it was just trained); then
    `then(the stages' checkpoint paths)`."""
    paths = [studies.checkpoint_path(args.checkpoint_dir, "relu", seed)]

    def next_stage(retrained):
        if len(paths) > len(stages):
            then(paths[1:])
            return
        code, extra = stages[len(paths) - 1]
        argv = stage_argv(seed, code, extra, paths[-1], args)
        paths.append(studies.argv_path(argv, "--checkpoint"))
        studies.network(tasks, f"seed {seed}, stage {code}", argv, args.retrain or retrained,
                        next_stage)
    next_stage(trained)


def record(paths):
    """What a recipe's network (the last of `paths`, its stages) is judged by, from its
    checkpoint and history, and what all its stages cost together."""
    checkpoint = load_checkpoint(paths[-1])
    histories = [json.loads(p.with_name(f"{p.stem}_history.json").read_text()) for p in paths]
    return {"val_accuracy": checkpoint["val_accuracy"], "epoch": checkpoint["epoch"],
            "epochs": sum(map(len, histories)),
            "final_train_accuracy": histories[-1][-1]["train_accuracy"],
            "seconds": sum(h["seconds"] for history in histories for h in history)}


def conversions_on_validation(relu, qcfs, data_dir, device):
    """A task: each of CONVERSIONS of a seed's default QCFS network (checkpoint bytes `qcfs`) on
    its validation images: {"gamma=G, V0=V": its accuracy per step, the first step within
    CONVERSION_MARGIN of the ReLU network's (bytes `relu`) validation accuracy and the energy per
    image there}."""
    data_dir, device = studies.on_this_node(data_dir), cli.resolve_device(device)
    with studies.checkpoint_files({"relu.pt": relu, "qcfs.pt": qcfs}) as (_, files):
        checkpoint, ann = load_ann(files["qcfs.pt"], device, data_dir)
        relu_ann = load_ann(files["relu.pt"], device)[1]
    validation = validation_split(checkpoint, *load_mnist(data_dir, train=True), BATCH_SIZE)
    results = {"relu_ann_accuracy": lenet5.evaluate(relu_ann, validation, device)}
    for gamma, v0 in CONVERSIONS:
        g = {"L": checkpoint["levels"], "2L": 2 * checkpoint["levels"]}.get(gamma, gamma)
        snn = build_snn(checkpoint, ann, Settings(None, gamma=g, v0=v0)).to(device)
        accuracy, counts = evaluate_snn(snn, validation, CONVERSION_STEPS, device)
        energy = efficiency(snn, counts, len(validation.labels), CONVERSION_STEPS,
                            neuron_names(snn), input_shapes(ann))["snn_energy_pj"]
        t = first_step_within(accuracy, results["relu_ann_accuracy"], CONVERSION_MARGIN)
        results[f"gamma={gamma}, V0={v0:g}"] = {"accuracy": accuracy, "first_step_within": t,
                                                "energy_pj_there": energy[t - 1] if t else None}
    return results


def schedule_seed(seed, args, tasks, per_seed, converted):
    """Add the tasks of `seed`: its ReLU network, then every recipe's stages and its default
    QCFS network, then that network's conversions on validation; each recipe's record goes to
    per_seed[seed][recipe], the conversions to converted[seed]."""
    relu_argv = studies.training_argv(seed, args, "relu")
    relu = studies.argv_path(relu_argv, "--checkpoint")
    per_seed[seed] = {}

    def recipe_made(name, paths):
        per_seed[seed][name] = record(paths)
        tasks.say(f"seed {seed}, {name}: validation {per_seed[seed][name]['val_accuracy']:.2%}")

    def relu_made(trained):
        for name, stages in RECIPES.items():
            train_recipe(seed, stages, args, tasks, trained=trained,
                         then=lambda paths, name=name: recipe_made(name, paths))
        argv = studies.training_argv(seed, args, "qcfs", relu)
        qcfs = studies.argv_path(argv, "--checkpoint")

        def validated(results):
            converted[seed] = results
            tasks.say(f"seed {seed}: {len(CONVERSIONS)} conversions of {qcfs} on validation")
        studies.network(tasks, f"seed {seed}, qcfs L={lenet5.LEVELS}", argv,
                        args.retrain or trained, lambda _: tasks.add(
                            f"seed {seed}, conversions on validation", "recipes",
                            "conversions_on_validation", (relu.read_bytes(), qcfs.read_bytes(),
                                                          str(studies.task_path(args.data_dir)),
                                                          args.device), validated))
    studies.network(tasks, f"seed {seed}, relu", relu_argv, args.retrain, relu_made)


def summarise(per_seed, seed_list):
    """Per recipe: mean and std over the seeds, and the paired difference to the baseline."""
    summary = {}
    for name in RECIPES:
        values = [per_seed[s][name]["val_accuracy"] for s in seed_list]
        diffs = [v - per_seed[s][BASELINE]["val_accuracy"] for v, s in zip(values, seed_list,
                                                                          strict=True)]
        summary[name] = {"val_accuracy": values, "mean": statistics.fmean(values),
                         "std": _std(values), "minus_baseline": diffs,
                         "minus_baseline_mean": statistics.fmean(diffs),
                         "minus_baseline_std": _std(diffs),
                         "train_accuracy_mean": statistics.fmean(
                             per_seed[s][name]["final_train_accuracy"] for s in seed_list),
                         "minutes_mean": statistics.fmean(
                             per_seed[s][name]["seconds"] for s in seed_list) / 60}
    return summary


def summarise_conversions(per_seed, seed_list):
    """Per conversion: the first step within the margin and the energy there, per seed and as
    mean ± std when every seed got there; and the one chosen (see "rule")."""
    summary = {}
    for name in [n for n in per_seed[seed_list[0]] if n != "relu_ann_accuracy"]:
        steps = [per_seed[s][name]["first_step_within"] for s in seed_list]
        energy = [per_seed[s][name]["energy_pj_there"] for s in seed_list]
        summary[name] = {"steps": steps, "energy_pj": energy}
        if None not in steps:
            summary[name] |= {"steps_mean": statistics.fmean(steps), "steps_std": _std(steps),
                              "energy_pj_mean": statistics.fmean(energy),
                              "energy_pj_std": _std(energy)}
        never = CONVERSION_STEPS + 1  # a seed that never gets there counts as one step more
        summary[name]["steps_counting_never_as_T_plus_1"] = statistics.fmean(
            never if t is None else t for t in steps)
    chosen = min(summary, key=lambda n: (summary[n]["steps_counting_never_as_T_plus_1"],
                                         summary[n].get("energy_pj_mean", math.inf)))
    return {"per_conversion": summary, "chosen": chosen,
            "rule": "fewest mean steps to within the margin, a seed that never gets there "
                    f"counting as {CONVERSION_STEPS + 1}; ties: the least energy"}


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def print_summary(summary, seed_list):
    print(f"validation accuracy of the best epoch over seeds {seed_list} (% ; minus the "
          f"baseline, {BASELINE}, on the same seed, in pp)")
    for name, entry in summary.items():
        print(f"{name:42s} {100 * entry['mean']:6.2f} ± {100 * entry['std']:.2f}   "
              f"{100 * entry['minus_baseline_mean']:+.2f} ± {100 * entry['minus_baseline_std']:.2f}"
              f"   train {100 * entry['train_accuracy_mean']:.2f}   "
              f"{entry['minutes_mean']:.1f} min")


def print_conversions(conversions):
    print(f"conversions of the default QCFS network on validation: first step within "
          f"{100 * CONVERSION_MARGIN:g} pp of the ReLU ANN, and µJ per image there")
    for name, entry in conversions["per_conversion"].items():
        where = (f"{entry['steps_mean']:.1f} ± {entry['steps_std']:.1f} steps, "
                 f"{entry['energy_pj_mean'] / 1e6:.2f} ± {entry['energy_pj_std'] / 1e6:.2f} µJ"
                 if "steps_mean" in entry else f"per seed {entry['steps']}") + (
            f" ({entry['steps_counting_never_as_T_plus_1']:.2f} counting never as "
            f"{CONVERSION_STEPS + 1})")
        print(f"{name:22s} {where}{'   <- chosen' if name == conversions['chosen'] else ''}")


def parse_args(argv=None):
    parser = studies.study_parser(__doc__, SEEDS, OUT_DIR)
    return studies.parse_study_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    per_seed = {}

    def body():
        tasks = studies.start(args, ["recipes.json", "recipes.csv"], args.checkpoint_dir /
                              "recipes", (CONVERSION_STEPS, BATCH_SIZE, lenet5.VAL_SIZE, 0))
        converted = {}
        for seed in args.seeds:
            schedule_seed(seed, args, tasks, per_seed, converted)
        tasks.run()
        per_seed.update({seed: {name: per_seed[seed][name] for name in RECIPES}  # in the
                         for seed in args.seeds})  # order of the recipes, however they finished
        summary = summarise(per_seed, args.seeds)
        converted = {seed: converted[seed] for seed in args.seeds}
        conversions = summarise_conversions(converted, args.seeds)
        rows = [{"recipe": name, "val_accuracy_mean": round(100 * e["mean"], 3),
                 "val_accuracy_std": round(100 * e["std"], 3),
                 "minus_baseline_mean_pp": round(100 * e["minus_baseline_mean"], 3),
                 "minus_baseline_std_pp": round(100 * e["minus_baseline_std"], 3),
                 "minutes": round(e["minutes_mean"], 1)} for name, e in summary.items()]
        with cli.file_set(args.out_dir) as files:
            write_json(files.path("recipes.json"), {
                "seeds": args.seeds, "baseline": BASELINE,
                "recipes": {n: [" ".join(a) for _, a in s] for n, s in RECIPES.items()},
                "per_seed": per_seed, "summary": summary, "conversions_per_seed": converted,
                "conversions": conversions})
            write_csv(files.path("recipes.csv"), rows)
        print_summary(summary, args.seeds)
        print_conversions(conversions)
        print(f"wrote recipes.json and recipes.csv in {args.out_dir}")
        return summary | {"conversions": conversions}
    return cli.run("recipes.py", body,
                   f"the networks trained so far are in {args.checkpoint_dir}; a re-run reuses "
                   "them")


if __name__ == "__main__":
    main()
