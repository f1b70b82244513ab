"""Synthetic landmarks: a deterministic, Google-Landmarks-shaped data set that needs no download.

Each landmark class is a procedurally drawn structure (a facade with its own proportions, colours, wall
texture, window grid and shapes, roof, towers and emblem). Each image is one *view* of a structure: a random
perspective warp, scale, rotation and position on a cluttered background (sky, ground, other plain buildings,
trees, poles), then lighting and colour changes, partial occlusion, blur, sensor noise and JPEG artefacts.
Query sets also hold images with no landmark: clutter only, or a structure that is not in the database
(an "unknown landmark", which the Google Landmark Recognition challenge also counts as no landmark). The
database holds a few known non-landmark images too (empty ``landmark_id``; other clutter and other
structures), which recognition uses to recognise queries that look like no landmark.

Layout written by :func:`generate` (paths in the CSVs are relative to OUT)::

    OUT/images/<h>/<h>/<id>.jpg   (h = first hex digits of the id, as Google Landmarks does)
    OUT/train.csv                 id,path,landmark_id   (empty landmark_id: a known non-landmark image)
    OUT/queries.csv               id,path,landmark_id   (empty landmark_id: no landmark)
    OUT/boxes.csv                 id,xmin,ymin,xmax,ymax,width,height for every image showing a landmark;
                                  pixel edges, half-open: the landmark covers columns xmin..xmax-1
    OUT/synth.json                the config, counts and class names

Everything is a function of the seed: every image draws from its own generator seeded by
(seed, split, class, view), so output is byte-identical for the same seed whatever the worker count.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from pipeline import config as cfg
from pipeline import fs
from pipeline.resources import cap_workers, max_workers

log = logging.getLogger(__name__)

CANVAS = 256  # side of the square canvas a structure is drawn on


@dataclass(frozen=True)
class SynthConfig:
    """What `cairn synth` generates."""

    seed: int = 0  # everything below is derived from it
    classes: int = 12  # landmark classes in the database
    views: int = 10  # database images of the most frequent class
    tail: float = 0.5  # long tail: class of rank r gets max(min_views, views * r**-tail) images (0 = uniform)
    min_views: int = 3  # fewest database images of any class
    queries_per_class: int = 3  # landmark queries per class
    non_landmark_queries: int = 24  # queries with no database landmark (clutter or an unknown structure)
    non_landmark_train: int = 16  # database images known to show no landmark (empty landmark_id), other scenes
    width: int = 320  # image width in pixels
    height: int = 240  # image height in pixels
    jpeg_quality_min: int = 60  # JPEG quality is drawn per image from [min, max]
    jpeg_quality_max: int = 95  # ... (higher = fewer artefacts)

    def __post_init__(self):
        cfg.check_numbers(self)  # the ranges are checked, as flag errors, by pipeline/stages/synth.py


@dataclass(frozen=True)
class ImageSpec:
    """One image to draw."""

    split: str  # "train" or "queries"
    cls: int  # class index 0..classes-1; for non-landmark queries -1 (clutter) or >= classes (unknown)
    view: int  # view number within (split, cls)

    def image_id(self, seed: int) -> str:
        return hashlib.sha1(f"{seed}:{self.split}:{self.cls}:{self.view}".encode()).hexdigest()[:16]


def views_per_class(config: SynthConfig) -> list[int]:
    """Database images per class, long-tailed by rank (class 0 is the most frequent)."""
    return [
        max(config.min_views, round(config.views * (r + 1) ** -config.tail)) for r in range(config.classes)
    ]


def landmark_ids(config: SynthConfig) -> list[int]:
    """Distinct, non-contiguous landmark ids (as in Google Landmarks), one per class."""
    rng = np.random.default_rng([config.seed, 0])
    return [int(x) for x in rng.choice(200_000, size=config.classes, replace=False)]


def plan(config: SynthConfig) -> list[ImageSpec]:
    """Every image of the data set, in output order."""
    specs = [ImageSpec("train", c, v) for c, n in enumerate(views_per_class(config)) for v in range(n)]
    for j in range(config.non_landmark_train):
        # known non-landmark database images, as Google Landmarks' distractors: clutter, or a structure that is
        # not a landmark (never the same one as a query's)
        specs.append(ImageSpec("train", -1 if j % 2 == 0 else config.classes + 5000 + j, j))
    specs += [ImageSpec("queries", c, v) for c in range(config.classes) for v in range(config.queries_per_class)]
    for j in range(config.non_landmark_queries):
        # even j: clutter only; odd j: a structure that is not in the database
        specs.append(ImageSpec("queries", -1 if j % 2 == 0 else config.classes + 1000 + j, j))
    return specs


# ----------------------------------------------------------------------------------------------------------
# Structures


def _colour(rng: np.random.Generator, sat=(0.3, 0.9), val=(0.35, 0.95)) -> tuple[int, int, int]:
    h = rng.uniform(0, 180)
    s = rng.uniform(*sat) * 255
    v = rng.uniform(*val) * 255
    bgr = cv2.cvtColor(np.uint8([[[h, s, v]]]), cv2.COLOR_HSV2RGB)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def _shade(colour, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def _draw_window(img, shape: str, x0: int, y0: int, x1: int, y1: int, colour, frame) -> None:
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    w, h = x1 - x0, y1 - y0
    if shape == "rect":
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, -1)
        cv2.line(img, (cx, y0), (cx, y1), frame, 1)
        cv2.line(img, (x0, cy), (x1, cy), frame, 1)
    elif shape == "arch":
        r = w // 2
        cv2.rectangle(img, (x0, y0 + r), (x1, y1), colour, -1)
        cv2.ellipse(img, (cx, y0 + r), (r, r), 0, 180, 360, colour, -1)
    elif shape == "circle":
        cv2.circle(img, (cx, cy), max(2, min(w, h) // 2), colour, -1)
        cv2.circle(img, (cx, cy), max(1, min(w, h) // 4), frame, 1)
    elif shape == "diamond":
        pts = np.int32([[cx, y0], [x1, cy], [cx, y1], [x0, cy]])
        cv2.fillPoly(img, [pts], colour)
    else:  # "slit": tall narrow window
        cv2.rectangle(img, (cx - max(1, w // 6), y0), (cx + max(1, w // 6), y1), colour, -1)


def draw_structure(seed: int, cls: int) -> np.ndarray:
    """The structure of class ``cls``: [CANVAS, CANVAS, 4] uint8 RGBA, alpha 255 on the structure."""
    rng = np.random.default_rng([seed, 1, cls])
    img = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    wall = _colour(rng)
    trim = _colour(rng, val=(0.2, 0.6))
    glass = _colour(rng, sat=(0.1, 0.8), val=(0.05, 0.45))
    accent = _colour(rng, sat=(0.7, 1.0), val=(0.6, 1.0))

    bw = int(rng.uniform(0.45, 0.85) * CANVAS)
    bh = int(rng.uniform(0.35, 0.6) * CANVAS)
    x0 = (CANVAS - bw) // 2
    y1 = CANVAS - 4
    y0 = y1 - bh
    a = (*wall, 255)
    cv2.rectangle(img, (x0, y0), (x0 + bw, y1), a, -1)

    # wall texture
    texture = rng.choice(["bricks", "stripes", "checker", "plain", "bands"])
    dark = (*_shade(wall, 0.75), 255)
    if texture == "bricks":
        step = int(rng.integers(6, 12))
        for k, y in enumerate(range(y0, y1, step)):
            cv2.line(img, (x0, y), (x0 + bw, y), dark, 1)
            for x in range(x0 + (k % 2) * step, x0 + bw, 2 * step):
                cv2.line(img, (x, y), (x, min(y1, y + step)), dark, 1)
    elif texture == "stripes":
        step = int(rng.integers(8, 20))
        for x in range(x0, x0 + bw, step):
            cv2.rectangle(img, (x, y0), (x + step // 3, y1), dark, -1)
    elif texture == "checker":
        step = int(rng.integers(10, 24))
        for i, y in enumerate(range(y0, y1, step)):
            for j, x in enumerate(range(x0, x0 + bw, step)):
                if (i + j) % 2:
                    cv2.rectangle(img, (x, y), (min(x0 + bw, x + step), min(y1, y + step)), dark, -1)
    elif texture == "bands":
        step = int(rng.integers(12, 28))
        for y in range(y0, y1, step):
            cv2.rectangle(img, (x0, y), (x0 + bw, y + step // 4), (*trim, 255), -1)

    # window grid with a class-specific pattern of filled cells
    rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 7))
    shape = rng.choice(["rect", "arch", "circle", "diamond", "slit"])
    pattern = rng.random((rows, cols)) < rng.uniform(0.6, 1.0)
    pattern = pattern | pattern[:, ::-1]  # facades tend to be symmetric
    margin_x, margin_y = bw * 0.08, bh * 0.1
    cell_w = (bw - 2 * margin_x) / cols
    cell_h = (bh * 0.75 - margin_y) / rows
    for r in range(rows):
        for c in range(cols):
            if not pattern[r, c]:
                continue
            wx0 = int(x0 + margin_x + c * cell_w + cell_w * 0.2)
            wy0 = int(y0 + margin_y + r * cell_h + cell_h * 0.15)
            _draw_window(img, shape, wx0, wy0, int(wx0 + cell_w * 0.6), int(wy0 + cell_h * 0.7),
                         (*glass, 255), (*trim, 255))
    # door
    dw, dh = int(bw * rng.uniform(0.1, 0.2)), int(bh * rng.uniform(0.2, 0.3))
    _draw_window(img, "arch", CANVAS // 2 - dw // 2, y1 - dh, CANVAS // 2 + dw // 2, y1, (*trim, 255),
                 (*glass, 255))

    # roof
    roof = rng.choice(["gable", "dome", "crenels", "spire", "steps", "flat"])
    rc = (*_colour(rng, val=(0.25, 0.8)), 255)
    top = max(4, y0 - int(rng.uniform(0.15, 0.35) * CANVAS))
    if roof == "gable":
        cv2.fillPoly(img, [np.int32([[x0 - 6, y0], [x0 + bw + 6, y0], [CANVAS // 2, top]])], rc)
    elif roof == "dome":
        cv2.ellipse(img, (CANVAS // 2, y0), (bw // 3, y0 - top), 0, 180, 360, rc, -1)
        cv2.line(img, (CANVAS // 2, top), (CANVAS // 2, max(0, top - 12)), rc, 2)
    elif roof == "crenels":
        step = max(6, bw // int(rng.integers(5, 11)))
        for x in range(x0, x0 + bw, 2 * step):
            cv2.rectangle(img, (x, y0 - step), (min(x0 + bw, x + step), y0), rc, -1)
    elif roof == "spire":
        cv2.fillPoly(img, [np.int32([[CANVAS // 2 - bw // 8, y0], [CANVAS // 2 + bw // 8, y0],
                                      [CANVAS // 2, max(0, top - 30)]])], rc)
    elif roof == "steps":
        levels = int(rng.integers(2, 5))
        for k in range(levels):
            w = int(bw * (1 - (k + 1) / (levels + 1)))
            h = (y0 - top) // levels
            cv2.rectangle(img, (CANVAS // 2 - w // 2, y0 - (k + 1) * h), (CANVAS // 2 + w // 2, y0 - k * h), rc, -1)
    else:
        cv2.rectangle(img, (x0 - 4, y0 - 8), (x0 + bw + 4, y0), rc, -1)

    # side towers
    if rng.random() < 0.5:
        tw = int(bw * rng.uniform(0.12, 0.22))
        th = int(bh * rng.uniform(1.1, 1.6))
        tcol = (*_shade(wall, rng.uniform(0.6, 1.1)), 255)
        for tx in (max(0, x0 - tw // 2), min(CANVAS - tw, x0 + bw - tw // 2)):
            cv2.rectangle(img, (tx, y1 - th), (tx + tw, y1), tcol, -1)
            cv2.fillPoly(img, [np.int32([[tx, y1 - th], [tx + tw, y1 - th], [tx + tw // 2, y1 - th - tw]])], rc)
            for k in range(2, th // 14):
                cv2.rectangle(img, (tx + tw // 3, y1 - k * 14), (tx + 2 * tw // 3, y1 - k * 14 + 6), (*glass, 255), -1)

    # emblem above the door
    emblem = rng.choice(["clock", "star", "cross", "ring", "none"])
    ec = (CANVAS // 2, y0 + int(bh * 0.12))
    er = max(5, int(bw * 0.06))
    e_col = (*accent, 255)
    if emblem == "clock":
        cv2.circle(img, ec, er, (240, 240, 230, 255), -1)
        cv2.circle(img, ec, er, e_col, 2)
        cv2.line(img, ec, (ec[0], ec[1] - er + 2), (20, 20, 20, 255), 1)
        cv2.line(img, ec, (ec[0] + er // 2, ec[1]), (20, 20, 20, 255), 1)
    elif emblem == "star":
        pts = [(ec[0] + er * math.cos(math.pi / 2 + k * 4 * math.pi / 5),
                ec[1] - er * math.sin(math.pi / 2 + k * 4 * math.pi / 5)) for k in range(5)]
        cv2.fillPoly(img, [np.int32(pts)], e_col)
    elif emblem == "cross":
        cv2.rectangle(img, (ec[0] - er // 4, ec[1] - er), (ec[0] + er // 4, ec[1] + er), e_col, -1)
        cv2.rectangle(img, (ec[0] - er, ec[1] - er // 4), (ec[0] + er, ec[1] + er // 4), e_col, -1)
    elif emblem == "ring":
        cv2.circle(img, ec, er, e_col, 3)
    return img


_structure = lru_cache(maxsize=64)(draw_structure)

# ----------------------------------------------------------------------------------------------------------
# Scenes


def draw_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A cluttered outdoor scene without a landmark: [H, W, 3] uint8 RGB."""
    horizon = int(rng.uniform(0.45, 0.8) * height)
    sky_top = np.array(_colour(rng, sat=(0.2, 0.7), val=(0.6, 1.0)), np.float32)
    sky_bottom = np.array(_colour(rng, sat=(0.0, 0.3), val=(0.7, 1.0)), np.float32)
    t = np.linspace(0, 1, horizon, dtype=np.float32)[:, None, None]
    img = np.empty((height, width, 3), np.float32)
    img[:horizon] = sky_top * (1 - t) + sky_bottom * t
    ground = np.array(_colour(rng, sat=(0.05, 0.5), val=(0.25, 0.6)), np.float32)
    img[horizon:] = ground
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    # plain buildings along the horizon
    for _ in range(int(rng.integers(2, 7))):
        w = int(rng.uniform(0.08, 0.3) * width)
        h = int(rng.uniform(0.1, 0.45) * height)
        x = int(rng.integers(-w // 2, width))
        col = _colour(rng, sat=(0.0, 0.25), val=(0.3, 0.75))
        cv2.rectangle(img, (x, horizon - h), (x + w, horizon + 2), col, -1)
        if rng.random() < 0.6:
            step = int(rng.integers(8, 16))
            for yy in range(horizon - h + 4, horizon - 4, step):
                cv2.line(img, (x + 2, yy), (x + w - 2, yy), _shade(col, 0.8), 1)
    # trees, poles, wires, signs
    for _ in range(int(rng.integers(3, 12))):
        kind = rng.integers(0, 4)
        x, y = int(rng.integers(0, width)), int(rng.integers(horizon - height // 4, height))
        if kind == 0:
            r = int(rng.integers(8, max(9, height // 6)))
            cv2.line(img, (x, y), (x, y + 2 * r), (90, 60, 30), max(2, r // 5))
            cv2.circle(img, (x, y), r, _colour(rng, sat=(0.4, 0.9), val=(0.2, 0.55)), -1)
        elif kind == 1:
            cv2.line(img, (x, y), (x, max(0, y - height // 2)), (60, 60, 60), 2)
        elif kind == 2:
            cv2.line(img, (0, int(rng.integers(0, horizon))), (width, int(rng.integers(0, horizon))), (40, 40, 40), 1)
        else:
            s = int(rng.integers(6, 20))
            cv2.rectangle(img, (x, y), (x + 2 * s, y + s), _colour(rng), -1)
    return img


def _place(rng: np.random.Generator, structure: np.ndarray, width: int, height: int) -> np.ndarray:
    """A perspective transform (3x3) that puts the structure's content somewhere visible in the image."""
    alpha = structure[:, :, 3] > 0
    ys, xs = np.nonzero(alpha)
    cx0, cy0 = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    content = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    scale = rng.uniform(0.45, 0.9) * min(width, height) / content
    angle = math.radians(rng.uniform(-10, 10))
    src = np.float32([[0, 0], [CANVAS, 0], [CANVAS, CANVAS], [0, CANVAS]])
    c, s = math.cos(angle), math.sin(angle)
    dst = []
    for x, y in src:
        dx, dy = (x - cx0) * scale, (y - cy0) * scale
        dst.append([c * dx - s * dy, s * dx + c * dy])
    dst = np.float32(dst)
    dst += rng.uniform(-0.12, 0.12, dst.shape).astype(np.float32) * CANVAS * scale  # perspective jitter
    m = cv2.getPerspectiveTransform(src, dst)
    # where does the content land? keep at most ~10% of it outside the frame
    corners = np.float32([[xs.min(), ys.min()], [xs.max(), ys.min()], [xs.max(), ys.max()], [xs.min(), ys.max()]])
    warped = cv2.perspectiveTransform(corners[None], m)[0]
    lo, hi = warped.min(0), warped.max(0)
    span = hi - lo
    slack = 0.1 * span
    x_range = (-lo[0] - slack[0], width - hi[0] + slack[0])
    y_range = (-lo[1] - slack[1], height - hi[1] + slack[1])
    tx = rng.uniform(*sorted(x_range)) if x_range[0] < x_range[1] else (width - (lo[0] + hi[0])) / 2
    ty = rng.uniform(*sorted(y_range)) if y_range[0] < y_range[1] else (height - (lo[1] + hi[1])) / 2
    shift = np.float64([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    return shift @ m


def _composite(bg: np.ndarray, structure: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = bg.shape[:2]
    warped = cv2.warpPerspective(structure, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0, 0))
    # the canvas is premultiplied (colour is 0 wherever alpha is 0), and so is its interpolation: blending
    # with "over" must not multiply the colour by alpha again, or every edge gets a dark halo
    a = warped[:, :, 3:4].astype(np.float32) / 255.0
    out = bg.astype(np.float32) * (1 - a) + warped[:, :, :3].astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), warped[:, :, 3] > 127


def _photometric(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    x = np.power(x, rng.uniform(0.7, 1.4))  # gamma
    x = (x - 0.5) * rng.uniform(0.7, 1.2) + 0.5  # contrast
    x = x * rng.uniform(0.65, 1.25)  # brightness
    x = x * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # colour cast
    out = np.clip(x * 255.0, 0, 255).astype(np.uint8)
    if rng.random() < 0.35:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.8))
    sigma = rng.uniform(0, 6)
    if sigma > 1:
        out = np.clip(out.astype(np.float32) + rng.normal(0, sigma, out.shape), 0, 255).astype(np.uint8)
    return out


def _occlude(rng: np.random.Generator, img: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Draw 1-3 people / trees / vehicles over part of the landmark box, in place."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    for _ in range(int(rng.integers(1, 4))):
        col = _colour(rng, sat=(0.2, 1.0), val=(0.1, 0.9))
        cx = int(rng.uniform(x0, x1))
        if rng.random() < 0.5:  # a person: head + body, standing at the bottom part of the box
            ph = int(bh * rng.uniform(0.2, 0.45))
            base = int(rng.uniform(y0 + bh * 0.7, y1 + bh * 0.1))
            cv2.ellipse(img, (cx, base - ph // 2), (max(2, ph // 6), ph // 2), 0, 0, 360, col, -1)
            cv2.circle(img, (cx, base - ph - ph // 8), max(2, ph // 8), (200, 160, 130), -1)
        else:  # a tree or a vehicle
            ow, oh = int(bw * rng.uniform(0.1, 0.3)), int(bh * rng.uniform(0.1, 0.3))
            cy = int(rng.uniform(y0 + bh * 0.5, y1))
            cv2.ellipse(img, (cx, cy), (max(2, ow // 2), max(2, oh // 2)), 0, 0, 360, col, -1)


def render(seed: int, spec: ImageSpec, config: SynthConfig) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Draw one image. Returns ([H, W, 3] uint8 RGB, landmark box (xmin, ymin, xmax, ymax) or None)."""
    split_code = 0 if spec.split == "train" else 1
    rng = np.random.default_rng([seed, 2, split_code, spec.cls + 1, spec.view])
    img = draw_background(rng, config.width, config.height)
    box = None
    if spec.cls >= 0:
        structure = _structure(seed, spec.cls)
        m = _place(rng, structure, config.width, config.height)
        img, mask = _composite(img, structure, m)
        ys, xs = np.nonzero(mask)
        if len(xs):
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if box and rng.random() < 0.5:
            _occlude(rng, img, box)
    img = _photometric(rng, img)
    if spec.cls >= config.classes:
        box = None  # an unknown structure is not a database landmark: no label, no box
    return img, box


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(quality), optimize=False, progressive=False)
    return buf.getvalue()


def _render_task(args) -> tuple[str, bytes, tuple[int, int, int, int] | None]:
    seed, spec, config = args
    img, box = render(seed, spec, config)
    rng = np.random.default_rng([seed, 3, 0 if spec.split == "train" else 1, spec.cls + 1, spec.view])
    quality = int(rng.integers(config.jpeg_quality_min, config.jpeg_quality_max + 1))
    return spec.image_id(seed), encode_jpeg(img, quality), box


def image_path(image_id: str) -> str:
    return f"images/{image_id[0]}/{image_id[1]}/{image_id}.jpg"


def generate(out: str, config: SynthConfig, workers: int = 0, progress: bool = True) -> dict:
    """Write the data set to ``out`` (a local folder). Returns the summary written to synth.json."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    if config.classes < 1 or config.views < 1 or config.min_views < 1:
        raise ValueError("classes, views and min_views must be >= 1")
    if config.width < 32 or config.height < 32:
        raise ValueError("width and height must be at least 32 pixels")
    specs = plan(config)
    ids_of_class = landmark_ids(config)
    os.makedirs(out, exist_ok=True)
    tasks = [(config.seed, s, config) for s in specs]
    workers = cap_workers(workers) if workers > 0 else max_workers()[0]
    rows = {"train": [], "queries": []}
    boxes = []
    bar = tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress)
    if workers > 1 and len(tasks) > 64:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_render_task, tasks, chunksize=16)
    else:
        pool, results = None, map(_render_task, tasks)
    try:
        for spec, (image_id, data, box) in zip(specs, results, strict=True):
            rel = image_path(image_id)
            fs.write_bytes(os.path.join(out, rel), data)
            label = ids_of_class[spec.cls] if 0 <= spec.cls < config.classes else None
            rows[spec.split].append((image_id, rel, "" if label is None else label))
            if box is not None and label is not None:
                boxes.append((image_id, *box, config.width, config.height))
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    for split, name in (("train", "train.csv"), ("queries", "queries.csv")):
        _write_csv(os.path.join(out, name), ("id", "path", "landmark_id"), rows[split])
    _write_csv(os.path.join(out, "boxes.csv"), ("id", "xmin", "ymin", "xmax", "ymax", "width", "height"), boxes)
    summary = {
        "config": cfg.to_dict(config),
        "counts": {
            "train": len(rows["train"]),
            "queries": len(rows["queries"]),
            "queries_with_landmark": sum(1 for r in rows["queries"] if r[2] != ""),
            "train_non_landmark": sum(1 for r in rows["train"] if r[2] == ""),
            "boxes": len(boxes),
        },
        "landmark_ids": ids_of_class,
    }
    cfg.save_json(os.path.join(out, "synth.json"), summary)
    return summary


def _write_csv(path: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    fs.write_text(path, buf.getvalue())
