import copy
import csv
import json
import re
import shutil
import sys

import pytest
from helpers import DATA, ROOT, check_refused

import lenet_convert

sys.path.insert(0, str(ROOT / "bench"))

import fronts  # noqa: E402
import seeds  # noqa: E402
import studies  # noqa: E402

SIMULATED = ": simulated, "  # the line of each conversion the study runs
PER_SEED = 23  # conversions of a seed: 17 of the ReLU network, 5 of L = 8 and 1 of L = 2
GIVEN_KEY, EXIT_KEY = "as given", "early exit (margin)"  # two of a seed's conversions


def test_each_seed_runs_what_lenet_convert_gives(study):
    _, tmp, saved, _ = study
    assert saved["seeds"] == [1, 2] and saved["timesteps"] == 4 and saved["test_images"] == 200
    assert set(saved["runs"]) == {"relu", "relu_braincog_reference", "qcfs"}
    for i, seed in enumerate((1, 2)):
        for name, file in (("relu", "relu"), ("qcfs", "qcfs_L8")):
            checkpoint = tmp / "ck" / f"{file}_seed{seed}.pt"
            single = lenet_convert.main(["--checkpoint", str(checkpoint), "--limit", "200",
                                         "--timesteps", "4", "--device", "cpu", "--data-dir",
                                         str(DATA), "--out-dir", str(tmp / "single")])
            assert saved["runs"][name]["snn"][i] == single["snn_accuracy"]
            assert saved["runs"][name]["ann"][i] == single["ann_accuracy"]


def test_summary_and_paired_differences_are_over_the_seeds(study):
    _, _, saved, per_seed = study
    relu = saved["runs"]["relu"]["snn"]
    summary = saved["summary"]["relu"]
    assert summary["snn_mean"] == pytest.approx([(a + b) / 2 for a, b in zip(*relu, strict=True)])
    assert summary["snn_std"] == pytest.approx([abs(a - b) / 2**0.5
                                                for a, b in zip(*relu, strict=True)])
    assert summary["snn_min"] == [min(a, b) for a, b in zip(*relu, strict=True)]
    gamma = saved["paired"]["γ = 4"]
    assert gamma["against"] == "as given"
    assert gamma["per_seed"] == [[a - b for a, b in zip(run["γ = 4"]["snn_accuracy"],
                                                         run["as given"]["snn_accuracy"],
                                                         strict=True)] for run in per_seed]
    assert saved["paired"]["qcfs L=8: γ = 1"]["against"] == "qcfs L=8: as given"
    for knob, entry in saved["paired"].items():  # each against its own network's default
        assert entry["against"] == knob.rpartition(": ")[0] + (": " if ": " in knob else "") + (
            "as given")
    assert {"lateral inhibition off", "V0 = 0", "γ = 1", "p = 99.9", "p = 100", "norm per channel",
            "norm per neuron", "reset to 0", "spike calibration 4", "early exit (margin)"} <= set(
        saved["paired"])


def test_the_energies_with_memory_traffic_are_summarised_over_the_seeds(study):
    _, _, saved, per_seed = study
    memory = saved["memory"]
    assert set(memory) == {"relu", "relu_braincog_reference", "qcfs"}
    first = memory["qcfs"]["t=1"]
    per_seed_qnn = [run["qcfs L=8: as given"]["energy_models"]["qnn"][0] for run in per_seed]
    assert first["over_qnn_memory"]["per_seed"] == [q["snn_over_qnn_memory"] for q in per_seed_qnn]
    assert first["over_qnn_memory"]["mean"] == pytest.approx(
        sum(q["snn_over_qnn_memory"] for q in per_seed_qnn) / 2)
    assert first["snn_compute_uj"]["per_seed"] == pytest.approx(
        [run["qcfs L=8: as given"]["snn_energy_pj"][0] / 1e6 for run in per_seed])
    factors = [q["break_even_factor_by_layer"] for q in per_seed_qnn]  # and layer by layer
    assert set(factors[0]) <= set(first["by_layer"])
    for layer in factors[0]:
        assert first["by_layer"][layer]["break_even_factor"]["per_seed"] == [
            f[layer] for f in factors]


def test_early_exit_and_levels_are_summarised_per_seed(study):
    _, _, saved, per_seed = study
    early = saved["early_exit"]
    qcfs_exit = "qcfs L=8: early exit (margin)"
    assert set(early) == {"early exit (margin)", qcfs_exit}
    steps = [run[qcfs_exit]["early_exit"]["mean_steps"] for run in per_seed]
    assert early[qcfs_exit]["mean_steps"]["per_seed"] == steps
    assert early[qcfs_exit]["mean_steps"]["mean"] == pytest.approx(sum(steps) / 2)
    levels = saved["levels"]
    assert set(levels) == {"L=2", "L=8"} and set(levels["L=2"]) == {"gamma = 2", "gamma = L"}
    relu_ann = saved["runs"]["relu"]["ann"]
    for levels_name, rules in levels.items():
        for rule, entry in rules.items():
            runs = [run[entry["run"]] for run in per_seed]
            assert all(r["settings"]["gamma"] == (2 if rule == "gamma = 2" else r["settings"][
                "levels"]) for r in runs)
            assert entry["first_step_within_0.05pp_of_relu_ann"] == [
                lenet_convert.first_step_within(r["snn_accuracy"], ann, 0.0005)
                for r, ann in zip(runs, relu_ann, strict=True)]
            if levels_name == "L=2":  # paired against the default levels, the same gamma rule
                base = [run[levels["L=8"][rule]["run"]] for run in per_seed]
                assert entry["minus_default_levels"]["ann"] == [
                    a["ann_accuracy"] - b["ann_accuracy"] for a, b in zip(runs, base, strict=True)]


def test_pareto_front_table_and_figures(study):
    _, tmp, saved, _ = study
    front = saved["pareto_front"]
    assert all(a["energy_uj"] <= b["energy_uj"] and a["accuracy"] < b["accuracy"]
               for a, b in zip(front, front[1:], strict=False))  # each buys accuracy
    points = fronts.energy_points(saved)[0]
    assert not any(p[0] <= f["energy_uj"] and p[1] > f["accuracy"] for f in front
                   for p in points)  # no point beats a front point on both axes
    memory_front = saved["memory_pareto_front"]
    memory_points = fronts.energy_points(saved, "memory")[0]
    assert not any(p[0] <= f["memory_uj"] and p[1] > f["accuracy"] for f in memory_front
                   for p in memory_points)
    ann = saved["summary"]["relu"]
    for point in front + memory_front:  # the three ratios of each point, of the means
        assert point["over_ann_compute"] == pytest.approx(
            1e6 * point["energy_uj"] / ann["ann_energy_pj"])
        assert point["over_ann_memory"] == pytest.approx(
            1e6 * point["memory_uj"] / ann["ann_memory_pj"])
        if point["t"] == 1:  # every seed ran the QNN of step 1
            assert point["over_qnn_memory"] > 0
    early = [p for p in memory_points if p[3] is None]
    assert {p[2] for p in early} == {"ReLU, early exit (margin)", "QCFS L=8, early exit (margin)"}
    exit_ = saved["early_exit"]["early exit (margin)"]
    assert exit_["memory_pj_per_image"]["mean"] / 1e6 in [p[0] for p in early]
    rows = list(csv.DictReader((tmp / "out" / "seeds.csv").open()))
    assert len(rows) == 4 * (3 + 4 + len(saved["paired"]))
    for name in ("seeds.png", "seeds_energy.png"):
        assert (tmp / "out" / name).read_bytes()[:4] == b"\x89PNG"


def _copy(study, tmp_path, monkeypatch):
    """The study's folders copied into `tmp_path`, where the test then runs (the other tests see
    the first run), and its command line."""
    argv, tmp, _, _ = study
    for folder in ("ck", "out"):
        shutil.copytree(tmp / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    return argv


def test_a_second_run_reuses_networks_and_conversions(study, tmp_path, monkeypatch, capsys):
    _, _, saved, per_seed = study
    argv = _copy(study, tmp_path, monkeypatch)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ck").glob("*.pt")}
    capsys.readouterr()
    assert seeds.main(argv)["runs"] == saved["runs"]
    out = capsys.readouterr().out
    assert out.count("(made with the same arguments)") == 6  # the three networks of both seeds
    conversions = len(per_seed[0])
    assert conversions == PER_SEED
    reused = [int(n) for n in re.findall(r"seed \d: reusing (\d+) conversions", out)]
    assert sum(reused) == 2 * conversions and SIMULATED not in out
    seeds.main([*argv, "--timesteps", "3"])  # a change the conversions depend on: run again
    assert capsys.readouterr().out.count(SIMULATED) == 2 * conversions
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ck").glob("*.pt")}
    relu_argv = studies.training_argv(1, seeds.parse_args(argv), "relu")
    assert studies.reusable(tmp_path / "ck" / "relu_seed1.pt", relu_argv)
    assert not studies.reusable(tmp_path / "ck" / "relu_seed1.pt", relu_argv + ["--lr", "0.02"])
    assert not studies.reusable(tmp_path / "ck" / "relu_seed3.pt", relu_argv)


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "-1"], r"--seeds: must be in \[0, 4294967295\], got -1"),
    (["--seeds", "1", "1"], "each seed once"),
    (["--epochs", "0"], r"--epochs: must be in \[1, 10000\], got 0"),
    (["--levels", "4", str(10**20)], r"--levels: must be in \[1, 1024\]"),
    (["--timesteps", str(10**20)], r"--timesteps: must be in \[1, 100000\]"),
    (["--limit", "20000"], r"--limit: must be in \[1, 10000\]"),
    (["--levels", "4"], "--levels: must include lenet5.py's default, 8"),
])
def test_bad_arguments_give_one_line(argv, message, capsys):
    check_refused(seeds.main, argv, message, capsys)


def _drop_a_field(path):
    runs = json.loads(path.read_text())
    del runs["γ = 4"]["snn_energy_pj"]
    path.write_text(json.dumps(runs))


# One row per cache a user might spoil or edit: the file, how, and what the run says it redoes.
SPOILED_CACHES = [
    ("out/seed1.json", lambda p: p.write_text(p.read_text()[:500]),
     "seed1.json does not read as this study writes it: making it again", PER_SEED),
    ("out/seed1.json", lambda p: p.write_text("[1, 2, 3]"),
     "seed1.json does not read as this study writes it: making it again", PER_SEED),
    ("out/seed1.json", _drop_a_field, "'γ = 4' does not read as this study writes it", 1),
    ("ck/relu_seed2_history.json", lambda p: p.write_text('[{"epoch": 1'),
     "relu_seed2_history.json does not read as this study writes it", 0),
    ("ck/qcfs_L2_seed1.pt", lambda p: p.write_bytes(p.read_bytes()[:999]),
     "qcfs_L2_seed1.pt is not a readable checkpoint .*; training it again", 0),
]


@pytest.mark.parametrize("file, spoil, line, simulated", SPOILED_CACHES)
def test_a_spoiled_cache_is_made_again_not_trusted(study, tmp_path, monkeypatch, capsys, file,
                                                    spoil, line, simulated):
    _, _, saved, _ = study
    argv = _copy(study, tmp_path, monkeypatch)
    spoil(tmp_path / file)
    capsys.readouterr()
    again = seeds.main(argv)
    out = capsys.readouterr().out
    assert re.search(line, out) and "Traceback" not in out
    if simulated:  # the conversions it held are simulated again, and the same
        assert out.count(SIMULATED) == simulated
    assert again["runs"]["relu"]["snn"] == saved["runs"]["relu"]["snn"] or file.startswith("ck")


def _at(path, value):
    """A change that sets the value at `path` ("outer/inner") of a cached conversion (a copy)."""
    def change(entry):
        entry = copy.deepcopy(entry)
        *outer, last = path.split("/")
        table = entry
        for key in outer:
            table = table[int(key) if isinstance(table, list) else key]
        table[int(last) if isinstance(table, list) else last] = value
        return entry
    return change


# A cached conversion spoiled at any depth: every field the study reads, of a wrong kind or
# range, or a list of the wrong length. Each must be made again, with one line, never trusted.
DEEP = ["run", "run/settings", "run/timesteps", "run/limit", "run/batch_size",
        "run/checkpoint_sha256", "settings", "settings/gamma", "settings/exit_rule",
        "settings/levels", "ann_accuracy", "snn_accuracy", "snn_energy_pj", "ann_energy_pj",
        lenet_convert.AT_ANN_LEVEL_KEY, "energy_pj_at_ann_level", "synops_by_layer",
        "synops_by_layer/act1", "test_images", "checkpoint", "energy_models",
        "energy_models/snn_memory_pj", "energy_models/ann_memory_pj",
        "energy_models/snn_over_ann_compute", "energy_models/snn_over_ann_memory",
        "energy_models/qnn", "energy_models/qnn/0", "energy_models/qnn/0/t",
        "energy_models/qnn/0/memory_pj", "energy_models/qnn/0/spike_rate",
        "energy_models/qnn/0/memory_by_layer_pj", "energy_models/qnn/0/break_even_factor_by_layer"]
PER_LAYER_TABLES = ("energy_models/qnn/0/memory_by_layer_pj",  # a table of one layer "a" is one
                    "energy_models/qnn/0/break_even_factor_by_layer")
SPOILED_ENTRIES = [(GIVEN_KEY, _at(key, bad)) for key in DEEP
                   for bad in ([1], "x", 10**400, float("nan"), -1, {"a": 1})
                   if not (key in ("run/checkpoint_sha256", "checkpoint") and bad == "x")
                   and not (key in PER_LAYER_TABLES and bad == {"a": 1})]
SPOILED_ENTRIES += [
    (GIVEN_KEY, _at("snn_accuracy", [0.5])),  # fewer steps than it was run for
    (GIVEN_KEY, _at("run/settings", {"gamma": 2, "new_knob": 1})),
    (GIVEN_KEY, _at(lenet_convert.AT_ANN_LEVEL_KEY, 99)),  # beyond its steps
    (GIVEN_KEY, _at("settings/exit_rule", "margin")),  # early exit without its record
    (EXIT_KEY, _at("early_exit/fixed_seconds", 0)),  # a time ratio divides by it
    (EXIT_KEY, _at("early_exit/mean_steps", None)),
    (EXIT_KEY, _at("early_exit", [1])),
    (EXIT_KEY, _at("early_exit/memory_pj_per_image", None)),  # from before early exit had it
    (GIVEN_KEY, _at("energy_models/qnn/0/t", 2)),  # no QNN of step 1 left: the study reads it
]


@pytest.mark.parametrize("name, spoil", SPOILED_ENTRIES)
def test_a_cached_conversion_is_checked_all_the_way_down(study, name, spoil):
    _, _, _, per_seed = study
    good = per_seed[0][name]
    inputs = good["run"]
    said = []
    assert seeds.cached({name: good}, name, inputs, "seed1.json", said.append) == good
    spoiled = spoil(good)
    assert seeds.cached({name: spoiled}, name, inputs, "seed1.json", said.append) is None
    assert said == [f"seed1.json: {name!r} does not read as this study writes it: simulating "
                    "it again"]


def test_a_folder_in_a_result_files_place_is_said_before_training(tmp_path, capsys):
    (tmp_path / "out" / "seed2.json").mkdir(parents=True)
    with pytest.raises(SystemExit, match="seed2.json is a folder where this run writes a file"):
        seeds.main(["--seeds", "1", "2", "--data-dir", str(DATA), "--checkpoint-dir",
                    str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out")])
    assert "training" not in capsys.readouterr().out and not (tmp_path / "ck").exists()
