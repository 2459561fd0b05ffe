"""Time the SNN simulation against the ANN (the dense unit) and against SpikingJelly, in one run.

On one machine, with the same checkpoint, threads and batch size:

- the dense unit, the fastest ANN forward pass over the test images this project can run
  (BatchNorm folded, the simulator's own max-pool and batch size), split into its
  first layer and the layers after it (the rest); and the ANN as trained, for reference;
- for each T, the step-by-step simulator of lenet_convert.py and the layer-wise one of
  bench/layerwise.py (times, ratio to T dense passes, whether they fire exactly the same
  spikes), and the cost of one simulated step against the rest of the dense unit, which is the
  floor for a step (the first layer's current is computed once);
- the time to reach the ANN's accuracy: for the ReLU network (--checkpoint) and a QCFS one
  (--qcfs-checkpoint, if there), the fixed T that first comes within 0.1 pp of the ANN and
  early exit (its threshold chosen on the checkpoint's validation split), each against one
  dense pass;
- the image as spikes (an input layer of --input-levels): C1 then stepped over spikes, each T
  against T dense passes and one step against the whole dense unit (no target);
- peak memory (a fresh process per simulator);
- when `spikingjelly` is installed (`pip install spikingjelly`, not a requirement of the
  project), its ann2snn converter (mode "99.9%") on the same ANN, timed the same way.

The spiking networks are built by `lenet_convert.build_snn` with the script's default settings,
so the benchmark times the networks the script simulates. Each time is the median of --repeats
runs after a warm-up.

Examples:
    python bench/bench_snn.py                                     # the full table (10-20 min)
    python bench/bench_snn.py --timesteps 1 2 4 64 --repeats 3    # a shorter run

Writes bench/results/bench_snn.json (--out).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/bench_snn.py
import cli  # noqa: E402  (first: see its docstring)

# isort: split
import functools  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from layerwise import simulate_layerwise  # noqa: E402

import early_exit  # noqa: E402
from checkpoint import (
    MAX_INPUT_LEVELS,  # noqa: E402
    load_checkpoint,  # noqa: E402
)
from cli import median_seconds, positive_int, write_json  # noqa: E402
from counting import max_pool  # noqa: E402
from lenet5 import evaluate  # noqa: E402
from lenet_convert import (  # noqa: E402
    build_snn,
    check_memory,
    evaluate_snn,
    first_step_within,
    fold_batchnorm,
    load_ann,
    load_test_set,
    simulate,
)
from mnist import TEST_IMAGES, Batches, load_mnist  # noqa: E402
from options import (  # noqa: E402
    BATCH_SIZE,
    CHECKPOINT,
    INPUT_LEVELS,
    MAX_TIMESTEPS,
    default_settings,
)

SIMULATORS = {  # the script's (the first layer in closed form), the same stepping every layer
    "step": simulate, "step_general": functools.partial(simulate, closed_form=False),
    "layerwise": simulate_layerwise}
QCFS_CHECKPOINT = Path("checkpoints/lenet5_qcfs_best.pt")
EXIT_RULE = "margin"  # the early-exit rule timed for the time to the ANN's accuracy


def spikingjelly_snn(ann, calibration, device):
    """SpikingJelly's ann2snn conversion of `ann` (mode "99.9%"), or None if not installed."""
    try:
        from spikingjelly.activation_based import ann2snn
    except ImportError:
        return None
    recipe = ann2snn.RateCodingRecipe(dataloader=calibration, mode="99.9%")
    return ann2snn.FXConverter(recipe=recipe, device=device).convert(ann)


def simulate_spikingjelly(snn, images, timesteps):
    """SpikingJelly's own way to run its converted model: reset, then T forward calls."""
    from spikingjelly.activation_based import functional
    functional.reset_net(snn)
    for _ in range(timesteps):
        yield snn(images)


class StridedMaxPool(nn.Module):
    """MaxPool2d(k) computed as the simulator computes it (`counting.max_pool`)."""

    def __init__(self, kernel_size):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x):
        return max_pool(x, self.kernel_size)


def fastest_ann(ann):
    """The ANN as fast as the project runs it: BatchNorm folded, the simulator's max-pool."""
    fast = fold_batchnorm(ann)
    for name, layer in fast.named_children():
        if isinstance(layer, nn.MaxPool2d):
            setattr(fast, name, StridedMaxPool(layer.kernel_size))
    return fast


def load(args, path=None):
    """(device, the checkpoint, its ANN, the SNN lenet_convert.py simulates by default, the test
    batches)."""
    device = cli.resolve_device(args.device)
    checkpoint, ann = load_ann(path or args.checkpoint, device, args.data_dir)
    snn = build_snn(checkpoint, ann, default_settings(checkpoint)).to(device)
    batches = load_test_set(args.data_dir, args.limit, args.batch_size)
    return device, checkpoint, ann, snn, batches


def peak_memory_mb(args, simulator, timesteps):
    """Peak resident memory (MB) of a fresh process that simulates at `timesteps`."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_measure_memory, args, simulator, timesteps).result()


def _measure_memory(args, simulator, timesteps):
    torch.set_num_threads(args.threads)
    device, _, _, snn, batches = load(args)
    before = _peak_rss_mb()
    evaluate_snn(snn, batches, timesteps, device, SIMULATORS[simulator])
    after = _peak_rss_mb()
    return {"peak_mb": round(after), "increase_mb": round(after - before)}


def _peak_rss_mb():
    """This process's peak resident memory in MB. Linux's VmHWM, since getrusage's ru_maxrss
    also counts the parent's memory, which a new process holds for a moment after the fork
    that starts it."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dense_runs(ann, batches, device):
    """The dense unit's passes over `batches` to time: in all, its first layer alone, and the
    layers after it on the first layer's outputs; with its accuracy."""
    dense = fastest_ann(ann).to(device).eval()
    images = [x.to(device) for x, _ in batches]
    with torch.no_grad():
        currents = [dense[0](x) for x in images]

    @torch.no_grad()
    def over(model, inputs):
        return lambda: [model(x).sum() for x in inputs]
    return {"dense": over(dense, images), "dense_first_layer": over(dense[0], images),
            "dense_rest": over(dense[1:], currents)}, evaluate(dense, batches, device)


def simulator_rows(args, snn, batches, device, dense, jelly):
    """One row per simulator and T, each timed in turn with one dense pass, whose median in the
    same rounds is the unit of its ratio; the step simulators' spikes checked against
    layer-wise's."""
    simulators = dict(SIMULATORS, **({"spikingjelly": simulate_spikingjelly} if jelly else {}))
    rows, units, n = [], {}, len(batches.labels)
    for timesteps in args.timesteps:
        runs = {"dense": dense["dense"]} | {name: functools.partial(
            evaluate_snn, jelly if name == "spikingjelly" else snn, batches, timesteps, device,
            simulator) for name, simulator in simulators.items()}
        seconds, results = median_seconds(runs, args.repeats)
        units[timesteps] = unit = seconds["dense"]
        for name in simulators:
            accuracy = results[name][0]
            rows.append({"simulator": name, "timesteps": timesteps, "seconds": seconds[name],
                         "image_steps_per_second": n * timesteps / seconds[name],
                         "dense_seconds": unit,
                         "ratio_to_T_ann": seconds[name] / (timesteps * unit),
                         "accuracy": accuracy})
            print(f"T={timesteps:4d} {name:13s} {seconds[name]:8.3f}s  "
                  f"{seconds[name] / (timesteps * unit):5.2f} x T*ANN  "
                  f"acc(T) {accuracy[-1]:.2%}", flush=True)
        for row in rows[-len(simulators):]:
            if row["simulator"].startswith("step"):
                row["same_spikes_as_layerwise"] = same_spikes(results[row["simulator"]][1],
                                                              results["layerwise"][1])
    return rows


def same_spikes(counts, reference):
    """Whether two simulations' spike counts ({module: [T, *units]}) are the same, step by step
    and unit by unit; for a layer counted in closed form (all steps in one row), in all."""
    return counts.keys() == reference.keys() and all(
        torch.equal(counts[k], reference[k]) if len(counts[k]) == len(reference[k])
        else torch.equal(counts[k].sum(0), reference[k].sum(0)) for k in counts)


def step_cost(snn, batches, device, dense, repeats, timesteps=(1, 9)):
    """Seconds of one simulated step after the first layer: each step simulator at the two
    `timesteps`, timed in turn with the dense unit's layers after its first, whose median in
    the same rounds is the floor the step is compared with."""
    runs = {(name, t): functools.partial(evaluate_snn, snn, batches, t, device, SIMULATORS[name])
            for name in ("step", "step_general") for t in timesteps}
    seconds, _ = median_seconds(runs | {"dense_rest": dense["dense_rest"]}, repeats)
    step = {name: (seconds[name, timesteps[1]] - seconds[name, timesteps[0]]) / (
        timesteps[1] - timesteps[0]) for name in ("step", "step_general")}
    rest = seconds["dense_rest"]
    return {"seconds": step["step"], "from_timesteps": list(timesteps), "dense_rest_seconds": rest,
            "ratio_to_dense_rest": step["step"] / rest,
            "general_seconds": step["step_general"],
            "general_ratio_to_dense_rest": step["step_general"] / rest}


def spiking_input_rows(args, checkpoint, ann, batches, device, dense):
    """The image as spikes (an input layer, L_in = --input-levels): C1 is then stepped over the
    input's spikes instead of computed once. For each T, its time against T dense passes (its
    spikes checked against the layer-wise simulator's, run untimed); and one step, from T = 1
    and 9, against the whole dense unit, first layer included. No target: what it costs."""
    settings = default_settings(checkpoint)._replace(input_levels=args.input_levels)
    snn, rows = build_snn(checkpoint, ann, settings).to(device), []
    for timesteps in args.timesteps:
        seconds, results = median_seconds({"dense": dense["dense"], "step": functools.partial(
            evaluate_snn, snn, batches, timesteps, device)}, args.repeats)
        accuracy, counts = results["step"]
        layerwise = evaluate_snn(snn, batches, timesteps, device, simulate_layerwise)
        rows.append({"timesteps": timesteps, "seconds": seconds["step"],
                     "dense_seconds": seconds["dense"],
                     "ratio_to_T_ann": seconds["step"] / (timesteps * seconds["dense"]),
                     "accuracy": accuracy, "same_spikes_as_layerwise": same_spikes(
                         counts, layerwise[1]) and accuracy == layerwise[0]})
        print(f"T={timesteps:4d} image as spikes {seconds['step']:8.3f}s  "
              f"{rows[-1]['ratio_to_T_ann']:5.2f} x T*ANN  acc(T) {accuracy[-1]:.2%}", flush=True)
    seconds, _ = median_seconds({"dense": dense["dense"]} | {t: functools.partial(
        evaluate_snn, snn, batches, t, device) for t in (1, 9)}, args.repeats)
    step = (seconds[9] - seconds[1]) / 8
    return {"input_levels": args.input_levels, "rows": rows, "step_seconds": step,
            "step_ratio_to_dense": step / seconds["dense"]}


def time_to_ann_level(args, path, dense_run):
    """For the network at `path`: the ANN's accuracy; the fixed T that first comes within
    0.1 pp of it and early exit, each timed against one pass of `dense_run` (the ReLU
    network's dense unit, for a QCFS network too: its activation costs more than a ReLU)."""
    device, checkpoint, ann, snn, batches = load(args, path)
    ann_accuracy = evaluate(ann, batches, device)
    accuracy, _ = evaluate_snn(snn, batches, args.search_timesteps, device)
    fixed_t = first_step_within(accuracy, ann_accuracy) or args.search_timesteps
    settings = default_settings(checkpoint)._replace(exit_rule=EXIT_RULE)
    train = load_mnist(args.data_dir, train=True)
    validation = early_exit.validation_split(checkpoint, *train, args.batch_size)
    threshold, deadline, _ = early_exit.choose_on_validation(snn, ann, settings, validation,
                                                            args.search_timesteps, device)
    seconds, results = median_seconds({
        "dense": dense_run,
        "fixed": functools.partial(evaluate_snn, snn, batches, fixed_t, device),
        "early exit": functools.partial(early_exit.evaluate_early_exit, snn, batches,
                                        args.search_timesteps, device, EXIT_RULE, threshold,
                                        deadline)}, args.repeats)
    capped, _, steps, _ = results["early exit"]
    same_t = first_step_within(accuracy, capped[-1], margin=0) or args.search_timesteps
    unit = seconds["dense"]
    result = {"ann_accuracy": ann_accuracy, "dense_seconds": unit, "fixed_timesteps": fixed_t,
              "fixed_accuracy": accuracy[fixed_t - 1], "fixed_seconds": seconds["fixed"],
              "fixed_vs_dense": seconds["fixed"] / unit,
              "early_exit": {"rule": EXIT_RULE, "threshold": threshold, "deadline": deadline,
                             "accuracy": capped[-1], "mean_steps": steps.double().mean().item(),
                             "seconds": seconds["early exit"],
                             "vs_dense": seconds["early exit"] / unit,
                             "fixed_timesteps_same_accuracy": same_t}}
    early = result["early_exit"]
    print(f"{path}: fixed T = {fixed_t} reaches the ANN's {ann_accuracy:.2%} in "
          f"{result['fixed_vs_dense']:.2f} x one dense pass; early exit {capped[-1]:.2%} at "
          f"{early['mean_steps']:.2f} steps in {early['vs_dense']:.2f} x", flush=True)
    return result


def run_benchmark(args):
    torch.set_num_threads(args.threads)
    if args.qcfs_checkpoint.is_file() and (
            load_checkpoint(args.qcfs_checkpoint).get("activation") != "qcfs"):
        raise cli.UserError(f"--qcfs-checkpoint {args.qcfs_checkpoint} is not a QCFS network")
    device, checkpoint, ann, snn, batches = load(args)
    images = len(batches.labels)  # the longest simulation, with early exit's records besides
    check_memory(snn, max(*args.timesteps, args.search_timesteps, args.memory_timesteps),
                 args.batch_size, images, images + checkpoint.get("args", {}).get("val_size", 0))
    runs, accuracy = dense_runs(ann, batches, device)
    seconds, _ = median_seconds(runs | {"as trained": functools.partial(
        evaluate, ann, batches, device)}, args.repeats)
    dense = {"seconds": seconds["dense"], "first_layer_seconds": seconds["dense_first_layer"],
             "rest_seconds": seconds["dense_rest"], "accuracy": accuracy,
             "as_trained_seconds": seconds["as trained"]}
    print(f"dense unit {dense['seconds']:.3f}s (first layer {dense['first_layer_seconds']:.3f}s, "
          f"the rest {dense['rest_seconds']:.3f}s); as trained {seconds['as trained']:.3f}s",
          flush=True)
    train_images, train_labels = load_mnist(args.data_dir, train=True)  # calibrate on training data
    calibration = [images for images, _ in Batches(train_images[:2000], train_labels[:2000],
                                                   args.batch_size)]
    jelly = spikingjelly_snn(ann, calibration, device)
    rows = simulator_rows(args, snn, batches, device, runs, jelly)
    step = step_cost(snn, batches, device, runs, args.repeats)
    print(f"one step {step['seconds']:.3f}s = {step['ratio_to_dense_rest']:.2f} x the dense unit "
          f"after its first layer (stepping every layer: {step['general_ratio_to_dense_rest']:.2f}"
          " x)", flush=True)
    spiking = spiking_input_rows(args, checkpoint, ann, batches, device, runs)
    print(f"the image as spikes: one step {spiking['step_seconds']:.3f}s = "
          f"{spiking['step_ratio_to_dense']:.2f} x the whole dense unit", flush=True)
    networks = {"relu": args.checkpoint} | (
        {"qcfs": args.qcfs_checkpoint} if args.qcfs_checkpoint.is_file() else {})
    to_ann = {name: time_to_ann_level(args, path, runs["dense"])
              for name, path in networks.items()}
    memory = {name: peak_memory_mb(args, name, args.memory_timesteps) for name in SIMULATORS}
    return {"machine": {"cores": os.cpu_count(), "threads": args.threads,
                        "processor": platform.processor() or platform.machine(),
                        "device": str(device), "torch": str(torch.__version__)},
            "test_images": len(batches.labels), "batch_size": args.batch_size,
            "repeats": args.repeats, "dense_unit": dense,
            "rows": rows, "step": step, "spiking_input": spiking, "to_ann_level": to_ann,
            "memory_timesteps": args.memory_timesteps, "peak_memory": memory,
            "spikingjelly": jelly is not None}


def print_summary(result):
    dense = result["dense_unit"]
    print(f"\n{result['machine']['cores']} cores, {result['machine']['threads']} threads, "
          f"{result['machine']['device']}; {result['test_images']} images, batch "
          f"{result['batch_size']}; dense unit {dense['seconds']:.3f}s (first layer "
          f"{dense['first_layer_seconds']:.3f}s, rest {dense['rest_seconds']:.3f}s), as trained "
          f"{dense['as_trained_seconds']:.3f}s (medians of {result['repeats']} rounds)")
    by = {(r["simulator"], r["timesteps"]): r for r in result["rows"]}
    names = list(dict.fromkeys(r["simulator"] for r in result["rows"]))
    print(f"{'T':>5} " + " ".join(f"{n + ' s':>16} {'x T*ANN':>8}" for n in names)
          + "   general/step" + ("   spikingjelly/step" if "spikingjelly" in names else ""))
    for t in sorted({r["timesteps"] for r in result["rows"]}):
        cells = " ".join(f"{by[n, t]['seconds']:16.3f} {by[n, t]['ratio_to_T_ann']:8.2f}"
                         for n in names)
        speedups = "".join(f"   {by[n, t]['seconds'] / by['step', t]['seconds']:14.2f}x"
                           for n in ("step_general", "spikingjelly") if n in names)
        same = "" if all(by[n, t]["same_spikes_as_layerwise"] for n in ("step", "step_general")
                         ) else "  (spikes differ!)"
        print(f"{t:5d} {cells}{speedups}{same}")
    step = result["step"]
    print(f"one step {step['seconds']:.3f}s = {step['ratio_to_dense_rest']:.2f} x the dense unit "
          f"after its first layer (stepping every layer: {step['general_seconds']:.3f}s = "
          f"{step['general_ratio_to_dense_rest']:.2f} x)")
    spiking = result.get("spiking_input")
    if spiking:
        print(f"the image as spikes (L_in = {spiking['input_levels']}): "
              + ", ".join(f"T={r['timesteps']} {r['ratio_to_T_ann']:.2f} x T*ANN"
                          + ("" if r["same_spikes_as_layerwise"] else " (spikes differ!)")
                          for r in spiking["rows"])
              + f"; one step {spiking['step_ratio_to_dense']:.2f} x the whole dense unit")
    for name, level in result["to_ann_level"].items():
        early = level["early_exit"]
        print(f"{name}: ANN {level['ann_accuracy']:.2%}; fixed T = {level['fixed_timesteps']} "
              f"({level['fixed_accuracy']:.2%}) {level['fixed_vs_dense']:.2f} x one dense pass; "
              f"early exit {early['accuracy']:.2%} at {early['mean_steps']:.2f} steps "
              f"{early['vs_dense']:.2f} x (fixed T needs {early['fixed_timesteps_same_accuracy']} "
              "for that accuracy)")
    for name, memory in result["peak_memory"].items():
        print(f"peak memory, {name} at T={result['memory_timesteps']}: "
              f"{memory['peak_mb']} MB ({memory['increase_mb']} MB for the simulation)")
    if not result["spikingjelly"]:
        print("spikingjelly is not installed: pip install spikingjelly to compare with it")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=cli.path_arg, default=CHECKPOINT,
                        help="the network to convert (with lenet_convert.py's default settings)")
    parser.add_argument("--qcfs-checkpoint", type=cli.path_arg, default=QCFS_CHECKPOINT,
                        help="a QCFS network, timed to its ANN's accuracy too (skipped if absent)")
    parser.add_argument("--timesteps", type=positive_int(MAX_TIMESTEPS), nargs="+",
                        default=[1, 2, 4, 8, 32, 64], help="the numbers of steps T to time")
    parser.add_argument("--input-levels", type=positive_int(MAX_INPUT_LEVELS),
                        default=INPUT_LEVELS, metavar="L_IN",
                        help="the input layer's levels in the rows that take the image as spikes")
    parser.add_argument("--search-timesteps", type=positive_int(MAX_TIMESTEPS), default=64,
                        help="the most steps the time to the ANN's accuracy may take")
    parser.add_argument("--batch-size", type=positive_int(TEST_IMAGES), default=BATCH_SIZE,
                        help="images at once, for the simulators and the ANN alike")
    parser.add_argument("--repeats", type=positive_int(1000), default=3,
                        help="timed runs per figure")
    parser.add_argument("--memory-timesteps", type=positive_int(MAX_TIMESTEPS), default=256,
                        help="T at which peak memory is measured")
    parser.add_argument("--threads", type=positive_int(1024), default=torch.get_num_threads(),
                        help="torch threads, for every figure alike")
    parser.add_argument("--limit", type=positive_int(TEST_IMAGES), default=None,
                        help="first N test images")
    cli.add_device_and_data(parser)
    parser.add_argument("--out", type=cli.path_arg, default=Path("bench/results/bench_snn.json"),
                        help="where the JSON goes")
    args = parser.parse_args(argv)
    if len(set(args.timesteps)) < len(args.timesteps):
        parser.error(f"argument --timesteps: each T once, got {args.timesteps}")
    return args


def main(argv=None):
    args = parse_args(argv)

    def body():
        cli.check_writable(args.out)
        result = run_benchmark(args)
        write_json(args.out, result)
        print_summary(result)
        print(f"wrote {args.out}")
        return result
    return cli.run("bench_snn.py", body, f"{args.out} is untouched")


if __name__ == "__main__":
    main()
