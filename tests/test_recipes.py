import json
import sys

import pytest
from helpers import DATA, ROOT

sys.path.insert(0, str(ROOT / "bench"))

import recipes  # noqa: E402


def test_recipes_are_judged_on_validation_paired_with_the_baseline(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(recipes, "RECIPES", {
        recipes.BASELINE: recipes.RECIPES[recipes.BASELINE],
        "two stages": [("S1", ["--levels", "8"]), ("S2", ["--threshold-decay", "0"])]})
    monkeypatch.setattr(recipes, "CONVERSIONS", [(2, 0.5), ("L", 0.5)])
    monkeypatch.setattr(recipes, "CONVERSION_STEPS", 3)
    argv = ["--seeds", "1", "2", "--epochs", "2", "--limit-train", "1000", "--device", "cpu",
            "--workers", "0",
            "--data-dir", str(DATA), "--checkpoint-dir", str(tmp_path / "ck"),
            "--out-dir", str(tmp_path / "out")]
    summary = recipes.main(argv)
    saved = json.loads((tmp_path / "out" / "recipes.json").read_text())
    conversions = summary.pop("conversions")
    assert saved["summary"] == json.loads(json.dumps(summary))
    assert saved["conversions"] == json.loads(json.dumps(conversions))
    for name, entry in conversions["per_conversion"].items():  # each seed's on validation
        runs = [saved["conversions_per_seed"][s] for s in ("1", "2")]
        assert entry["steps"] == [run[name]["first_step_within"] for run in runs]
        assert all(len(run[name]["accuracy"]) == recipes.CONVERSION_STEPS for run in runs)
    chosen, never = conversions["chosen"], recipes.CONVERSION_STEPS + 1
    score = {name: sum(never if t is None else t for t in e["steps"]) / 2
             for name, e in conversions["per_conversion"].items()}
    assert score[chosen] == min(score.values())
    for seed in (1, 2):
        made = {name: json.loads((tmp_path / "ck" / "recipes" / f"{code}_seed{seed}_history.json")
                                 .read_text()) for name, code in (("base", "A"), ("two", "S2"))}
        assert len(made["base"]) == len(made["two"]) == 2
        per_seed = saved["per_seed"][str(seed)]
        assert per_seed["two stages"]["val_accuracy"] == max(h["val_accuracy"]
                                                             for h in made["two"])
        first = json.loads((tmp_path / "ck" / "recipes" / f"S1_seed{seed}_history.json")
                           .read_text())
        assert per_seed["two stages"]["epochs"] == len(first) + len(made["two"])  # all stages
        assert per_seed["two stages"]["seconds"] == pytest.approx(
            sum(h["seconds"] for h in first + made["two"]))
    two = summary["two stages"]
    assert two["minus_baseline"] == pytest.approx(
        [saved["per_seed"][s]["two stages"]["val_accuracy"] -
         saved["per_seed"][s][recipes.BASELINE]["val_accuracy"] for s in ("1", "2")])
    assert two["mean"] == pytest.approx(sum(two["val_accuracy"]) / 2)
    # the second stage started from the first: lenet5.py recorded where it came from
    from checkpoint import load_checkpoint
    started = load_checkpoint(tmp_path / "ck" / "recipes" / "S2_seed1.pt")["args"]["init_from"]
    assert started.endswith("S1_seed1.pt")
    capsys.readouterr()
    recipes.main(argv)  # everything is reused the second time
    assert "training on" not in capsys.readouterr().out
