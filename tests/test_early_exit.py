import json
import math

import pytest
import torch
from helpers import DATA, dyadic_snn, run_command, two_class_snn, without_timings

import early_exit
import lenet_convert
import mnist
from lenet_convert import evaluate_snn


def test_early_exit_stops_each_image_at_its_known_step():
    images = torch.tensor([[1.0, 0], [0.5, 0], [0.375, 0], [0.25, 0.375], [0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    # margin floor(t a) / t reaches 0.5 at t = 1 for a = 1, at t = 2 for a = 0.5, never for the
    # third and fourth images (they run to T = 6); the last is class 1 from the first step
    snn = two_class_snn()
    accuracy, counts, steps, predictions = early_exit.evaluate_early_exit(
        snn, [(images, labels)], 6, "cpu", "margin", 0.5)
    assert steps.tolist() == [1, 2, 6, 6, 1]
    assert predictions.tolist() == [0, 0, 0, 1, 1]
    assert snn.spy.sizes == [5, 3, 2, 2, 2, 2]  # stopped images are not simulated further
    assert counts["act"].sum(1).tolist() == [2, 1, 2, 1, 0, 2]  # their spikes are not counted
    # with the steps capped at t, the fourth image's scores are (0, 0), (0, 0), (0, 1), (1, 1),
    # (1, 1), (1, 2): right at t = 3 and 6 only (a tie goes to class 0)
    assert accuracy == pytest.approx([4 / 5, 4 / 5, 1, 4 / 5, 4 / 5, 1])
    # the one-pass recording gives the same exit steps and predictions for any threshold
    values, recorded, _ = early_exit.record_settledness(two_class_snn(), [(images, labels)],
                                                          6, "cpu", "margin")
    for threshold in (0.2, 0.5, 0.7, 1.0):
        steps = early_exit.evaluate_early_exit(two_class_snn(), [(images, labels)], 6, "cpu",
                                                  "margin", threshold)[2]
        assert torch.equal(early_exit.exit_steps(values, threshold), steps)
    table = early_exit.exit_table(values, recorded, labels, [0.5])
    assert early_exit.exit_curve(table, [0.5], 6) == [
        {"threshold": 0.5, "accuracy": 1.0, "mean_steps": 16 / 5}]
    # with a deadline of 3 the two slow images stop there, both right at t = 3
    assert early_exit.exit_curve(table, [0.5], 3) == [
        {"threshold": 0.5, "accuracy": 1.0, "mean_steps": 2.0}]
    snn = two_class_snn()
    accuracy, _, steps, predictions = early_exit.evaluate_early_exit(
        snn, [(images, labels)], 6, "cpu", "margin", 0.5, deadline=3)
    assert steps.tolist() == [1, 2, 3, 3, 1] and predictions.tolist() == [0, 0, 0, 1, 1]
    assert snn.spy.sizes == [5, 3, 2] and accuracy == pytest.approx([0.8, 0.8, 1, 1, 1, 1])


def test_exit_threshold_and_deadline_are_the_fewest_steps_within_the_margin():
    accuracy = torch.tensor([[0.95, 0.97], [0.990, 0.992]], dtype=torch.float64)
    steps = torch.tensor([[1.0, 1.05], [1.3, 1.5]], dtype=torch.float64)  # [threshold, deadline]
    table, thresholds = (accuracy, steps), [1.0, 2.0]
    choose = early_exit.choose_exit
    assert choose(table, thresholds, 0.9905, 0.001, [1, 2]) == (2.0, 1, True)
    assert choose(table, thresholds, 0.9905, 0.001, [2]) == (2.0, 2, True)  # a given deadline
    assert choose(table, thresholds, 0.9935, 0.001, [1, 2]) == (2.0, 2, False)  # none within


def test_settledness_rules():
    total = torch.tensor([[4.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    assert early_exit.settledness(total, 2, "margin").tolist() == [1.0, 0.0]
    confidence = early_exit.settledness(total, 2, "confidence")
    assert confidence.tolist() == pytest.approx([torch.tensor([2.0, 1, 0]).softmax(0)[0].item(),
                                                 1 / 3])


def _early_exit_run(trained, tmp_path, *extra, shuffle_test_labels=False, monkeypatch=None):
    if shuffle_test_labels:
        load = mnist.load_mnist

        def shuffled(data_dir, train):
            images, labels = load(data_dir, train)
            return (images, labels) if train else (images, labels[torch.randperm(len(labels))])
        monkeypatch.setattr(lenet_convert, "load_mnist", shuffled)
    lenet_convert.main(["--checkpoint", str(trained), "--limit", "300", "--timesteps", "8",
                        "--data-dir", str(DATA), "--out-dir", str(tmp_path), *extra])
    return json.loads((tmp_path / "snn_early_exit.json").read_text())


@pytest.mark.parametrize("rule, readout", [("margin", "analog"), ("confidence", "spikes")])
def test_early_exit_writes_its_record_and_figure(trained, tmp_path, rule, readout):
    record = _early_exit_run(trained, tmp_path, "--exit-rule", rule, "--readout", readout)
    assert record["rule"] == rule and record["chosen_on"] == "validation"
    assert record["settings"]["readout"] == readout and record["settings"]["exit_rule"] == rule
    assert record["validation_images"] == 1000  # the conftest network's split
    assert sum(record["exit_steps"]) == record["test_images"] == 300
    assert record["mean_steps"] == pytest.approx(
        sum(t * n for t, n in enumerate(record["exit_steps"], 1)) / 300)
    chosen = next(c for c in record["curve"] if c["threshold"] == record["threshold"])
    assert chosen["accuracy"] == record["validation_accuracy"]
    on_test = next(c for c in record["test_curve"] if c["threshold"] == record["threshold"])
    assert on_test["accuracy"] == pytest.approx(record["test_accuracy"])  # recording = real run
    assert on_test["mean_steps"] == pytest.approx(record["mean_steps"])
    assert record["accuracy_with_steps_capped"][-1] == record["test_accuracy"]
    assert record["synops_per_image"] == record["synops_with_steps_capped"][-1]
    assert record["seconds"] > 0 and record["fixed_seconds"] > 0 and "median" in record["timing"]
    assert record["fixed_accuracy_per_step"][record["fixed_timesteps"] - 1] >= (
        record["test_accuracy"]) or record["fixed_timesteps"] == 8
    assert len(record["hardest"]) == 16
    order = [(-h["exit_step"], h[rule]) for h in record["hardest"]]
    assert order == sorted(order)  # the longest runs, the least settled first
    assert max(h["exit_step"] for h in record["hardest"]) == max(
        t for t, n in enumerate(record["exit_steps"], 1) if n)
    assert (tmp_path / "snn_early_exit.png").read_bytes()[:4] == b"\x89PNG"
    fixed = json.loads((tmp_path / "snn_accuracy.json").read_text())
    assert fixed["settings"]["exit_rule"] == "none"  # the usual files stay the fixed-T run


def test_exit_threshold_search_never_reads_test_labels(trained, tmp_path, monkeypatch):
    first = _early_exit_run(trained, tmp_path / "a", "--exit-rule", "margin")
    shuffled = _early_exit_run(trained, tmp_path / "b", "--exit-rule", "margin",
                               shuffle_test_labels=True, monkeypatch=monkeypatch)
    assert shuffled["threshold"] == first["threshold"] and shuffled["curve"] == first["curve"]
    assert shuffled["exit_steps"] == first["exit_steps"]
    assert shuffled["test_accuracy"] != first["test_accuracy"]  # the test labels did change


def test_given_exit_threshold_skips_the_search(trained, tmp_path):
    record = _early_exit_run(trained, tmp_path, "--exit-rule", "confidence",
                             "--exit-threshold", "0.9")
    assert record["chosen_on"] == "given" and record["threshold"] == 0.9 and "curve" not in record
    assert record["deadline"] == 8  # --timesteps, unless --exit-deadline


@pytest.mark.parametrize("rule, threshold, step", [("confidence", "0.05", 1),
                                                  ("margin", "1e9", 8)])
def test_early_exits_energy_with_memory_traffic_is_a_fixed_runs_of_its_steps(
        trained, tmp_path, rule, threshold, step):
    """Every image stops at t = 1 (of 10 classes, one has at least 0.1 of the softmax), or none
    before T = 8: early exit then costs, with memory traffic, what a fixed run of that many
    steps costs; its QNN is the one of the fixed T that reaches its accuracy."""
    record = _early_exit_run(trained, tmp_path / "exit", "--exit-rule", rule, "--exit-threshold",
                             threshold)
    assert record["mean_steps"] == step

    def fixed(steps):  # the last step's QNN is always run
        return lenet_convert.main(["--checkpoint", str(trained), "--limit", "300", "--timesteps",
                                   str(steps), "--data-dir", str(DATA), "--out-dir",
                                   str(tmp_path / str(steps))])["energy_models"]
    models = fixed(step)
    assert record["memory_pj_per_image"] == pytest.approx(models["snn_memory_pj"][-1], rel=1e-9)
    assert record["over_ann_memory"] == pytest.approx(models["snn_over_ann_memory"][-1], rel=1e-9)
    qnn = fixed(record["fixed_timesteps"])["qnn"][-1]
    assert record["qnn_memory_pj"] == qnn["memory_pj"]
    assert record["over_qnn_memory"] == pytest.approx(
        record["memory_pj_per_image"] / qnn["memory_pj"])


def test_early_exit_without_a_validation_split_fails_before_simulating(trained, tmp_path, capsys):
    checkpoint = torch.load(trained, weights_only=True)
    del checkpoint["args"]["val_size"]
    path = tmp_path / "no_split.pt"
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit) as exit_info:
        lenet_convert.main(["--checkpoint", str(path), "--exit-rule", "margin",
                            "--data-dir", str(DATA), "--out-dir", str(tmp_path / "out")])
    assert "records no validation split" in str(exit_info.value.code)
    assert "simulating" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_early_exit_steps_the_slow_images_of_all_batches_together():
    fast, slow = [[1.0, 0], [0, 1.0]] * 4, [[0.375, 0], [0.25, 0.375]]
    images = torch.tensor(fast + slow)  # 8 settled after one step, 2 never
    labels = images.argmax(1)
    batches = [(images, labels), (images.flip(0), labels.flip(0)), (images[:5], labels[:5])]
    merged = two_class_snn()
    together = early_exit.evaluate_early_exit(merged, batches, 6, "cpu", "margin", 0.5)
    # after the first step two images of each of the first two batches run on (a fifth of a
    # batch: merged, as one group of 4); the third batch has none left
    assert merged.spy.sizes == [10, 10, 5] + [4] * 5
    assert together[2].tolist() == [1] * 8 + [6, 6] + [6, 6] + [1] * 8 + [1] * 5
    apart = [early_exit.evaluate_early_exit(two_class_snn(), [batch], 6, "cpu", "margin", 0.5)
             for batch in batches]  # each batch alone: the same exits, answers and spikes
    sizes = [len(labels) for _, labels in batches]
    assert together[0] == pytest.approx([sum(a[0][t] * n for a, n in zip(apart, sizes, strict=True))
                                         / sum(sizes) for t in range(6)])
    assert together[1]["act"].equal(sum(a[1]["act"] for a in apart))
    assert torch.equal(together[2], torch.cat([a[2] for a in apart]))
    assert torch.equal(together[3], torch.cat([a[3] for a in apart]))


@pytest.mark.parametrize("settings", [
    {},  # the first layer in closed form
    {"readout": "spikes", "v0": 0.25, "gamma": 1},  # the same
    {"spicalib": 2, "reset": "zero", "readout": "spikes"},
    {"spicalib": 1, "lateral_inhibition": False, "gamma": 1},
])
def test_early_exit_carries_every_module_state_when_images_leave_or_merge(settings, monkeypatch):
    """Stopping images and merging the slow ones of several batches moves the state of every
    stateful module (potentials, calibration, pools): the results must not depend on it."""
    torch.manual_seed(1)
    images, labels = torch.rand(24, 1, 32, 32), torch.randint(0, 10, (24,))
    batches = [(images[:8], labels[:8]), (images[8:16], labels[8:16]), (images[16:], labels[16:])]
    values, _, _ = early_exit.record_settledness(dyadic_snn(**settings), batches, 10, "cpu",
                                                 "margin")
    middle = values[2].median().item()  # about half the images stop by step 3
    monkeypatch.setattr(early_exit, "EXIT_MERGE", 1.0)  # merge whatever fits in a batch
    runs = [early_exit.evaluate_early_exit(dyadic_snn(**settings), data, 10, "cpu", "margin",
                                           threshold)
            for threshold, data in ((math.inf, batches), (middle, batches),
                                    (middle, [(images, labels)]))]
    everything, merged, alone = runs
    assert 1 < alone[2].double().mean() < 10  # some images stop early, some run on
    assert torch.equal(alone[2], merged[2]) and torch.equal(alone[3], merged[3])
    assert alone[0] == merged[0]
    for name, counts in alone[1].items():
        assert torch.equal(counts, merged[1][name]), name
    # an image's predictions up to its exit step are those it has when nothing stops, and so
    # are its spikes (a layer counted in closed form: all steps in one row)
    full, counts = evaluate_snn(dyadic_snn(**settings), [(images, labels)], 10, "cpu")
    assert everything[0] == pytest.approx(full)
    for name, counted in counts.items():
        assert torch.equal(everything[1][name].sum(0), counted.sum(0)), name



def test_early_exit_command_in_a_fresh_process_gives_the_same_record(trained, tmp_path):
    """`python lenet_convert.py --exit-rule margin` as a user runs it, against main() here."""
    argv = ["--checkpoint", str(trained), "--limit", "200", "--timesteps", "6", "--device",
            "cpu", "--data-dir", str(DATA), "--exit-rule", "margin"]
    done = run_command("lenet_convert.py", *argv, "--out-dir", str(tmp_path / "command"))
    assert done.returncode == 0, done.stderr
    assert "snn_early_exit.png and snn_early_exit.json" in done.stdout
    assert "Traceback" not in done.stderr
    lenet_convert.main([*argv, "--out-dir", str(tmp_path / "here")])
    for name in ("snn_accuracy.json", "snn_early_exit.json"):
        command, here = (json.loads((tmp_path / d / name).read_text()) for d in ("command", "here"))
        assert without_timings(command) == without_timings(here), name

