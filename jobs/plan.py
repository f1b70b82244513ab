"""cairn plan: what a comparison run will cost, before it runs, measured on samples of its own manifests.

Runs `cairn compare` (the same methods, --set parameters and boxes) on two samples of the manifests on this
machine, SAMPLE and SAMPLE/2 database images (whole classes, the non-landmark images at the same rate, the
queries at the same rate as the database), with every stage recorded (pipeline/stages.py). Each stage's time
is fitted as fixed + per-unit cost over the two samples, where a unit is what the stage's work grows with:
images for extraction, encoding, fine-tuning and index adds; images x classes for the linear classifiers;
sampled descriptors (capped by the vocabulary's sample size) for k-means; queries x database vectors for the
search; held-out database images x database vectors for the vote tuning. The fit is then projected to the
whole manifests (or to --target sizes) on --workers workers:

    stages that run on Beam workers (extraction, encoding, descriptor sampling, the Beam search) divide their
    per-unit time by the cores of the cluster over the cores they used here; training, index builds, search
    and reports run on the launching machine, assumed as fast as this one.

Prints, per stage and in all, the projected hours, the storage written (features, indices) and the memory an
index takes (CPU, or GPU with --device gpu), with every assumption; writes OUT/plan.json and OUT/plan.csv.

Accuracy: on this machine, projected from samples of 400 and 200 database images, the projection of a whole
run is checked against a measured one (BENCHMARKS.md, section "scale").
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import random
import time

from jobs import common
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError

log = logging.getLogger(__name__)

EXCLUDED = ("seconds", "peak_bytes", "worker_peak_bytes", "key")


def quantities(train: str, queries: str | None) -> dict:
    """The sizes a run's work grows with: database images (train), queries and landmark classes."""
    from pipeline.manifest import read_manifest

    db = read_manifest(train)
    q = read_manifest(queries) if queries else None
    return {"train": db.total_rows, "queries": q.total_rows if q else 0,
            "classes": len({label for label in db.labels if label is not None})}


# -----------------------------------------------------------------------------------------------------------
# samples


def sample_manifests(train: str, queries: str, size: int, folder: str, seed: int = 0) -> dict:
    """CSV manifests in ``folder`` with about ``size`` database images: whole landmark classes drawn at random
    (so that images per class stay as in the corpus), the non-landmark images and the queries at the same
    rate. Returns {"train", "queries", "fraction"}."""
    from pipeline.manifest import read_manifest

    db, q = read_manifest(train), read_manifest(queries)
    if len(db) == 0:
        raise CairnError(f"{train} holds no usable rows")
    fraction = min(1.0, size / len(db))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(db.labels):
        if label is not None:
            by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    rng.shuffle(classes)
    landmark_target = round(fraction * sum(len(v) for v in by_class.values()))
    chosen, rows = set(), []
    for c in classes:
        if len(rows) >= landmark_target:
            break
        chosen.add(c)
        rows += by_class[c]
    others = [i for i, label in enumerate(db.labels) if label is None]
    rows += rng.sample(others, round(fraction * len(others)))
    q_rows = [i for i, label in enumerate(q.labels) if label in chosen]
    q_others = [i for i, label in enumerate(q.labels) if label is None or label not in by_class]
    q_rows += rng.sample(q_others, round(fraction * len(q_others)))
    fs.makedirs(folder)
    out = {"fraction": fraction}
    for name, manifest, picked in (("train", db, sorted(rows)), ("queries", q, sorted(q_rows))):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(("id", "path", "landmark_id"))
        for i in picked:
            label = manifest.labels[i]
            w.writerow((manifest.ids[i], manifest.paths[i], "" if label is None else label))
        out[name] = fs.join(folder, f"{name}.csv")
        fs.write_text(out[name], buf.getvalue())
    return out


def measure(argv: list[str], train: str, queries: str, size: int, folder: str) -> dict:
    """Run `cairn compare` ``argv`` on a sample of ``size`` database images with its stages recorded."""
    from jobs import compare
    from pipeline import stages

    sample = sample_manifests(train, queries, size, fs.join(folder, "manifests"))
    run_argv = [*argv, "--train", sample["train"], "--queries", sample["queries"], "--out", fs.join(folder, "run"),
                "--force"]
    started = time.perf_counter()
    log_path = fs.join(folder, "compare.log")
    with stages.recording() as ledger, open(log_path, "w", encoding="utf-8") as log_file, \
            contextlib.redirect_stdout(log_file):  # the sample run's tables: in its folder, not the plan's output
        compare.run(run_argv)
    seconds = time.perf_counter() - started
    work = fs.join(folder, "run")
    for r in ledger:
        r["key"] = r["key"].replace(work, "RUN")
    other = seconds - sum(r["seconds"] for r in ledger)
    ledger.append({"kind": "other", "key": "RUN/other", "name": "compare's own work (manifests, copies)",
                   "units": 1, "grows": [["train", None]], "cap": None, "parallel": False, "cores": os.cpu_count(),
                   "output_bytes": 0, "seconds": round(max(0.0, other), 3)})
    return {"quantities": quantities(sample["train"], sample["queries"]), "seconds": round(seconds, 2),
            "stages": ledger}


# -----------------------------------------------------------------------------------------------------------
# the model


def _ratio(grows: list, have: dict, want: dict) -> float:
    r = 1.0
    for name, cap in grows:
        h, w = have.get(name, 0), want.get(name, 0)
        if cap:
            h, w = min(h, cap), min(w, cap)
        r *= (w / h) if h else 0.0
    return r


def fit(small: dict, large: dict) -> list[dict]:
    """Per stage of the larger sample: fixed seconds and seconds per unit, from both samples."""
    smaller = {r["key"]: r for r in small["stages"]}
    fitted = []
    for r in large["stages"]:
        s = smaller.get(r["key"])
        x2, t2 = float(r["units"]), float(r["seconds"])
        if s is not None and float(s["units"]) < x2 and t2 > float(s["seconds"]):
            per_unit = (t2 - float(s["seconds"])) / (x2 - float(s["units"]))
            fixed = max(0.0, t2 - per_unit * x2)
        else:  # one point (or no growth seen): all of it per unit, none fixed (the larger estimate)
            per_unit, fixed = (t2 / x2 if x2 else 0.0), (0.0 if x2 else t2)
        fitted.append({**{k: v for k, v in r.items() if k not in EXCLUDED}, "key": r["key"], "fixed_seconds": fixed,
                       "seconds_per_unit": per_unit, "measured_seconds": t2,
                       "peak_bytes": r.get("peak_bytes", 0)})
    return fitted


def project(fitted: list[dict], have: dict, want: dict, workers: int, cores_per_worker: int,
            search_fraction: float = 1.0) -> list[dict]:
    """Seconds and bytes of every fitted stage for the quantities ``want`` on ``workers`` x ``cores_per_worker``."""
    rows = []
    for f in fitted:
        ratio = _ratio(f["grows"], have, want)
        units = float(f["units"]) * ratio
        if f.get("cap"):
            units = min(units, float(f["cap"]))
        work = f["seconds_per_unit"] * units
        if f["kind"] == "search":
            work *= search_fraction
        # Beam workers: the cores of the cluster over the cores the stage used here. The index adds and the
        # search run on this machine in a local run and on workers with a cluster runner (--beam auto)
        parallel = f["parallel"] or (f.get("cluster_parallel", False) and workers > 1)
        if parallel:
            work *= f["cores"] / max(1, workers * cores_per_worker)
        if f["kind"] in ("extract", "encode"):  # features: bytes per image
            written = f.get("output_bytes", 0) * ratio
        elif f["kind"] == "train":  # models: fixed size, but a classifier's grows with its classes
            written = f.get("output_bytes", 0) * _ratio([g for g in f["grows"] if g[0] == "classes"], have, want)
        else:  # indices: see index_memory
            written = 0
        rows.append({"name": f["name"], "kind": f["kind"], "split": f.get("split", ""), "key": f["key"],
                     "parallel": parallel, "units": round(units), "seconds": f["fixed_seconds"] + work,
                     "output_bytes": round(written),
                     "peak_bytes": f.get("peak_bytes", 0)})
    return rows


def index_memory(n: int, d: int, budget: int) -> dict:
    """Factory Cairn's auto choice takes for ``n`` vectors of dimension ``d`` and the bytes it holds in RAM
    (CPU) and on a GPU (faiss-gpu: Flat as float32, IVF-PQ codes + ids; fast-scan codes are not on GPUs, the
    GPU takes IVF-PQ with the same number of 8-bit sub-quantizers as the refinement)."""
    from index.build import ID_BYTES, _largest_divisor, choose_factory, nlist_for

    factory, search = choose_factory(n, d, budget)
    if factory == "Flat":
        return {"factory": factory, "cpu_bytes": n * d * 4, "gpu_bytes": n * d * 4, "search": search,
                "scanned_fraction": 1.0}
    nlist = nlist_for(n)
    fast = _largest_divisor(d, max(2, d // 8))
    refine = _largest_divisor(d, max(1, d // 4))
    m = _largest_divisor(d, max(1, d // 8))
    centroids = nlist * d * 4
    nprobe = 128 if "fs" in factory else 64
    if "fs" in factory:
        cpu = n * (fast // 2 + refine + ID_BYTES) + centroids
    else:
        cpu = n * (m + ID_BYTES) + centroids
    return {"factory": factory, "cpu_bytes": cpu, "gpu_bytes": n * (refine + ID_BYTES) + centroids,
            "search": search, "scanned_fraction": min(1.0, nprobe / nlist)}


def plan(fitted: list[dict], have: dict, want: dict, workers: int, cores_per_worker: int, device: str,
         memory_budget: int) -> dict:
    """The projection for ``want`` on ``workers``: stages, totals, storage, index memory, assumptions."""
    indices = []
    for f in fitted:
        if f["kind"] == "index" and f.get("dim"):
            n = round(f["vectors"] * _ratio([["train", None]], have, want))
            indices.append({"key": f["key"], "vectors": n, "dim": f["dim"], **index_memory(n, f["dim"], memory_budget)})
    fraction = max((i["scanned_fraction"] for i in indices), default=1.0)
    rows = project(fitted, have, want, workers, cores_per_worker, fraction)
    total = sum(r["seconds"] for r in rows)
    storage = sum(r["output_bytes"] for r in rows) + sum(i["cpu_bytes"] for i in indices)
    memory_key = "gpu_bytes" if device == "gpu" else "cpu_bytes"
    cores_here = os.cpu_count() or 1
    assumptions = [
        f"measured on this machine ({cores_here} cores, {'a GPU' if _has_gpu() else 'no GPU'}) with the run's "
        "methods and parameters on two samples of the manifests; each stage is fixed seconds + seconds per unit",
        f"Beam stages (extraction, encoding, descriptor sampling; with more than one worker also the index adds "
        f"and the search, which a cluster runner puts on workers) scale linearly to {workers} worker(s) x "
        f"{cores_per_worker} cores at this machine's per-core speed; cluster start-up and data transfer are not "
        "counted",
        "training (k-means, PCA, classifiers, fine-tuning, DELF, the detector), index training and merging, vote "
        "tuning and the report run on one launching machine as fast as this one",
        "k-means learns from at most the vocabulary's sample_size descriptors; the detector from at most its "
        "max_images; fine-tuning and DELF do the same epochs over every image",
        "linear classifiers cost images x classes; the search costs queries x database vectors, of which an "
        f"IVF index scans nprobe/nlist (here {fraction:.3f}) at the flat per-vector cost (an overestimate for "
        "compressed codes); vote tuning costs held-out images (one per class, at most 2,000) x database vectors",
        "storage: features and models as written on the samples, scaled by images; indices as Cairn's auto "
        "factory choice for the projected vector count",
    ]
    if device == "gpu" and not _has_gpu():
        assumptions.append("--device gpu: this machine has no GPU, so the times are CPU times; only the index "
                           "memory is given for GPUs")
    return {"target": want, "workers": workers, "cores_per_worker": cores_per_worker, "device": device,
            "stages": rows, "total_seconds": total, "storage_bytes": storage, "indices": indices,
            "index_memory_bytes": sum(i[memory_key] for i in indices), "assumptions": assumptions}


def _has_gpu() -> bool:
    from index.build import gpu_count

    return gpu_count() > 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def describe(result: dict) -> str:
    t = result["target"]
    lines = [f"plan: {t['train']:,} database images over {t['classes']:,} classes, {t['queries']:,} queries, on "
             f"{result['workers']} worker(s) x {result['cores_per_worker']} cores ({result['device']})", ""]
    lines.append(f"  {'stage':44s} {'where':8s} {'units':>14s} {'time':>10s} {'written':>10s}")
    for r in sorted(result["stages"], key=lambda r: -r["seconds"]):
        where = "workers" if r["parallel"] else "launcher"
        parts = r["key"].split("/")
        label = f"{r['name']} {r['split']}".strip() + (f" [{parts[2]}]" if len(parts) > 3 else "")
        lines.append(f"  {label[:44]:44s} {where:8s} {r['units']:14,d} {_human_seconds(r['seconds']):>10s} "
                     f"{_human_bytes(r['output_bytes']):>10s}")
    lines += ["", f"  total time    {_human_seconds(result['total_seconds'])}",
              f"  storage       {_human_bytes(result['storage_bytes'])} (features, models, indices)",
              f"  index memory  {_human_bytes(result['index_memory_bytes'])} ({result['device'].upper()}, all indices)"]
    for i in result["indices"]:
        lines.append(f"    {i['key']}: {i['vectors']:,} x {i['dim']} as {i['factory']}: CPU "
                     f"{_human_bytes(i['cpu_bytes'])}, GPU {_human_bytes(i['gpu_bytes'])}")
    lines += ["", "assumptions:"] + [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# command line


def parse_target(text: str, have: dict) -> dict:
    """'train=1000000,classes=13000,queries=100000' over the manifests' own sizes."""
    want = dict(have)
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in want or not value.replace("_", "").isdigit():
            raise CairnError(f"--target {item!r}: expected train=N, classes=N or queries=N")
        want[name] = int(value.replace("_", ""))
    return want


def build_parser():
    from jobs.compare import build_parser as compare_parser

    p = compare_parser()
    p.prog, p.description = "cairn plan", __doc__
    for action in p._actions:  # --train is the manifest to plan (alias --manifest); --out is the plan's folder
        if action.dest == "train":
            action.option_strings.append("--manifest")
            p._option_string_actions["--manifest"] = action
        if action.dest == "out":
            action.help = "the plan's folder: plan.json, plan.csv and the sample runs (work/)"
        if action.dest == "workers":  # the cluster's workers; the samples run with the automatic local ones
            action.type, action.default = str, "1"
            action.help = ("workers to project for, comma-separated, e.g. 1,10,100 (default 1: this machine); "
                           "the samples run on this machine with its automatic DirectRunner workers")
    g = p.add_argument_group("plan")
    g.add_argument("--sample", type=int, default=400,
                   help="database images of the larger sample (default 400; the smaller has half)")
    g.add_argument("--cores-per-worker", type=int, default=0,
                   help="cores of each worker (default: this machine's)")
    g.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="where the index is searched: the memory figure is for the CPU or a GPU")
    g.add_argument("--target", default="",
                   help="sizes to project instead of the manifests', e.g. train=1000000,classes=13000,queries=100000")
    g.add_argument("--reuse", action="store_true", help="reuse OUT/work's sample runs when they are there")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    import sys

    argv = list(sys.argv[2:] if argv is None else argv)
    p = build_parser()
    args, _ = common.parse(p, argv, beam=True)
    if args.sample < 20:
        raise CairnError("--sample must be at least 20 database images")
    try:
        worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        worker_counts = []
    if not worker_counts or min(worker_counts) < 1:
        raise CairnError(f"--workers {args.workers!r}: give worker counts >= 1, e.g. 1,10,100")
    compare_argv = _compare_argv(argv)
    out = args.out
    fs.makedirs(out)
    runs = []
    for size in (max(10, args.sample // 2), args.sample):
        folder = fs.join(out, "work", f"sample-{size}")
        record_path = fs.join(folder, "measured.json")
        if args.reuse and fs.exists(record_path):
            runs.append(cfg.load_json(record_path))
            continue
        log.info("plan: measuring every stage on a sample of %d database images", size)
        runs.append(measure(compare_argv, args.train, args.queries, size, folder))
        cfg.save_json(record_path, runs[-1])
    fitted = fit(*runs)
    have = runs[1]["quantities"]
    want = parse_target(args.target, quantities(args.train, args.queries))
    cores = args.cores_per_worker or (os.cpu_count() or 1)
    from index.build import available_memory

    results = [plan(fitted, have, want, w, cores, args.device, available_memory() // 2) for w in worker_counts]
    record = {"sample_runs": [{k: v for k, v in r.items() if k != "stages"} for r in runs], "fitted": fitted,
              "plans": results}
    cfg.save_json(fs.join(out, "plan.json"), record)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("workers", "stage", "split", "key", "where", "units", "seconds", "output_bytes"))
    for res in results:
        for r in res["stages"]:
            w.writerow((res["workers"], r["name"], r["split"], r["key"], "workers" if r["parallel"] else "launcher",
                        r["units"], round(r["seconds"], 2), r["output_bytes"]))
    fs.write_text(fs.join(out, "plan.csv"), buf.getvalue())
    for res in results:
        print(describe(res))
        print()
    print(f"plan: {fs.join(out, 'plan.json')} and plan.csv; the sample runs are in {fs.join(out, 'work')}/")
    return record


PLAN_ONLY = {"--sample": 1, "--workers": 1, "--cores-per-worker": 1, "--device": 1,
             "--target": 1, "--reuse": 0, "--train": 1, "--manifest": 1, "--queries": 1, "--out": 1}


def _compare_argv(argv: list[str]) -> list[str]:
    """The compare arguments of a plan's command line (without the plan's own and the manifests/out)."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in PLAN_ONLY:
            skip = PLAN_ONLY[name] if "=" not in a else 0
            continue
        out.append(a)
    return out

