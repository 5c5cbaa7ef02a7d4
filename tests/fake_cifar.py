"""A tiny CIFAR data set in torchvision's on-disk format (pickled batches), for tests of the real loading path.

torchvision checks every file against the MD5 of the real CIFAR; ``trust_fake_cifar`` points those
checksums at the fake files (the one thing patched), so everything else runs as it does on real data.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

LAYOUT = {  # name -> (folder, train files, test file, meta file, label key, meta key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names", 100),
}


def write_fake_cifar(data_dir: Path, name: str = "cifar10", train_images: int = 200, test_images: int = 50,
                     seed: int = 0) -> dict[str, str]:
    """Random uint8 images in ``data_dir/<folder>``; returns file name -> MD5."""
    folder, train_files, test_file, meta_file, label_key, meta_key, classes = LAYOUT[name]
    out = Path(data_dir) / folder
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                label_key: [int(c) for c in rng.integers(0, classes, n)], "batch_label": "fake"}

    per_file = train_images // len(train_files)
    contents = {f: batch(per_file) for f in train_files}
    contents[test_file] = batch(test_images)
    contents[meta_file] = {meta_key: [f"class{i}" for i in range(classes)]}
    md5s = {}
    for fname, obj in contents.items():
        blob = pickle.dumps(obj)
        (out / fname).write_bytes(blob)
        md5s[fname] = hashlib.md5(blob).hexdigest()
    return md5s


def trust_fake_cifar(monkeypatch, md5s: dict[str, str], name: str = "cifar10") -> None:
    """Make torchvision's checksum lists those of the fake files (in this process)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [[f, md5s[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5s[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})
