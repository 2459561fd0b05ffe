import argparse
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers import DATA, ROOT

import cli
from checkpoint import load_checkpoint
from cli import UserError


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_refused():
    with pytest.raises(UserError, match="no CUDA GPU"):
        cli.resolve_device("cuda")


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "new" / "result.json"
    cli.write_json(path, {"a": 1})  # makes the folder when there is something to write
    with pytest.raises(RuntimeError), cli.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_file_set_moves_all_files_in_at_the_end_or_none(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "a.json").write_text("earlier a")
    with cli.file_set(out) as files:
        cli.write_json(files.path("a.json"), {"a": 2})
        files.path("b.txt").write_text("b")
        assert (out / "a.json").read_text() == "earlier a" and not (out / "b.txt").exists()
    assert files.names == ["a.json", "b.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.txt"]
    assert json.loads((out / "a.json").read_text()) == {"a": 2}
    for fail in (RuntimeError, KeyboardInterrupt):  # a later run that fails half-way
        with pytest.raises(fail), cli.file_set(out) as files:
            files.path("a.json").write_text("half of a new set")
            raise fail
        assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.txt"]
        assert json.loads((out / "a.json").read_text()) == {"a": 2}


def test_file_set_checks_every_target_before_moving_any(tmp_path):
    (tmp_path / "a.json").write_text("earlier a")
    with pytest.raises(UserError, match="b.json is a folder where this run writes a file"), (
            cli.file_set(tmp_path)) as files:
        files.path("a.json").write_text("new a")
        files.path("b.json").write_text("new b")
        (tmp_path / "b.json").mkdir()  # a folder where the set wants a file, made meanwhile
    assert (tmp_path / "a.json").read_text() == "earlier a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    new = tmp_path / "new" / "folder"
    with pytest.raises(RuntimeError), cli.file_set(new) as files:
        files.path("x.json").write_text("x")
        raise RuntimeError
    assert not (tmp_path / "new").exists()  # the folders it made are gone again


@pytest.mark.parametrize("text, parse, value", [
    ("3", cli.positive_int(3), 3), ("0", cli.non_negative_int(5), 0),
    ("4294967295", cli.seed_int, 2**32 - 1),
    ("0.5", cli.fraction, 0.5), ("99.9", cli.percentile_arg, 99.9), ("0", cli.non_negative_float,
                                                                    0.0),
])
def test_argument_types_take_good_values(text, parse, value):
    assert parse(text) == value


@pytest.mark.parametrize("text, parse, message", [
    ("0", cli.positive_int(9), r"must be in \[1, 9\], got 0"),
    ("10", cli.positive_int(9), r"must be in \[1, 9\], got 10"),
    (str(10**20), cli.int_in(1, 100), r"must be in \[1, 100\], got 100000000000000000000"),
    ("x", cli.positive_int(9), "expected a positive integer, got 'x'"),
    ("-1", cli.seed_int, r"must be in \[0, 4294967295\], got -1"),
    ("4294967296", cli.seed_int, r"must be in \[0, 4294967295\], got 4294967296"),
    ("1", cli.fraction, r"must be in \[0, 1\)"),
    ("nan", cli.positive_float, "must be a positive number"),
    ("inf", cli.positive_float, "must be a positive number"),
    ("-1", cli.non_negative_float, "must be a finite number >= 0, got -1"),
    ("nan", cli.non_negative_float, "must be a finite number >= 0, got nan"),
    ("inf", cli.non_negative_float, "must be a finite number >= 0, got inf"),
    ("0", cli.percentile_arg, r"must be in \(0, 100\]"),
])
def test_argument_types_refuse_bad_values(text, parse, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


def test_check_writable_creates_nothing(tmp_path):
    cli.check_writable(tmp_path / "a" / "b", folder=True)
    cli.check_writable(tmp_path / "a" / "b.json")
    assert not list(tmp_path.iterdir())
    (tmp_path / "file").write_text("x")
    for path, folder, message in ((tmp_path, False, "is a folder; give a file name"),
                                  (tmp_path / "file", True, "is a file, not a folder"),
                                  (tmp_path / "file" / "x.json", False, "file is a file")):
        with pytest.raises(UserError, match=message):
            cli.check_writable(path, folder)


def _interrupted(kind):
    def body():
        if kind is UserError:
            raise UserError("the checkpoint is spoiled")
        if kind is OSError:
            raise OSError(28, "No space left on device", "results/snn_accuracy.json")
        if kind is KeyboardInterrupt:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # the handler cli installs raises Terminated
    return body


@pytest.mark.parametrize("kind, code, line", [
    (UserError, None, "prog.py: error: the checkpoint is spoiled"),
    (OSError, None, "prog.py: error: results/snn_accuracy.json: No space left on device"),
    (KeyboardInterrupt, 130, "prog.py: interrupted; results kept"),
    ("sigterm", 143, "prog.py: terminated; results kept"),
])
def test_run_ends_errors_and_interrupts_in_one_line(kind, code, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run("prog.py", _interrupted(kind), kept=lambda: "results kept")
    if code is None:  # sys.exit(message): status 1, the message on stderr
        assert exit_info.value.code == line
    else:
        assert exit_info.value.code == code and capsys.readouterr().err == line + "\n"


def _start(*argv):
    """A project command in a fresh process, its output unbuffered, as a user starts it."""
    return subprocess.Popen([sys.executable, "-u", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(process, pattern, stream="stdout"):
    """Read the command's output (or stderr) until a line matches the regular expression."""
    for line in getattr(process, stream):
        if re.search(pattern, line):
            return
    pytest.fail(f"the command ended without printing {pattern!r}: {process.stderr.read()}")


def test_sigterm_during_training_keeps_the_checkpoint_and_says_so(trained, tmp_path):
    checkpoint = tmp_path / "ck.pt"
    checkpoint.write_bytes(trained.read_bytes())
    before = checkpoint.read_bytes()
    process = _start("lenet5.py", "--epochs", "3", "--limit-train", "2000", "--device", "cpu",
                     "--data-dir", str(DATA), "--checkpoint", str(checkpoint))
    _wait_for(process, "epoch  1")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143
    assert err == (f"lenet5.py: terminated; {checkpoint} is untouched; this run's best so far "
                   f"is in {tmp_path / 'ck.partial.pt'}\n")
    assert checkpoint.read_bytes() == before
    assert load_checkpoint(tmp_path / "ck.partial.pt")["epoch"] == 1  # complete and usable


@pytest.mark.parametrize("phase", ["numpy", "torch", "matplotlib", "simulating"])
def test_ctrl_c_in_the_converter_is_one_line(trained, tmp_path, phase):
    out = tmp_path / "results"
    out.mkdir()
    (out / "snn_accuracy.json").write_text("an earlier run")
    importtime = [] if phase == "simulating" else ["-X", "importtime"]
    process = _start(*importtime, "lenet_convert.py", "--checkpoint", str(trained),
                     "--device", "cpu", "--data-dir", str(DATA), "--out-dir", str(out))
    if phase == "simulating":
        _wait_for(process, "simulating")
    else:  # inside that library's imports (which can swallow a KeyboardInterrupt): Python
        # writes a line to stderr for each module imported, the package itself last
        _wait_for(process, rf"\|\s+{phase}\.", stream="stderr")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    err = "".join(line for line in err.splitlines(keepends=True)
                  if not line.startswith("import time:"))
    assert process.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lenet_convert.py: interrupted")
    assert [p.name for p in out.iterdir()] == ["snn_accuracy.json"]
    assert (out / "snn_accuracy.json").read_text() == "an earlier run"
