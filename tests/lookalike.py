"""A Dan:mul-format dataset made the way another tool would make it: look-alike characters told apart by tags.

Independent of ``ingest/synth.py`` (its own drawing code and its own tags) and written with pyarrow and a
``dataset.json`` holding only the contract's fields, so it checks that training defaults work on data the
project did not generate. Characters come in families of three that share everything visible at a glance
(head and hair shape, hair, eye and outfit colours, headwear, background palette); the members of a family
differ only in a small emblem on the chest (its shape and colour), which a held object hides in a quarter of
the images and which the tags name (``star_emblem``, ``gold_emblem``, ...). About 21 tags per image: the
family's looks, the emblem, the pose, framing and background of the picture, and noise (true tags missing,
wrong ones added).

    python tests/lookalike.py OUT [--characters 30] [--images 614] [--size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

PALETTE = {
    "black": (30, 30, 35), "brown": (120, 75, 40), "blonde": (235, 205, 100), "red": (205, 45, 45),
    "orange": (240, 145, 50), "pink": (245, 165, 205), "purple": (135, 85, 185), "blue": (60, 105, 215),
    "aqua": (85, 205, 205), "green": (70, 165, 80), "white": (240, 240, 245), "grey": (145, 145, 155),
}  # fmt: skip
HAIR_SHAPES = ["spiky_hair", "bob_cut", "long_hair", "drill_hair", "messy_hair"]
HEADWEAR = ["beret", "crown", "bow_hairband", "cap", "none"]
OUTFITS = ["coat", "vest", "blazer", "tunic", "jacket"]
EMBLEMS = ["star", "moon", "heart", "diamond", "cross"]
EMBLEM_COLOURS = {"gold": (250, 215, 40), "crimson": (200, 20, 60), "cobalt": (30, 60, 200), "jade": (20, 160, 90),
                  "violet": (150, 50, 210)}  # fmt: skip
BACKDROPS = {  # top and bottom colours of a vertical gradient
    "sunset_background": ((250, 170, 120), (120, 60, 110)), "sky_background": ((150, 200, 250), (240, 250, 255)),
    "forest_background": ((60, 120, 60), (160, 200, 120)), "room_background": ((200, 180, 160), (150, 130, 110)),
    "plain_background": ((235, 235, 235), (235, 235, 235)),
}  # fmt: skip
POSES = ["standing", "looking_at_viewer", "looking_away", "arms_behind_back", "waving"]
FRAMES = {"close-up": 1.25, "bust_shot": 0.95, "knee_shot": 0.7}
MOODS = ["smiling", "serious", "surprised", "sleepy"]
NOISE = ["sparkles", "motion_lines", "lens_flare", "sketch", "watermark", "border", "dated", "artist_name",
         "simple_shading", "jpeg_artifacts", "speech_bubble", "chromatic_aberration"]  # fmt: skip


def make_families(n_characters: int, rng: random.Random) -> list[dict]:
    """Characters in families of three (the last family may be smaller): shared looks, one emblem each."""
    colours = list(PALETTE)
    chars = []
    for f in range((n_characters + 2) // 3):
        looks = {
            "hair": rng.choice(colours), "hair_shape": rng.choice(HAIR_SHAPES), "eyes": rng.choice(colours),
            "outfit": rng.choice(OUTFITS), "outfit_colour": rng.choice(colours), "headwear": rng.choice(HEADWEAR),
            "backdrop": rng.choice(list(BACKDROPS)), "series": f"series_{f // 2:02d}",
        }  # fmt: skip
        shapes, colours_ = rng.sample(EMBLEMS, 3), rng.sample(list(EMBLEM_COLOURS), 3)
        for member, (shape, colour) in enumerate(zip(shapes, colours_, strict=True)):
            if len(chars) < n_characters:
                chars.append(
                    {**looks, "name": f"family{f:02d}_member{member}", "emblem": shape, "emblem_colour": colour}
                )
    return chars


def emblem(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour) -> None:
    if kind == "star":
        pts = [(cx + (r if i % 2 == 0 else r / 2.4) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r / 2.4) * math.cos(i * math.pi / 5)) for i in range(10)]  # fmt: skip
        draw.polygon(pts, fill=colour)
    elif kind == "moon":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        draw.ellipse([cx - r / 3, cy - r, cx + r * 1.5, cy + r * 0.8], fill=(250, 250, 250))
    elif kind == "heart":
        draw.ellipse([cx - r, cy - r * 0.8, cx, cy + r * 0.2], fill=colour)
        draw.ellipse([cx, cy - r * 0.8, cx + r, cy + r * 0.2], fill=colour)
        draw.polygon([(cx - r, cy - r * 0.2), (cx + r, cy - r * 0.2), (cx, cy + r)], fill=colour)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=colour)
    else:  # cross
        w = r / 2.5
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)


def draw(char: dict, size: int, rng: random.Random) -> tuple[bytes, list[str]]:
    """One picture of ``char`` and the tags an uploader would give it."""
    pose, frame, mood = rng.choice(POSES), rng.choice(list(FRAMES)), rng.choice(MOODS)
    w, h = (size, size) if rng.random() < 0.5 else (size, int(size * rng.uniform(1.0, 1.4)))
    top, bottom = BACKDROPS[char["backdrop"]]
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):  # vertical gradient backdrop
        t = y / max(1, h - 1)
        d.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    scale = FRAMES[frame] * size / 128 * rng.uniform(0.9, 1.1)
    cx, cy = w / 2 + rng.uniform(-12, 12) * scale, h * 0.38 + rng.uniform(-8, 8) * scale
    hair, eyes, cloth = PALETTE[char["hair"]], PALETTE[char["eyes"]], PALETTE[char["outfit_colour"]]
    # hair behind the back first, so the body and its emblem are drawn over it
    if char["hair_shape"] in ("long_hair", "drill_hair"):
        d.rectangle([cx - 28 * scale, cy - 10 * scale, cx + 28 * scale, cy + 60 * scale], fill=hair)
    # body and outfit
    d.polygon([(cx - 34 * scale, cy + 95 * scale), (cx - 24 * scale, cy + 30 * scale),
               (cx + 24 * scale, cy + 30 * scale), (cx + 34 * scale, cy + 95 * scale)], fill=cloth)  # fmt: skip
    if char["outfit"] in ("coat", "blazer", "jacket"):
        d.line([(cx, cy + 30 * scale), (cx, cy + 95 * scale)], fill=(20, 20, 20), width=max(1, int(2 * scale)))
    if char["outfit"] == "vest":
        d.rectangle([cx - 8 * scale, cy + 30 * scale, cx + 8 * scale, cy + 95 * scale], fill=(245, 245, 245))
    emblem(d, char["emblem"], cx + 12 * scale, cy + 50 * scale, 9 * scale, EMBLEM_COLOURS[char["emblem_colour"]])
    # face, hair in front
    d.ellipse([cx - 22 * scale, cy - 24 * scale, cx + 22 * scale, cy + 26 * scale], fill=(250, 225, 205))
    shape = char["hair_shape"]
    if shape == "spiky_hair":
        d.polygon([(cx - 26 * scale + i * 8.7 * scale, cy - (14 if i % 2 else 34) * scale) for i in range(7)]
                  + [(cx + 26 * scale, cy - 6 * scale), (cx - 26 * scale, cy - 6 * scale)], fill=hair)  # fmt: skip
    else:
        d.chord([cx - 25 * scale, cy - 30 * scale, cx + 25 * scale, cy + 10 * scale], 180, 360, fill=hair)
        if shape == "drill_hair":
            for side in (-1, 1):
                d.ellipse([cx + side * 30 * scale - 6 * scale, cy + 10 * scale, cx + side * 30 * scale + 6 * scale,
                           cy + 50 * scale], fill=hair)  # fmt: skip
        if shape == "messy_hair":
            for _ in range(5):
                x = cx + rng.uniform(-24, 24) * scale
                d.line(
                    [(x, cy - 28 * scale), (x + rng.uniform(-8, 8) * scale, cy - 40 * scale)],
                    fill=hair,
                    width=max(1, int(3 * scale)),
                )
    for side in (-1, 1):  # eyes
        ex = cx + side * 9 * scale
        if mood == "sleepy":
            d.line(
                [(ex - 5 * scale, cy + 2 * scale), (ex + 5 * scale, cy + 2 * scale)],
                fill=eyes,
                width=max(1, int(2 * scale)),
            )
        else:
            d.ellipse([ex - 5 * scale, cy - 4 * scale, ex + 5 * scale, cy + 7 * scale], fill=eyes)
    hw = char["headwear"]
    if hw == "crown":
        points = [(-14, -30), (-14, -44), (-5, -36), (0, -46), (5, -36), (14, -44), (14, -30)]
        d.polygon([(cx + x * scale, cy + y * scale) for x, y in points], fill=(240, 200, 40))
    elif hw == "beret":
        d.ellipse([cx - 26 * scale, cy - 42 * scale, cx + 20 * scale, cy - 22 * scale], fill=cloth)
    elif hw == "cap":
        d.chord([cx - 24 * scale, cy - 40 * scale, cx + 24 * scale, cy - 10 * scale], 180, 360, fill=cloth)
        d.rectangle([cx, cy - 26 * scale, cx + 34 * scale, cy - 22 * scale], fill=cloth)
    elif hw == "bow_hairband":
        points = [(10, -28), (26, -38), (26, -18)]
        d.polygon([(cx + x * scale, cy + y * scale) for x, y in points], fill=(230, 40, 90))
    hidden = rng.random() < 0.25
    if hidden:  # something held in front of the chest hides the emblem
        colour = tuple(rng.randrange(40, 220) for _ in range(3))
        d.rectangle([cx - 4 * scale, cy + 36 * scale, cx + 30 * scale, cy + 64 * scale], fill=colour)
    if pose == "waving":
        d.line(
            [(cx - 30 * scale, cy + 40 * scale), (cx - 46 * scale, cy + 5 * scale)],
            fill=(250, 225, 205),
            width=max(2, int(6 * scale)),
        )
    img = img.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, fillcolor=top)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(80, 95))
    tags = [f"{char['hair']}_hair", char["hair_shape"], f"{char['eyes']}_eyes", char["outfit"],
            f"{char['outfit_colour']}_{char['outfit']}", char["backdrop"], pose, frame, mood,
            "solo", "1girl", "upper_body" if frame != "knee_shot" else "cowboy_shot"]  # fmt: skip
    if hw != "none":
        tags.append(hw)
    tags += [f"{char['emblem']}_emblem", "emblem", f"{char['emblem_colour']}_emblem", "chest_emblem"]
    if hidden:
        tags.append("holding_object")
    tags = [t for t in tags if rng.random() > 0.08]  # the uploader forgot some
    tags += rng.sample(NOISE, rng.randint(3, 6))  # and added a few that say nothing about the character
    return buf.getvalue(), sorted(set(tags))


def generate(out: str, characters: int = 30, images: int = 614, size: int = 128, seed: int = 0) -> str:
    rng = random.Random(seed)
    chars = make_families(characters, rng)
    weights = [1 / (i + 1) ** 0.7 for i in range(characters)]  # a long tail, every class at least 12 images
    extra = images - 12 * characters
    counts = [12 + int(extra * w / sum(weights)) for w in weights]
    counts[0] += images - sum(counts)
    rows: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    post_id = 1000
    for char, n in zip(chars, counts, strict=True):
        n_val, n_test = max(2, round(0.1 * n)), max(2, round(0.2 * n))
        for i in range(n):
            image, tags = draw(char, size, rng)
            split = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            post_id += rng.randint(1, 50)
            rows[split].append({"post_id": post_id, "image": image, "character": char["name"], "tags": tags,
                                "copyright": [char["series"]], "rating": "g"})  # fmt: skip
    schema = pa.schema([("post_id", pa.int64()), ("image", pa.binary()), ("character", pa.string()),
                        ("tags", pa.list_(pa.string())), ("copyright", pa.list_(pa.string())),
                        ("rating", pa.string())])  # fmt: skip
    for split, split_rows in rows.items():
        os.makedirs(os.path.join(out, split), exist_ok=True)
        rng.shuffle(split_rows)
        pq.write_table(pa.Table.from_pylist(split_rows, schema), os.path.join(out, split, "part-00000.parquet"))
    all_rows = [r for split_rows in rows.values() for r in split_rows]
    info = {
        "characters": [c["name"] for c in chars],
        "tags": sorted({t for r in all_rows for t in r["tags"]}),
        "num_images": len(all_rows),
        "num_characters": len(chars),
        "avg_tags_per_image": sum(len(r["tags"]) for r in all_rows) / len(all_rows),
        "splits": {split: len(split_rows) for split, split_rows in rows.items()},
        "filters": [],
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(info, f, indent=1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--characters", type=int, default=30)
    p.add_argument("--images", type=int, default=614)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    generate(a.out, a.characters, a.images, a.size, a.seed)
    print(f"wrote {a.images} images of {a.characters} look-alike characters to {a.out}")


if __name__ == "__main__":
    main()
