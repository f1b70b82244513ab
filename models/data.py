"""The tf.data input pipeline for fine-tuning: decode once, sample class-balanced, augment, batch, prefetch.

1. **Decode and cache** (:func:`build_cache`): every training image is decoded once by Cairn's own decoder
   (pipeline/images.py: EXIF, colour modes, bomb guard) on a Python thread pool ahead of tf.data, resized whole
   to ``cache_size`` squared, and kept as uint8 in memory or in a memory-mapped file (``cache="disk"``: 1M images at 256 px
   are 197 GB, far beyond RAM; the OS page cache keeps the hot part). Images that cannot be decoded become
   dead letters with their id and reason and are left out of training.
2. **Class-balanced sampling** (:func:`balanced_sampler`): image i of class c is drawn with probability
   proportional to n_c ** -balance, so class c gets a share proportional to n_c ** (1 - balance): 0 samples
   images uniformly (the head classes dominate), 1 samples classes uniformly (a 2-image class is seen as
   often as a 2,000-image one, which over-fits its two images), 0.5 (square-root sampling) sits between.
3. **Augment** (:func:`augment`): a random resized crop (scale and aspect ranges as in Inception/ResNet
   training), optional horizontal flip, colour jitter (brightness, contrast, saturation, hue).
4. ``batch(drop_remainder)`` and ``prefetch(AUTOTUNE)``; the gather from the cache and the augmentation run
   in parallel (``num_parallel_calls=AUTOTUNE``).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from features.cnn import resize_square
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import DeadLetter
from pipeline.images import DecodeConfig, ImageError, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (random resized crop, flip, colour jitter)."""

    crop_scale_min: float = 0.35  # smallest crop, as a share of the image area
    crop_ratio_min: float = 0.75  # crop aspect ratio range (w / h)
    crop_ratio_max: float = 1.333
    flip: bool = False  # horizontal flips (off: mirrored landmarks are other buildings' layouts)
    brightness: float = 0.2  # max brightness change (share of 255)
    contrast: float = 0.2  # contrast factor in [1 - c, 1 + c]
    saturation: float = 0.2  # saturation factor in [1 - s, 1 + s]
    hue: float = 0.02  # max hue shift (share of the colour circle)

    def __post_init__(self):
        cfg.check_numbers(self)
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"crop_scale_min must be in (0, 1], not {self.crop_scale_min}")
        if not 0 < self.crop_ratio_min <= self.crop_ratio_max:
            raise ValueError("need 0 < crop_ratio_min <= crop_ratio_max")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], not {self.hue}")
        for name in ("brightness", "contrast", "saturation"):  # factors in [1 - x, 1 + x] stay >= 0
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")


@dataclass
class ImageCache:
    """Decoded training images: ``images`` [N, S, S, 3] uint8 (array or memmap), aligned with ``ids``/``labels``."""

    images: np.ndarray
    ids: list[str]
    labels: np.ndarray  # [N] int64 class indices 0..C-1
    dead_letters: list[DeadLetter]


def _decode(path: str, size: int, decode: DecodeConfig) -> np.ndarray:
    return resize_square(load_image(path, decode), size)


def build_cache(records: list[tuple[str, str, int]], size: int, decode: DecodeConfig = DecodeConfig(),
                mode: str = "memory", folder: str = "", threads: int = 0, progress: bool = True) -> ImageCache:
    """Decode ``records`` (id, path, class index) once into an :class:`ImageCache` of ``size`` x ``size``.

    ``mode`` "memory" keeps the array in RAM; "disk" writes it to ``folder``/images-<size>.npy (a memmap),
    with images-<size>.json recording which images it holds: a rerun (a resume) with the same records, size and
    decoding reuses it instead of decoding everything again.
    """
    from tqdm import tqdm

    if mode not in ("memory", "disk"):
        raise ValueError(f"cache must be 'memory' or 'disk', not {mode!r}")
    n = len(records)
    shape = (n, size, size, 3)
    key = {"records": cfg.fingerprint([list(r) for r in records]), "size": size, "decode": cfg.to_dict(decode),
           # the files by size and modification time (one stat each): an image replaced in place is decoded again
           "files": cfg.fingerprint(fs.stat_files([r[1] for r in records]))}
    if mode == "disk":
        os.makedirs(folder, exist_ok=True)
        array, record = os.path.join(folder, f"images-{size}.npy"), os.path.join(folder, f"images-{size}.json")
        if cfg.check_reusable(record, key) and os.path.exists(array):  # a finished cache of the same images
            stored = cfg.load_json(record)
            log.info("fine-tuning: reusing the decoded images in %s", array)
            return _finish(np.load(array, mmap_mode="r"), records, np.array(stored["ok"], bool),
                           [DeadLetter(*d) for d in stored["dead_letters"]], mode)
        if os.path.exists(record):
            os.remove(record)
        images = np.lib.format.open_memmap(array, mode="w+", dtype=np.uint8, shape=shape)
    else:
        images = np.empty(shape, np.uint8)
    ok = np.zeros(n, bool)
    dead = []

    def work(i):
        image_id, path, _ = records[i]
        try:
            images[i] = _decode(path, size, decode)
            return i, None
        except ImageError as e:
            return i, DeadLetter(image_id, e.stage, e.reason, path)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop training
            return i, DeadLetter(image_id, "decode", f"{type(e).__name__}: {e}", path)

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for i, letter in tqdm(pool.map(work, range(n)), total=n, desc="decode training images", unit="img",
                              disable=not progress, leave=False):
            if letter is None:
                ok[i] = True
            else:
                dead.append(letter)
    if mode == "disk":
        images.flush()
        cfg.save_json(record, {"config": key, "ok": ok.tolist(), "dead_letters": [list(d) for d in dead]})
    return _finish(images, records, ok, dead, mode)


def _finish(images, records, ok: np.ndarray, dead: list[DeadLetter], mode: str) -> ImageCache:
    keep = np.flatnonzero(ok)
    if len(keep) < len(records):
        log.warning("fine-tuning: %d of %d training images could not be decoded (dead letters)",
                    len(records) - len(keep), len(records))
        images = images[keep] if mode == "memory" else _Rows(images, keep)
    labels = np.array([records[i][2] for i in keep], np.int64)
    ids = [records[i][0] for i in keep]
    return ImageCache(images, ids, labels, dead)


class _Rows:
    """A view of selected rows of a memmap without copying it (``view[i]`` = ``array[rows[i]]``)."""

    def __init__(self, array: np.ndarray, rows: np.ndarray):
        self.array, self.rows = array, rows
        self.shape = (len(rows), *array.shape[1:])

    def __getitem__(self, i):
        return self.array[self.rows[i]]

    def __len__(self):
        return len(self.rows)


def class_sampling_weights(labels: np.ndarray, balance: float) -> np.ndarray:
    """[N] probabilities: image i of class c drawn with probability proportional to n_c ** -balance."""
    counts = np.bincount(labels)
    w = counts[labels].astype(np.float64) ** -float(balance)
    return w / w.sum()


def balanced_sampler(labels: np.ndarray, balance: float, seed: int):
    """An endless generator of (row, label) drawn with :func:`class_sampling_weights`, in chunks."""
    p = class_sampling_weights(labels, balance)
    rng = np.random.default_rng(seed)

    def gen():
        while True:
            rows = rng.choice(len(labels), size=4096, p=p)
            for r in rows:
                yield np.int64(r), labels[r]

    return gen


def augment(image, size: int, config: AugmentConfig):
    """[S, S, 3] uint8 tensor -> [size, size, 3] float32 in 0..255, randomly cropped, flipped and jittered."""
    import tensorflow as tf

    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])
    begin, extent, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=bbox, min_object_covered=0.0,
        aspect_ratio_range=(config.crop_ratio_min, config.crop_ratio_max),
        area_range=(config.crop_scale_min, 1.0), max_attempts=20, use_image_if_no_bounding_boxes=True)
    x = tf.slice(image, begin, extent)
    x = tf.image.resize(x, (size, size), method="bilinear", antialias=True) / 255.0
    if config.flip:
        x = tf.image.random_flip_left_right(x)
    if config.brightness:
        x = tf.image.random_brightness(x, config.brightness)
    if config.contrast:
        x = tf.image.random_contrast(x, 1 - config.contrast, 1 + config.contrast)
    if config.saturation:
        x = tf.image.random_saturation(x, 1 - config.saturation, 1 + config.saturation)
    if config.hue:
        x = tf.image.random_hue(x, config.hue)
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def _gather(cache: ImageCache):
    images = cache.images

    def get(row):
        return np.asarray(images[int(row)], dtype=np.uint8)

    return get


def training_dataset(cache: ImageCache, rows: np.ndarray, size: int, batch_size: int, augment_config: AugmentConfig,
                     balance: float, seed: int):
    """Endless batches ({"image", "label"}, label) of augmented images drawn class-balanced from ``rows``."""
    import tensorflow as tf

    labels = cache.labels[rows]
    get = _gather(cache)
    sampler = balanced_sampler(labels, balance, seed)
    side = cache.images.shape[1]

    def load(i, y):
        image = tf.numpy_function(lambda j: get(rows[j]), [i], tf.uint8)
        image.set_shape((side, side, 3))
        return augment(image, size, augment_config), y

    ds = tf.data.Dataset.from_generator(sampler, output_signature=(
        tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.int64)))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda x, y: ({"image": x, "label": y}, y))
    return ds.prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(cache: ImageCache, rows: np.ndarray, size: int, batch_size: int):
    """Batches ({"image", "label"}, label) of ``rows`` in order, resized whole to ``size``, no augmentation."""
    import tensorflow as tf

    get = _gather(cache)
    labels = cache.labels[rows]
    side = cache.images.shape[1]

    def load(i, y):
        image = tf.numpy_function(lambda j: get(rows[j]), [i], tf.uint8)
        image.set_shape((side, side, 3))
        x = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bilinear", antialias=True)
        return x, y

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(rows), dtype=np.int64), labels))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    ds = ds.map(lambda x, y: ({"image": x, "label": y}, y))
    return ds.cache().prefetch(tf.data.AUTOTUNE)
