"""What a study pays Ray per run and per task, so that you can judge when the tasks pay: the time
`ray.init()` takes to start a local Ray (its import included), a no-op task's round trip (the
median of 50, after a first one that starts a worker), and 8 tasks that each import torch (as
every study task does, once per worker).

Example:
    python bench/ray_costs.py
"""

import statistics
import time


def noop():
    return None


def import_torch():
    import torch

    return torch.get_num_threads()


def main():
    start = time.perf_counter()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started = time.perf_counter() - start
    try:
        nothing, torch_task = ray.remote(noop), ray.remote(import_torch)
        ray.get(nothing.remote())  # a worker is started
        trips = []
        for _ in range(50):
            begin = time.perf_counter()
            ray.get(nothing.remote())
            trips.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        ray.get([torch_task.remote() for _ in range(8)])
        torch_seconds = time.perf_counter() - begin
    finally:
        ray.shutdown()
    print(f"ray.init {started:.1f} s (import included); a no-op task's round trip "
          f"{1000 * statistics.median(trips):.1f} ms (median of 50); 8 tasks importing torch "
          f"{torch_seconds:.1f} s")


if __name__ == "__main__":
    main()
