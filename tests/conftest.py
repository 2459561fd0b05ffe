import json
import sys

import pytest
from helpers import DATA, ROOT

import lenet5

sys.path.insert(0, str(ROOT / "bench"))

import seeds  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A LeNet5 trained briefly on 4,000 images by lenet5.py's own command line."""
    path = tmp_path_factory.mktemp("trained") / "ck.pt"
    lenet5.main(["--epochs", "3", "--limit-train", "4000", "--val-size", "1000", "--device", "cpu",
                 "--data-dir", str(DATA), "--checkpoint", str(path)])
    return path


@pytest.fixture(scope="session")
def qcfs(trained, tmp_path_factory):
    """A plain QCFS LeNet5 (L = 2; no energy term, the analog image, no teacher) fine-tuned
    briefly from `trained` by lenet5.py's command line."""
    path = tmp_path_factory.mktemp("qcfs") / "qcfs.pt"
    lenet5.main(["--activation", "qcfs", "--levels", "2", "--init-from", str(trained),
                 "--energy-weight", "0", "--input-levels", "analog", "--distill-weight", "0",
                 "--epochs", "1", "--limit-train", "2000", "--val-size", "1000", "--lr", "0.01",
                 "--device", "cpu", "--data-dir", str(DATA), "--checkpoint", str(path)])
    return path


TINY = ["--seeds", "1", "2", "--levels", "2", "8", "--limit-train", "1000", "--epochs", "2",
        "--limit", "200", "--timesteps", "4", "--device", "cpu", "--data-dir", str(DATA),
        "--checkpoint-dir", "ck", "--out-dir", "out"]  # folders relative to where it runs


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """A tiny study of two seeds and two levels, run in this process without Ray, as the command
    runs it: (argv, its folder, seeds.json, the per-seed JSON)."""
    tmp = tmp_path_factory.mktemp("study")
    argv = [*TINY, "--workers", "0"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        returned = seeds.main(argv)
    saved = json.loads((tmp / "out" / "seeds.json").read_text())
    assert saved == json.loads(json.dumps(returned))
    per_seed = [json.loads((tmp / "out" / f"seed{s}.json").read_text()) for s in (1, 2)]
    return argv, tmp, saved, per_seed
