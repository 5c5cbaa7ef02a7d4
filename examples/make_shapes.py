"""Make a small image-folder dataset for the plugin example: coloured shapes (circle, square, triangle,
cross) on noisy backgrounds, one sub-folder per class, PNG files.

    python examples/make_shapes.py examples/shapes --per-class 300 --size 32
"""

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross")


def draw(kind: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randrange(0, 120) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    px = img.load()
    for _ in range(size * size // 8):  # a little noise, so the classes are not separable by one pixel
        px[rng.randrange(size), rng.randrange(size)] = tuple(rng.randrange(0, 160) for _ in range(3))
    pen = ImageDraw.Draw(img)
    colour = tuple(rng.randrange(130, 256) for _ in range(3))
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = (rng.uniform(r, size - r) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        pen.ellipse(box, fill=colour)
    elif kind == "square":
        pen.rectangle(box, fill=colour)
    elif kind == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = max(1, int(r / 2.5))
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for kind in CLASSES:
        folder = args.out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            draw(kind, args.size, rng).save(folder / f"{i:05d}.png")
    print(f"{len(CLASSES) * args.per_class} images in {args.out} ({', '.join(CLASSES)})")


if __name__ == "__main__":
    main()
