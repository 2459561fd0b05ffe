import csv
import json

from helpers import DATA, run_command, without_timings

import compare
import lenet_convert
from compare import BRAINCOG, BRAINCOG_SETTINGS, GIVEN, compare_settings
from options import HARDWARE, Settings


def test_compare_settings_change_one_knob_at_a_time():
    given = Settings("99")
    variants = compare_settings(given, ["99", "99.9", "99.99", "100"])
    assert variants[0] == (GIVEN, given) and variants[-1] == (BRAINCOG, BRAINCOG_SETTINGS)
    varied = set()
    for label, settings in variants[1:-1]:
        changed = {f for f in Settings._fields if getattr(settings, f) != getattr(given, f)}
        assert len(changed) == 1, label
        varied |= changed
    # every knob of the conversion is tried; the exit threshold, margin and deadline are chosen
    # on validation when early exit is on
    assert varied == set(Settings._fields) - {"exit_threshold", "exit_margin", "exit_deadline",
                                              *HARDWARE}  # the energy model's: no knob
    labels = [label for label, _ in variants]
    assert len(set(labels)) == len(labels)
    qcfs = compare_settings(Settings(None), ["99"], every_knob=False)
    assert {s.gamma for _, s in qcfs} == set(compare.COMPARE_GAMMAS)
    assert qcfs[-1][1].exit_rule == compare.COMPARE_EXIT_RULE


def test_compare_mode_writes_its_figure_and_table(trained, qcfs, tmp_path):
    results = lenet_convert.main(["--checkpoint", str(trained), "--compare", str(qcfs),
                                  "--limit", "100", "--timesteps", "4", "--data-dir", str(DATA),
                                  "--out-dir", str(tmp_path)])
    labels = [r["label"] for r in results]
    recorded = ["99", "99.9", "99.99", "100"]
    assert labels == [label for label, _ in compare_settings(Settings("99"), recorded)] + [
        label for label, _ in compare_settings(Settings(None), recorded, every_knob=False)]
    reference = results[labels.index("BrainCog reference")]["settings"]
    assert (reference["v0"], reference["gamma"], reference["percentile"],
            reference["lateral_inhibition"]) == (0.0, 2, "99.9", False)
    assert results[-1]["checkpoint"] == str(qcfs) and results[-1]["settings"]["levels"] == 2
    assert results[-2]["settings"]["gamma"] == 4 and results[-1]["early_exit"]["mean_steps"] >= 1
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [r["setting"] for r in rows] == labels
    assert [float(r["t=4"]) for r in rows] == [round(100 * r["snn_accuracy"][3], 2)
                                               for r in results]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert len(saved["runs"]) == len(results) and "efficiency" in saved["runs"][0]
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_command_in_a_fresh_process_gives_the_same_runs(trained, qcfs, tmp_path):
    """`python lenet_convert.py --compare` as a user runs it: the features it hands over to
    must work on the same classes as the script (one copy of the module)."""
    argv = ["--checkpoint", str(trained), "--compare", str(qcfs), "--limit", "100",
            "--timesteps", "4", "--device", "cpu", "--data-dir", str(DATA)]
    done = run_command("lenet_convert.py", *argv, "--out-dir", str(tmp_path / "command"))
    assert done.returncode == 0, done.stderr
    assert "wrote compare.png, compare.json and compare.csv" in done.stdout
    lenet_convert.main([*argv, "--out-dir", str(tmp_path / "here")])
    command, here = (json.loads((tmp_path / d / "compare.json").read_text())
                     for d in ("command", "here"))
    assert without_timings(command) == without_timings(here)
    assert all(run["efficiency"]["firing_rate"] for run in command["runs"])  # SpikeNodes found

