"""Synthetic Dan:mul (``danmul data synth``): drawn characters with Danbooru-style tags.

No real images or pretrained weights can be downloaded here, so danmul makes its own Dan:mul-like
data, hard enough that learning on it means something:

- a character is a fixed combination of visual attributes (hair colour, length and style, eye colour,
  outfit and its colour, accessories, costume details, skin, 1girl/1boy), drawn with PIL;
- every image varies pose (offset, scale, tilt), framing (portrait ... full body), background,
  clutter in hair-like colours, expression, aspect ratio, and sometimes an occluder over the figure;
- characters of one series (copyright) share an outfit, attribute values are shared across many
  characters, and about a fifth of the characters are "siblings" of another that differ only in the
  eye colour or one small accessory: detail an occluder or closed eyes can hide, so tags help;
- tags describe the drawing as an uploader would tag it (framing and background included), about
  20-25 per image, with noise: some true tags missing, some wrong ones added;
- class sizes follow a long tail (Zipf), every class with at least ``min_images``.
The occluder stands for what the model's view loses (crops, overlays, thumbnails); the tags describe
the whole picture. Same seed, same dataset, byte for byte.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ingest.schema import RATINGS, DatasetInfo
from ingest.shards import DEFAULT_SHARD_MB, DatasetWriter, Example, SplitAssigner, parse_fractions
from ingest.storage import Storage

RGB = tuple[int, int, int]

HAIR_COLORS: dict[str, RGB] = {
    "black": (35, 32, 40), "brown": (115, 72, 40), "blonde": (240, 212, 110), "red": (200, 40, 45),
    "orange": (240, 140, 50), "pink": (248, 160, 200), "purple": (140, 80, 190), "blue": (60, 100, 220),
    "aqua": (80, 210, 210), "green": (70, 170, 80), "white": (238, 238, 244), "grey": (150, 150, 162),
}  # fmt: skip
EYE_COLORS: dict[str, RGB] = {
    "blue": (40, 90, 230), "red": (210, 30, 40), "green": (40, 170, 60), "brown": (120, 70, 30),
    "purple": (150, 60, 200), "yellow": (235, 200, 30), "aqua": (40, 200, 200), "pink": (240, 110, 170),
    "orange": (245, 130, 30), "grey": (130, 130, 140),
}  # fmt: skip
CLOTH_COLORS: dict[str, RGB] = {
    "black": (30, 30, 36), "white": (245, 245, 245), "red": (190, 35, 45), "blue": (45, 70, 170),
    "green": (45, 130, 70), "pink": (240, 150, 190), "purple": (120, 70, 160), "yellow": (235, 205, 70),
    "brown": (120, 80, 50), "grey": (140, 140, 150),
}  # fmt: skip
SKIN: dict[str, RGB] = {"pale": (255, 236, 224), "fair": (250, 220, 196), "dark": (170, 110, 75)}
HAIR_LENGTHS = {"short_hair": 0.4, "medium_hair": 1.6, "long_hair": 3.4, "very_long_hair": 5.6}
HAIRSTYLES = ["twintails", "ponytail", "side_ponytail", "hair_bun"]
# outfit -> (tags, the garment its colour tag names, has a skirt)
OUTFITS: dict[str, tuple[list[str], str, bool]] = {
    "school_uniform": (
        ["school_uniform", "serafuku", "sailor_collar", "pleated_skirt"], "sailor_collar", True
    ),
    "dress": (["dress"], "dress", False),
    "shirt": (["shirt", "skirt"], "shirt", True),
    "kimono": (["japanese_clothes", "kimono", "obi"], "kimono", False),
    "armor": (["armor", "gauntlets"], "armor", False),
    "hoodie": (["hoodie", "hood_down", "shorts"], "hoodie", False),
    "maid": (["maid", "apron", "maid_headdress"], "dress", False),
}
# Small accessories a sibling may differ in; an occluder or the framing can hide them.
SMALL_ACCESSORIES = ["hair_ribbon", "earrings", "choker", "hair_flower", "hairband"]
ACCESSORIES = [*SMALL_ACCESSORIES, "hat", "glasses", "animal_ears", "halo", "horns"]
DETAILS = ["bangs", "ahoge", "hair_between_eyes", "long_sleeves", "short_sleeves", "gloves",
           "thighhighs", "bow", "necktie", "sidelocks"]  # fmt: skip
FRAMINGS = {"portrait": 1.7, "upper_body": 3.0, "cowboy_shot": 4.8, "full_body": 7.6}  # visible bottom
BACKGROUNDS = ["white_background", "simple_background", "gradient_background", "outdoors", "night", "indoors"]
CLUTTER = {"flower": (255, 120, 170), "heart": (235, 60, 90), "sparkle": (255, 230, 120), "petals": (250, 190, 210)}
EXPRESSIONS = ["smile", "open_mouth", "closed_eyes", "blush"]
NOISE_TAGS = ["holding", "hand_up", "from_side", "wind", "dutch_angle", "light_smile", "upper_teeth_only",
              "parted_lips", "floating_hair", "depth_of_field", "blurry", "signature"]  # fmt: skip
SYLLABLES = ["a", "ka", "ri", "mi", "na", "to", "yu", "ha", "ru", "ko", "sa", "ne", "shi", "ra", "ki", "mo",
             "ya", "chi", "no", "e", "su", "ta", "hi", "me", "ro", "se", "ai", "ku", "fu", "wa"]  # fmt: skip
SERIES_WORDS = ["star", "blade", "academy", "chronicle", "festival", "garden", "heart", "kingdom", "melody",
                "nova", "online", "quest", "saga", "sky", "tale", "wing", "zero", "force", "dream", "arc"]  # fmt: skip


@dataclass
class SynthConfig:
    out: str = field(metadata={"help": "output dataset URI (local folder or s3://bucket/prefix)"})
    characters: int = field(default=50, metadata={"help": "number of character classes"})
    images: int = field(default=2000, metadata={"help": "number of images in total"})
    image_size: int = field(default=128, metadata={"help": "longer image side, pixels"})
    series: int = field(default=0, metadata={"help": "number of series (0: one per 5 characters)"})
    min_images: int = field(default=10, metadata={"help": "images of the rarest class"})
    zipf: float = field(default=1.0, metadata={"help": "long-tail exponent of class sizes (0: balanced)"})
    sibling_rate: float = field(default=0.2, metadata={"help": "share of characters that differ from another "
                                                               "only in a detail occlusion can hide"})
    occlusion: float = field(default=0.35, metadata={"help": "share of images with an occluder"})
    tag_drop: float = field(default=0.12, metadata={"help": "chance that a true tag is missing, on average"})
    wrong_tags: float = field(default=1.5, metadata={"help": "wrong tags added per image, on average"})
    splits: str = field(default="0.8,0.1,0.1", metadata={"help": "train,val,test fractions per character"})
    seed: int = field(default=0, metadata={"help": "random seed: same seed, same dataset"})
    shard_mb: float = field(default=DEFAULT_SHARD_MB, metadata={"help": "image bytes per shard file, MiB"})
    workers: int = field(default=0, metadata={"help": "rendering processes (0: one per CPU core)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing dataset at --out"})
    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (else AWS_ENDPOINT_URL)"})


@dataclass
class Character:
    name: str
    series: str
    girl: bool
    skin: str
    hair_color: str
    hair_length: str
    hairstyle: str | None
    eye_color: str
    outfit: str
    outfit_color: str
    accessories: list[str]
    details: list[str]
    sibling_of: str | None = None

    def signature(self) -> tuple:
        return (self.girl, self.skin, self.hair_color, self.hair_length, self.hairstyle, self.eye_color,
                self.outfit, self.outfit_color, tuple(sorted(self.accessories)),
                tuple(sorted(self.details)))  # fmt: skip

    def tags(self) -> list[str]:
        """What an uploader tags for this character whatever the picture shows."""
        outfit_tags, garment, _ = OUTFITS[self.outfit]
        tags = ["1girl" if self.girl else "1boy", "solo", f"{self.hair_color}_hair", self.hair_length,
                f"{self.eye_color}_eyes", *outfit_tags, *self.accessories, *self.details]  # fmt: skip
        if self.outfit != "armor":
            tags.append(f"{self.outfit_color}_{garment}")
        if self.hairstyle:
            tags.append(self.hairstyle)
        if self.skin == "dark":
            tags.append("dark_skin")
        return tags


# -- the cast --------------------------------------------------------------------------------------


def make_cast(cfg: SynthConfig) -> list[Character]:
    """Characters grouped in series; names and attributes are a pure function of the seed."""
    rng = np.random.default_rng([cfg.seed, 1])
    n_series = cfg.series or max(1, math.ceil(cfg.characters / 5))
    series_names = _unique_names(rng, n_series, lambda: f"{_word(rng, 2)}_{rng.choice(SERIES_WORDS)}")
    series_outfit = {s: str(rng.choice(list(OUTFITS))) for s in series_names}
    cast: list[Character] = []
    seen: set[tuple] = set()
    given_names: set[str] = set()
    while len(cast) < cfg.characters:
        if cast and rng.random() < cfg.sibling_rate:
            ch = _sibling(rng, cast[int(rng.integers(len(cast)))])
        else:
            series = str(rng.choice(series_names))
            ch = _new_character(rng, series, series_outfit[series])
        if ch.signature() in seen:
            continue
        given = _word(rng, int(rng.integers(2, 4)))
        if given in given_names:
            continue
        given_names.add(given)
        seen.add(ch.signature())
        ch.name = f"{given}_({ch.series})"
        cast.append(ch)
    return cast


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(str(rng.choice(SYLLABLES)) for _ in range(n))


def _unique_names(rng: np.random.Generator, n: int, make) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = make()
        if name not in names:
            names.append(name)
    return names


def _new_character(rng: np.random.Generator, series: str, series_outfit: str) -> Character:
    girl = rng.random() < 0.8
    pick = lambda xs: str(rng.choice(list(xs)))  # noqa: E731
    n_acc = int(rng.choice([0, 1, 1, 2, 2, 3]))
    details = list(rng.choice(DETAILS, size=int(rng.integers(3, 6)), replace=False))
    if "long_sleeves" in details and "short_sleeves" in details:
        details.remove("short_sleeves")
    return Character(
        name="",
        series=series,
        girl=girl,
        skin=pick(SKIN) if rng.random() < 0.3 else "fair",
        hair_color=pick(HAIR_COLORS),
        hair_length=pick(HAIR_LENGTHS) if girl else str(rng.choice(["short_hair", "medium_hair"])),
        hairstyle=pick(HAIRSTYLES) if girl and rng.random() < 0.6 else None,
        eye_color=pick(EYE_COLORS),
        outfit=series_outfit if rng.random() < 0.7 else pick(OUTFITS),
        outfit_color=pick(CLOTH_COLORS),
        accessories=[str(a) for a in rng.choice(ACCESSORIES, size=n_acc, replace=False)],
        details=[str(d) for d in details],
    )


def _sibling(rng: np.random.Generator, base: Character) -> Character:
    """A copy of ``base`` that differs in eye colour or one small accessory (twins, alternate forms)."""
    ch = Character(**{**asdict(base), "name": "", "sibling_of": base.name})
    ch.accessories = list(base.accessories)
    if rng.random() < 0.5:
        ch.eye_color = str(rng.choice([c for c in EYE_COLORS if c != base.eye_color]))
    else:
        have = [a for a in ch.accessories if a in SMALL_ACCESSORIES]
        if have and rng.random() < 0.5:
            ch.accessories.remove(have[0])
        else:
            ch.accessories.append(str(rng.choice([a for a in SMALL_ACCESSORIES if a not in ch.accessories])))
    return ch


def class_sizes(n_classes: int, n_images: int, min_images: int, zipf: float, seed: int) -> np.ndarray:
    """Long-tailed images per class: ``min_images`` each, the rest shared by Zipf weights over a
    random ranking of the classes."""
    if n_images < n_classes * min_images:
        raise ValueError(f"{n_images} images cannot give {n_classes} classes {min_images} images each")
    rng = np.random.default_rng([seed, 2])
    weights = 1.0 / np.arange(1, n_classes + 1) ** zipf
    extra = rng.multinomial(n_images - n_classes * min_images, weights / weights.sum())
    return min_images + extra[rng.permutation(n_classes)]


# -- drawing ---------------------------------------------------------------------------------------


@dataclass
class Scene:
    """Everything random about one picture of a character."""

    framing: str
    background: str
    expressions: list[str]
    clutter: list[str]
    occluder: str | None  # "speech_bubble", "sign" or "leaf"
    transparent: bool


def _scene(rng: np.random.Generator, occlusion: float) -> Scene:
    expressions = [e for e in EXPRESSIONS if rng.random() < 0.35]
    background = str(rng.choice(BACKGROUNDS, p=[0.25, 0.2, 0.15, 0.15, 0.1, 0.15]))
    clutter = [c for c in CLUTTER if rng.random() < 0.2]
    occluder = str(rng.choice(["speech_bubble", "sign", "leaf"])) if rng.random() < occlusion else None
    transparent = background == "white_background" and rng.random() < 0.25
    framing = str(rng.choice(list(FRAMINGS), p=[0.2, 0.35, 0.25, 0.2]))
    return Scene(framing, background, expressions, clutter, occluder, transparent)


def scene_tags(scene: Scene) -> list[str]:
    tags = [scene.framing, *scene.expressions, *scene.clutter]
    if "closed_eyes" not in scene.expressions:
        tags.append("looking_at_viewer")
    tags += {
        "white_background": ["white_background", "simple_background"],
        "simple_background": ["simple_background"],
        "gradient_background": ["gradient_background", "simple_background"],
        "outdoors": ["outdoors", "sky", "cloud", "day", "grass"],
        "night": ["night", "night_sky", "starry_sky", "outdoors"],
        "indoors": ["indoors", "window", "curtains"],
    }[scene.background]
    if scene.occluder == "speech_bubble":
        tags.append("speech_bubble")
    if scene.transparent:
        tags.append("transparent_background")
    return tags


def visible_character_tags(ch: Character, framing: str) -> list[str]:
    """Tags of the character that this framing can show (legs need a full or cowboy shot)."""
    hidden = set()
    if framing != "full_body":
        hidden |= {"thighhighs"}
    if framing in ("portrait", "upper_body"):
        hidden |= {"pleated_skirt", "skirt", "shorts", "gauntlets", "obi"}
    if framing == "portrait":
        hidden |= {"gloves", "long_sleeves", "short_sleeves", "apron"}
    return [t for t in ch.tags() if t not in hidden]


class _Pen:
    """Draws in figure units (head radius 1, head centre at the origin) onto a pixel canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, scale: float, cx: float, cy: float):
        self.d, self.s, self.cx, self.cy = draw, scale, cx, cy

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + x * self.s, self.cy + y * self.s

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (a, b), (c, d) = self.xy(x0, y0), self.xy(x1, y1)
        return [min(a, c), min(b, d), max(a, c), max(b, d)]

    def ellipse(self, x0, y0, x1, y1, fill=None, outline=None, width=1.0):
        self.d.ellipse(self.box(x0, y0, x1, y1), fill=fill, outline=outline, width=max(1, round(width * self.s / 10)))

    def rect(self, x0, y0, x1, y1, fill):
        self.d.rectangle(self.box(x0, y0, x1, y1), fill=fill)

    def poly(self, pts, fill):
        self.d.polygon([self.xy(x, y) for x, y in pts], fill=fill)

    def line(self, pts, fill, width=1.0):
        self.d.line([self.xy(x, y) for x, y in pts], fill=fill, width=max(1, round(width * self.s / 10)))


def _shade(c: RGB, f: float) -> RGB:
    return tuple(int(max(0, min(255, v * f))) for v in c)  # type: ignore[return-value]


def draw_character(pen: _Pen, ch: Character, scene: Scene, rng: np.random.Generator) -> None:
    hair = HAIR_COLORS[ch.hair_color]
    skin = SKIN[ch.skin]
    cloth = CLOTH_COLORS[ch.outfit_color]
    hair_len = HAIR_LENGTHS[ch.hair_length]
    width = 1.25 if ch.girl else 1.5  # half shoulder width
    # back hair, behind everything (long hair falls behind the body)
    if hair_len > 0.5:
        pen.poly([(-1.15, -0.3), (1.15, -0.3), (1.3, 0.6 + hair_len), (-1.3, 0.6 + hair_len)], _shade(hair, 0.85))
    if ch.hairstyle == "twintails":
        for sx in (-1, 1):
            pen.ellipse(sx * 1.0, -0.6, sx * 1.9, 1.0 + hair_len + 1.5, fill=hair)
    elif ch.hairstyle == "ponytail":
        pen.ellipse(0.4, -1.4, 1.6, 1.8 + hair_len, fill=_shade(hair, 0.9))
    elif ch.hairstyle == "side_ponytail":
        pen.ellipse(-1.8, -0.8, -0.9, 1.6 + hair_len, fill=hair)
    elif ch.hairstyle == "hair_bun":
        pen.ellipse(-0.55, -1.75, 0.55, -0.75, fill=hair)
    # legs and shoes
    legs = CLOTH_COLORS["white"] if "thighhighs" in ch.details else skin
    if "thighhighs" in ch.details and ch.outfit_color == "white":
        legs = CLOTH_COLORS["black"]
    for sx in (-1, 1):
        pen.rect(sx * 0.25, 4.0, sx * 0.7, 7.0, fill=legs)
        pen.ellipse(sx * 0.15, 6.8, sx * 0.85, 7.3, fill=(60, 40, 30))
    # body by outfit
    torso = [(-width, 1.2), (width, 1.2), (width * 0.8, 3.3), (-width * 0.8, 3.3)]
    if ch.outfit in ("dress", "maid"):
        body_color = cloth if ch.outfit == "dress" else CLOTH_COLORS["black"]
        pen.poly([(-width, 1.2), (width, 1.2), (width * 1.5, 5.0), (-width * 1.5, 5.0)], body_color)
        if ch.outfit == "maid":
            pen.poly([(-0.7, 2.2), (0.7, 2.2), (0.9, 4.8), (-0.9, 4.8)], (250, 250, 250))
    elif ch.outfit == "kimono":
        pen.rect(-width, 1.2, width, 6.6, cloth)
        pen.line([(0, 1.2), (-0.6, 3.0)], _shade(cloth, 0.6), width=1.5)
        pen.rect(-width, 2.9, width, 3.5, (230, 190, 80))  # obi
    elif ch.outfit == "armor":
        pen.poly(torso, (160, 165, 175))
        pen.rect(-width * 0.8, 3.2, width * 0.8, 4.2, cloth)
        for y in (1.7, 2.4):
            pen.line([(-width * 0.8, y), (width * 0.8, y)], (100, 100, 110), width=1)
    else:
        top = CLOTH_COLORS["white"] if ch.outfit == "school_uniform" else cloth
        pen.poly(torso, top)
        bottom = cloth if ch.outfit != "hoodie" else CLOTH_COLORS["blue"]
        if ch.outfit == "hoodie":
            pen.rect(-width * 0.85, 3.2, width * 0.85, 4.1, bottom)  # shorts
            pen.ellipse(-1.1, 0.8, 1.1, 1.6, fill=_shade(cloth, 0.8))  # hood behind the neck
        else:
            pen.poly([(-width * 0.8, 3.2), (width * 0.8, 3.2), (width * 1.3, 4.5), (-width * 1.3, 4.5)], bottom)
    # arms: sleeves in the outfit colour, skin below short sleeves; gloves over the hands
    sleeve = cloth if ch.outfit not in ("school_uniform", "armor") else (245, 245, 245)
    for sx in (-1, 1):
        x0, x1 = sx * width, sx * (width + 0.45)
        pen.rect(x0, 1.3, x1, 3.6, fill=sleeve if "short_sleeves" not in ch.details else skin)
        if "short_sleeves" in ch.details:
            pen.rect(x0, 1.3, x1, 2.0, fill=sleeve)
        pen.ellipse(x0 - sx * 0.05, 3.5, x1 + sx * 0.05, 4.0, fill=(255, 255, 255) if "gloves" in ch.details else skin)
    # neck and collar details
    pen.rect(-0.3, 0.8, 0.3, 1.3, fill=skin)
    if ch.outfit == "school_uniform":
        pen.poly([(-width, 1.2), (width, 1.2), (0, 2.2)], cloth)
    if "bow" in ch.details:
        pen.poly([(0, 1.35), (-0.45, 1.1), (-0.45, 1.6)], (220, 40, 60))
        pen.poly([(0, 1.35), (0.45, 1.1), (0.45, 1.6)], (220, 40, 60))
    if "necktie" in ch.details:
        pen.poly([(-0.12, 1.25), (0.12, 1.25), (0.2, 2.6), (0, 2.85), (-0.2, 2.6)], (40, 50, 120))
    if "choker" in ch.accessories:
        pen.rect(-0.32, 0.95, 0.32, 1.08, fill=(20, 20, 20))
    # head
    pen.ellipse(-1, -1, 1, 1, fill=skin)
    eyes_closed = "closed_eyes" in scene.expressions
    iris = EYE_COLORS[ch.eye_color]
    for sx in (-1, 1):
        ex = sx * 0.42
        if eyes_closed:
            pen.line([(ex - 0.22, 0.15), (ex, 0.25), (ex + 0.22, 0.15)], (40, 30, 30), width=1)
        else:
            pen.ellipse(ex - 0.2, -0.12, ex + 0.2, 0.42, fill=(255, 255, 255))
            pen.ellipse(ex - 0.17, -0.08, ex + 0.17, 0.4, fill=iris)
            pen.ellipse(ex - 0.07, 0.08, ex + 0.07, 0.3, fill=_shade(iris, 0.35))
            pen.ellipse(ex - 0.12, -0.04, ex - 0.03, 0.06, fill=(255, 255, 255))
    if "open_mouth" in scene.expressions:
        pen.ellipse(-0.15, 0.55, 0.15, 0.75, fill=(150, 40, 50))
    elif "smile" in scene.expressions:
        pen.line([(-0.2, 0.58), (0, 0.66), (0.2, 0.58)], (120, 40, 40), width=1)
    if "blush" in scene.expressions:
        for sx in (-1, 1):
            pen.ellipse(sx * 0.55 - 0.17, 0.42, sx * 0.55 + 0.17, 0.55, fill=(250, 150, 160))
    if "earrings" in ch.accessories:
        for sx in (-1, 1):
            pen.ellipse(sx * 1.0 - 0.09, 0.35, sx * 1.0 + 0.09, 0.53, fill=(240, 200, 40))
    # front hair: the crown, then fringe variants
    pen.d.chord(pen.box(-1.12, -1.15, 1.12, 0.9), 180, 360, fill=hair)
    if "bangs" in ch.details:
        for x in (-0.75, -0.25, 0.25, 0.75):
            pen.poly([(x - 0.3, -0.2), (x + 0.3, -0.2), (x, 0.12)], hair)
    if "hair_between_eyes" in ch.details:
        pen.poly([(-0.12, -0.25), (0.12, -0.25), (0, 0.3)], hair)
    if "sidelocks" in ch.details:
        for sx in (-1, 1):
            pen.rect(sx * 0.88, -0.2, sx * 1.12, 1.1, fill=hair)
    if "ahoge" in ch.details:
        pen.line([(0, -1.1), (0.2, -1.6), (0.45, -1.45)], hair, width=2)
    # accessories on the head
    if "animal_ears" in ch.accessories:
        for sx in (-1, 1):
            pen.poly([(sx * 0.35, -0.9), (sx * 0.95, -0.55), (sx * 0.8, -1.6)], hair)
    if "horns" in ch.accessories:
        for sx in (-1, 1):
            pen.poly([(sx * 0.35, -0.9), (sx * 0.7, -0.8), (sx * 0.6, -1.6)], (225, 210, 170))
    if "hairband" in ch.accessories:
        pen.d.arc(pen.box(-1.05, -1.05, 1.05, 1.0), 200, 340, fill=(230, 50, 80), width=max(1, round(pen.s / 8)))
    if "hat" in ch.accessories:
        pen.rect(-1.4, -1.05, 1.4, -0.85, fill=_shade(cloth, 0.7))
        pen.poly([(-0.9, -0.95), (0.9, -0.95), (0.6, -1.9), (-0.6, -1.9)], _shade(cloth, 0.7))
    if "hair_ribbon" in ch.accessories:
        pen.poly([(0.85, -0.7), (1.35, -1.05), (1.35, -0.35)], (230, 40, 70))
        pen.poly([(0.85, -0.7), (0.4, -1.05), (0.45, -0.4)], (230, 40, 70))
    if "hair_flower" in ch.accessories:
        for a in range(5):
            t = a * 2 * math.pi / 5
            x, y = -0.85 + 0.18 * math.cos(t), -0.75 + 0.18 * math.sin(t)
            pen.ellipse(x - 0.13, y - 0.13, x + 0.13, y + 0.13, fill=(255, 255, 255))
        pen.ellipse(-0.93, -0.83, -0.77, -0.67, fill=(250, 210, 60))
    if "halo" in ch.accessories:
        pen.ellipse(-0.7, -1.75, 0.7, -1.4, outline=(250, 220, 70), width=2)
    if "glasses" in ch.accessories:
        for sx in (-1, 1):
            pen.ellipse(sx * 0.42 - 0.27, -0.18, sx * 0.42 + 0.27, 0.48, outline=(30, 30, 30), width=1)
        pen.line([(-0.15, 0.1), (0.15, 0.1)], (30, 30, 30), width=1)
    if "maid_headdress" in OUTFITS[ch.outfit][0]:
        pen.rect(-0.8, -1.15, 0.8, -0.9, fill=(250, 250, 250))


def _background(img: Image.Image, scene: Scene, rng: np.random.Generator) -> None:
    w, h = img.size
    d = ImageDraw.Draw(img)
    bg = scene.background
    if bg == "white_background":
        d.rectangle([0, 0, w, h], fill=(255, 255, 255))
    elif bg == "simple_background":
        d.rectangle([0, 0, w, h], fill=tuple(int(v) for v in rng.integers(90, 250, 3)))
    elif bg == "gradient_background":
        a, b = rng.integers(60, 250, 3), rng.integers(60, 250, 3)
        for y in range(h):
            t = y / max(1, h - 1)
            d.line([(0, y), (w, y)], fill=tuple(int(v) for v in a * (1 - t) + b * t))
    elif bg == "outdoors":
        d.rectangle([0, 0, w, h], fill=(130, 190, 245))
        d.rectangle([0, int(h * 0.72), w, h], fill=(90, 170, 80))
        for _ in range(3):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h * 0.4), rng.uniform(w * 0.05, w * 0.12)
            d.ellipse([x - 2 * r, y - r, x + 2 * r, y + r], fill=(250, 250, 252))
    elif bg == "night":
        d.rectangle([0, 0, w, h], fill=(20, 25, 60))
        for _ in range(25):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            d.point((x, y), fill=(255, 255, 220))
    else:  # indoors
        d.rectangle([0, 0, w, h], fill=tuple(int(v) for v in rng.integers(170, 235, 3)))
        x0, y0 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.3)
        d.rectangle([x0, y0, x0 + w * 0.35, y0 + h * 0.35], fill=(170, 215, 250), outline=(120, 90, 60), width=2)
        d.rectangle([x0 - w * 0.06, y0, x0, y0 + h * 0.45], fill=(180, 60, 60))
    # clutter: confusing shapes, some in hair colours
    palette = list(HAIR_COLORS.values())
    for _ in range(int(rng.integers(0, 5))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(w * 0.02, w * 0.08)
        d.ellipse([x - r, y - r, x + r, y + r], fill=palette[int(rng.integers(len(palette)))])
    for kind in scene.clutter:
        color = CLUTTER[kind]
        for _ in range(int(rng.integers(3, 7))):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(w * 0.015, w * 0.04)
            if kind == "sparkle":
                d.polygon([(x, y - 2 * r), (x + r / 2, y), (x, y + 2 * r), (x - r / 2, y)], fill=color)
            else:
                d.ellipse([x - r, y - r, x + r, y + r], fill=color)


def render(ch: Character, scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """One picture: background, the figure on its own layer (tilted), then an occluder."""
    aspect = float(rng.uniform(0.7, 1.4)) if rng.random() < 0.3 else 1.0  # Danbooru is not square
    w, h = (size, round(size / aspect)) if aspect >= 1 else (round(size * aspect), size)
    img = Image.new("RGB", (w, h))
    _background(img, scene, rng)
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    top, bottom = -2.0, FRAMINGS[scene.framing]
    scale = h / (bottom - top) * float(rng.uniform(0.85, 1.05))
    cx = w / 2 + float(rng.uniform(-0.2, 0.2)) * w
    cy = -top * scale + float(rng.uniform(-0.05, 0.08)) * h
    draw_character(_Pen(ImageDraw.Draw(layer), scale, cx, cy), ch, scene, rng)
    layer = layer.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, center=(cx, cy))
    if scene.transparent:
        img = layer
    else:
        img.paste(layer, (0, 0), layer)
    if scene.occluder:
        d = ImageDraw.Draw(img)
        ow, oh = w * float(rng.uniform(0.25, 0.5)), h * float(rng.uniform(0.15, 0.35))
        # aim at the face half the time: that is where the hideable details are
        if rng.random() < 0.5:
            ox, oy = cx - ow / 2 + float(rng.uniform(-0.2, 0.2)) * ow, cy - oh / 2
        else:
            ox, oy = float(rng.uniform(0, w - ow)), float(rng.uniform(0, h - oh))
        if scene.occluder == "speech_bubble":
            d.ellipse([ox, oy, ox + ow, oy + oh], fill=(255, 255, 255), outline=(0, 0, 0), width=2)
        elif scene.occluder == "sign":
            d.rectangle([ox, oy, ox + ow, oy + oh], fill=tuple(int(v) for v in rng.integers(60, 230, 3)))
        else:
            d.ellipse([ox, oy, ox + ow, oy + oh], fill=(60, 140, 60))
    return img


def encode(img: Image.Image, rng: np.random.Generator) -> bytes:
    """Mostly JPEG like Danbooru's 512px set; some PNG (transparent ones always) and WebP."""
    buf = io.BytesIO()
    u = rng.random()
    if img.mode == "RGBA" or u < 0.08:
        img.save(buf, format="PNG", optimize=False)
    elif u < 0.13:
        img.save(buf, format="WEBP", quality=85)
    else:
        img.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue()


def noisy_tags(true_tags: list[str], vocab: list[str], cfg: SynthConfig, rng: np.random.Generator) -> list[str]:
    """Posts differ in how carefully they were tagged: each drops true tags at its own rate (mean
    ``tag_drop``), then gains a few wrong ones."""
    drop = float(rng.uniform(0, 2 * cfg.tag_drop))
    kept = [t for t in dict.fromkeys(true_tags) if rng.random() >= drop]
    for _ in range(int(rng.poisson(cfg.wrong_tags))):
        kept.append(vocab[int(rng.integers(len(vocab)))])
    return sorted(set(kept))


def tag_vocabulary() -> list[str]:
    """Every general tag the generator can emit (before noise)."""
    tags = {"1girl", "1boy", "solo", "looking_at_viewer", "dark_skin", "speech_bubble", "transparent_background"}
    tags |= {f"{c}_hair" for c in HAIR_COLORS} | set(HAIR_LENGTHS) | set(HAIRSTYLES)
    tags |= {f"{c}_eyes" for c in EYE_COLORS} | set(ACCESSORIES) | set(DETAILS)
    for outfit_tags, garment, _ in OUTFITS.values():
        tags |= set(outfit_tags) | {f"{c}_{garment}" for c in CLOTH_COLORS}
    tags |= set(FRAMINGS) | set(EXPRESSIONS) | set(CLUTTER) | set(NOISE_TAGS)
    for bg in BACKGROUNDS:
        tags |= set(scene_tags(Scene("portrait", bg, [], [], None, False)))
    return sorted(tags)


# -- the dataset -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    post_id: int
    char_index: int


def _render_example(args: tuple[SynthConfig, list[Character], list[str], _Job]) -> Example:
    cfg, cast, vocab, job = args
    rng = np.random.default_rng([cfg.seed, 3, job.post_id])
    ch = cast[job.char_index]
    scene = _scene(rng, cfg.occlusion)
    img = render(ch, scene, cfg.image_size, rng)
    true_tags = visible_character_tags(ch, scene.framing) + scene_tags(scene) + _extra_noise(rng)
    return Example(
        post_id=job.post_id,
        image=encode(img, rng),
        character=ch.name,
        tags=noisy_tags(true_tags, vocab, cfg, rng),
        copyright=[ch.series],
        rating=str(rng.choice(RATINGS[:2], p=[0.85, 0.15])),
    )


def _extra_noise(rng: np.random.Generator) -> list[str]:
    """Tags for things the drawing does not show but uploaders add anyway."""
    return [t for t in NOISE_TAGS if rng.random() < 0.12]


def _jobs(cfg: SynthConfig) -> list[_Job]:
    sizes = class_sizes(cfg.characters, cfg.images, cfg.min_images, cfg.zipf, cfg.seed)
    order = np.repeat(np.arange(cfg.characters), sizes)
    np.random.default_rng([cfg.seed, 4]).shuffle(order)
    return [_Job(post_id=i + 1, char_index=int(c)) for i, c in enumerate(order)]


def iter_examples(cfg: SynthConfig, cast: list[Character], workers: int = 1) -> Iterator[Example]:
    """Examples in post-id order; rendering fans out over ``workers`` processes."""
    vocab = tag_vocabulary()
    args = ((cfg, cast, vocab, job) for job in _jobs(cfg))
    if workers <= 1:
        yield from map(_render_example, args)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_render_example, args, chunksize=32)


def synthesize(cfg: SynthConfig, progress: bool | None = None) -> DatasetInfo:
    """Generate the dataset and write it as Dan:mul shards under ``cfg.out``."""
    if progress is None:
        progress = sys.stderr.isatty()
    fractions = parse_fractions(cfg.splits)
    cast = make_cast(cfg)
    sizes = class_sizes(cfg.characters, cfg.images, cfg.min_images, cfg.zipf, cfg.seed)
    assigner = SplitAssigner({ch.name: int(n) for ch, n in zip(cast, sizes, strict=True)}, fractions, cfg.seed)
    out = Storage(cfg.out, cfg.endpoint_url)
    writer = DatasetWriter(out, source="synthetic", shard_mb=cfg.shard_mb, overwrite=cfg.overwrite)
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.images < 2000:
        workers = 1  # starting processes costs more than it saves
    examples = iter_examples(cfg, cast, workers)
    if progress:
        from tqdm import tqdm

        examples = tqdm(examples, total=cfg.images, desc="synth", unit=" img", file=sys.stderr)
    for ex in examples:
        writer.add(ex, assigner.assign(ex.character, ex.post_id))
    config = asdict(cfg) | {"cast": [asdict(ch) for ch in cast]}
    return writer.close(config=config)
