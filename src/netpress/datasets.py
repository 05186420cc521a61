"""Dataset loaders for netpress's reference experiments.

Every loader returns a :class:`torch.utils.data.TensorDataset` of ``(images, labels)``: images are
float32 ``N x C x H x W``, normalised; labels are int64. Nothing is read at import time, and
scikit-learn / Pillow are imported only inside the functions that need them.

Preprocessing (a model must be evaluated on inputs prepared as it was trained):

* ``digits``: pixel values 0..16 divided by 16, then standardised with the train split's own
  mean and std (one number each, about 0.30 and 0.38).
* CIFAR-10: pixels / 255, then per channel ``(x - mean) / std`` with the ImageNet statistics
  mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), which the pretrained akamaster
  ResNets were trained with.
* MNIST: pixels / 255, then ``(x - 0.1307) / 0.3081``.
* Fashion-MNIST: pixels / 255, then ``(x - 0.2860) / 0.3530``.

Each returned dataset carries this description as ``dataset.netpress_preprocessing``
(:func:`preprocessing_of` finds it through loaders and subsets), so that a report whose
reference scores near chance can say which normalisation the data went through.

Real data lives in the shared data folder named by the ``NETPRESS_DATA`` environment variable
(holding ``cifar10/``, ``cifar10_resnets_akamaster/``, ``mnist/`` and ``fashion_mnist/``); each
loader's ``root`` may be that folder or the dataset's own subfolder. Files are read without
pickle (``np.load(..., allow_pickle=False)``).
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from netpress.errors import DataError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "cifar10_exact_test",
    "cifar10_exact_train",
    "cifar10_jpeg_test",
    "cifar10_jpeg_train",
    "digits",
    "fashion_mnist",
    "loader",
    "preprocessing_of",
    "mnist_test",
    "mnist_train",
    "read_idx",
    "shared_data_dir",
]

#: ImageNet statistics: what the pretrained akamaster CIFAR ResNets were trained with.
CIFAR10_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR10_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

_ENV = "NETPRESS_DATA"
_ATTR = "netpress_preprocessing"


def _stats(mean: Sequence[float], std: Sequence[float]) -> str:
    def fmt(v: Sequence[float]) -> str:
        return f"{v[0]:.4g}" if len(v) == 1 else "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

    return f"mean {fmt(mean)}, std {fmt(std)}"


def _described(dataset: TensorDataset, text: str) -> TensorDataset:
    setattr(dataset, _ATTR, text)
    return dataset


def preprocessing_of(data: object) -> str | None:
    """The preprocessing a built-in loader applied to ``data`` (a dataset, a ``Subset`` or a
    ``DataLoader`` over one), or ``None`` for data netpress did not load."""
    for _ in range(8):  # DataLoader -> Subset -> TensorDataset, at most a few levels
        text = getattr(data, _ATTR, None)
        if isinstance(text, str):
            return text
        data = getattr(data, "dataset", None)
        if data is None:
            return None
    return None


def shared_data_dir(required: bool = False) -> Path | None:
    """Return the shared data folder named by ``$NETPRESS_DATA``.

    If the variable is unset, return ``None``, or raise :class:`DataError` when ``required``.
    If it is set but the folder does not exist, raise :class:`DataError`.
    """
    value = os.environ.get(_ENV, "").strip()
    if not value:
        if required:
            raise DataError(
                f"{_ENV} is not set: set {_ENV}=../shared/data (the folder holding cifar10/, "
                "cifar10_resnets_akamaster/, mnist/ and fashion_mnist/)"
            )
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(
            f"{_ENV}={value!r} but {path.resolve()} is not a folder; point it at the shared data "
            "folder (e.g. ../shared/data)"
        )
    return path


# --------------------------------------------------------------------------- helpers


def _dataset_dir(root: str | Path, sub: str, marker: str) -> Path:
    """``root`` itself if it holds ``marker``, else ``root/sub`` if that does; else DataError."""
    base = Path(root).expanduser()
    for folder in (base, base / sub):
        if (folder / marker).exists():
            return folder
    raise DataError(
        f"cannot find {marker} in {base} or {base / sub}; pass the {sub}/ folder or the shared "
        f"data folder that contains it (NETPRESS_DATA=../shared/data)"
    )


def _load_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read ``keys`` from the pickle-free ``.npz`` at ``path``, naming the file in every error."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the data folder")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path} lacks array(s) {', '.join(missing)} (it has: "
                    f"{', '.join(npz.files)}); the file is not the expected version"
                )
            return {k: npz[k] for k in keys}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read {path} as a pickle-free .npz: {exc}") from exc


def _check_images(path: Path, x: np.ndarray, y: np.ndarray, shape: tuple[int, ...]) -> None:
    """Check ``x`` is uint8 ``N x shape`` and ``y`` has ``N`` labels in 0..9."""
    if x.dtype != np.uint8 or x.shape[1:] != shape or x.shape[0] != y.shape[0] or y.ndim != 1:
        raise DataError(
            f"{path}: expected uint8 images of shape (N, {', '.join(map(str, shape))}) and N "
            f"labels, got images {x.dtype} {x.shape} and labels {y.shape}"
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataError(f"{path}: labels must lie in 0..9, got {int(y.min())}..{int(y.max())}")


def _to_dataset(
    x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float], name: str
) -> TensorDataset:
    """uint8 ``NHWC`` / ``NHW`` images -> normalised float32 ``NCHW`` and int64 labels,
    described as ``name``'s preprocessing (see :func:`preprocessing_of`)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    c = t.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    if m.shape[1] not in (1, c) or s.shape[1] not in (1, c):
        raise DataError(f"mean/std must have 1 or {c} values, got {len(mean)} and {len(std)}")
    if bool((s <= 0).any()):
        raise DataError(f"std values must be > 0, got {tuple(std)}")
    images = t.contiguous().to(torch.float32).div_(255.0).sub_(m).div_(s)
    labels = torch.from_numpy(y.astype(np.int64))
    text = f"netpress's {name} loader: pixels / 255, then (x - mean) / std with {_stats(mean, std)}"
    return _described(TensorDataset(images, labels), text)


def _as_seq(v: float | Sequence[float]) -> Sequence[float]:
    """A scalar statistic as a one-element sequence."""
    return (float(v),) if isinstance(v, (int, float)) else v


# --------------------------------------------------------------------------- digits


def digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits as ``(train, test)``, images ``N x 1 x 8 x 8``.

    Pixels are scaled to [0, 1] and standardised with the train split's mean and std. The split
    is stratified and deterministic given ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())
    text = (f"netpress's digits loader: pixel values / 16, then (x - mean) / std with the "
            f"train split's mean {mean:.4g}, std {std:.4g}")
    return (
        _described(TensorDataset(torch.from_numpy((x_tr - mean) / std), torch.from_numpy(y_tr)),
                   text),
        _described(TensorDataset(torch.from_numpy((x_te - mean) / std), torch.from_numpy(y_te)),
                   text),
    )


# --------------------------------------------------------------------------- CIFAR-10

_EXACT = "cifar10_exact_subset.npz"
_JPEG_TEST = "cifar10_jpeg_test.npz"
_JPEG_BYTES = "cifar10_jpeg_bytes.npz"


def _cifar_file(root: str | Path, name: str) -> Path:
    """Locate ``name`` in ``root`` or ``root/cifar10``."""
    return _dataset_dir(root, "cifar10", name) / name


def _cifar_npz(root: str | Path, name: str, xk: str, yk: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate images ``xk`` and labels ``yk`` from a CIFAR ``.npz``."""
    path = _cifar_file(root, name)
    arrays = _load_npz(path, (xk, yk))
    _check_images(path, arrays[xk], arrays[yk], (32, 32, 3))
    return arrays[xk], arrays[yk]


def cifar10_exact_test(
    root: str | Path,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> TensorDataset:
    """The 1,017 lossless CIFAR-10 test images (test images 0..1016), ``N x 3 x 32 x 32``."""
    x, y = _cifar_npz(root, _EXACT, "x_test", "y_test")
    return _to_dataset(x, y, mean, std, "CIFAR-10")


def cifar10_exact_train(
    root: str | Path,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> TensorDataset:
    """The 5,085 lossless CIFAR-10 train images (images 0..1016 of each train batch)."""
    x, y = _cifar_npz(root, _EXACT, "x_train", "y_train")
    return _to_dataset(x, y, mean, std, "CIFAR-10")


def cifar10_jpeg_test(
    root: str | Path,
    limit: int | None = None,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> TensorDataset:
    """The full 10k CIFAR-10 test set, JPEG-degraded (lossy); ``limit`` keeps the first images."""
    _check_limit(limit)
    x, y = _cifar_npz(root, _JPEG_TEST, "x_test", "y_test")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return _to_dataset(x, y, mean, std, "CIFAR-10")


def cifar10_jpeg_train(
    root: str | Path,
    limit: int | None = None,
    seed: int = 0,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> TensorDataset:
    """The 50k CIFAR-10 train images decoded from their JPEG files (lossy).

    With ``limit``, only a class-balanced subset of ``limit`` images is decoded, chosen
    deterministically from ``seed`` and kept in the original order. Decoding all 50k takes a
    few seconds.
    """
    _check_limit(limit)
    path = _cifar_file(root, _JPEG_BYTES)
    arrays = _load_npz(path, ("train_jpeg", "train_offsets", "y_train"))
    blob, offsets, labels = arrays["train_jpeg"], arrays["train_offsets"], arrays["y_train"]
    if offsets.ndim != 1 or offsets.shape[0] != labels.shape[0] + 1 or offsets[-1] > blob.size:
        raise DataError(
            f"{path}: train_offsets {offsets.shape} does not fit y_train {labels.shape} and "
            f"train_jpeg ({blob.size} bytes); the file is corrupt"
        )
    n = labels.shape[0]
    idx = np.arange(n) if limit is None else _balanced_subset(labels, limit, seed)
    x = _decode_jpegs(path, blob, offsets, idx)
    y = labels[idx]
    _check_images(path, x, y, (32, 32, 3))
    return _to_dataset(x, y, mean, std, "CIFAR-10")


def _check_limit(limit: int | None) -> None:
    """Raise DataError unless ``limit`` is None or a positive int."""
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise DataError(f"limit must be a positive int or None, got {limit!r}")


def _balanced_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of ``limit`` items, as equal per class as possible, chosen with ``seed``."""
    if limit >= labels.shape[0]:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [np.flatnonzero(labels == c) for c in classes]
    quota = np.full(len(classes), limit // len(classes))
    quota[: limit % len(classes)] += 1
    picked = [rng.permutation(ix)[: int(q)] for ix, q in zip(per_class, quota)]
    return np.sort(np.concatenate(picked))


def _decode_jpegs(path: Path, blob: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Decode the JPEG files ``idx`` of ``blob`` (split at ``offsets``) into uint8 ``NHWC``."""
    from PIL import Image

    raw = blob.tobytes()
    out = np.empty((idx.shape[0], 32, 32, 3), dtype=np.uint8)
    for row, i in enumerate(idx):
        data = raw[int(offsets[i]) : int(offsets[i + 1])]
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise DataError(f"{path}: JPEG #{int(i)} cannot be decoded: {exc}") from exc
        if arr.shape != (32, 32, 3):
            raise DataError(f"{path}: JPEG #{int(i)} has shape {arr.shape}, expected (32, 32, 3)")
        out[row] = arr
    return out


# --------------------------------------------------------------------------- MNIST / Fashion

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw), using its magic number and dims to parse the header."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"IDX file {p} does not exist; check the data folder")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{p} is not a readable gzip file ({exc}); the file is corrupt") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{p} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{p}: IDX header with {ndim} dims is truncated or empty")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[raw[2]]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{p}: header says shape {dims} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header} bytes after the header; the file is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and check the ``{prefix}-images-idx3-ubyte.gz`` / ``-labels-idx1-ubyte.gz`` pair."""
    img_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    x = read_idx(img_path)
    y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    _check_images(img_path, x, y, (28, 28))
    return x, y


def mnist_test(root: str | Path, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> TensorDataset:
    """The 10k MNIST test images, ``N x 1 x 28 x 28``."""
    folder = _dataset_dir(root, "mnist", "t10k-images-idx3-ubyte.gz")
    x, y = _idx_pair(folder, "t10k")
    return _to_dataset(x, y, _as_seq(mean), _as_seq(std), "MNIST")


def mnist_train(
    root: str | Path, mean: float = MNIST_MEAN, std: float = MNIST_STD
) -> TensorDataset:
    """The first 17,435 MNIST train images (all that survive losslessly), ``N x 1 x 28 x 28``."""
    name = "mnist_train_first17435.npz"
    path = _dataset_dir(root, "mnist", name) / name
    arrays = _load_npz(path, ("x_train", "y_train"))
    _check_images(path, arrays["x_train"], arrays["y_train"], (28, 28))
    return _to_dataset(arrays["x_train"], arrays["y_train"], _as_seq(mean), _as_seq(std),
                       "MNIST")


def fashion_mnist(
    root: str | Path,
    split: Literal["train", "test"] = "train",
    mean: float = FASHION_MNIST_MEAN,
    std: float = FASHION_MNIST_STD,
) -> TensorDataset:
    """Fashion-MNIST ``split`` (60k train or 10k test images), ``N x 1 x 28 x 28``."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise DataError(f"fashion_mnist split must be 'train' or 'test', got {split!r}")
    prefix = prefixes[split]
    folder = _dataset_dir(root, "fashion_mnist", f"{prefix}-images-idx3-ubyte.gz")
    x, y = _idx_pair(folder, prefix)
    return _to_dataset(x, y, _as_seq(mean), _as_seq(std), "Fashion-MNIST")


# --------------------------------------------------------------------------- loaders


def loader(
    dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A single-process :class:`DataLoader`; shuffling uses a generator seeded with ``seed``."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be > 0, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0
    )
