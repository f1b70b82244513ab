"""Benchmark "extract": image decode + HoG / SIFT throughput of the Beam job vs a bare Python loop.

Reference: one process, one thread, ``load_image`` then the extractor's ``extract`` (HoG: OpenCV's
HOGDescriptor; SIFT: OpenCV's SIFT detectAndCompute, capped and RootSIFT-ready) for each path. Measured:
``pipeline.stages.extract.extract`` on DirectRunner with 1 worker (in this process) and 2 worker processes, one thread
each. A job's time includes pipeline start-up, which dominates small runs, so the same job is also timed on
a 4-image manifest; (N - 4) / (T_N - T_4) estimates the throughput once the pipeline is running. On the
synthetic images N is 2,080 for SIFT (520 images four times over, each copy its own id) and 8,320 for HoG (16
times over), so that the difference is seconds of work rather than noise, and the whole job on it (start-up
included) is the figure a user waits for. HoG takes 1 ms per image: on 2,080 rows T_N - T_4 was 2.4 s and its
ratio moved between 0.88x and 0.94x over the runs of one day.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import time

from tqdm import tqdm

from bench.common import entry, offline_beam_args, skipped, summary, time_runs

log = logging.getLogger(__name__)

NAME = "extract"
TITLE = "Image decode + HoG / SIFT extraction throughput"
DESCRIPTION = (
    "Reference: a bare Python loop in one process and one thread (`pipeline.resources.limit_threads(1)`), "
    "`pipeline.images.load_image(path, DecodeConfig())` then the extractor's `extract(img)` for each image "
    "(`features.hog.HogExtractor`, or `features.sift.SiftExtractor`: the bare OpenCV SIFT call plus the "
    "response cap and the keypoint rescaling). SIFT rows also pay for packing the keypoints into Arrow. "
    "Measured: the Beam job `pipeline.stages.extract.extract(manifest, out, method=..., threads=1, "
    "force=True)` called in-process with `workers=1`, and with `workers=2` (DirectRunner multi-processing, "
    "one thread per worker). The job's time is the whole `extract()` call: manifest validation, the "
    "pipeline (read, decode + HoG, Parquet and dead-letter writes) and the final reconciliation. "
    "\"Fixed overhead\" is the same job on a 4-image manifest; \"start-up excluded\" is "
    "(N - 4) / (T_N - T_4), an estimate of the throughput once the pipeline runs. On the synthetic images the "
    "manifest lists the 520 images 16 times over for HoG (8,320 rows) and four times over for SIFT (2,080 rows), "
    "each copy its own id (the bare loop reads the same list), so that T_N - T_4 is seconds of work (HoG: 1 ms "
    "an image). Each repeat runs the bare loop, the job on 4 images and the job on N one after the other (the "
    "loop first in even repeats, last in odd ones), so that the machine's drift (its speed moves by 10 to 20% "
    "over minutes) weighs on the reference and the job alike; each figure is the best of its runs. The bare loop runs beside the first worker count's runs only "
    "(the in-process job for the synthetic images; the 2-worker job for Porto's), 5 times for HoG's 8,320 rows, "
    "3 for the rest. "
    "Beam flags: `--runner=DirectRunner` (run on Beam's FnApiRunner, see pipeline/options.py). "
    "Ratios are value / bare loop on the same images."
)

IMAGES_FULL = dict(classes=52, views=10)  # 52 classes x 10 views = 520 training images of 320x240
# the synthetic manifest lists the images this many times over, each copy its own id: 8,320 rows for HoG (1 ms an
# image: at 2,080 rows T_N - T_4 was 2.4 s and its ratio moved by 6% between runs), 2,080 for SIFT (26 s)
COPIES = {"hog": 16, "sift": 4}
# HoG's 10 s runs move by up to 20% with the machine (from one run to the next); more pairs for its best
REPEATS = {"hog": 5}
IMAGES_QUICK = dict(classes=12, views=5)  # 60 images
TINY = 4  # images in the manifest that measures the fixed overhead


def _porto_root() -> str:
    """../shared/data/porto next to the project (the photos are read in place, never copied)."""
    from bench.common import ROOT

    return os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "porto"))


def _synthetic(workdir: str, quick: bool) -> str:
    """Generate (or reuse, when synth.json holds the same config) the synthetic images; returns train.csv."""
    from pipeline import config as cfg
    from pipeline.synthetic import SynthConfig, generate

    config = SynthConfig(**(IMAGES_QUICK if quick else IMAGES_FULL), tail=0.0, queries_per_class=0,
                         non_landmark_queries=0, non_landmark_train=0)
    out = os.path.join(workdir, "synthetic-quick" if quick else "synthetic")
    record = os.path.join(out, "synth.json")
    if os.path.exists(record) and os.path.exists(os.path.join(out, "train.csv")) and \
            cfg.load_json(record).get("config") == cfg.to_dict(config):
        log.info("extract: reusing the synthetic images in %s (same config)", out)
    else:
        shutil.rmtree(out, ignore_errors=True)
        log.info("extract: generating %d synthetic images in %s", config.classes * config.views, out)
        generate(out, config, progress=False)
    return os.path.join(out, "train.csv")


def _write_manifest(path: str, rows: list[tuple[str, str, int]]) -> str:
    """Write a CSV manifest (id,path,landmark_id) with absolute image paths."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("id", "path", "landmark_id"))
        w.writerows(rows)
    return path


def _rows_of(manifest_path: str) -> list[tuple[str, str, int]]:
    from pipeline.manifest import read_manifest

    m = read_manifest(manifest_path)
    if m.dead_letters:
        raise RuntimeError(f"{manifest_path}: {len(m.dead_letters)} rows rejected by the manifest reader")
    return [(i, os.path.abspath(p), -1 if y is None else y) for i, p, y in m.records()]


def _porto_rows(quick: bool) -> list[tuple[str, str, int]]:
    root = _porto_root()
    with open(os.path.join(root, "labels.csv"), newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    names = sorted({r["label"] for r in table})
    label = {name: i for i, name in enumerate(names)}
    rows = [(os.path.splitext(os.path.basename(r["image_path"]))[0], os.path.join(root, r["image_path"]),
             label[r["label"]]) for r in table]
    if quick:
        rows = rows[::8]  # ~60 photos from every class
    return rows


def bare_loop(paths: list[str], desc: str, method: str = "hog") -> int:
    """The reference: decode + extract for each path in this process. Returns the number of images."""
    from features.registry import make_extractor
    from pipeline.images import DecodeConfig, load_image

    extractor = make_extractor(method)
    decode = DecodeConfig()
    n = 0
    for path in tqdm(paths, desc=desc, unit="img", leave=False, mininterval=0.5):
        extractor.extract(load_image(path, decode))
        n += 1
    return n


def _beam_runs(manifest: str, tiny: str, out: str, workers: int, n: int, repeats: int, beam_args: list[str],
               method: str = "hog", reference=None) -> dict:
    """Time the extract job on the full and the tiny manifest; returns times and the fitted rates. Each repeat
    also runs ``reference()`` (the bare loop, which times itself), so that the machine's drift weighs on the
    reference and the job alike: before the jobs in even repeats, after them in odd ones, so that a machine
    that slows (or speeds up) under sustained load does not favour whichever runs first."""
    from pipeline.stages.extract import extract

    def job(path: str, dest: str) -> dict:
        record = extract(path, dest, method=method, workers=workers, threads=1, beam_args=beam_args, force=True)
        counts = record["counts"]
        if counts["outputs"] != counts["inputs"]:
            raise RuntimeError(f"extract lost images: {counts}")
        return record

    # warm-up: first-run costs (imports, pickling, worker start-up code paths) are not start-up of a job
    job(tiny, os.path.join(out, f"warmup-w{workers}"))
    tiny_times, full_times, inner, inside = [], [], [], []
    with _time_inside_the_extractor() as spent:  # in this process only: the 1-worker job's
        for repeat in tqdm(range(repeats), desc=f"beam {workers} worker(s)", unit="run", leave=False):
            if reference is not None and repeat % 2 == 0:
                reference()
            start = time.perf_counter()
            job(tiny, os.path.join(out, f"tiny-w{workers}"))
            tiny_times.append(time.perf_counter() - start)
            spent[0] = 0.0
            start = time.perf_counter()
            record = job(manifest, os.path.join(out, f"full-w{workers}"))
            full_times.append(time.perf_counter() - start)
            inner.append(record["seconds"])
            inside.append(spent[0])
            if reference is not None and repeat % 2 == 1:
                reference()
    t_full, t_tiny = min(full_times), min(tiny_times)
    steady = (n - TINY) / (t_full - t_tiny) if t_full > t_tiny else None
    return {"rate": n / t_full, "steady": steady, "overhead_s": t_tiny, "full": summary(full_times),
            "tiny": summary(tiny_times), "pipeline_seconds_in_record": inner,
            "inside": min(inside) if workers == 1 else None}


@contextlib.contextmanager
def _time_inside_the_extractor():
    """Seconds the in-process job spends decoding and extracting (DecodeAndExtract's per-image work, the bare
    loop's work) added up into the yielded list's first item; the rest of a job's time is Beam's and the sink's."""
    from pipeline.stages.transforms import DecodeAndExtract

    spent = [0.0]
    original = DecodeAndExtract._extract

    def timed(self, row):
        start = time.perf_counter()
        try:
            return original(self, row)
        finally:
            spent[0] += time.perf_counter() - start

    DecodeAndExtract._extract = timed
    try:
        yield spent
    finally:
        DecodeAndExtract._extract = original


def _measure(group: str, rows: list[tuple[str, str, int]], workdir: str, workers_list: tuple[int, ...],
             repeats: int, beam_args: list[str], method: str = "hog") -> list[dict]:
    n = len(rows)
    manifest = _write_manifest(os.path.join(workdir, "manifest.csv"), rows)
    tiny = _write_manifest(os.path.join(workdir, "manifest-tiny.csv"), rows[:TINY])
    paths = [p for _, p, _ in rows]

    bare_loop(paths[:TINY], "warm-up", method)
    times = []

    def reference():
        times.extend(time_runs(lambda: bare_loop(paths, f"bare loop {method}", method), 1))

    # the reference runs beside the first worker count's runs only (for the synthetic images, the in-process
    # job: one process, one thread, as the loop): the machine's speed in another phase is not theirs
    runs = {workers: _beam_runs(manifest, tiny, os.path.join(workdir, "beam"), workers, n, repeats, beam_args,
                                method, reference if workers == workers_list[0] else None)
            for workers in workers_list}
    ref = "bare loop, 1 process, 1 thread"
    entries = [entry(group, ref, n / min(times), "images/s", repeats=len(times), images=n, **summary(times))]
    log.info("extract [%s]: bare loop %.1f images/s", group, n / min(times))
    for workers in workers_list:
        label = "1 worker (in-process)" if workers == 1 else f"{workers} workers (processes)"
        r = runs[workers]
        log.info("extract [%s]: Beam %s %.1f images/s (start-up excluded: %s), fixed overhead %.2f s", group,
                 label, r["rate"], f"{r['steady']:.1f}" if r["steady"] else "n/a", r["overhead_s"])
        entries.append(entry(group, f"Beam job, {label}", r["rate"], "images/s", ref, repeats=repeats,
                             note="whole extract() call, start-up included", images=n, workers=workers,
                             threads_per_worker=1, full=r["full"],
                             pipeline_seconds_in_record=r["pipeline_seconds_in_record"]))
        entries.append(entry(group, f"Beam job, {label}, start-up excluded (estimate)", r["steady"], "images/s",
                             ref, repeats=repeats, note=f"(N - {TINY}) / (T_N - T_{TINY})", images=n,
                             workers=workers))
        entries.append(entry(group, f"Beam fixed overhead, {label}", r["overhead_s"], "s", better="lower",
                             repeats=repeats, note=f"same job on {TINY} images", workers=workers,
                             tiny=r["tiny"]))
        if r["inside"]:
            entries.append(entry(group, f"decode + extract inside the job, {label}", n / r["inside"], "images/s",
                                 ref, repeats=repeats, note="its DoFn's per-image work alone: the rest of the "
                                 "job's time is Beam's and the Parquet sink's", seconds=round(r["inside"], 3)))
    return entries


def run(workdir: str, quick: bool) -> list[dict]:
    from pipeline.resources import limit_threads

    limit_threads(1)  # the reference and the in-process worker both use one OpenCV/BLAS thread
    os.makedirs(workdir, exist_ok=True)
    beam_args = offline_beam_args(workdir)
    repeats = 2 if quick else 3

    train_csv = _synthetic(workdir, quick)
    images = _rows_of(train_csv)
    entries = []
    for method in ("hog", "sift"):
        copies = 1 if quick else COPIES[method]
        rows = [(f"{i}-{k}" if copies > 1 else i, p, y) for k in range(copies) for i, p, y in images]
        listed = f"{len(images)} images" if copies == 1 else \
            f"{len(rows):,} rows ({len(images)} images {copies} times over, each copy its own id)"
        group = f"{method.upper()}, synthetic: {listed}, 320x240 JPEG"
        entries += _measure(group, rows, os.path.join(workdir, f"run-synthetic-{method}"), (1, 2),
                            repeats if quick else REPEATS.get(method, repeats),
                            beam_args, method)

    root = _porto_root()
    for method in ("hog", "sift"):
        porto_group = f"{method.upper()}, Porto: real photos (long side up to 1024 px), read in place"
        if os.path.exists(os.path.join(root, "labels.csv")):
            porto = _porto_rows(quick)
            porto_group = f"{method.upper()}, Porto: {len(porto)} real photos (long side up to 1024 px), read in place"
            entries += _measure(porto_group, porto, os.path.join(workdir, f"run-porto-{method}"), (2,),
                                2 if method == "sift" else repeats, beam_args, method)
        else:
            reason = f"{root}/labels.csv not found (the shared Porto photos are not on this machine)"
            log.warning("extract: skipping the Porto photos: %s", reason)
            entries.append(skipped(porto_group, "bare loop and Beam 2 workers", reason))
    return entries
