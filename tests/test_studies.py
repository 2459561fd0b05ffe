"""The studies' tasks: on a local Ray and on a two-node Ray cluster they give what the run in one
process gives, bit for bit; a failed task is said in one line and the rest is kept; an
interrupted study resumes with what it had made."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import seeds
from conftest import TINY
from helpers import ROOT, without_timings

import lenet5
from cli import UserError

PORT = 6391  # the test cluster's head, in its own network namespace


def in_private_network(script, cwd, timeout=600):
    """Run the shell `script` where Ray stays on this machine's loopback: in a network namespace
    of its own with only loopback up, where this machine allows one (as root), else as it is;
    with a HOME of its own, so that Ray starts from a clean state."""
    home = cwd / "home"
    home.mkdir(exist_ok=True)
    env = os.environ | {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    private = subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 \
        if shutil.which("unshare") else False
    command = ["unshare", "-n", "sh", "-c", f"ip link set lo up && {script}"] if private else [
        "sh", "-c", script]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def study_command(argv):
    return " ".join([sys.executable, str(ROOT / "bench" / "seeds.py"), *argv])


def same_files(first, second, names):
    """Each JSON in `names` the same in both folders but for timings; each .pt file the same."""
    for name in names:
        if name.endswith(".json"):
            assert without_timings(json.loads((first / name).read_text())) == without_timings(
                json.loads((second / name).read_text())), name
        else:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_local_ray_gives_what_one_process_gives(study, tmp_path):
    _, tmp, _, _ = study
    done = in_private_network(study_command(TINY), tmp_path)  # Ray's default: every core
    assert done.returncode == 0, done.stderr
    assert "on Ray: 1 node" in done.stdout
    same_files(tmp / "out", tmp_path / "out", ["seeds.json", "seed1.json", "seed2.json"])
    same_files(tmp / "ck", tmp_path / "ck", [p.name for p in (tmp / "ck").glob("*.pt")])


def test_a_two_node_cluster_gives_what_one_process_gives(study, tmp_path):
    _, tmp, _, per_seed = study
    (tmp_path / "ck").mkdir()
    for name in ("relu_seed1.pt", "relu_seed1_history.json"):  # the QCFS network is trained
        shutil.copy(tmp / "ck" / name, tmp_path / "ck" / name)
    argv = [*TINY[:TINY.index("--seeds")], "--seeds", "1", "--levels", "4",
            *TINY[TINY.index("--limit-train"):], "--address", f"127.0.0.1:{PORT}"]
    done = in_private_network(
        f"ray start --head --port {PORT} --num-cpus 1 --include-dashboard false && "
        f"ray start --address 127.0.0.1:{PORT} --num-cpus 1 && "
        f"{study_command(argv)}; status=$?; ray stop --force; exit $status", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on Ray: 2 nodes, 2 CPUs" in done.stdout
    assert "reusing ck/relu_seed1.pt" in done.stdout and "qcfs L=4: trained" in done.stdout
    same_files(tmp / "ck", tmp_path / "ck", ["qcfs_L4_seed1.pt"])
    on_cluster = json.loads((tmp_path / "out" / "seed1.json").read_text())
    assert list(on_cluster) == [n for n in per_seed[0] if not n.startswith("qcfs L=2")]
    assert without_timings(on_cluster) == without_timings(
        {name: per_seed[0][name] for name in on_cluster})


def _copy_without(study, tmp_path, monkeypatch, *names):
    """The tiny study's folders in `tmp_path` (where the test runs) less the files `names`."""
    _, tmp, _, _ = study
    for folder in ("ck", "out"):
        shutil.copytree(tmp / folder, tmp_path / folder)
    for name in names:
        (tmp_path / name).unlink()
    monkeypatch.chdir(tmp_path)
    return [*TINY, "--workers", "0"]


def test_a_failed_task_is_one_line_and_the_others_are_kept(study, tmp_path, monkeypatch, capsys):
    argv = _copy_without(study, tmp_path, monkeypatch, "ck/qcfs_L4_seed2.pt", "out/seed2.json")
    train = lenet5.run

    def diverging(args):
        if args.seed == 2 and args.levels == 4:
            raise UserError("training diverged in epoch 1 (loss nan); its checkpoint is untouched")
        return train(args)
    monkeypatch.setattr(lenet5, "run", diverging)
    with pytest.raises(SystemExit, match=r"1 task\(s\) failed \(seed 2, qcfs L=4: training\)"):
        seeds.main(argv)
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "failed" in line]
    assert failed == ["seed 2, qcfs L=4: training failed: training diverged in epoch 1 (loss "
                      "nan); what needs it is not made, everything else is"]
    kept = json.loads((tmp_path / "out" / "seed2.json").read_text())
    assert len(kept) == 17 and not any(name.startswith("qcfs L=4") for name in kept)


def test_an_interrupted_study_resumes_with_what_it_made(study, tmp_path, monkeypatch, capsys):
    _, _, saved, _ = study
    argv = _copy_without(study, tmp_path, monkeypatch, "ck/relu_seed2.pt", "out/seed2.json")
    train = lenet5.run

    def interrupted(args):
        if args.activation == "qcfs" and args.seed == 2:
            raise KeyboardInterrupt
        return train(args)
    monkeypatch.setattr(lenet5, "run", interrupted)
    with pytest.raises(SystemExit) as stopped:
        seeds.main(argv)
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip() == (
        "seeds.py: interrupted; the networks and conversions made so far are in ck and out "
        "(seed<S>.json); a re-run reuses them")
    assert (tmp_path / "ck" / "relu_seed2.pt").is_file()
    monkeypatch.setattr(lenet5, "run", train)
    again = seeds.main(argv)
    assert "reusing ck/relu_seed2.pt (made with the same arguments)" in capsys.readouterr().out
    assert again["runs"] == saved["runs"]  # the same networks, trained in two runs


@pytest.mark.parametrize("address", ["127.0.0.1:1", "nowhere:6379", "127.0.0.1"])
def test_a_cluster_that_is_not_there_is_one_line(address, tmp_path, capsys):
    with pytest.raises(SystemExit, match=f"no Ray cluster answers at {address}"):
        seeds.main([*TINY, "--address", address, "--checkpoint-dir", str(tmp_path / "ck"),
                    "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "ck").exists()
