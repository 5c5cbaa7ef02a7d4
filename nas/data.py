"""Data sets held as uint8 tensors (on the training device) with batched tensor augmentation.

Like airbench: the whole data set lives on the device, augmentation (random crop with padding,
horizontal flip, cutout) is a handful of batched tensor ops, and no per-image Python runs in the
training loop. ``cifar10``/``cifar100`` come through torchvision; ``digits`` is scikit-learn's
bundled 8x8 digits (no download), for smoke runs and tests.

In a sweep the driver loads a data set once and ships it to the trials as numpy arrays through Ray's
object store (:func:`to_arrays` / :func:`from_arrays`), so worker nodes need neither internet nor a copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F

from nas.errors import ConfigError
from nas.registry import BUILTIN, DATASETS, DatasetEntry, register_dataset, registering

CIFAR10_MEAN, CIFAR10_STD = (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class ImageData:
    """Train and test images as uint8 NCHW tensors plus what the networks need to know about them."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    crop_padding: int  # DARTS: 4 for 32x32
    cutout_length: int  # DARTS: 16 for 32x32
    class_names: tuple[str, ...] = ()

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def to(self, device: torch.device | str) -> "ImageData":
        return replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                       test_x=self.test_x.to(device), test_y=self.test_y.to(device))


def _digits() -> ImageData:
    """scikit-learn's bundled 8x8 digits, split 80/20 per class with a fixed seed.

    Read straight from the package's CSV: importing scikit-learn takes about 1.5 s, which every fresh Ray
    worker would pay before its first epoch.
    """
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise ConfigError("dataset 'digits' comes with scikit-learn: pip install scikit-learn")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :64] * (255.0 / 16.0)).round().to(torch.uint8).view(-1, 1, 8, 8)
    labels = torch.from_numpy(table[:, 64]).long()
    gen = torch.Generator().manual_seed(0)
    test = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        test.append(members[torch.randperm(len(members), generator=gen)[:round(0.2 * len(members))]])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    tr, te = (~is_test).nonzero().flatten(), is_test.nonzero().flatten()
    x = images.float() / 255
    return ImageData("digits", images[tr], labels[tr], images[te], labels[te], (x.mean().item(),),
                     (x.std().item(),), 10, crop_padding=1, cutout_length=4,
                     class_names=tuple(str(d) for d in range(10)))


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)


def _cifar_class(name: str):
    import torchvision

    return torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100


def download_hint(name: str, root: Path) -> str:
    return (f"on a machine with internet run `dartsweep data download {name} --data-dir {root}` (or copy "
            f"{CIFAR_FOLDERS[name]}/ there)")


def _online(timeout: float = 3.0) -> bool:
    """Whether the CIFAR host answers; torchvision's download has no time-out of its own, so ask first."""
    import socket

    try:
        socket.create_connection(DOWNLOAD_HOST, timeout=timeout).close()
    except OSError:
        return False
    return True


def _cifar(name: str, data_dir: str | Path, download: bool) -> ImageData:
    cls = _cifar_class(name)
    root = Path(data_dir).expanduser().resolve()
    try:
        train = cls(str(root), train=True, download=False)
    except RuntimeError:
        if not download:
            raise ConfigError(f"{name} not found (or corrupted) in {root}; {download_hint(name, root)}") from None
        if not _online():
            raise ConfigError(f"{name} not found in {root} and this machine is offline; "
                              f"{download_hint(name, root)}") from None
        try:
            train = cls(str(root), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
            raise ConfigError(f"{name} not found in {root} and the download failed ({type(exc).__name__}); "
                              f"{download_hint(name, root)}") from None
    test = cls(str(root), train=False, download=False)

    def as_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long()

    (trx, try_), (tex, tey) = as_tensors(train), as_tensors(test)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return ImageData(name, trx, try_, tex, tey, mean, std, 10 if name == "cifar10" else 100, 4, 16,
                     tuple(train.classes))


def image_data(name: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
               test_y: torch.Tensor, class_names: tuple[str, ...] | list[str],
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
               crop_padding: int | None = None, cutout_length: int | None = None) -> ImageData:
    """An ``ImageData`` from uint8 N x C x H x W images and integer labels, for a dataset plugin's loader.
    Left out: mean/std come from the training images; the crop padding is H/8 and the cutout H/2 (DARTS'
    4 and 16 at 32x32)."""
    if mean is None or std is None:
        if not isinstance(train_x, torch.Tensor) or train_x.dim() != 4 or not train_x.numel():
            raise ConfigError(f"dataset {name!r}: the training split is empty, or not N x C x H x W images")
        measured_mean, measured_std = channel_stats(train_x)
        mean = measured_mean if mean is None else mean
        std = measured_std if std is None else std
    size = int(train_x.shape[-1])
    return ImageData(name, train_x, torch.as_tensor(train_y).long(), test_x, torch.as_tensor(test_y).long(),
                     tuple(float(m) for m in mean), tuple(float(v) for v in std), len(class_names),
                     max(1, size // 8) if crop_padding is None else crop_padding,
                     max(1, size // 2) if cutout_length is None else cutout_length, tuple(map(str, class_names)))


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (on the 0-1 scale) of uint8 N x C x H x W images, a chunk at a time: a
    float copy of 50,000 32x32 images would take 600 MB."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        values = part.to(torch.float32)
        total += values.sum(dim=(0, 2, 3), dtype=torch.float64)
        squares += values.square().sum(dim=(0, 2, 3), dtype=torch.float64)
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1e-3).tolist())


def check_image_data(data: object, entry: DatasetEntry) -> ImageData:
    """Refuse a loaded dataset the training loops cannot use, naming what is wrong (one line)."""
    where = f"dataset {entry.name!r} (from {entry.source})"
    if not isinstance(data, ImageData):
        raise ConfigError(f"{where}: its loader must return nas.data.ImageData (see nas.data.image_data), got "
                          f"{type(data).__name__}")
    c, size, classes = entry.shape
    for split in ("train", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            raise ConfigError(f"{where}: {split} images must be a uint8 tensor N x C x H x W, got "
                              f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
        if len(x) == 0:
            raise ConfigError(f"{where}: the {split} split is empty")
        if tuple(x.shape[1:]) != (c, size, size):
            raise ConfigError(f"{where}: {split} images are {tuple(x.shape[1:])} but it was registered as "
                              f"{(c, size, size)} (in_channels, image_size, image_size)")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != len(x) or y.is_floating_point():
            raise ConfigError(f"{where}: {split} labels must be one integer per image ({len(x)}), got "
                              f"{tuple(getattr(y, 'shape', ()))}")
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise ConfigError(f"{where}: {split} labels must lie in 0..{classes - 1}, found {int(y.min())}.."
                              f"{int(y.max())}")
    if data.num_classes != classes:
        raise ConfigError(f"{where}: it holds {data.num_classes} classes but was registered with {classes}")
    if len(data.train_y.unique()) < 2:
        raise ConfigError(f"{where}: the training split holds fewer than 2 classes")
    if len(data.mean) != c or len(data.std) != c or min(data.std) <= 0:
        raise ConfigError(f"{where}: mean and std need one value per channel ({c}), std > 0; got {data.mean}, "
                          f"{data.std}")
    return data


def load_dataset(name: str, data_dir: str | Path = "./data", download: bool = True) -> ImageData:
    """Load registered dataset ``name`` (cifar10, cifar100, digits, or a plugin's) into CPU uint8 tensors,
    checked against what it was registered with; CIFAR downloads when missing and ``download``."""
    entry = DATASETS.get(name)
    return check_image_data(entry.load(Path(data_dir), download), entry)


def dataset_shape(name: str) -> tuple[int, int, int]:
    """(image channels, image size, classes) of registered dataset ``name``, without loading it."""
    return DATASETS.get(name).shape


def _register_builtins() -> None:
    """The bundled datasets, registered exactly as a plugin registers its own (``nas.registry``)."""
    register_dataset("cifar10", lambda root, download: _cifar("cifar10", root, download), in_channels=3,
                     image_size=32, num_classes=10)
    register_dataset("cifar100", lambda root, download: _cifar("cifar100", root, download), in_channels=3,
                     image_size=32, num_classes=100)
    register_dataset("digits", lambda root, download: _digits(), in_channels=1, image_size=8, num_classes=10)
    from nas.image_folder import PREFIX, folder_entry

    DATASETS.families[PREFIX] = folder_entry  # dataset: {image_folder: PATH, size: 32, ...} (nas.image_folder)


with registering(BUILTIN):
    _register_builtins()


@dataclass(frozen=True)
class DataFile:
    """One file of a CIFAR data set on disk and whether its MD5 is the one torchvision expects."""

    path: Path
    md5: str
    expected_md5: str

    @property
    def ok(self) -> bool:
        return self.md5 == self.expected_md5


def dataset_files(name: str, data_dir: str | Path) -> list[DataFile]:
    """The files of CIFAR data set ``name`` under ``data_dir`` with their checksums (missing: md5 '')."""
    from torchvision.datasets.utils import calculate_md5

    if name not in CIFAR_FOLDERS:
        raise ConfigError(f"only cifar10 and cifar100 are downloaded; {name!r} is not (digits ships with "
                          "scikit-learn)")
    cls = _cifar_class(name)
    folder = Path(data_dir).expanduser().resolve() / cls.base_folder
    expected = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return [DataFile(folder / f, calculate_md5(str(folder / f)) if (folder / f).is_file() else "", md5)
            for f, md5 in expected]


def download_dataset(name: str, data_dir: str | Path) -> list[DataFile]:
    """Make sure CIFAR data set ``name`` is complete in ``data_dir``, downloading it if it is not; returns
    its files, each checked against torchvision's checksum."""
    files = dataset_files(name, data_dir)
    if not all(f.ok for f in files):
        root = Path(data_dir).expanduser().resolve()
        if any(f.md5 for f in files):  # a partial or corrupted copy: torchvision would re-extract over it
            bad = next(f for f in files if not f.ok)
            raise ConfigError(f"{bad.path} is {'corrupted' if bad.md5 else 'missing'} (md5 {bad.md5 or '-'}, "
                              f"expected {bad.expected_md5}); delete {bad.path.parent} and download again")
        if not _online():
            raise ConfigError(f"cannot reach {DOWNLOAD_HOST[0]} to download {name}; run this on a machine "
                              f"with internet and copy {root / CIFAR_FOLDERS[name]} here")
        root.mkdir(parents=True, exist_ok=True)
        _cifar_class(name)(str(root), train=True, download=True)
        files = dataset_files(name, data_dir)
    return files


# ---------------------------------------------------------------------------------------------- shipping

def to_arrays(data: ImageData) -> dict:
    """``data`` as numpy arrays and plain values: what travels through Ray's object store, where numpy
    arrays are stored once per node and read without a copy by every trial there."""
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in fields.items()}


def from_arrays(arrays: Mapping) -> ImageData:
    """The inverse of :func:`to_arrays`. Tensors share the (read-only) object-store memory; the training
    loops only ever index them, which copies."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ImageData(**{k: torch.from_numpy(v) if hasattr(v, "dtype") and hasattr(v, "shape") else v
                            for k, v in arrays.items()})


def nbytes(data: ImageData) -> int:
    return sum(t.numel() * t.element_size() for t in (data.train_x, data.train_y, data.test_x, data.test_y))


# ---------------------------------------------------------------------------------------------- augmentation

def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch back to its size (DARTS' RandomCrop(padding))."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a length x length square (clipped at the border) around a random centre in each image."""
    if length <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n, 1), device=x.device, generator=generator)
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ar_h >= cy - length // 2) & (ar_h < cy + length // 2)
    in_x = (ar_w >= cx - length // 2) & (ar_w < cx + length // 2)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


@lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, C, 1, 1) tensors on ``device``, made once: a tensor made from a tuple on a GPU is a
    blocking copy, which would make every batch wait for the GPU to finish the previous step."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m, s = _channel_stats(tuple(mean), tuple(std), x.device)
    return (x.float() / 255.0 - m) / s


def make_batch(data: ImageData, x: torch.Tensor, *, augment: bool, generator: torch.Generator | None,
               cutout_length: int = 0, crop_padding: int | None = None,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 images -> normalised float batch, with DARTS augmentation when ``augment``."""
    if augment:
        assert generator is not None
        x = random_flip(random_crop(x, data.crop_padding if crop_padding is None else crop_padding, generator),
                        generator)
    out = normalize(x, data.mean, data.std)
    if augment and cutout_length > 0:
        out = cutout(out, cutout_length, generator)
    return out.contiguous(memory_format=memory_format)


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None, device: torch.device,
                  drop_last: bool) -> Iterator[torch.Tensor]:
    """Shuffled (when a generator is given) index batches over ``n`` items."""
    order = (torch.randperm(n, device=device, generator=generator) if generator is not None
             else torch.arange(n, device=device))
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
