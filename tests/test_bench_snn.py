import itertools
import json
import math
import re
import sys

import pytest
import torch
import torch.nn as nn
from helpers import DATA, ROOT, check_refused, dyadic_snn

import constant_input
import lenet5
import lenet_convert
import mnist
import options
from checkpoint import load_checkpoint
from lenet_convert import counting_modules, evaluate_snn, simulate
from options import Settings

sys.path.insert(0, str(ROOT / "bench"))

import bench_snn  # noqa: E402
from layerwise import simulate_layerwise  # noqa: E402


def _run(simulator, snn, images, steps, **kwargs):
    with torch.no_grad():
        outputs = torch.stack(list(simulator(snn, images, steps, **kwargs)))
    counts = {name: m.counts.clone() for name, m in counting_modules(snn).items()}
    return outputs, counts


@pytest.mark.parametrize("gamma, v0, inhibition, readout",
                         itertools.product((1, 2), (0.0, 0.5), (True, False), ("analog", "spikes")))
def test_layerwise_simulation_gives_identical_spikes(gamma, v0, inhibition, readout):
    _check_layerwise(gamma=gamma, v0=v0, lateral_inhibition=inhibition, readout=readout)


@pytest.mark.parametrize("reset, spicalib, inhibition",
                         [("zero", 0, True), ("subtract", 2, True), ("zero", 1, False)])
def test_layerwise_simulation_resets_and_calibrates_identically(reset, spicalib, inhibition):
    _check_layerwise(reset=reset, spicalib=spicalib, lateral_inhibition=inhibition)


@pytest.mark.parametrize("input_levels, gamma", [(1, 2), (4, 2), (3, 1)])
def test_layerwise_simulation_takes_the_image_as_spikes_identically(input_levels, gamma):
    _check_layerwise(input_levels=input_levels, gamma=gamma)


def _check_layerwise(**settings):
    snn = dyadic_snn(**settings)
    images = torch.rand(13, 1, 32, 32)
    layer_outputs, layer_counts = _run(simulate_layerwise, snn, images, 12,
                                       chunk_elements=12 * 4704 * 5)  # 5 images a chunk
    stepped_outputs, stepped_counts = _run(simulate, snn, images, 12, closed_form=False)
    assert stepped_counts["act6"].sum() > 0 and stepped_counts.keys() == layer_counts.keys()
    for name, counts in stepped_counts.items():  # the same spikes at every step and unit
        assert counts.shape[0] == 12 and torch.equal(counts, layer_counts[name]), name
    assert torch.equal(stepped_outputs, layer_outputs)
    outputs, counts = _run(simulate, snn, images, 12)  # the script's: in closed form if it can
    assert torch.equal(outputs, layer_outputs) and bench_snn.same_spikes(counts, layer_counts)
    assert (len(counts["act1"]) == 1) == constant_input.in_closed_form(snn)


def test_layerwise_gives_the_same_accuracy_on_a_trained_network(trained):
    checkpoint = load_checkpoint(trained)
    ann = lenet5.model_from_checkpoint(checkpoint)
    snn = lenet_convert.build_snn(checkpoint, ann, Settings("99"))
    images, labels = mnist.load_mnist(DATA, train=False)
    batches = mnist.Batches(images[:300], labels[:300], 128)
    step = evaluate_snn(snn, batches, 16, "cpu")
    layerwise = evaluate_snn(snn, batches, 16, "cpu", simulate_layerwise)
    assert step[0] == layerwise[0] and bench_snn.same_spikes(step[1], layerwise[1])


def test_benchmark_simulates_the_network_the_script_converts(trained):
    args = bench_snn.parse_args(["--checkpoint", str(trained), "--data-dir", str(DATA),
                                 "--limit", "10"])
    _, _, ann, snn, batches = bench_snn.load(args)
    checkpoint, script_ann = lenet_convert.load_ann(trained, "cpu")
    script_args = options.parse_args(["--checkpoint", str(trained)])
    script_snn = lenet_convert.build_snn(checkpoint, script_ann,
                                         options.settings_from(script_args, checkpoint))
    assert repr(snn) == repr(script_snn)
    assert all(torch.equal(a, b) for a, b in zip(snn.state_dict().values(),
                                                  script_snn.state_dict().values(), strict=True))
    assert args.batch_size == script_args.batch_size  # the dense unit runs at the same batch size
    images = next(iter(batches))[0]
    with torch.no_grad():  # the fastest ANN is the same function as the ANN
        assert torch.allclose(bench_snn.fastest_ann(ann)(images), ann(images), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bench_snn.fastest_ann(ann).modules())


def test_benchmark_writes_its_table(trained, qcfs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench_snn.main(["--checkpoint", str(trained), "--qcfs-checkpoint", str(qcfs),
                             "--limit", "40", "--timesteps", "1", "3", "--repeats", "1",
                             "--search-timesteps", "4", "--memory-timesteps", "3",
                             "--data-dir", str(DATA), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {(r["simulator"], r["timesteps"]): r for r in result["rows"]}
    assert set(rows) >= {("step", 1), ("layerwise", 1), ("step", 3), ("layerwise", 3)}
    dense = result["dense_unit"]
    for (_, timesteps), row in rows.items():  # times measured, not made up
        assert all(0 < row[key] < math.inf for key in ("seconds", "dense_seconds",
                                                          "ratio_to_T_ann"))
        assert len(row["accuracy"]) == timesteps
    assert rows["step", 1]["same_spikes_as_layerwise"] and rows["step", 3][
        "same_spikes_as_layerwise"]
    assert result["step"]["from_timesteps"] == [1, 9] and result["step"]["dense_rest_seconds"] > 0
    # both simulators give the accuracy that lenet_convert.py's evaluation gives
    args = bench_snn.parse_args(["--checkpoint", str(trained), "--data-dir", str(DATA),
                                 "--limit", "40"])
    _, _, ann, snn, batches = bench_snn.load(args)
    expected, _ = evaluate_snn(snn, batches, 3, "cpu")
    assert rows["step", 3]["accuracy"] == expected == rows["layerwise", 3]["accuracy"]
    assert dense["accuracy"] == lenet5.evaluate(ann, batches, "cpu")
    for name, path in (("relu", trained), ("qcfs", qcfs)):  # what the script's evaluation gives
        level = result["to_ann_level"][name]
        _, _, ann, snn, _ = bench_snn.load(args, path)
        accuracy, _ = evaluate_snn(snn, batches, 4, "cpu")
        ann_accuracy = lenet5.evaluate(ann, batches, "cpu")
        assert level["ann_accuracy"] == ann_accuracy
        assert level["fixed_timesteps"] == (lenet_convert.first_step_within(accuracy, ann_accuracy)
                                            or 4)
        assert level["fixed_accuracy"] == accuracy[level["fixed_timesteps"] - 1]
        assert 1 <= level["early_exit"]["mean_steps"] <= 4
    assert result["peak_memory"]["layerwise"]["peak_mb"] > 0
    spiking = result["spiking_input"]  # C1 stepped over the input's spikes: timed, and the same
    assert spiking["input_levels"] == options.INPUT_LEVELS and spiking["step_ratio_to_dense"] > 0
    assert [r["timesteps"] for r in spiking["rows"]] == [1, 3]
    assert all(r["same_spikes_as_layerwise"] and r["ratio_to_T_ann"] > 0 for r in spiking["rows"])
    assert "x T*ANN" in capsys.readouterr().out


@pytest.mark.parametrize("out, message", [
    ("{dir}", "is a folder; give a file name"),
    ("{file}/bench.json", "cannot write to .*: .*file is a file"),
])
def test_benchmark_refuses_an_unwritable_out_before_it_starts(tmp_path, out, message, monkeypatch):
    (tmp_path / "file").write_text("a file")
    monkeypatch.setattr(bench_snn, "run_benchmark", lambda args: pytest.fail("it ran"))
    out = out.replace("{dir}", str(tmp_path)).replace("{file}", str(tmp_path / "file"))
    with pytest.raises(SystemExit) as exit_info:
        bench_snn.main(["--out", out])
    assert re.search(message, str(exit_info.value.code))


def test_benchmark_refuses_what_it_cannot_time_before_it_starts(trained, capsys):
    check_refused(bench_snn.main, ["--timesteps", "1", "4", "1"], "--timesteps: each T once",
                  capsys)
    with pytest.raises(SystemExit, match="is not a QCFS network"):
        bench_snn.main(["--checkpoint", str(trained), "--qcfs-checkpoint", str(trained),
                        "--data-dir", str(DATA), "--out", "/nowhere/x.json"])
