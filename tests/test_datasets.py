"""Tests for netpress.datasets: digits, CIFAR-10, MNIST, Fashion-MNIST, IDX reading, loaders."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from netpress import datasets as ds
from netpress.errors import DataError


def _check(dataset: TensorDataset, n: int, chw: tuple[int, int, int]) -> None:
    x, y = dataset.tensors
    assert x.shape == (n, *chw) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (n,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert torch.isfinite(x).all()


def test_import_is_light() -> None:
    code = (
        "import sys, netpress.datasets, netpress.models; "
        "print(sorted(m for m in ('sklearn', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- shared_data_dir


def test_shared_data_dir_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NETPRESS_DATA", raising=False)
    assert ds.shared_data_dir() is None
    with pytest.raises(DataError, match="NETPRESS_DATA=../shared/data"):
        ds.shared_data_dir(required=True)


def test_shared_data_dir_missing_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NETPRESS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        ds.shared_data_dir()
    monkeypatch.setenv("NETPRESS_DATA", str(tmp_path))
    assert ds.shared_data_dir(required=True) == tmp_path


# ---------------------------------------------------------------- digits


def test_digits_shapes_split_and_determinism() -> None:
    train, test = ds.digits(seed=0)
    _check(train, 1437, (1, 8, 8))
    _check(test, 360, (1, 8, 8))
    x = train.tensors[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3
    counts = torch.bincount(test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified
    again, _ = ds.digits(seed=0)
    assert torch.equal(again.tensors[0], x)
    other, _ = ds.digits(seed=1)
    assert not torch.equal(other.tensors[1], train.tensors[1])


def test_digits_bad_fraction() -> None:
    with pytest.raises(DataError, match="test_fraction"):
        ds.digits(test_fraction=1.5)


# ---------------------------------------------------------------- IDX


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = tmp_path / "img-idx3-ubyte"
    raw.write_bytes(_idx_bytes(images, 0x08))
    np.testing.assert_array_equal(ds.read_idx(raw), images)
    ints = np.array([1, -2, 300000], dtype=np.int32)
    gz = tmp_path / "ints-idx1.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(ints, 0x0C)))
    out = ds.read_idx(gz)
    np.testing.assert_array_equal(out, ints)
    assert out.dtype == np.int32


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x08\x03\x00\x00garbage", "bad magic"),
        (bytes([0, 0, 8, 3]) + np.array([2, 28, 28], ">u4").tobytes() + b"\x00" * 100, "truncated"),
        (bytes([0, 0, 8, 2, 0, 0]), "header"),
        (b"", "bad magic"),
    ],
)
def test_read_idx_corrupt(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(DataError, match=match) as info:
        ds.read_idx(path)
    assert "bad-idx3-ubyte.gz" in str(info.value)


def test_read_idx_bad_gzip_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(b"\x00" * 1000)[:20])
    with pytest.raises(DataError, match="broken.gz"):
        ds.read_idx(path)
    with pytest.raises(DataError, match="does not exist"):
        ds.read_idx(tmp_path / "absent.gz")


# ---------------------------------------------------------------- file validation


def test_cifar_missing_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar10_exact_subset.npz"):
        ds.cifar10_exact_test(tmp_path)
    folder = tmp_path / "cifar10"
    folder.mkdir()
    np.savez(folder / "cifar10_exact_subset.npz", x_test=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="lacks array.*y_test"):
        ds.cifar10_exact_test(tmp_path)
    np.savez(
        folder / "cifar10_exact_subset.npz",
        x_test=np.zeros((2, 32, 32), np.uint8),
        y_test=np.zeros(2, np.uint8),
    )
    with pytest.raises(DataError, match="expected uint8 images"):
        ds.cifar10_exact_test(folder)


def test_cifar_tiny_fake_normalisation(tmp_path: Path) -> None:
    x = np.full((3, 32, 32, 3), 255, np.uint8)
    np.savez(tmp_path / "cifar10_exact_subset.npz", x_test=x, y_test=np.array([0, 4, 9], np.uint8))
    data = ds.cifar10_exact_test(tmp_path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    _check(data, 3, (3, 32, 32))
    assert data.tensors[0][:, :, 0, 0].tolist() == [[2.0, 1.0, 0.5]] * 3


# ---------------------------------------------------------------- loader


def test_loader_seeded_shuffle() -> None:
    data = TensorDataset(torch.arange(100).float(), torch.arange(100))

    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in ds.loader(data, 16, shuffle=True, seed=seed)]).tolist()

    assert order(3) == order(3) != order(4)
    assert sorted(order(3)) == list(range(100))
    plain = torch.cat([y for _, y in ds.loader(data, 32)]).tolist()
    assert plain == list(range(100))


# ---------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_cifar10_exact(shared_data: Path) -> None:
    test = ds.cifar10_exact_test(shared_data)
    _check(test, 1017, (3, 32, 32))
    _check(ds.cifar10_exact_train(shared_data / "cifar10"), 5085, (3, 32, 32))
    mean = test.tensors[0].mean(dim=(0, 2, 3))
    assert mean.abs().max() < 0.5  # roughly centred by the ImageNet statistics


@pytest.mark.shared_data
def test_cifar10_jpeg_test(shared_data: Path) -> None:
    data = ds.cifar10_jpeg_test(shared_data, limit=300)
    _check(data, 300, (3, 32, 32))
    exact = ds.cifar10_exact_test(shared_data)
    assert torch.equal(data.tensors[1], exact.tensors[1][:300])
    err = (data.tensors[0] - exact.tensors[0][:300]).abs().mean()
    assert float(err) < 0.2  # same images, JPEG loss only


@pytest.mark.shared_data
def test_cifar10_jpeg_train_balanced_subset(shared_data: Path) -> None:
    data = ds.cifar10_jpeg_train(shared_data, limit=105, seed=0)
    _check(data, 105, (3, 32, 32))
    counts = torch.bincount(data.tensors[1], minlength=10)
    assert counts.tolist() == [11] * 5 + [10] * 5
    again = ds.cifar10_jpeg_train(shared_data, limit=105, seed=0)
    assert torch.equal(again.tensors[0], data.tensors[0])
    other = ds.cifar10_jpeg_train(shared_data, limit=105, seed=1)
    assert not torch.equal(other.tensors[0], data.tensors[0])
    with pytest.raises(DataError, match="limit"):
        ds.cifar10_jpeg_train(shared_data, limit=0)


@pytest.mark.shared_data
def test_mnist(shared_data: Path) -> None:
    test = ds.mnist_test(shared_data)
    _check(test, 10_000, (1, 28, 28))
    counts = torch.bincount(test.tensors[1], minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train = ds.mnist_train(shared_data / "mnist")
    _check(train, 17_435, (1, 28, 28))
    x = train.tensors[0]
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1


@pytest.mark.shared_data
@pytest.mark.parametrize(("split", "n"), [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist(shared_data: Path, split: str, n: int) -> None:
    data = ds.fashion_mnist(shared_data, split=split)  # type: ignore[arg-type]
    _check(data, n, (1, 28, 28))
    assert torch.bincount(data.tensors[1], minlength=10).tolist() == [n // 10] * 10


def test_fashion_mnist_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'val'"):
        ds.fashion_mnist(tmp_path, split="val")  # type: ignore[arg-type]
