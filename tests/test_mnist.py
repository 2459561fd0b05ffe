import gzip
import hashlib

import pytest
import torch
from helpers import DATA

import mnist
from cli import UserError
from mnist import Batches, load_mnist, prepare_mnist, random_shift, split_train_val


def test_md5_constants_match_the_shipped_list():
    listed = dict(line.split()[::-1] for line in
                  (DATA / "MNIST/raw/MD5SUMS.extracted").read_text().splitlines() if line.strip())
    assert listed == mnist.MNIST_MD5


def test_shipped_mnist_loads_padded_to_32():
    images, labels = load_mnist(DATA, train=False)
    assert images.shape == (10000, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    assert images[:, :2].sum() == 0 and images[:, :, -2:].sum() == 0  # the 2-pixel zero border


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A data folder with one small fake 'MNIST' file, so extraction is tested in milliseconds."""
    content = bytes(range(256)) * 64
    monkeypatch.setattr(mnist, "MNIST_MD5", {"fake-ubyte": hashlib.md5(content).hexdigest()})
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "fake-ubyte.gz").write_bytes(gzip.compress(content))
    return tmp_path, raw, content


def test_prepare_mnist_extracts_and_checks(fake_mnist):
    data_dir, raw, content = fake_mnist
    prepare_mnist(data_dir)
    assert (raw / "fake-ubyte").read_bytes() == content
    assert sorted(p.name for p in raw.iterdir()) == ["fake-ubyte", "fake-ubyte.gz"]  # no temp left


def test_prepare_mnist_repairs_a_corrupt_extracted_file(fake_mnist):
    data_dir, raw, content = fake_mnist
    (raw / "fake-ubyte").write_bytes(content[:-1] + b"x")
    prepare_mnist(data_dir)
    assert (raw / "fake-ubyte").read_bytes() == content


def test_truncated_gz_is_named_and_leaves_nothing(fake_mnist):
    data_dir, raw, _ = fake_mnist
    gz = raw / "fake-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(UserError, match="fake-ubyte.gz is corrupt or truncated"):
        prepare_mnist(data_dir)
    assert sorted(p.name for p in raw.iterdir()) == ["fake-ubyte.gz"]


def test_altered_gz_fails_the_md5_check(fake_mnist):
    data_dir, raw, content = fake_mnist
    (raw / "fake-ubyte.gz").write_bytes(gzip.compress(content[::-1]))
    with pytest.raises(UserError, match="fake-ubyte.gz does not extract.*MD5"):
        prepare_mnist(data_dir)
    assert not (raw / "fake-ubyte").exists()


def test_missing_files_say_what_and_where(fake_mnist, monkeypatch):
    data_dir, raw, _ = fake_mnist
    (raw / "fake-ubyte.gz").unlink()

    def no_network(*args, **kwargs):
        raise RuntimeError("no internet")

    monkeypatch.setattr(mnist.torchvision.datasets, "MNIST", no_network)
    with pytest.raises(UserError, match=r"missing from .*raw: fake-ubyte.gz"):
        prepare_mnist(data_dir)
    with pytest.raises(UserError, match=r"missing from .*nowhere/MNIST/raw: fake-ubyte.gz"):
        prepare_mnist(data_dir / "nowhere")
    assert not (data_dir / "nowhere").exists()  # the failed attempt leaves no empty folders


def test_split_is_seeded_and_disjoint():
    train, val = split_train_val(100, 10, seed=3)
    assert len(train) == 90 and len(val) == 10
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert torch.equal(val, split_train_val(100, 10, seed=3)[1])
    assert not torch.equal(val, split_train_val(100, 10, seed=4)[1])


def test_random_shift_moves_whole_images():
    images = torch.zeros(50, 32, 32, dtype=torch.uint8)
    images[:, 10:20, 12:18] = torch.randint(1, 255, (50, 10, 6), dtype=torch.uint8)
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(shifted.sum((1, 2)), images.sum((1, 2)))  # nothing falls off the edge
    assert not torch.equal(shifted, images)
    for original, moved in zip(images, shifted, strict=True):  # each one purely translated
        assert any(torch.equal(torch.roll(original, (dy, dx), (0, 1)), moved)
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_batches_cover_every_sample_once_in_float():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 32, 32).contiguous()
    labels = torch.arange(10)
    batches = Batches(images, labels, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 3
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(10))
    x, y = next(iter(Batches(images, labels, 4)))
    assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0, 0], y.float() / 255)
