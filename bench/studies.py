"""What the studies (seeds.py, recipes.py) share: their options, the reuse of what an earlier
run made, and running their trainings and conversions as tasks.

A task is a function of its inputs (a command line, the bytes of the checkpoints it starts from
or converts) that returns what it made (a checkpoint's and its history's bytes, a conversion's
result) to this process, which writes every file, atomically, into its own folders. So no task
needs a shared file system or writes anything, and the tasks can run anywhere:

- on Ray (https://docs.ray.io), by default a local Ray that this process starts, one task per
  core (--threads torch threads each), or the Ray cluster at --address (each node gets a copy
  of the project, MNIST included, from Ray; Ray's own setup is up to its user);
- with --workers 0, one after another in this process, without Ray.

A task starts as soon as what it needs is made: a QCFS network after the ReLU network it is
fine-tuned from, a conversion after its network, longer tasks (trainings) first. Every task
runs with --threads torch threads whoever runs it: training results depend on the thread count
(and the machine type), not on where or in which order a task ran, so the same seed gives the
same checkpoints and numbers bit for bit with Ray or without, on any number of workers.

A task that fails (a training that diverges) is said in one line; the tasks that need what it
would have made do not run, all the others do and what they made is kept, and the study ends
with an error naming what failed.
"""

import sys
from pathlib import Path

import cli  # (first: see its docstring; the caller put the project on the path)

# isort: split
import contextlib
import hashlib
import heapq
import importlib
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from typing import NamedTuple

from tqdm import tqdm

import lenet5
import lenet_convert
from checkpoint import history_path, load_checkpoint, promote, serialise
from cli import UserError, positive_int
from mnist import TRAIN_IMAGES, prepare_mnist

ROOT = Path(__file__).resolve().parent.parent  # the project: what a Ray worker gets a copy of
CHECKPOINT_DIR = Path("checkpoints/seeds")
JOIN_SECONDS = 60  # how long joining a Ray cluster (--address) may take before it is given up
JOIN_PROBE = ("import logging, sys, ray; ray.init(address=sys.argv[1], include_dashboard=False, "
              "log_to_driver=False, logging_level=logging.ERROR); ray.shutdown()")
THREADS = 1  # torch threads per task: small LeNet trainings use more than one or two poorly
NOT_COMPARED = ("checkpoint", "device", "data_dir", "init_from", "teacher")  # paths: may differ
TASK_INPUTS = {"start.pt": "--init-from", "teacher.pt": "--teacher"}  # what a training reads:
# each file's bytes is an argument of its own (Ray resolves only those, not what a dict holds)
HISTORY_KEYS = ("epoch", "train_accuracy", "val_accuracy", "seconds")  # read from a history


# ----------------------------------------------------------------------------- options


def study_parser(description, seeds, out_dir):
    """The options a study over seeds has: the seeds, where its networks and results go,
    retraining, quick runs (fewer epochs or training images), and where its tasks run."""
    parser = cli.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=cli.seed_int, nargs="+", default=list(seeds),
                        help="the seeds")
    parser.add_argument("--checkpoint-dir", type=cli.path_arg, default=CHECKPOINT_DIR,
                        help="where each seed's checkpoints are kept and looked for")
    parser.add_argument("--out-dir", type=cli.path_arg, default=out_dir,
                        help="where the results go")
    parser.add_argument("--retrain", action="store_true",
                        help="train again even where a checkpoint with the same arguments exists")
    parser.add_argument("--epochs", type=positive_int(lenet5.MAX_EPOCHS), default=None,
                        help="training epochs of every network (quick runs; default: "
                             "lenet5.py's)")
    parser.add_argument("--limit-train", type=positive_int(TRAIN_IMAGES), default=None,
                        metavar="N",
                        help="train on the first N training images only (quick runs)")
    cli.add_device_and_data(parser)
    parser.add_argument("--workers", type=cli.non_negative_int(4096), default=None,
                        help="tasks (trainings, conversions) run at once on Ray (default: as "
                             "many as the Ray cluster has CPUs for, --threads each); 0: one "
                             "after another in this process, without Ray (the same results)")
    parser.add_argument("--threads", type=positive_int(256), default=THREADS,
                        help="torch threads of each task (results depend on it: keep it to "
                             "compare runs bit for bit)")
    parser.add_argument("--address", default=None, metavar="HOST:PORT",
                        help="join the Ray cluster there (e.g. one started by 'ray start "
                             "--head'); default: start a local Ray on this machine")
    parser.add_argument("--join-timeout", type=positive_int(3600), default=JOIN_SECONDS,
                        metavar="SECONDS", help="with --address: give up joining the cluster "
                        "after this long (Ctrl-C ends it at any moment)")
    return parser


def parse_study_args(parser, argv):
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: each seed once, got {args.seeds}")
    if args.workers == 0 and args.address:
        parser.error("argument --address: a cluster needs --workers of at least 1")
    return args


# ----------------------------------------------------------------------------- networks


def checkpoint_path(directory, activation, seed):
    return Path(directory) / f"{activation}_seed{seed}.pt"


def training_argv(seed, args, activation, init_from=None, levels=lenet5.LEVELS):
    """lenet5.py's command line for one network of one seed (a QCFS one with `levels`)."""
    name = activation if activation == "relu" else f"{activation}_L{levels}"
    argv = ["--seed", str(seed), "--device", args.device,
            "--data-dir", str(task_path(args.data_dir)),
            "--checkpoint", str(checkpoint_path(args.checkpoint_dir, name, seed))]
    if activation == "qcfs":
        argv += ["--activation", "qcfs", "--levels", str(levels), "--init-from", str(init_from)]
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    if args.limit_train:
        argv += ["--limit-train", str(args.limit_train)]
    return argv


def argv_path(argv, option):
    """The path an option of lenet5.py's command line `argv` names (None if it is not there)."""
    return Path(argv[argv.index(option) + 1]) if option in argv else None


def reusable(path, argv, reads=()):
    """Whether `path` holds a checkpoint made by lenet5.py with the arguments `argv`, and its
    history beside it, both with every field the study reads: `reads` names those beyond the
    usual ones, each in the checkpoint and in every epoch of the history (a file made by an
    older lenet5.py may lack them). One that does not read as expected is not used (a line
    says why)."""
    if not path.is_file():
        return False
    try:
        checkpoint = load_checkpoint(path)
    except UserError as e:
        say(f"{e}; training it again")
        return False
    missing = [key for key in reads if key not in checkpoint]
    if missing:
        say(f"{path} has no {' or '.join(missing)} (made by an older lenet5.py): training it "
            "again")
        return False
    history = read_cache(history_path(path),
                         lambda h: _history_entries(h, HISTORY_KEYS + tuple(reads)))
    if history is None:
        return False
    made, wanted = checkpoint.get("args", {}), vars(lenet5.parse_args(argv))
    ignored = NOT_COMPARED + (lenet5.QCFS_ONLY if wanted["activation"] == "relu" else ())
    return all(str(made[k]) == str(v) if k in made else not v  # a newer option, left off
               for k, v in wanted.items() if k not in ignored)


def read_cache(path, readable):
    """The JSON in `path` if it is there and `readable(value)`; else None. A file that is there
    but does not read as expected (truncated, edited) is never trusted and never fatal: a line
    says it is made again."""
    if not Path(path).exists():
        return None
    try:
        value = json.loads(Path(path).read_text())
        if readable(value):
            return value
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    say(f"{path} does not read as this study writes it: making it again")
    return None


def _history_entries(history, keys=HISTORY_KEYS):
    """A history lenet5.py writes: a record per epoch, each with a usable number for `keys`."""
    return isinstance(history, list) and history and cli.conforms(
        history, [dict.fromkeys(keys, cli.is_number)])


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def network(tasks, what, argv, retrain, then, reads=()):
    """Make the network lenet5.py's command line `argv` trains, unless its checkpoint is there
    already (made with the same arguments, with what the study `reads`: see `reusable`) and
    `retrain` is false; then `then(trained)`.

    The training is a task (`train_network`) that gets the bytes of the checkpoints it starts
    from and learns from (--init-from, --teacher); the checkpoint and history it returns are
    promoted here as lenet5.py does it.
    """
    path = argv_path(argv, "--checkpoint")
    if not retrain and reusable(path, argv, reads):
        say(f"reusing {path} (made with the same arguments)")
        then(False)
        return
    given = {name: argv_path(argv, option) for name, option in TASK_INPUTS.items()}

    def made(files):
        with cli.held(path):  # as lenet5.py holds it: no run of its own writes there meanwhile
            for name, data in files.items():  # where lenet5.py keeps a run until it completes
                cli.partial_path(path.with_name(name)).write_bytes(data)
            replaced = promote(path)[1]
        record = load_checkpoint(path)
        tasks.say(f"{what}: trained {path} (best epoch {record['epoch']}, val "
                  f"{record['val_accuracy']:.2%})" + (f"; kept the one it replaced as {replaced}"
                                                      if replaced else ""))
        then(True)
    tasks.add(f"{what}: training", "studies", "train_network",
              (argv, *(p and tasks.share(p.read_bytes()) for p in given.values())), made,
              first=True)


# ----------------------------------------------------------------------------- what tasks run


def train_network(argv, *given):
    """Train with lenet5.py's command line `argv`, given the bytes of the checkpoints its
    --init-from and --teacher name (in the order of TASK_INPUTS; None where it names none);
    {file name: bytes} of the checkpoint and history it made, for the paths in `argv`. The
    checkpoint records `argv`'s paths, not this task's temporary ones."""
    args = lenet5.parse_args(argv)
    asked = {"checkpoint": str(args.checkpoint), "data_dir": str(args.data_dir)} | {
        option: getattr(args, option) and str(getattr(args, option))
        for option in ("init_from", "teacher")}
    args.data_dir = on_this_node(args.data_dir)
    with checkpoint_files({name: data for name, data in zip(TASK_INPUTS, given, strict=True)
                           if data is not None}) as (folder, paths):
        args.checkpoint = folder / args.checkpoint.name
        args.init_from, args.teacher = paths.get("start.pt"), paths.get("teacher.pt")
        best = lenet5.run(args)
        best["args"] |= asked
        made = io.BytesIO()
        serialise(best, made)
        history = history_path(args.checkpoint)
        return {args.checkpoint.name: made.getvalue(), history.name: history.read_bytes()}


@contextlib.contextmanager
def checkpoint_files(files):
    """A temporary folder holding `files` ({name: bytes}); yields (folder, {name: path})."""
    with tempfile.TemporaryDirectory(prefix="study-task-") as folder:
        paths = {}
        for name, data in files.items():
            paths[name] = Path(folder) / name
            paths[name].write_bytes(data)
        yield Path(folder), paths


def on_this_node(path):
    """A path the driver gave relative to the project (`task_path`), on the node running the
    task."""
    return ROOT / path


def task_path(path):
    """How a task is told of a file the driver has: relative to the project if it is in it (a
    Ray worker has its own copy of the project), else as it is (it must be there on every node)."""
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


class Failed(NamedTuple):
    """What a task that ended in a UserError returns: the error's first clause."""

    message: str


def run_task(module, function, arguments, threads):
    """Run `module.function(*arguments)` with `threads` torch threads, its output kept to itself;
    what it returns, or Failed."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return getattr(importlib.import_module(module), function)(*arguments)
    except UserError as e:  # "what went wrong; what was kept" in a task's own folders: the first
        return Failed(str(e).partition("; ")[0])
    finally:
        torch.set_num_threads(threads_before)


def _ray_task():
    """The function a Ray worker runs: `run_task` from its copy of the project. Defined here,
    inside a function, so that Ray sends it by value (its own module is not importable on a
    worker until the project's folders are on the path)."""
    def call(module, function, threads, *arguments):  # Ray passes what an ObjectRef among
        # `arguments` holds, not the ref
        folder = os.getcwd()  # a Ray worker starts in its copy of the project (working_dir)
        for where in (folder, os.path.join(folder, "bench")):
            if where not in sys.path:
                sys.path.insert(0, where)
        return importlib.import_module("studies").run_task(module, function, arguments, threads)
    return call


# ----------------------------------------------------------------------------- running tasks


def say(line):
    """A line that does not break the progress bar."""
    tqdm.write(line)


class Task(NamedTuple):
    what: str  # "seed 1, relu: training"
    module: str
    function: str
    arguments: tuple
    then: object  # called here with what the task returned


class Tasks:
    """The tasks of a study: `add` them, `run` them; each task's `then` runs here, in order of
    completion, and may add more. On Ray with args.workers at once (see the module's
    docstring), or with args.workers == 0 in this process."""

    def __init__(self, args):
        self.threads, self.ray, self.workers = args.threads, None, 1
        self.ready, self.order, self.running, self.failed = [], itertools.count(), {}, []
        self.seconds = {}  # what: how long the task took, from its start to its result here
        each = f"{self.threads} torch thread{'s' * (self.threads > 1)} each"
        if args.workers == 0:
            say(f"tasks run one after another in this process, {each}")
        else:
            self.ray = start_ray(args.address, args.join_timeout)
            resources = self.ray.cluster_resources()
            cpus, gpus = int(resources.get("CPU", 1)), resources.get("GPU", 0)
            nodes = sum(node["Alive"] for node in self.ray.nodes())
            self.workers = args.workers or max(1, cpus // self.threads)
            gpu = min(1.0, gpus / self.workers) if args.device != "cpu" else 0  # Ray shows a
            self.remote = self.ray.remote(_ray_task()).options(  # task only the GPUs it asks for
                num_cpus=self.threads, num_gpus=gpu, max_retries=0)
            say(f"tasks run on Ray: {nodes} node{'s' * (nodes > 1)}, {cpus} CPUs"
                + (f", {gpus:g} GPUs ({gpu:.2g} per task)" if gpu else "")
                + f", {self.workers} at once, {each}")
        self.bar = tqdm(total=0, desc="tasks", unit="task", disable=None, dynamic_ncols=True)

    def share(self, value):
        """`value` as a task's argument: put into Ray's object store once, however many tasks
        get it."""
        return self.ray.put(value) if self.ray else value

    def add(self, what, module, function, arguments, then, first=False):
        """A task to run once a worker is free: `first` ones (trainings) before the others."""
        heapq.heappush(self.ready, (not first, next(self.order),
                                    Task(what, module, function, tuple(arguments), then)))
        self.bar.total += 1
        self._show()

    def say(self, line):
        say(line)

    def run(self):
        """Run every task added, and every task their `then` adds; stop at Ctrl-C."""
        start = time.perf_counter()
        try:
            while self.ready or self.running:
                task, result = self._next()
                self.bar.update()
                if isinstance(result, Failed):
                    self.failed.append(task.what)
                    say(f"{task.what} failed: {result.message}; what needs it is not made, "
                        "everything else is")
                else:
                    task.then(result)
                self._show()
        finally:
            self.close()
        if self.seconds:
            wall, work = time.perf_counter() - start, sum(self.seconds.values())
            say(f"{len(self.seconds)} tasks in {wall:.0f} s: {work:.0f} s of work, "
                f"{work / wall:.2f} tasks at once on average")
        if self.failed:
            raise UserError(f"{len(self.failed)} task(s) failed ({'; '.join(self.failed)}): "
                            "see the lines above")

    def _next(self):
        """Start tasks while a worker is free; wait for one to finish: (task, what it returned)."""
        if not self.ray:
            task = heapq.heappop(self.ready)[2]
            self.running[None] = (task, time.perf_counter())
            self._show()
            result = run_task(task.module, task.function, task.arguments, self.threads)
            return self._finished(None), result
        while self.ready and len(self.running) < self.workers:
            task = heapq.heappop(self.ready)[2]
            ref = self.remote.remote(task.module, task.function, self.threads, *task.arguments)
            self.running[ref] = (task, time.perf_counter())
        self._show()
        (ref,), _ = self.ray.wait(list(self.running), num_returns=1)
        task = self._finished(ref)
        try:
            return task, self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # a bug, not a user's error: its trace
            raise e.as_instanceof_cause() from None
        except self.ray.exceptions.RayError as e:  # Ray lost it: a node or a worker died
            raise UserError(f"Ray lost the task '{task.what}' ({cli.first_line(e)}); run the "
                            "same command again to go on from what is kept") from None

    def _finished(self, key):
        task, start = self.running.pop(key)
        self.seconds[task.what] = round(time.perf_counter() - start, 2)
        return task

    def _show(self):
        self.bar.set_postfix_str(f"running {len(self.running)}, waiting {len(self.ready)}",
                                 refresh=False)

    def close(self):
        """Stop what still runs (after Ctrl-C or an error) and let go of Ray."""
        self.bar.close()
        if self.ray:
            for ref in self.running:
                self.ray.cancel(ref, force=True)
            self.ray.shutdown()
            self.ray = None


def start_ray(address, join_seconds=JOIN_SECONDS):
    """Ray, started on this machine or joined at `address` (tried first: `_check_joins`), with
    the project sent to every worker (only what git would keep: .gitignore leaves out
    checkpoints and results)."""
    try:
        import ray
    except ImportError:
        raise UserError("the studies run their tasks on Ray: pip install -r "
                        "requirements-study.txt (or --workers 0: one after another, without "
                        "Ray)") from None
    import logging

    if address and address != "auto":  # Ray itself would wait for it for minutes
        _check_answers(address)
        _check_joins(address, join_seconds)
    runtime = {"working_dir": str(ROOT), "excludes": ["checkpoints/", "results/", ".git/"]}
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, runtime_env=runtime, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"Ray did not start{f' at {address}' if address else ''}: "
                        f"{cli.first_line(e)}") from None
    return ray


def _check_joins(address, seconds):
    """That a Ray driver joins the cluster at `address` within `seconds`, tried in a process of
    its own: Ray's join waits for minutes where something else answers and does not stop for
    Ctrl-C or SIGTERM meanwhile, but that process is ended at the deadline or at either signal
    (which then end this command, with one line). A UserError saying why it did not join."""
    child = subprocess.Popen([sys.executable, "-c", JOIN_PROBE, address],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # Ctrl-C reaches it only through here
    try:
        _, err = child.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise UserError(f"no Ray cluster joined at {address} within {seconds:g} s (something "
                        "answers there, but not as a Ray head does; --join-timeout gives it "
                        "longer)") from None
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    if child.returncode:
        raise UserError(f"Ray did not start at {address}: " + (
            "the cluster wants an auth token this process does not send (InvalidAuthToken: "
            "an earlier local Ray left ~/.ray/auth_token, which the cluster's head took up); "
            "give every 'ray start' and this study RAY_AUTH_MODE=token, or delete that file "
            "and start the cluster again" if "InvalidAuthToken" in err else
            next((line for line in reversed(err.splitlines()) if line.strip()), "it failed")))


# ----------------------------------------------------------------------------- running a study


def start(args, files, networks, simulation):
    """Before any task: check the device (unless on a cluster, whose workers may have what this
    one lacks), the data, the memory a conversion will need (`simulation`: its steps, batch
    size, images and early exit's images, as lenet_convert.check_memory takes them), and the
    folders and files the study writes (`files` in args.out_dir, its networks in `networks`);
    the Tasks to add its tasks to."""
    if not args.address:
        cli.resolve_device(args.device)
    prepare_mnist(args.data_dir)  # the data every task reads, there and whole
    timesteps, batch_size, images, early_exit_images = simulation
    lenet_convert.check_memory(None, timesteps, batch_size, images, early_exit_images)
    check_folders(args.out_dir, networks, files=[args.out_dir / name for name in files])
    return Tasks(args)


def kept(args):
    """What an interrupted or failed study of networks and conversions leaves."""
    return (f"the networks and conversions made so far are in {args.checkpoint_dir} and "
            f"{args.out_dir} (seed<S>.json); a re-run reuses them")


def check_folders(*folders, files=()):
    """Before anything runs: the study's folders can be written, and no folder stands where it
    writes a file."""
    for directory in folders:
        cli.check_writable(directory, folder=True)
    for path in files:
        cli.FileSet.check(path)


def _check_answers(address):
    """That something listens at `address` (HOST:PORT, or ray://HOST:PORT)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except (OSError, ValueError) as e:
        raise UserError(f"no Ray cluster answers at {address} ({cli.first_line(e)}): start one "
                        "with 'ray start --head', or leave out --address for a local Ray") from None
