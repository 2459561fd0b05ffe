"""MNIST from the project's own tree: the shipped .gz files, extracted and MD5-checked once, the
seeded split of the training images into training and validation, and in-memory mini-batches.

The four files ship in data/MNIST/raw/ (about 11 MB), so nothing needs the network; without
them, torchvision's download is tried (it needs internet).
"""

import gzip
import hashlib
import math
import shutil
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from cli import UserError, atomic_path

# The extracted MNIST files, as published by torchvision and others (see data/MNIST/raw/MD5SUMS.*).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
TRAIN_IMAGES = 60_000
TEST_IMAGES = 10_000
IMAGE_SHAPE = (1, 32, 32)  # MNIST's 28 x 28 padded by 2 pixels, as in the original LeNet5


def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_checked(gz_path, target, expected_md5):
    """Extract `gz_path` to `target` through a temporary file; rename only if the MD5 matches."""
    digest = hashlib.md5()
    with atomic_path(target) as tmp:
        try:
            with gzip.open(gz_path, "rb") as src, open(tmp, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{gz_path} is corrupt or truncated ({e}); restore it "
                            "(git checkout -- data/) and run again") from None
        if digest.hexdigest() != expected_md5:
            raise UserError(f"{gz_path} does not extract to the official {target.name} "
                            "(MD5 mismatch); restore it (git checkout -- data/) and run again")


def prepare_mnist(data_dir):
    """Make sure `data_dir`/MNIST/raw holds the four extracted, MD5-checked MNIST files.

    Each shipped .gz is extracted on first use. Without the shipped files, torchvision's download
    is tried (it needs internet); if that fails too, the error says what is missing and where,
    and the folders the attempt made are removed again.
    """
    raw = Path(data_dir) / "MNIST" / "raw"
    missing = []
    for name, md5 in MNIST_MD5.items():
        target, gz = raw / name, raw / f"{name}.gz"
        if target.exists() and md5sum(target) == md5:
            continue
        if gz.exists():
            extract_checked(gz, target, md5)
        elif target.exists():
            raise UserError(f"{target} is corrupt (MD5 mismatch) and {gz.name} is not there to "
                            "restore it from; restore data/ (git checkout -- data/)")
        else:
            missing.append(gz.name)
    if missing:
        new = next((p for p in reversed((raw, *raw.parents)) if not p.exists()), None)
        try:
            torchvision.datasets.MNIST(data_dir, train=True, download=True)
            torchvision.datasets.MNIST(data_dir, train=False, download=True)
        except Exception:  # no internet, or a mirror failed: say what to put where
            if new is not None:
                shutil.rmtree(new, ignore_errors=True)
            raise UserError(f"MNIST files missing from {raw}: {', '.join(missing)} (download "
                            "failed too); restore them with git checkout -- data/") from None


def load_mnist(data_dir, train):
    """MNIST images padded to 32x32 (uint8, [N, 32, 32]) and labels (int64, [N])."""
    prepare_mnist(data_dir)
    dataset = torchvision.datasets.MNIST(data_dir, train=train, download=False)
    return F.pad(dataset.data, (2, 2, 2, 2)), dataset.targets.long()


def split_train_val(n, val_size, seed, limit_train=None):
    """A seeded split of range(n): (train indices, the first `limit_train` only; validation)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:][:limit_train], order[:val_size]


def random_shift(images, max_shift, generator):
    """Shift each uint8 image [N, H, W] by up to `max_shift` pixels each way, zero-filled."""
    n, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]
    cols = (dx + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]


class Batches:
    """Mini-batches (float images in [0, 1] of shape [B, 1, 32, 32], labels) from memory.

    Much faster than a per-image DataLoader on a small dataset held whole in memory. Shuffling
    and shifts draw from `generator`, so the sequence of batches is reproducible.
    """

    def __init__(self, images, labels, batch_size, shuffle=False, max_shift=0, generator=None):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.max_shift = batch_size, shuffle, max_shift
        self.generator = generator

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.images[index]
            if self.max_shift:
                images = random_shift(images, self.max_shift, self.generator)
            yield images.unsqueeze(1).float().div_(255), self.labels[index]
