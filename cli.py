"""What every command of the project shares: one-line errors and exits, argparse types, the
device, and atomic writes (a file is either complete or the one that was there before).

It imports only the standard library, so the entry scripts import it first: a Ctrl-C or SIGTERM
while torch is still loading then ends in one line too, not in a traceback.
"""

import argparse
import contextlib
import csv
import ctypes
import ctypes.util
import json
import math
import multiprocessing
import os
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

SEED_RANGE = (0, 2**32 - 1)  # numpy's: every seed the project takes must be valid for it


class UserError(Exception):
    """A problem the user can fix (a bad file, a bad value): the command says it in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C, so that the same clean-up runs."""


def exit_code(interrupt):
    """128 + the signal's number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return 143 if isinstance(interrupt, Terminated) else 130


def _raise_terminated(signum, frame):
    raise Terminated


def _starting_line(terminated):
    """What an interrupt before a command's `run` says."""
    return (f"{Path(sys.argv[0]).name}: {'terminated' if terminated else 'interrupted'} "
            "while starting; nothing was written\n")


def _exit_at_once(signum, frame):
    """A signal while a command starts (loading torch, reading its arguments): nothing is
    written yet, so end at once. No KeyboardInterrupt is raised: inside a library's import it
    can be swallowed (the run goes on) or turned into another error with a long traceback."""
    if multiprocessing.parent_process() is None:  # a worker (bench_snn.py's) ends quietly
        os.write(2, _starting_line(signum == signal.SIGTERM).encode())
    os._exit(128 + signum)


def _one_line_interrupts(kind, value, traceback):
    """sys.excepthook: an interrupt that no command caught is one line."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, value, traceback)
    print(_starting_line(kind is Terminated), end="", file=sys.stderr, flush=True)
    os._exit(exit_code(value))


def _is_a_command():
    """Whether this process runs one of the project's scripts (not, say, pytest)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    here = Path(__file__).resolve().parent
    return main is not None and Path(main).resolve().parent in (here, here / "bench")


if threading.current_thread() is threading.main_thread():
    if _is_a_command():
        signal.signal(signal.SIGINT, _exit_at_once)
        signal.signal(signal.SIGTERM, _exit_at_once)
    else:
        signal.signal(signal.SIGTERM, _raise_terminated)
    sys.excepthook = _one_line_interrupts


def keep_freed_memory():
    """Ask the C library's allocator (glibc's) to keep the memory torch frees for reuse, rather
    than hand it back to the system; True if it could.

    A simulation makes and drops tensors of about 10 MB every step and batch. By default glibc
    maps each of those anew and returns it when it is freed, so the next one is paged in again:
    measured here, 90,000 to 145,000 page faults per pass over the test set, and up to half its
    time. Tensors up to 32 MB (glibc's most) now come from the heap, which is not trimmed.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to tune
        return False
    mmap_threshold, trim_threshold = -3, -1  # mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    return bool(mallopt(mmap_threshold, 32 * 2**20)) and bool(mallopt(trim_threshold, 2**30))


def available_memory():
    """Bytes of memory this machine can still give a process, or None where it cannot tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def is_number(value, lowest=-math.inf, highest=math.inf, integer=False):
    """Whether `value` is a number the project can compute with: an int or a float (not a bool),
    finite as a float (an int too large for one is not), an integer if asked, in [lowest,
    highest]. What every value read from a file (a checkpoint, a cache) is held to."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        return False
    return finite and lowest <= value <= highest


class Number(NamedTuple):
    """A check of a number (`is_number`) in [lowest, highest], or None where `empty`; called
    with a value, it tells whether the value passes."""

    lowest: float
    highest: float
    integer: bool = False
    empty: bool = False

    def __call__(self, value):
        return (self.empty and value is None) or is_number(value, self.lowest, self.highest,
                                                           self.integer)

    @property
    def kind(self):
        return (("empty or " if self.empty else "")
                + f"{'an integer' if self.integer else 'a number'} in [{self.lowest:g}, "
                + (f"{self.highest}" if self.integer else f"{self.highest:g}") + "]")


def conforms(value, shape):
    """Whether `value` has `shape` all the way down. A shape is a test (a function of the value,
    such as a Number), a dict {key: shape} (each key there, with its shape; others may be there
    too), or a one-element list [shape] (a list whose every element has that shape)."""
    if isinstance(shape, dict):
        return isinstance(value, dict) and all(
            key in value and conforms(value[key], inner) for key, inner in shape.items())
    if isinstance(shape, list):
        return isinstance(value, list) and all(conforms(v, shape[0]) for v in value)
    return bool(shape(value))


def check_memory(needed, what):
    """A UserError if `needed` bytes (an estimate for `what`) are more than the machine has."""
    available = available_memory()
    if available is not None and needed > available:
        raise UserError(f"{what} needs about {needed / 2**30:.1f} GB of memory, but this machine "
                        f"has {available / 2**30:.1f} GB free")


def run(prog, body, kept="nothing was written"):
    """Run a command's `body()` and return what it returns; end its errors in one line.

    A UserError (or an OSError: a full disk, a file that cannot be written) exits with status 1
    and "prog: error: ...". Ctrl-C (130) and SIGTERM (143) say what was kept: `kept`, a text or
    a function that gives it at that moment.
    """
    if threading.current_thread() is threading.main_thread():  # from here on an interrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)  # is raised, so that the
        signal.signal(signal.SIGTERM, _raise_terminated)  # command can say what it kept
    keep_freed_memory()
    try:
        return body()
    except UserError as e:
        sys.exit(f"{prog}: error: {e}")
    except OSError as e:  # a file that cannot be written or read after all: full disk, rights
        sys.exit(f"{prog}: error: {e.filename or 'a file'}: {e.strerror or e}")
    except KeyboardInterrupt as e:
        what = kept() if callable(kept) else kept
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"{prog}: {stopped}; {what}", file=sys.stderr, flush=True)
        sys.exit(exit_code(e))


def first_line(error):
    """An exception's first sentence without terminal colour codes, for a one-line message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    if not text:
        return type(error).__name__
    return re.split(r"\.\s", text.splitlines()[0])[0].rstrip(" .,:")


def resolve_device(name):
    """'auto' -> the GPU when there is one, else the CPU; otherwise check that `name` is usable."""
    import torch  # here, not at the top: see the module's docstring

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    So an interrupted write never leaves a half-written file, and the previous one stays intact.
    The folder is made here, when there is something to write into it.
    """
    path = Path(path)
    _not_a_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_csv(path, rows):
    """Write a list of dicts with the same keys as a CSV table, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _not_a_folder(path):
    """A UserError if a folder stands where a run is to write the file `path`."""
    if path.is_dir():
        raise UserError(f"{path} is a folder where this run writes a file: move it away or "
                        "write elsewhere")


class FileSet:
    """The files of one run, each written to a temporary file beside its place (`path`), or made
    earlier (`adopt`), and moved into place with the others by `file_set`."""

    def __init__(self, folder):
        self.folder, self.made, self.adopted = Path(folder), {}, {}

    def path(self, name):
        """Where to write the file `name` of the set; its folder is made now if need be."""
        target = self.folder / name
        self.check(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.made[name] = target.with_name(f".{target.stem}.set{os.getpid()}{target.suffix}")
        return self.made[name]

    def adopt(self, name, path):
        """Move the finished file at `path` to `name` with the set (if the set fails, it stays)."""
        self.check(self.folder / name)
        self.adopted[name] = Path(path)

    @staticmethod
    def check(target):
        """That `target` can be written: a folder in its place is named as such."""
        _not_a_folder(target)
        check_writable(target)

    @property
    def names(self):
        return list(self.made) + list(self.adopted)


@contextlib.contextmanager
def file_set(folder):
    """Yield a FileSet; once the block has completed, move all its files into place together.

    So a run that fails or is interrupted before then, whatever file it had made, leaves every
    earlier file as it was, and a folder it made is removed again. Each target is checked first;
    the moves are renames, made with Ctrl-C and SIGTERM held back until all are done.
    """
    folder = Path(folder)
    new = [p for p in (folder, *folder.parents) if not p.exists()]
    files = FileSet(folder)
    done = False
    try:
        yield files
        moves = {**files.made, **files.adopted}
        for name, source in moves.items():
            files.check(folder / name)
            if not source.is_file():
                raise UserError(f"{source} is gone: {folder / name} was not replaced")
        with _signals_held():
            for name, source in moves.items():
                os.replace(source, folder / name)
        done = True
    finally:
        for tmp in files.made.values():
            tmp.unlink(missing_ok=True)
        for made in new if not done else ():  # the deepest first
            with contextlib.suppress(OSError):
                made.rmdir()


@contextlib.contextmanager
def _signals_held():
    """Hold back Ctrl-C and SIGTERM during the block (where the platform can); they arrive after."""
    held = {signal.SIGINT, signal.SIGTERM}
    can = hasattr(signal, "pthread_sigmask") and threading.current_thread() is (
        threading.main_thread())
    if can:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def and_list(names):
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


@contextlib.contextmanager
def held(path):
    """Hold the lock of `path` (<stem>.lock beside it) for the block: one run at a time writes a
    file and what goes with it; a second is refused in one line, not kept waiting. The lock is
    the kernel's (flock), so it ends with the process however that ends; the holder removes
    the lock file (and a folder it made for it, if still empty) when done. (Where there is no
    flock, on Windows, nothing is locked.)"""
    path = Path(path)
    check_writable(path)
    if fcntl is None:
        yield
        return
    lock = path.with_name(f"{path.stem}.lock")
    made = [folder for folder in [lock.parent, *lock.parent.parents] if not folder.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = _lock(lock, path)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # still held: a run that opens it now is refused or
        os.close(handle)  # finds it gone (`_lock`); closing lets go of it
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _lock(lock, path):
    """An open handle of `lock` holding its flock. Where the holder before let go of it and
    removed the file meanwhile, the lock taken is on a file no longer there: try again."""
    for _ in range(10):
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(handle).st_ino == os.stat(lock).st_ino:
                return handle
        except BlockingIOError:
            os.close(handle)
            raise UserError(f"another run is writing {path} now (it holds {lock}): wait for "
                            "it to end, or write elsewhere") from None
        except FileNotFoundError:
            pass
        os.close(handle)
    raise UserError(f"{lock} keeps changing: another run is starting and ending there")


def partial_path(path):
    """Where a run keeps a file until the run completes: <stem>.partial<suffix>."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def previous_path(path):
    """Where a completed run keeps the file it replaced: <stem>.prev<suffix>."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def check_writable(path, folder=False):
    """Make sure `path` (a file, or a folder if `folder`) can be written, before long work.

    Nothing is created: the nearest folder that exists must be writable, and nothing on the way
    may be a file (or, for a file, the path itself a folder).
    """
    path = Path(path)
    if not folder and path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder")
    parent = path if folder else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write to {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {path}: {parent} is not writable")


# ----------------------------------------------------------------------------- timing


def median_seconds(runs, repeats, warm_up=True):
    """({name: median wall time of runs[name]()}, {name: the last result of runs[name]()}).

    Each run is called once untimed first (unless not `warm_up`: the caller's last call was
    that), then all of them in turn, `repeats` rounds: a machine that speeds up or slows down
    meanwhile affects each alike, so ratios between them hold even where absolute times drift.
    """
    results = {name: run() for name, run in runs.items()} if warm_up else {}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


# ----------------------------------------------------------------------------- command line


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help texts end with the range a number may take and the default, except where there is
    none to state (None, a flag); the description (a script's docstring) keeps its lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        lowest, highest = getattr(action.type, "bounds", (None, None))
        if highest is not None:
            text += f"; {lowest} to {highest}"
        if action.default is None or isinstance(action.default, bool) or (
                action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line on stderr (exit 2) instead of the usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_device_and_data(parser):
    """The two options every command has: --device and --data-dir."""
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    parser.add_argument("--data-dir", type=path_arg, default=Path("data"),
                        help="folder holding MNIST/raw (the shipped .gz files)")


def _parse_number(text, convert, kind):
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def int_in(lowest, highest=None, kind="an integer"):
    """An argparse type: an integer in [lowest, highest] (the help states the range)."""
    def parse(text):
        value = _parse_number(text, int, kind)
        if value < lowest or highest is not None and value > highest:
            raise argparse.ArgumentTypeError(
                f"must be at least {lowest}, got {value}" if highest is None
                else f"must be in [{lowest}, {highest}], got {value}")
        return value
    parse.bounds = (lowest, highest)
    return parse


def positive_int(highest):
    """An argparse type: an integer in [1, highest]."""
    return int_in(1, highest, "a positive integer")


def non_negative_int(highest):
    """An argparse type: an integer in [0, highest]."""
    return int_in(0, highest, "an integer >= 0")


seed_int = int_in(*SEED_RANGE, kind="a seed")


def path_arg(text):
    """An argparse type: a path, not an empty string (which would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return Path(text)


def positive_float(text):
    value = _parse_number(text, float, "a positive number")
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    value = _parse_number(text, float, "a number >= 0")
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def float_in(lowest, highest):
    """An argparse type: a number in [lowest, highest]."""
    def parse(text):
        value = _parse_number(text, float, "a number")
        if not lowest <= value <= highest:
            raise argparse.ArgumentTypeError(f"must be in [{lowest:g}, {highest:g}], got {text}")
        return value
    parse.bounds = (f"{lowest:g}", f"{highest:g}")
    return parse


def percentile_arg(text):
    value = _parse_number(text, float, "a percentile")
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {text}")
    return value


def fraction(text):
    value = _parse_number(text, float, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value
