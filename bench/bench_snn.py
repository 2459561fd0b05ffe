"""Time the SNN simulation against the ANN (the dense unit) and against SpikingJelly, in one run.

On one machine, with the same checkpoint, threads and batch size: the dense unit, the fastest
ANN forward pass over the test images this project can run (BatchNorm folded, the simulator's
own max-pool, the simulator's batch size), and the ANN as trained for reference; for each T,
the step-by-step simulator of lenet_convert.py and the layer-wise one of bench/layerwise.py
(times, images x steps per second, ratio to T dense passes); their peak memory (a fresh process
per simulator, so the figures don't mix); and, when `spikingjelly` is installed
(`pip install spikingjelly`, not a requirement of the project), its ann2snn converter (mode
"99.9%") on the same ANN, timed the same way, with its accuracy per step. The spiking network
is built by `lenet_convert.build_snn` with the script's default settings, so the benchmark
times the network the script simulates. Each time is the median of --repeats runs after a
warm-up.

Example:
    python bench/bench_snn.py                                  # the full table (long: ~30 min)
    python bench/bench_snn.py --timesteps 8 32 64 --repeats 3  # a shorter run

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
import statistics  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from layerwise import simulate_layerwise  # noqa: E402

from cli import positive_int, write_json  # noqa: E402
from lenet5 import evaluate  # noqa: E402
from lenet_convert import (  # noqa: E402
    BATCH_SIZE,
    CHECKPOINT,
    Settings,
    build_snn,
    evaluate_snn,
    fold_batchnorm,
    load_ann,
    max_pool,
    scaling_percentile,
    simulate,
)
from mnist import Batches, load_mnist  # noqa: E402

SIMULATORS = {"step": simulate, "layerwise": simulate_layerwise}


def median_seconds(run, repeats):
    """Median wall time of `run()` over `repeats` calls, after one untimed warm-up call."""
    result = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


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
    """MaxPool2d(k) computed as the simulator computes it (`lenet_convert.max_pool`)."""

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


def load(args):
    """(device, the ANN, the SNN lenet_convert.py simulates by default, the test batches)."""
    device = cli.resolve_device(args.device)
    checkpoint, ann = load_ann(args.checkpoint, device)
    snn = build_snn(checkpoint, ann, Settings(scaling_percentile(checkpoint))).to(device)
    images, labels = load_mnist(args.data_dir, train=False)
    batches = Batches(images[:args.limit], labels[:args.limit], args.batch_size)
    return device, ann, snn, batches


def peak_memory_mb(args, simulator, timesteps):
    """Peak resident memory (MB) of a fresh process that simulates at `timesteps`."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_measure_memory, args, simulator, timesteps).result()


def _measure_memory(args, simulator, timesteps):
    torch.set_num_threads(args.threads)
    device, _, snn, batches = load(args)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    evaluate_snn(snn, batches, timesteps, device, SIMULATORS[simulator])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": round(after), "increase_mb": round(after - before)}


def run_benchmark(args):
    torch.set_num_threads(args.threads)
    device, ann, snn, batches = load(args)
    n = len(batches.labels)
    dense = fastest_ann(ann)
    ann_seconds, ann_accuracy = median_seconds(
        lambda: evaluate(dense, batches, device), args.repeats)
    trained_seconds, trained_accuracy = median_seconds(
        lambda: evaluate(ann, batches, device), args.repeats)
    train_images, train_labels = load_mnist(args.data_dir, train=True)  # calibrate on training data
    calibration = [images for images, _ in Batches(train_images[:2000], train_labels[:2000],
                                                   args.batch_size)]
    jelly = spikingjelly_snn(ann, calibration, device)
    simulators = dict(SIMULATORS, **({"spikingjelly": simulate_spikingjelly} if jelly else {}))
    rows = []
    for timesteps in args.timesteps:
        for name, simulator in simulators.items():
            model = jelly if name == "spikingjelly" else snn
            run = functools.partial(evaluate_snn, model, batches, timesteps, device, simulator)
            seconds, (accuracy, _) = median_seconds(run, args.repeats)
            rows.append({"simulator": name, "timesteps": timesteps, "seconds": seconds,
                         "image_steps_per_second": n * timesteps / seconds,
                         "ratio_to_T_ann": seconds / (timesteps * ann_seconds),
                         "ratio_to_T_ann_as_trained": seconds / (timesteps * trained_seconds),
                         "accuracy": accuracy})
            print(f"T={timesteps:4d} {name:13s} {seconds:8.2f}s  "
                  f"{n * timesteps / seconds:10.0f} image-steps/s  "
                  f"{seconds / (timesteps * ann_seconds):5.2f} x T*ANN  "
                  f"acc(T) {accuracy[-1]:.2%}", flush=True)
    memory = {name: peak_memory_mb(args, name, args.memory_timesteps) for name in SIMULATORS}
    return {"machine": {"cores": os.cpu_count(), "threads": args.threads,
                        "processor": platform.processor() or platform.machine(),
                        "device": str(device), "torch": str(torch.__version__)},
            "test_images": n, "batch_size": args.batch_size, "repeats": args.repeats,
            "ann_seconds": ann_seconds, "ann_accuracy": ann_accuracy,
            "ann_as_trained_seconds": trained_seconds, "ann_as_trained_accuracy": trained_accuracy,
            "dense_unit": "the ANN with BatchNorm folded and the simulator's max-pool and batch "
                          "size (ann_seconds); as trained: ann_as_trained_seconds",
            "rows": rows,
            "memory_timesteps": args.memory_timesteps, "peak_memory": memory,
            "spikingjelly": jelly is not None}


def print_summary(result):
    print(f"\n{result['machine']['cores']} cores, {result['machine']['threads']} threads, "
          f"{result['machine']['device']}; {result['test_images']} images, batch "
          f"{result['batch_size']}; ANN forward {result['ann_seconds']:.3f}s folded "
          f"(the dense unit), {result['ann_as_trained_seconds']:.3f}s as trained "
          f"(median of {result['repeats']})")
    by = {(r["simulator"], r["timesteps"]): r for r in result["rows"]}
    names = list(dict.fromkeys(r["simulator"] for r in result["rows"]))
    print(f"{'T':>5} " + " ".join(f"{n + ' s':>16} {'x T*ANN':>8}" for n in names)
          + ("   step/spikingjelly" if "spikingjelly" in names else ""))
    for t in sorted({r["timesteps"] for r in result["rows"]}):
        cells = " ".join(f"{by[n, t]['seconds']:16.2f} {by[n, t]['ratio_to_T_ann']:8.2f}"
                         for n in names)
        speedup = (f"   {by['spikingjelly', t]['seconds'] / by['step', t]['seconds']:.2f}x"
                   if "spikingjelly" in names else "")
        print(f"{t:5d} {cells}{speedup}")
    for name, memory in result["peak_memory"].items():
        print(f"peak memory, {name} at T={result['memory_timesteps']}: "
              f"{memory['peak_mb']} MB ({memory['increase_mb']} MB for the simulation)")
    if not result["spikingjelly"]:
        print("spikingjelly is not installed: pip install spikingjelly to compare with it")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                        help="the network to convert (with lenet_convert.py's default settings)")
    parser.add_argument("--timesteps", type=positive_int, nargs="+", default=[8, 32, 64, 128, 256],
                        help="the numbers of steps T to time")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help="images at once, for the simulators and the ANN alike")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per figure")
    parser.add_argument("--memory-timesteps", type=positive_int, default=256,
                        help="T at which peak memory is measured")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads(),
                        help="torch threads, for every figure alike")
    parser.add_argument("--limit", type=positive_int, default=None, help="first N test images")
    cli.add_device_and_data(parser)
    parser.add_argument("--out", type=Path, default=Path("bench/results/bench_snn.json"),
                        help="where the JSON goes")
    return parser.parse_args(argv)


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
