import pytest
from helpers import DATA

import lenet5


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A LeNet5 trained briefly on 4,000 images by lenet5.py's own command line."""
    path = tmp_path_factory.mktemp("trained") / "ck.pt"
    lenet5.main(["--epochs", "3", "--limit-train", "4000", "--val-size", "1000", "--device", "cpu",
                 "--data-dir", str(DATA), "--checkpoint", str(path)])
    return path


@pytest.fixture(scope="session")
def qcfs(trained, tmp_path_factory):
    """A QCFS LeNet5 (L = 2) fine-tuned briefly from `trained` by lenet5.py's command line."""
    path = tmp_path_factory.mktemp("qcfs") / "qcfs.pt"
    lenet5.main(["--activation", "qcfs", "--levels", "2", "--init-from", str(trained),
                 "--epochs", "1", "--limit-train", "2000", "--val-size", "1000", "--lr", "0.01",
                 "--device", "cpu", "--data-dir", str(DATA), "--checkpoint", str(path)])
    return path
