from pathlib import Path

import pytest

import lenet5

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A LeNet5 trained briefly on 4,000 images by lenet5.py's own command line."""
    path = tmp_path_factory.mktemp("trained") / "ck.pt"
    lenet5.main(["--epochs", "3", "--limit-train", "4000", "--val-size", "1000", "--device", "cpu",
                 "--data-dir", str(DATA), "--checkpoint", str(path)])
    return path
