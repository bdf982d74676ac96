"""A small captioned-image set generated on the fly (seeded): shapes of colours at positions.

For tests and the no-dataset demo: it is written in the official Flickr8k layout, so it exercises the
same ingest path as real data, and its captions really describe its images, so retrieval is learnable.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 210, 20),
           "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": 0.27, "centre": 0.5, "right": 0.73}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (15, 15, 15)}
TEMPLATES = (
    "a {colour} {shape} on the {position} of a {background} background",
    "a {background} picture with a {colour} {shape} at the {position}",
    "there is a {shape} coloured {colour} on the {position}",
    "{colour} {shape} , {position} side , {background} backdrop",
    "an image showing one {colour} {shape} placed {position}",
)


def _draw(colour: str, shape: str, position: str, background: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    cx = POSITIONS[position] * size + rng.uniform(-0.04, 0.04) * size
    cy = size / 2 + rng.uniform(-0.15, 0.15) * size
    r = size * rng.uniform(0.14, 0.2)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def make_toy_dataset(root: str | Path, n_train: int = 200, n_dev: int = 50, size: int = 96, seed: int = 0) -> Path:
    """Write images/, Flickr8k.token.txt and the train/dev split files under `root`; returns root."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    token_lines, splits = [], {"train": [], "dev": []}
    for i in range(n_train + n_dev):
        attrs = {"colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES),
                 "position": rng.choice(list(POSITIONS)), "background": rng.choice(list(BACKGROUNDS))}
        name = f"toy_{i:05d}.jpg"
        _draw(size=size, rng=rng, **attrs).save(root / "images" / name, quality=92)
        for k, template in enumerate(TEMPLATES):
            token_lines.append(f"{name}#{k}\t{template.format(**attrs)}")
        splits["train" if i < n_train else "dev"].append(name)
    (root / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(splits["train"]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(splits["dev"]) + "\n")
    return root
