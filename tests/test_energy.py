import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from helpers import DATA, ROOT, check_refused

from checkpoint import load_checkpoint

sys.path.insert(0, str(ROOT / "bench"))

import energy  # noqa: E402
import studies  # noqa: E402

ARGV = ["--seeds", "1", "2", "--levels", "2", "--weights", "10", "--limit-train", "1000",
        "--epochs", "2", "--fine-tune-epochs", "1", "--limit", "200", "--timesteps", "3",
        "--early-exit", "--device", "cpu", "--data-dir", str(DATA), "--checkpoint-dir", "ck",
        "--out-dir", "energy", "--workers", "0"]


@pytest.fixture(scope="module")
def sweep(study):
    """A tiny energy study in the tiny seeds study's folder (its ReLU networks are the same
    command lines, so they are reused): (its folder, energy.json, what it printed)."""
    _, tmp, _, _ = study
    assert TINY[TINY.index("--epochs") + 1] == "2"  # ARGV's ReLU networks are the study's
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        returned = energy.main(ARGV)
    saved = json.loads((tmp / "energy" / "energy.json").read_text())
    assert saved == json.loads(json.dumps(returned))
    return tmp, saved


def test_validation_is_read_from_the_checkpoints_and_paired(sweep):
    tmp, saved = sweep
    table = saved["validation"]["networks"]
    assert list(table) == ["L=2, w=0", "L=2, w=10"]  # 0 added: each penalised one's pair
    for seed in (1, 2):
        checkpoints = {w: load_checkpoint(tmp / "ck" / "energy" / f"qcfs_L2_w{w}_e1_seed{seed}.pt")
                       for w in (0, 10)}
        relu = load_checkpoint(tmp / "ck" / f"relu_seed{seed}.pt")
        i = seed - 1
        assert checkpoints[10]["args"]["energy_weight"] == 10
        for w, ck in checkpoints.items():
            entry = table[f"L=2, w={w}"]
            assert entry["accuracy"]["per_seed"][i] == ck["val_accuracy"]
            assert entry["energy_uj"]["per_seed"][i] == ck["val_energy_uj"]
            assert entry["minus_relu"]["per_seed"][i] == pytest.approx(
                ck["val_accuracy"] - relu["val_accuracy"])
        paired = table["L=2, w=10"]["minus_unpenalised"]["energy_uj"]["per_seed"][i]
        assert paired == pytest.approx(checkpoints[10]["val_energy_uj"]
                                       - checkpoints[0]["val_energy_uj"])
        assert paired < 0  # the penalty buys fewer spikes on every seed
    close = [n for n, e in table.items() if e["minus_relu"]["mean"] >= -energy.MARGIN]
    assert saved["validation"]["chosen"] == min(
        close, key=lambda n: table[n]["energy_uj"]["mean"], default=None)


def test_test_set_summary_is_paired_and_checks_the_target(sweep):
    _, saved = sweep
    test, per_seed = saved["test"], saved["per_seed"]
    assert list(test) == ["L=2, w=0: gamma = L", "L=2, w=0: early exit",
                          "L=2, w=10: gamma = L", "L=2, w=10: early exit"]
    key, base = "L=2, w=10: gamma = L", "L=2, w=0: gamma = L"
    diffs = [per_seed[s]["test"][key]["snn_accuracy"][0]
             - per_seed[s]["test"][base]["snn_accuracy"][0] for s in ("1", "2")]
    assert test[key]["minus_unpenalised"]["snn_accuracy"]["mean"][0] == pytest.approx(
        statistics.fmean(diffs))
    assert "minus_unpenalised" not in test[base]
    relu = saved["relu_ann_accuracy"]["mean"]
    for entry in test.values():
        if "early_exit" in entry:
            continue
        meets = [t for t in range(1, energy.TARGET_STEPS + 1)
                 if entry["snn_mean"][t - 1] >= relu - energy.MARGIN
                 and entry["energy_pj_mean"][t - 1] <= energy.TARGET_ENERGY
                 * saved["ann_energy_pj"]]
        assert entry["meets_target_at"] == (meets[0] if meets else None)
        assert sum(entry["synops_by_layer_t1_mean"].values()) == pytest.approx(
            (entry["energy_pj_mean"][0] - 117_600 * 4.6) / 0.9)


def test_the_fronts_take_every_point_and_the_old_front_is_kept(sweep):
    _, saved = sweep
    fronts, along = saved["fronts"], saved["dominance"]
    levels = json.loads(energy.LEVELS_FRONT.read_text())["pareto_front"]
    assert [(p["energy_uj"], p["accuracy"]) for p in fronts["levels study"]] == [
        (p["energy_uj"], p["accuracy"]) for p in levels]
    assert all(0 < p["accuracy"] <= 100 for front in fronts.values() for p in front)  # all in %
    for name, front in fronts.items():
        energies = [p["energy_uj"] for p in front]
        accuracies = [p["accuracy"] for p in front]
        assert energies == sorted(energies) and accuracies == sorted(accuracies), name
    assert all(p["name"].startswith("L=2, w=0:") for p in fronts["without the penalty"])
    for old, new in zip(along["levels study"], along["levels study and this one"], strict=True):
        assert old is None or new >= old  # one front of more points is never below
    own = fronts["with the penalty"]  # this study's points: their energies and three ratios
    for point in own:
        entry = saved["test"][point["name"]]
        t = point["t"]
        memory = (entry["early_exit"]["memory_pj_per_image"]["mean"] if t is None
                  else entry["memory_pj_mean"][t - 1])
        assert point["memory_uj"] == pytest.approx(memory / 1e6)
        assert point["over_ann_compute"] == pytest.approx(
            1e6 * point["energy_uj"] / saved["ann_energy_pj"])
        assert point["over_ann_memory"] == pytest.approx(memory / entry["ann_memory_pj"])
    assert any(p["t"] == 1 and p["over_qnn_memory"] > 0 for p in own)


def test_a_rerun_reuses_every_network_and_conversion(sweep, capsys):
    tmp, saved = sweep
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        again = energy.main(ARGV)
    out = capsys.readouterr().out
    assert "trained" not in out and "tasks in" not in out and "reusing" in out
    keep = ("validation", "test", "fronts", "relu_ann_accuracy")
    assert {k: json.loads(json.dumps(again))[k] for k in keep} == {k: saved[k] for k in keep}


def test_a_spoiled_nested_cache_entry_is_simulated_again(sweep, tmp_path, monkeypatch, capsys):
    tmp, saved = sweep
    shutil.copytree(tmp / "ck", tmp_path / "ck")
    shutil.copytree(tmp / "energy", tmp_path / "energy")
    seed1 = tmp_path / "energy" / "seed1.json"
    record = json.loads(seed1.read_text())
    record["test"]["L=2, w=10: gamma = L"]["run"]["settings"] = [1, 2]  # not a mapping
    seed1.write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    again = energy.main(ARGV)
    out = capsys.readouterr().out
    assert ("'L=2, w=10: gamma = L' does not read as this study writes it: simulating it "
            "again") in out
    assert out.count("L=2, w=10: gamma = L: ") == 1  # that one conversion, made again
    assert json.loads(json.dumps(again))["test"] == saved["test"]


def _older(checkpoint, history):
    """As lenet5.py wrote a QCFS network before the energy weight existed."""
    del checkpoint["val_energy_uj"], checkpoint["args"]["energy_weight"]
    for epoch in history:
        del epoch["val_energy_uj"], epoch["train_energy_uj"]


def _spoil_history(value):
    def spoil(checkpoint, history):
        history[-1]["val_energy_uj"] = value
    return spoil


# A network the study would reuse, lacking or spoiling what the study reads of it: each is
# trained again, with one line saying why, never read into a KeyError or an overflow.
OLDER_NETWORKS = [
    (_older, r"has no val_energy_uj \(made by an older lenet5.py\): training it again"),
    (lambda ck, h: ck.pop("val_energy_uj"), "has no val_energy_uj"),
    (lambda ck, h: h[0].pop("val_energy_uj"), "history.json does not read as this study"),
    (_spoil_history(10**400), "history.json does not read as this study"),
    (_spoil_history(float("nan")), "history.json does not read as this study"),
    (_spoil_history("0.7"), "history.json does not read as this study"),
    (lambda ck, h: ck.update(val_energy_uj=10**400), r"val_energy_uj is 1000.*, not a number in"),
]


@pytest.mark.parametrize("spoil, line", OLDER_NETWORKS)
def test_a_network_lacking_what_the_study_reads_is_trained_again(sweep, tmp_path, spoil, line,
                                                                 capsys):
    tmp, _ = sweep
    name = "qcfs_L2_w10_e1_seed1"
    for suffix in (".pt", "_history.json"):
        shutil.copy(tmp / "ck" / "energy" / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    path = tmp_path / f"{name}.pt"
    argv = energy.qcfs_argv(1, energy.Recipe(2, 10), tmp / "ck" / "relu_seed1.pt",
                                 energy.parse_args(ARGV))
    argv[argv.index("--checkpoint") + 1] = str(path)
    assert studies.reusable(path, argv, energy.VALIDATION_READS)  # as it was made
    checkpoint = torch.load(path, weights_only=True)
    history = json.loads((tmp_path / f"{name}_history.json").read_text())
    spoil(checkpoint, history)
    torch.save(checkpoint, path)
    (tmp_path / f"{name}_history.json").write_text(json.dumps(history))
    capsys.readouterr()
    assert not studies.reusable(path, argv, energy.VALIDATION_READS)
    assert re.search(line, capsys.readouterr().out)


def test_a_study_over_an_older_network_trains_it_again_and_ends(sweep, tmp_path, monkeypatch,
                                                                capsys):
    tmp, saved = sweep
    shutil.copytree(tmp / "ck", tmp_path / "ck")
    shutil.copytree(tmp / "energy", tmp_path / "energy")
    path = tmp_path / "ck" / "energy" / "qcfs_L2_w0_e1_seed2.pt"
    history_file = path.with_name(f"{path.stem}_history.json")
    checkpoint, history = torch.load(path, weights_only=True), json.loads(
        history_file.read_text())
    _older(checkpoint, history)
    torch.save(checkpoint, path)
    history_file.write_text(json.dumps(history))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    again = energy.main(ARGV)
    out = capsys.readouterr().out
    assert out.count("training it again") == 1 and out.count(": trained ") == 1
    assert load_checkpoint(path)["val_energy_uj"] == again["per_seed"][2]["validation"][
        "L=2, w=0"]["energy_uj"]  # the network trained again is the one the study reads
    assert again["validation"]["networks"]["L=2, w=0"] == json.loads(json.dumps(
        saved["validation"]["networks"]["L=2, w=0"]))  # the same seed and command: the same


def _front(points):
    return json.dumps({"pareto_front": points})


GOOD_POINT = {"name": "ReLU ANN", "t": 0, "energy_uj": 1.9, "accuracy": 99.5}


@pytest.mark.parametrize("argv, message", [
    (["--weights", "-1"], r"--weights: must be in \[0, 1000\], got -1"),
    (["--weights", "1e400"], r"--weights: must be in \[0, 1000\]"),
    (["--fine-tune-epochs", "0"], r"--fine-tune-epochs: must be in \[1, 10000\]"),
    (["--front", "{tmp}/none.json"], "no front of bench/seeds.py"),
    (["--front", "{tmp}"], "no front of bench/seeds.py"),  # a folder
] + [(["--front", f"{{tmp}}/front.json={text}"], "no front of bench/seeds.py") for text in [
    "not json", "[]", '{"pareto_front": 3}', _front([{"t": 1, "energy_uj": 1, "accuracy": 99}]),
    _front([GOOD_POINT | {"name": 7}]), _front([GOOD_POINT | {"t": "one"}]),
    _front([GOOD_POINT | {"t": -1}]), _front([GOOD_POINT | {"energy_uj": None}]),
    _front([GOOD_POINT | {"energy_uj": 10**400}]), '{"pareto_front": [{"name": "a", "t": 1, '
    '"energy_uj": 1e400, "accuracy": 99}]}', _front([GOOD_POINT | {"accuracy": 0.99e3}]),
    _front([GOOD_POINT, [1]])]])
def test_bad_arguments_and_input_files_give_one_line_before_any_task(argv, message, capsys,
                                                                     tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "=" in argv[-1]:  # a file with this text
        path, text = argv[-1].split("=", 1)
        Path(path).write_text(text)
        argv[-1] = path
    check_refused(energy.main, [*argv, "--workers", "0", "--data-dir", str(DATA),
                                "--checkpoint-dir", str(tmp_path / "ck"), "--out-dir",
                                str(tmp_path / "o")], message, capsys)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "o").exists()


def test_recipes_pair_each_network_with_the_analog_one_without_penalty_or_teacher():
    args = energy.parse_args(ARGV[:2] + ["--levels", "2", "4", "--weights", "0.5",
                                         "--input-levels", "analog", "8", "--distill", "0", "1"])
    names = [recipe.name for recipe in energy.recipes(args)]
    assert names == ["L=2, w=0", "L=2, w=0.5", "L=2, w=0.5, kd=1", "L=2, w=0.5, in=8",
                     "L=2, w=0.5, in=8, kd=1", "L=4, w=0", "L=4, w=0.5", "L=4, w=0.5, kd=1",
                     "L=4, w=0.5, in=8", "L=4, w=0.5, in=8, kd=1"]
    for recipe in energy.recipes(args):
        assert energy.parse_name(f"{recipe.name}: gamma = L") == recipe
        assert energy.unpenalised(f"{recipe.name}: early exit") == (
            f"L={recipe.levels}, w=0: early exit")
    argv = energy.qcfs_argv(3, energy.Recipe(4, 0.5, 8, 1.0), Path("relu.pt"), args)
    assert argv[argv.index("--input-levels") + 1] == "8"
    assert argv[argv.index("--teacher") + 1] == "relu.pt" == argv[argv.index("--init-from") + 1]
    assert argv[argv.index("--temperature") + 1] == "2"
    assert Path(argv[argv.index("--checkpoint") + 1]).name == "qcfs_L4_w0.5_in8_kd1_T2_e8_seed3.pt"


def test_a_network_on_spikes_and_taught_is_trained_converted_and_paired(sweep, capsys):
    """One seed, one network trained on the image's levels with a teacher: its SNN takes the
    image as spikes (from its checkpoint), its first step costs no MAC, and it is paired with
    the analog network without penalty."""
    tmp, _ = sweep
    argv = ["--seeds", "1", "--levels", "2", "--weights", "10", "--input-levels", "4",
            "--distill", "1", *ARGV[ARGV.index("--limit-train"):], "--out-dir", "energy_spikes"]
    argv.remove("--early-exit")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        study = energy.main(argv)
    key = "L=2, w=10, in=4, kd=1: gamma = L"
    result = study["per_seed"][1]["test"][key]
    assert result["run"]["settings"]["input_levels"] == 4
    assert result["settings"]["input_neuron"]["gamma"] == 4
    assert result["snn_energy_pj"][0] < study["per_seed"][1]["test"]["L=2, w=0: gamma = L"][
        "snn_energy_pj"][0] - 117_600 * 4.6 / 2  # no MACs: much less than the pair
    assert "minus_unpenalised" in study["test"][key]
    memory = study["test"][key]["memory"]["t=1"]  # and with memory traffic, against its QNN
    assert memory["over_qnn_memory"]["per_seed"] == [
        result["energy_models"]["qnn"][0]["snn_over_qnn_memory"]]
    assert "with memory traffic" in capsys.readouterr().out
    trained = load_checkpoint(tmp / "ck" / "energy" / "qcfs_L2_w10_in4_kd1_T2_e1_seed1.pt")
    assert trained["input_levels"] == 4 and trained["args"]["teacher"].endswith("relu_seed1.pt")
