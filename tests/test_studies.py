"""The studies' tasks: on a local Ray and on a two-node Ray cluster they give what the run in one
process gives, bit for bit; a failed task is said in one line and the rest is kept; an
interrupted study resumes with what it had made."""

import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import seeds
import studies
import torch
from conftest import TINY
from helpers import DATA, ROOT, without_timings

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
    argv = [*TINY[:TINY.index("--seeds")], "--seeds", "1", "--levels", "8",
            *TINY[TINY.index("--limit-train"):], "--address", f"127.0.0.1:{PORT}"]
    done = in_private_network(
        f"ray start --head --port {PORT} --num-cpus 1 --include-dashboard false && "
        f"ray start --address 127.0.0.1:{PORT} --num-cpus 1 && "
        f"{study_command(argv)}; status=$?; ray stop --force; exit $status", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on Ray: 2 nodes, 2 CPUs" in done.stdout
    assert "reusing ck/relu_seed1.pt" in done.stdout and "qcfs L=8: trained" in done.stdout
    same_files(tmp / "ck", tmp_path / "ck", ["qcfs_L8_seed1.pt"])
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
    argv = _copy_without(study, tmp_path, monkeypatch, "ck/qcfs_L8_seed2.pt", "out/seed2.json")
    train = lenet5.run

    def diverging(args):
        if args.seed == 2 and args.levels == 8:
            raise UserError("training diverged in epoch 1 (loss nan); its checkpoint is untouched")
        return train(args)
    monkeypatch.setattr(lenet5, "run", diverging)
    with pytest.raises(SystemExit, match=r"1 task\(s\) failed \(seed 2, qcfs L=8: training\)"):
        seeds.main(argv)
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "failed" in line]
    assert failed == ["seed 2, qcfs L=8: training failed: training diverged in epoch 1 (loss "
                      "nan); what needs it is not made, everything else is"]
    kept = json.loads((tmp_path / "out" / "seed2.json").read_text())
    assert len(kept) == 18 and not any(name.startswith("qcfs L=8") for name in kept)


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


# Something that accepts connections and says nothing: not a Ray head. Joining it must end at
# its deadline, or at Ctrl-C or SIGTERM at any moment, in one line, leaving no Ray behind.
JOIN = """
import json, signal, socket, subprocess, sys, threading, time
server = socket.create_server(("127.0.0.1", 6399))
held = []
threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(99)],
                 daemon=True).start()
study = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
start, sent = time.monotonic(), None
if sys.argv[1] != "none":
    time.sleep(6)  # Python, torch and Ray imported: it waits for the cluster now
    sent = time.monotonic()
    study.send_signal(getattr(signal, sys.argv[1]))
out, err = study.communicate(timeout=120)
end = time.monotonic()
time.sleep(1)
left = subprocess.run(["pgrep", "-f", "ray.init"], capture_output=True, text=True).stdout
print(json.dumps({"code": study.returncode, "err": err, "seconds": end - start,
                  "after_signal": end - sent if sent else None, "left": left.split()}))
"""


@pytest.mark.parametrize("signal_name, code, said", [
    ("none", 1, r"error: no Ray cluster joined at 127.0.0.1:6399 within 8 s \(something answers "
                r"there, but not as a Ray head does; --join-timeout gives it longer\)"),
    ("SIGTERM", 143, "terminated; the networks and conversions made so far are in"),
    ("SIGINT", 130, "interrupted; the networks and conversions made so far are in"),
])
def test_joining_what_is_not_a_ray_head_ends_in_one_line(signal_name, code, said, tmp_path):
    (tmp_path / "join.py").write_text(JOIN)
    study = [sys.executable, str(ROOT / "bench" / "seeds.py"), *TINY, "--address",
             "127.0.0.1:6399", "--join-timeout", "8"]
    done = in_private_network(" ".join([sys.executable, "join.py", signal_name, *study]),
                              tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == code and result["err"].count("\n") == 1, result["err"]
    assert re.search(f"^seeds.py: {said}", result["err"]), result["err"]
    assert result["after_signal"] is None or result["after_signal"] < 5  # at once, not minutes
    assert result["seconds"] < 40 and result["left"] == []  # nothing of Ray left running
    assert not (tmp_path / "ck").exists()


def test_a_cluster_that_wants_an_auth_token_says_so(tmp_path):
    """An earlier local Ray leaves ~/.ray/auth_token; a head started then asks every client for
    it: the study says so in one line, and how to start a cluster that works."""
    argv = [*TINY, "--address", f"127.0.0.1:{PORT}"]
    done = in_private_network(
        f"{sys.executable} -c 'import ray; ray.init(num_cpus=1, include_dashboard=False)' && "
        f"ray start --head --port {PORT} --num-cpus 1 --include-dashboard false && "
        f"{study_command(argv)}; status=$?; ray stop --force; exit $status", tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"seeds.py: error: Ray did not start at 127.0.0.1:{PORT}: the cluster wants an auth "
        "token this process does not send (InvalidAuthToken: an earlier local Ray left "
        "~/.ray/auth_token, which the cluster's head took up); give every 'ray start' and this "
        "study RAY_AUTH_MODE=token, or delete that file and start the cluster again")
    assert not (tmp_path / "ck").exists()


class _LostRay:
    """Stands in for Ray: a cluster of one node whose node dies under the first task."""

    class exceptions:  # noqa: N801  (as Ray names its module)
        class RayError(Exception):
            pass

        class RayTaskError(RayError):
            pass

        class NodeDiedError(RayError):
            pass

    def cluster_resources(self):
        return {"CPU": 2}

    def nodes(self):
        return [{"Alive": True}]

    def remote(self, *arguments):  # ray.remote(function), then its .remote(arguments)
        return self if len(arguments) == 1 else object()

    def options(self, **_):
        return self

    def put(self, value):
        return value

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        raise self.exceptions.NodeDiedError("Task failed because the node it was running on is "
                                            "dead or unavailable.\nMore lines of Ray's.")

    def cancel(self, ref, force):
        pass

    def shutdown(self):
        pass


def test_a_task_that_ray_loses_is_one_line_and_what_was_made_is_kept(study, tmp_path,
                                                                     monkeypatch):
    argv = _copy_without(study, tmp_path, monkeypatch, "ck/relu_seed2.pt", "out/seed2.json")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(studies, "start_ray", lambda *_: _LostRay())
    argv.remove("--workers")
    argv.remove("0")
    with pytest.raises(SystemExit) as ended:  # its message is the one line on stderr, rc 1
        seeds.main(argv)
    said = ended.value.code
    assert isinstance(said, str) and "\n" not in said
    assert re.fullmatch(r"seeds.py: error: Ray lost the task 'seed 2, relu: training' \(Task "
                        r"failed because the node it was running on is dead or unavailable\.?\); "
                        r"run the same command again to go on from what is kept", said), said
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_training_task_reads_its_start_and_teacher_from_the_bytes_it_is_given(
        trained, tmp_path, monkeypatch):
    """On a node of its own a task cannot read the driver's files: it gets their bytes."""
    argv = ["--activation", "qcfs", "--levels", "2", "--init-from", "elsewhere/relu.pt",
            "--teacher", "elsewhere/relu.pt", "--epochs", "1", "--limit-train", "500",
            "--val-size", "500", "--device", "cpu", "--data-dir", str(DATA), "--checkpoint",
            "ck/taught.pt"]
    monkeypatch.chdir(tmp_path)  # where neither path is
    data = trained.read_bytes()
    files = studies.train_network(argv, data, data)
    made = torch.load(io.BytesIO(files["taught.pt"]), weights_only=True)
    assert made["args"]["init_from"] == made["args"]["teacher"] == "elsewhere/relu.pt"
    assert made["args"]["distill_weight"] == lenet5.DISTILL_WEIGHT
    assert set(files) == {"taught.pt", "taught_history.json"}


@pytest.mark.parametrize("study", ["seeds", "energy", "recipes"])
def test_a_study_without_its_data_says_so_before_any_task(study, tmp_path, capsys):
    main = importlib.import_module(study).main
    with pytest.raises(SystemExit, match=f"MNIST files missing from {tmp_path}/none"):
        main(["--seeds", "1", "--workers", "0", "--data-dir", str(tmp_path / "none"),
              "--checkpoint-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out")])
    assert "training" not in capsys.readouterr().out and not (tmp_path / "ck").exists()
