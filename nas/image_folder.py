"""A folder of one's own images as a dataset: ``dataset: {image_folder: PATH, size: 32}`` in a sweep file.

Layout (torchvision's ImageFolder): one sub-folder per class, either under ``PATH/train`` and
``PATH/test``, or directly under ``PATH`` with a held-out ``test_fraction`` per class chosen with
``seed``. Every image is decoded once, converted to RGB (``channels: 3``) or grey (``channels: 1``),
resized to ``size`` x ``size`` and cached as uint8 tensors under ``~/.cache/dartsweep`` (or
``$DARTSWEEP_CACHE``), keyed by the files' names, sizes and times and the options, so a second sweep (or
a trial reading it with ``data_transfer: shared_path``) does not decode again.

Such a dataset is named by a canonical string (``image_folder:/abs/path?size=32&...``) that every trial
config carries, so any process resolves it the same way through the dataset registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlencode

import torch

from nas.errors import ConfigError

PREFIX = "image_folder:"
KEYS = {"image_folder", "size", "channels", "test_fraction", "seed"}


@dataclass(frozen=True)
class FolderSpec:
    """An image folder and how it becomes a dataset."""

    path: str  # absolute
    size: int = 32
    channels: int = 3
    test_fraction: float = 0.2  # only where the folder has no train/ and test/
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 4 <= self.size <= 512:
            raise ConfigError(f"dataset.size: must be an integer between 4 and 512, got {self.size!r}")
        if self.channels not in (1, 3):
            raise ConfigError(f"dataset.channels: must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        if not isinstance(self.test_fraction, (int, float)) or not 0 < self.test_fraction < 1:
            raise ConfigError(f"dataset.test_fraction: must be between 0 and 1, got {self.test_fraction!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"dataset.seed: must be an integer, got {self.seed!r}")

    @property
    def name(self) -> str:
        params = {k: v for k, v in asdict(self).items() if k != "path"}
        return f"{PREFIX}{self.path}?{urlencode(params)}"

    @property
    def split_folders(self) -> bool:
        root = Path(self.path)
        return (root / "train").is_dir() and (root / "test").is_dir()

    def to_dict(self) -> dict[str, Any]:
        return {"image_folder": self.path, **{k: v for k, v in asdict(self).items() if k != "path"}}


def folder_spec(raw: Mapping[str, Any], base_dir: Path = Path(".")) -> FolderSpec:
    """A FolderSpec from a sweep file's ``dataset:`` mapping; the path resolves against ``base_dir``."""
    unknown = set(raw) - KEYS
    if unknown:
        raise ConfigError(f"dataset: unknown key(s) {sorted(unknown)}; allowed: {sorted(KEYS)}")
    path = raw.get("image_folder")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"dataset.image_folder: must be a folder path, got {path!r}")
    folder = (base_dir / Path(path).expanduser()).resolve()
    if not folder.is_dir():
        raise ConfigError(f"dataset.image_folder: {folder} is not a folder (paths are relative to the sweep file)")
    return FolderSpec(str(folder), **{k: v for k, v in raw.items() if k != "image_folder"})


def parse_name(name: str) -> FolderSpec:
    path, _, query = name[len(PREFIX):].partition("?")
    params: dict[str, Any] = dict(parse_qsl(query))
    try:
        typed = {"size": int(params.get("size", 32)), "channels": int(params.get("channels", 3)),
                 "test_fraction": float(params.get("test_fraction", 0.2)), "seed": int(params.get("seed", 0))}
    except ValueError:
        raise ConfigError(f"dataset {name!r}: malformed image_folder name") from None
    return FolderSpec(path, **typed)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _classes(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"{root}: an image folder needs one sub-folder per class, at least 2; found "
                          f"{len(classes)}")
    return classes


def _files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    out = []
    for label, cls in enumerate(classes):
        out += [(p, label) for p in sorted((root / cls).rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return out


def class_names(spec: FolderSpec) -> list[str]:
    root = Path(spec.path)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} is missing; on a cluster it must exist on every node that reads it")
    return _classes(root / "train" if spec.split_folders else root)


def _decode(path: Path, size: int, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB" if channels == 3 else "L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size, size, channels).permute(2, 0, 1)


def _decode_all(files: list[tuple[Path, int]], spec: FolderSpec, progress) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.empty(len(files), spec.channels, spec.size, spec.size, dtype=torch.uint8)

    def one(i: int) -> None:
        path = files[i][0]
        try:
            images[i] = _decode(path, spec.size, spec.channels)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; the user needs the file's name
            raise ConfigError(f"image folder: cannot read {path}: {type(exc).__name__}: {exc}") from None

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding and resizing
        for done, _ in enumerate(pool.map(one, range(len(files))), 1):
            if progress is not None and done % 10_000 == 0:
                progress(f"decoded {done}/{len(files)} images")
    return images, torch.tensor([label for _, label in files], dtype=torch.long)


def _cache_dir() -> Path:
    return Path(os.environ.get("DARTSWEEP_CACHE") or Path.home() / ".cache" / "dartsweep") / "image_folder"


def _key(spec: FolderSpec, listing: list[tuple[Path, int]]) -> str:
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    for path, label in listing:
        st = path.stat()
        digest.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def load_image_folder(spec: FolderSpec, progress=None) -> Any:
    """The folder as an ``ImageData`` (decoded once, then read from the cache)."""
    from nas.data import image_data

    root = Path(spec.path)
    classes = class_names(spec)
    if spec.split_folders:
        train_files, test_files = _files(root / "train", classes), _files(root / "test", classes)
        missing = sorted(set(_classes(root / "test")) - set(classes))
        if missing:
            raise ConfigError(f"{root / 'test'} has class folder(s) {missing} that {root / 'train'} lacks")
    else:
        every = _files(root, classes)
        gen = torch.Generator().manual_seed(spec.seed)
        train_files, test_files = [], []
        for label in range(len(classes)):
            members = [f for f in every if f[1] == label]
            order = torch.randperm(len(members), generator=gen).tolist()
            n_test = round(spec.test_fraction * len(members))
            test_files += [members[i] for i in sorted(order[:n_test])]
            train_files += [members[i] for i in sorted(order[n_test:])]
    if not train_files or not test_files:
        raise ConfigError(f"image folder {root}: the {'training' if not train_files else 'test'} split has no images "
                          f"({', '.join(IMAGE_SUFFIXES)})")
    cache = _cache_dir() / f"{_key(spec, train_files + test_files)}.pt"
    if cache.is_file():
        arrays = torch.load(cache, weights_only=True)
        if progress is not None:
            progress(f"image folder {root}: read from the cache {cache}")
    else:
        if progress is not None:
            progress(f"image folder {root}: decoding {len(train_files) + len(test_files)} images once "
                     f"(cached in {cache.parent})")
        (trx, try_), (tex, tey) = _decode_all(train_files, spec, progress), _decode_all(test_files, spec, progress)
        arrays = {"train_x": trx, "train_y": try_, "test_x": tex, "test_y": tey}
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        os.close(fd)
        torch.save(arrays, tmp)
        os.replace(tmp, cache)  # atomic: a reader sees the whole cache or none
    return image_data(spec.name, arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], classes)


def estimated_bytes(spec: FolderSpec) -> int:
    """What the folder will hold once decoded (uint8), from its file listing alone."""
    root = Path(spec.path)
    classes = class_names(spec)
    files = (_files(root / "train", classes) + _files(root / "test", classes)) if spec.split_folders else \
        _files(root, classes)
    return len(files) * spec.channels * spec.size * spec.size


def folder_entry(name: str) -> Any:
    """The registry entry of an ``image_folder:`` dataset name (its classes are listed, nothing decoded)."""
    from nas.registry import DatasetEntry

    spec = parse_name(name)
    return DatasetEntry(name, lambda root, download: load_image_folder(spec, progress=_say), spec.channels,
                        spec.size, len(class_names(spec)), source=f"image folder {spec.path}")


def _say(msg: str) -> None:
    import sys

    print(f"[dartsweep] {msg}", file=sys.stderr, flush=True)
