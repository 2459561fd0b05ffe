import csv
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lenet5
import lenet_convert
from lenet_convert import Counting, Settings, evaluate_snn, fuse_norm_replace, simulate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT / "bench"))

import bench_snn  # noqa: E402
from layerwise import simulate_layerwise  # noqa: E402


def _dyadic_snn(**settings):
    """A converted random LeNet5 whose weights and biases are multiples of 1/64.

    Every sum of spikes times weights is then exact in float32 whatever the order of the terms,
    so two correct simulators must agree bit for bit.
    """
    torch.manual_seed(0)
    scales = {name: 1.0 for name in ("act1", "act3", "act5", "act6", "out")}
    snn = fuse_norm_replace(lenet5.LeNet5().eval(), scales, **settings)
    with torch.no_grad():
        for layer in snn.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight.copy_(torch.round(layer.weight * 192) / 64)
                layer.bias.copy_(torch.round(layer.bias * 64) / 64 + 0.25)
    return snn


def _run(simulator, snn, images, steps, **kwargs):
    with torch.no_grad():
        outputs = torch.stack(list(simulator(snn, images, steps, **kwargs)))
    counts = {name: m.counts.clone() for name, m in snn.named_modules()
              if isinstance(m, Counting)}
    return outputs, counts


@pytest.mark.parametrize("gamma, v0, inhibition, readout",
                         itertools.product((1, 2), (0.0, 0.5), (True, False), ("analog", "spikes")))
def test_layerwise_simulation_gives_identical_spikes(gamma, v0, inhibition, readout):
    _check_layerwise(gamma=gamma, v0=v0, lateral_inhibition=inhibition, readout=readout)


@pytest.mark.parametrize("reset, spicalib, inhibition",
                         [("zero", 0, True), ("subtract", 2, True), ("zero", 1, False)])
def test_layerwise_simulation_resets_and_calibrates_identically(reset, spicalib, inhibition):
    _check_layerwise(reset=reset, spicalib=spicalib, lateral_inhibition=inhibition)


def _check_layerwise(**settings):
    snn = _dyadic_snn(**settings)
    images = torch.rand(13, 1, 32, 32)
    step_outputs, step_counts = _run(simulate, snn, images, 12)
    layer_outputs, layer_counts = _run(simulate_layerwise, snn, images, 12,
                                       chunk_elements=12 * 4704 * 5)  # 5 images a chunk
    assert step_counts["act6"].sum() > 0 and step_counts.keys() == layer_counts.keys()
    for name, counts in step_counts.items():  # the same spikes at every step and unit
        assert counts.shape[0] == 12 and torch.equal(counts, layer_counts[name]), name
    assert torch.equal(step_outputs, layer_outputs)


def test_layerwise_gives_the_same_accuracy_on_a_trained_network(trained):
    checkpoint = lenet5.load_checkpoint(trained)
    ann = lenet5.model_from_checkpoint(checkpoint)
    snn = lenet_convert.build_snn(checkpoint, ann, Settings("99"))
    images, labels = lenet5.load_mnist(DATA, train=False)
    batches = lenet5.Batches(images[:300], labels[:300], 128)
    step = evaluate_snn(snn, batches, 16, "cpu")
    layerwise = evaluate_snn(snn, batches, 16, "cpu", simulate_layerwise)
    assert step[0] == layerwise[0]
    assert all(torch.equal(step[1][name], layerwise[1][name]) for name in step[1])


def test_benchmark_simulates_the_network_the_script_converts(trained):
    args = bench_snn.parse_args(["--checkpoint", str(trained), "--data-dir", str(DATA),
                                 "--limit", "10"])
    _, ann, snn, batches = bench_snn.load(args)
    checkpoint, script_ann = lenet_convert.load_ann(trained, "cpu")
    script_args = lenet_convert.parse_args(["--checkpoint", str(trained)])
    script_snn = lenet_convert.build_snn(checkpoint, script_ann,
                                         lenet_convert.settings_from(script_args, checkpoint))
    assert repr(snn) == repr(script_snn)
    assert all(torch.equal(a, b) for a, b in zip(snn.state_dict().values(),
                                                  script_snn.state_dict().values(), strict=True))
    assert args.batch_size == script_args.batch_size  # the dense unit runs at the same batch size
    images = next(iter(batches))[0]
    with torch.no_grad():  # the fastest ANN is the same function as the ANN
        assert torch.allclose(bench_snn.fastest_ann(ann)(images), ann(images), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bench_snn.fastest_ann(ann).modules())


def test_benchmark_writes_its_table(trained, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench_snn.main(["--checkpoint", str(trained), "--limit", "40", "--timesteps", "2",
                             "3", "--repeats", "1", "--memory-timesteps", "3",
                             "--data-dir", str(DATA), "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {(r["simulator"], r["timesteps"]): r for r in result["rows"]}
    assert set(rows) >= {("step", 2), ("layerwise", 2), ("step", 3), ("layerwise", 3)}
    for (_, timesteps), row in rows.items():
        assert row["ratio_to_T_ann"] == pytest.approx(
            row["seconds"] / (timesteps * result["ann_seconds"]))
        assert len(row["accuracy"]) == timesteps
    # both simulators give the accuracy that lenet_convert.py's evaluation gives
    args = bench_snn.parse_args(["--checkpoint", str(trained), "--data-dir", str(DATA),
                                 "--limit", "40"])
    _, ann, snn, batches = bench_snn.load(args)
    expected, _ = evaluate_snn(snn, batches, 3, "cpu")
    assert rows["step", 3]["accuracy"] == expected == rows["layerwise", 3]["accuracy"]
    assert result["ann_accuracy"] == lenet5.evaluate(ann, batches, "cpu")
    assert result["ann_as_trained_accuracy"] == result["ann_accuracy"]
    assert result["peak_memory"]["layerwise"]["peak_mb"] > 0
    assert "x T*ANN" in capsys.readouterr().out


def test_seeds_study_summarises_the_per_seed_runs(tmp_path, capsys):
    import seeds
    argv = ["--seeds", "1", "2", "--limit-train", "300", "--epochs", "1", "--limit", "200",
            "--timesteps", "4", "--device", "cpu", "--data-dir", str(DATA),
            "--checkpoint-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out")]
    study = seeds.main(argv)
    saved = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert saved == json.loads(json.dumps(study))
    assert saved["seeds"] == [1, 2] and saved["timesteps"] == 4 and saved["test_images"] == 200
    assert set(saved["runs"]) == {"relu", "relu_braincog_reference", "qcfs"}
    for i, seed in enumerate((1, 2)):  # each seed's runs are what lenet_convert.py gives
        for name in ("relu", "qcfs"):
            checkpoint = tmp_path / "ck" / f"{name}_seed{seed}.pt"
            single = lenet_convert.main(["--checkpoint", str(checkpoint), "--limit", "200",
                                         "--timesteps", "4", "--device", "cpu", "--data-dir",
                                         str(DATA), "--out-dir", str(tmp_path / "single")])
            assert saved["runs"][name]["snn"][i] == single["snn_accuracy"]
            assert saved["runs"][name]["ann"][i] == single["ann_accuracy"]
    relu = saved["runs"]["relu"]["snn"]
    summary = saved["summary"]["relu"]
    assert summary["snn_mean"] == pytest.approx([(a + b) / 2 for a, b in zip(*relu, strict=True)])
    assert summary["snn_std"] == pytest.approx([abs(a - b) / 2**0.5
                                                for a, b in zip(*relu, strict=True)])
    assert summary["snn_min"] == [min(a, b) for a, b in zip(*relu, strict=True)]
    per_seed = [json.loads((tmp_path / "out" / f"seed{s}.json").read_text()) for s in (1, 2)]
    gamma = saved["paired"]["γ = 4"]
    assert gamma["against"] == "as given"
    assert gamma["per_seed"] == [[a - b for a, b in zip(run["γ = 4"]["snn_accuracy"],
                                                         run["as given"]["snn_accuracy"],
                                                         strict=True)] for run in per_seed]
    assert saved["paired"]["qcfs: γ = 1"]["against"] == "qcfs: as given"
    assert {"lateral inhibition off", "V0 = 0", "γ = 1", "p = 99.9", "p = 100", "norm per channel",
            "norm per neuron", "reset to 0", "spike calibration 4", "early exit (margin)"} <= set(
        saved["paired"])
    early = saved["early_exit"]
    assert set(early) == {"early exit (margin)", "qcfs: early exit (margin)"}
    steps = [run["qcfs: early exit (margin)"]["early_exit"]["mean_steps"] for run in per_seed]
    assert early["qcfs: early exit (margin)"]["mean_steps"]["per_seed"] == steps
    assert early["qcfs: early exit (margin)"]["mean_steps"]["mean"] == pytest.approx(sum(steps) / 2)
    rows = list(csv.DictReader((tmp_path / "out" / "seeds.csv").open()))
    assert len(rows) == 4 * (3 + len(saved["paired"]))
    assert (tmp_path / "out" / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    # a second run reuses every checkpoint made with the same arguments
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ck").glob("*.pt")}
    capsys.readouterr()
    assert seeds.main(argv)["runs"] == saved["runs"]
    out = capsys.readouterr().out
    assert out.count("(made with the same arguments)") == 4  # both networks of both seeds
    conversions = len(per_seed[0])  # 16 of the ReLU network, 4 of the QCFS one
    assert conversions == 20
    assert f"reusing {conversions} conversions" in out and "simulating" not in out
    seeds.main([*argv, "--timesteps", "3"])  # a change the conversions depend on: run again
    assert capsys.readouterr().out.count("simulating") == 2 * conversions
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ck").glob("*.pt")}
    relu_argv = seeds.training_argv(1, seeds.parse_args(argv), "relu")
    assert seeds.reusable(tmp_path / "ck" / "relu_seed1.pt", relu_argv)
    assert not seeds.reusable(tmp_path / "ck" / "relu_seed1.pt", relu_argv + ["--lr", "0.02"])
    assert not seeds.reusable(tmp_path / "ck" / "relu_seed3.pt", relu_argv)


@pytest.mark.parametrize("settings", [
    {"spicalib": 2, "reset": "zero", "readout": "spikes"},
    {"spicalib": 1, "lateral_inhibition": False, "gamma": 1},
])
def test_early_exit_carries_every_module_state_when_images_leave_or_merge(settings):
    """Stopping images and merging the slow ones of several batches moves the state of every
    stateful module (potentials, calibration, pools): the results must not depend on it."""
    torch.manual_seed(1)
    images, labels = torch.rand(24, 1, 32, 32), torch.randint(0, 10, (24,))
    batches = [(images[:8], labels[:8]), (images[8:16], labels[8:16]), (images[16:], labels[16:])]
    values, _, _ = lenet_convert.record_settledness(_dyadic_snn(**settings), batches, 10, "cpu",
                                                    "margin")
    middle = values[2].median().item()  # about half the images stop by step 3
    runs = [lenet_convert.evaluate_early_exit(_dyadic_snn(**settings), batches, 10, "cpu",
                                              "margin", threshold, park=park)
            for threshold, park in ((math.inf, 0), (middle, 0), (middle, 1))]
    everything, alone, merged = runs
    assert 1 < alone[2].double().mean() < 10  # some images stop early, some run on
    assert torch.equal(alone[2], merged[2]) and torch.equal(alone[3], merged[3])
    assert alone[0] == merged[0]
    for name, counts in alone[1].items():
        assert torch.equal(counts, merged[1][name]), name
    # an image's predictions up to its exit step are those it has when nothing stops
    full = evaluate_snn(_dyadic_snn(**settings), [(images, labels)], 10, "cpu")[0]
    assert everything[0] == pytest.approx(full)
