"""`cairn plan`: what a comparison run will cost, before it runs, measured on samples of its own manifests.

Two samples of the manifests run `cairn compare` on this machine, each in a process of its own, with every
stage's cost recorded (ledger.py); each stage's time is fitted as fixed + per-unit cost over the two samples and
projected to the whole manifests (or to other sizes) on a number of workers. `cairn plan --help` (jobs/plan.py)
says how.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import shutil
import subprocess
import time

from index.build import ID_BYTES, available_memory, choose_factory, gpu_count, ivf_of, new_index
from models.classifiers import softmax_step_seconds, training_rows
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.manifest import manifest_fingerprint, read_manifest
from pipeline.run.methods import index_owner

log = logging.getLogger(__name__)

EXCLUDED = ("seconds", "peak_bytes", "worker_peak_bytes")


def quantities(train: str, queries: str | None) -> dict:
    """The sizes a run's work grows with: database images (train), queries and landmark classes."""
    db = read_manifest(train)
    q = read_manifest(queries) if queries else None
    return {"train": len(db), "queries": len(q) if q else 0,
            "classes": len({label for label in db.labels if label is not None})}


# -----------------------------------------------------------------------------------------------------------
# samples


def sample_manifests(train: str, queries: str, size: int, folder: str, seed: int = 0) -> dict:
    """CSV manifests in ``folder`` with about ``size`` database images: whole landmark classes drawn at random
    (so that images per class stay as in the corpus), the non-landmark images and the queries at the same
    rate. Returns {"train", "queries", "fraction"}."""
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


def measure(argv: list[str], train: str, queries: str, size: int, folder: str, child: list[str]) -> dict:
    """Run `cairn compare` ``argv`` on a sample of ``size`` database images with its stages recorded, in a process
    of its own as the real run would be: each sample then pays the same start-up (imports, the first TensorFlow
    graph), which would otherwise fall on the first sample only and tilt the fitted lines. ``child``: the command
    that runs a sample, given the path of its spec (jobs/plan.py): {"argv", "factor" (each stage runs in-process
    or on worker processes as it would on the whole manifests: pipeline.options.sized_as), "result" (where its
    stages go), "verbose"}."""
    sample = sample_manifests(train, queries, size, fs.join(folder, "manifests"))
    run_dir = fs.join(folder, "run")
    if fs.is_local_dir(run_dir):  # from scratch, sharing what compare shares (--force would redo shared work)
        shutil.rmtree(run_dir)
    spec = {"argv": [*argv, "--train", sample["train"], "--queries", sample["queries"], "--out", run_dir],
            "factor": 1 / sample["fraction"], "result": fs.join(folder, "stages.json"),
            "verbose": log.isEnabledFor(logging.DEBUG)}
    spec_path = fs.join(folder, "sample-run.json")
    cfg.save_json(spec_path, spec)
    if os.path.exists(spec["result"]):  # a result must come from this run
        os.remove(spec["result"])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(fs.join(folder, "compare.log"), "w", encoding="utf-8") as stdout:  # its tables; logs go to stderr
        done = subprocess.run([*child, spec_path], stdout=stdout, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not os.path.exists(spec["result"]):
        raise CairnError(f"the comparison on the sample of {size} database images failed (exit {done.returncode}); "
                         f"see its messages above and {fs.join(folder, 'compare.log')}")
    stages = cfg.load_json(spec["result"])["stages"]
    for r in stages:
        r["key"] = r["key"].replace(run_dir, "RUN")
    other = seconds - sum(r["seconds"] for r in stages)
    stages.append({"kind": "other", "key": "RUN/other", "name": "compare's own work (start-up, manifests, copies)",
                   "units": 1, "grows": [], "cap": None, "parallel": False, "cores": os.cpu_count(),
                   "output_bytes": 0, "seconds": round(max(0.0, other), 3)})
    return {"quantities": quantities(sample["train"], sample["queries"]), "seconds": round(seconds, 2),
            "stages": stages}


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


MODEL_VERSION = 8  # of what the sample runs record; older measurements are not reused


def fit(small: dict, large: dict) -> list[dict]:
    """Per stage of the larger sample: fixed seconds and seconds per unit, a least-squares line through its
    points in both samples, where the database and query splits of one Beam job (one features folder, the same
    worker processes) pool their points: up to four sizes. A slope that comes out negative (start-up noise
    above the work) is taken as 0: the stage's time is then fixed."""
    points: dict[tuple, list[tuple[float, float]]] = {}
    cpu: dict[tuple, list[tuple[float, float]]] = {}
    for run in (small, large):
        for r in run["stages"]:
            points.setdefault(_family(r), []).append((float(r["units"]), float(r["seconds"])))
            if r.get("cpu_seconds") is not None:
                cpu.setdefault(_family(r), []).append((float(r["units"]), float(r["cpu_seconds"])))
    fitted = []
    for r in large["stages"]:
        if r.get("probe"):  # its work is timed at the target's shape: the sample's time beyond it is fixed
            fixed = max(0.0, float(r["seconds"]) - probe_seconds(r["probe"], large["quantities"]))
            fitted.append(_fitted(r, fixed, 0.0, 1, "probe"))
            continue
        if r.get("parallel") and len(cpu.get(_family(r), [])) >= 2:
            fitted.append(_fit_beam_stage(r, cpu[_family(r)]))
            continue
        pts = points[_family(r)]
        slope, mx, mt = _slope(pts)
        if len({x for x, _ in pts}) == 1 and mx:  # one size only: all of it per unit (the larger estimate)
            per_unit, fixed = mt / mx, 0.0
        else:
            per_unit = max(0.0, slope)
            fixed = mt - per_unit * mx
            if fixed < 0:  # steeper than proportional: proportional through the points' mean
                per_unit, fixed = (mt / mx if mx else 0.0), 0.0
        fitted.append(_fitted(r, fixed, per_unit, len(pts), "wall"))
    return fitted


def _fitted(r: dict, fixed: float, per_unit: float, points: int, source: str) -> dict:
    """A stage's record with its fitted line (``source``: wall time, CPU time or a probe)."""
    return {**{k: v for k, v in r.items() if k not in EXCLUDED}, "fixed_seconds": fixed,
            "seconds_per_unit": per_unit, "measured_seconds": float(r["seconds"]), "points": points,
            "from": source, "peak_bytes": r.get("peak_bytes", 0)}


def _slope(pts: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(slope, mean x, mean y) of the least-squares line through ``pts`` (slope 0 when every x is the same)."""
    xs, ys = zip(*pts, strict=True)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return (sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0), mx, my


def _fit_beam_stage(r: dict, cpu_points: list[tuple[float, float]]) -> dict:
    """A Beam stage: its per-unit cost from its CPU time (core-seconds per unit, the slope over the samples),
    spread over the cores it ran on; its fixed time is what the larger sample's wall time leaves. The wall time
    of a small sample depends on how evenly Beam spread it over the workers; its CPU time does not."""
    slope, _, _ = _slope(cpu_points)
    per_unit = max(0.0, slope) / max(1, int(r.get("cores", 1)))
    fixed = max(0.0, float(r["seconds"]) - per_unit * float(r["units"]))
    return _fitted(r, fixed, per_unit, len(cpu_points), "cpu")


_STEP_SECONDS: dict[tuple, float] = {}
PROBE_CLASSES = 20_000


def probe_seconds(probe: dict, quantities: dict) -> float:
    """Seconds of a stage's kernel at ``quantities``, timed on this machine at that shape. The one kernel:
    "softmax-step", a softmax classifier's SGD (epochs x its training rows / batch steps of batch x dim x
    classes + 1, the non-landmark images being a class of their own); a step at 13,000 classes runs BLAS at
    another speed than at a sample's twenty, so it is timed, not extrapolated. The rest of the stage (reading
    the features, calibration, saving) is taken as fixed."""
    if probe.get("kernel") != "softmax-step":
        raise CairnError(f"cairn plan: unknown cost probe {probe.get('kernel')!r} (measured by another version?); "
                         "measure the samples again with --force")

    classes = int(quantities.get("classes", 0)) + 1
    # above PROBE_CLASSES the step is timed there and scaled: the matmuls are linear in the classes by then, and
    # the plan's own process need not hold a 100k-class weight matrix and its Adam moments
    shape = (int(probe["batch"]), int(probe["dim"]), min(classes, PROBE_CLASSES))
    if shape not in _STEP_SECONDS:
        _STEP_SECONDS[shape] = softmax_step_seconds(*shape)
    rows = training_rows(int(quantities.get("train", 0)), classes, float(probe["validation_fraction"]))
    steps = int(probe["epochs"]) * math.ceil(rows / shape[0])
    return steps * _STEP_SECONDS[shape] * classes / shape[2]


def _family(record: dict) -> tuple:
    """The stages that share a cost line: a Beam job's database and query splits (the same folder and worker
    processes); every other stage alone."""
    if record.get("split"):
        return (record["kind"], record["key"].rsplit("/", 1)[0], record.get("workers"))
    return (record["kind"], record["key"])


def project(fitted: list[dict], have: dict, want: dict, workers: int, cores_per_worker: int,
            scanned: dict | None = None) -> list[dict]:
    """Seconds and bytes of every fitted stage for the quantities ``want`` on ``workers`` x ``cores_per_worker``;
    ``scanned``: per method owning an index, the share of the database the index scans per query (the search,
    also of the methods that search another's index: hog-linear hog's, cnn+delf cnn's...)."""
    rows = []
    for f in fitted:
        ratio = _ratio(f["grows"], have, want)
        units = float(f["units"]) * ratio
        if f.get("cap"):
            units = min(units, float(f["cap"]))
        work = f["seconds_per_unit"] * units
        if f.get("probe"):
            work = probe_seconds(f["probe"], want)
        if f["kind"] == "search" and any(name == "train" for name, _ in f["grows"]):  # an index's scan
            work *= (scanned or {}).get(index_owner(_method_of(f["key"])), 1.0)
        # Beam workers: the cores of the cluster over the cores the stage used here. The index adds run on this
        # machine in a local run and on workers with a cluster runner (--beam auto)
        parallel = f["parallel"] or (f.get("cluster_parallel", False) and workers > 1)
        if parallel:
            work *= f["cores"] / max(1, workers * cores_per_worker)
        if f["kind"] in ("extract", "encode"):  # features: bytes per image
            written = f.get("output_bytes", 0) * ratio
        elif f["kind"] == "train":  # models: fixed size, but a classifier's grows with its classes
            written = f.get("output_bytes", 0) * _ratio(f.get("output_grows") or [], have, want)
        else:  # indices: see index_memory
            written = 0
        rows.append({"name": f["name"], "kind": f["kind"], "split": f.get("split", ""), "key": f["key"],
                     "parallel": parallel, "units": round(units), "seconds": f["fixed_seconds"] + work,
                     "output_bytes": round(written),
                     "peak_bytes": f.get("peak_bytes", 0)})
    return rows


def index_memory(n: int, d: int, budget: int, factory: str = "auto", search: str = "",
                 mergeable_only: bool = False) -> dict:
    """The factory an index of ``n`` vectors of dimension ``d`` is built with (Cairn's auto choice for the
    memory budget, the mergeable one for a build on workers, or ``factory`` as given), the bytes it holds in RAM
    and on a GPU (faiss-gpu: Flat in float16, IVF lists as codes + ids; None where FAISS keeps the kind on the
    CPU: fast-scan, refinement, HNSW), and the share of vectors a search scans (nprobe / nlist)."""
    import faiss

    if factory == "auto":
        factory, search = choose_factory(n, d, budget, mergeable_only)
    index = new_index(factory, d, "ip")  # empty: its layout only
    inner = faiss.downcast_index(index)
    ivf = ivf_of(index)
    if ivf is None:
        flat = isinstance(inner, faiss.IndexFlat)
        return {"factory": factory, "cpu_bytes": n * d * 4 + (0 if flat else n * 2 * 32 * 4),
                "gpu_bytes": n * d * 2 if flat else None, "search": search, "scanned_fraction": 1.0}
    code = faiss.downcast_index(ivf).code_size
    refine = faiss.downcast_index(inner.refine_index).code_size if isinstance(inner, faiss.IndexRefine) else 0
    centroids = ivf.nlist * d * 4
    params = dict(item.split("=", 1) for item in search.split(",") if "=" in item)
    nprobe = float(params.get("nprobe", 1))  # FAISS's default when no search parameter says otherwise
    on_gpu = not refine and not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)
    return {"factory": factory, "cpu_bytes": n * (code + refine + ID_BYTES) + centroids,
            "gpu_bytes": n * (code + ID_BYTES) + centroids if on_gpu else None, "search": search,
            "scanned_fraction": min(1.0, nprobe / ivf.nlist)}


def plan(fitted: list[dict], have: dict, want: dict, workers: int, cores_per_worker: int, device: str,
         memory_budget: int, factory: str = "auto", search: str = "") -> dict:
    """The projection for ``want`` on ``workers``: stages, totals, storage, index memory, assumptions."""
    indices = []
    for f in fitted:
        if f["kind"] != "index" or not f.get("dim") or "#" in f["key"]:
            continue
        n = round(f["vectors"] * _ratio([["train", None]], have, want))
        if f.get("factory") == "sparse-inverted-file":  # BoVW postings: bytes per image, no FAISS layout
            size = round(f.get("output_bytes", 0) * _ratio([["train", None]], have, want))
            indices.append({"key": f["key"], "vectors": n, "dim": f["dim"], "factory": "sparse-inverted-file",
                            "cpu_bytes": size, "gpu_bytes": None, "search": "", "scanned_fraction": 1.0})
            continue
        # with more than one worker the adds run on workers, whose shards need a mergeable index kind
        indices.append({"key": f["key"], "vectors": n, "dim": f["dim"],
                        **index_memory(n, f["dim"], memory_budget, factory, search, mergeable_only=workers > 1)})
    fractions = {_method_of(i["key"]): i["scanned_fraction"] for i in indices}
    rows = project(fitted, have, want, workers, cores_per_worker, fractions)
    total = sum(r["seconds"] for r in rows)
    storage = sum(r["output_bytes"] for r in rows) + sum(i["cpu_bytes"] for i in indices)
    on_cpu_only = [i for i in indices if i["gpu_bytes"] is None]
    memory = sum(i["cpu_bytes"] if device == "cpu" or i["gpu_bytes"] is None else i["gpu_bytes"] for i in indices)
    cores_here = os.cpu_count() or 1
    assumptions = [
        f"measured on this machine ({cores_here} cores, {'a GPU' if _has_gpu() else 'no GPU'}) with the run's "
        "methods and parameters on two samples of the manifests; each stage is fixed seconds + seconds per unit",
        f"Beam stages (extraction, encoding, descriptor sampling; with more than one worker also the index adds, "
        f"which a cluster runner puts on workers) scale linearly to {workers} worker(s) x {cores_per_worker} cores "
        "at this machine's per-core speed; cluster start-up and data transfer are not counted",
        "on one launching machine as fast as this one: training (k-means, PCA, classifiers, fine-tuning, DELF, "
        "the detector), index training and merging, the search, vote tuning, spatial verification and the report",
        "k-means learns from at most the vocabulary's sample_size descriptors, the encoders from at most their "
        "idf/PCA image samples, the detector from at most max_images; fine-tuning and DELF do the same epochs "
        "over every image",
        "a softmax classifier costs epochs x images / batch SGD steps, each timed here at the target's classes and "
        "dimension (the rest of its stage is fixed); its scoring costs queries x classes. The search costs "
        "queries x database vectors, of which an IVF index scans nprobe/nlist at the per-vector cost of the "
        "exact search measured on the samples (an overestimate for compressed codes); the vote tuning costs per "
        "held-out image (one per class, at most 2,000): its reading and search of the database are not scaled "
        "with the database",
        "the samples' indices are exact (Flat): training an IVF index (k-means on up to max(65,536, 40 x nlist) "
        "vectors) at the projected size is not in the index stages' time",
        "compare's own work outside the stages (start-up, reading manifests, copying outputs) takes as long as on the "
        "samples (their mean)",
        "storage: features and models as written on the samples, scaled by images; indices by the layout of the "
        "factory Cairn would build at the projected size",
    ]
    if device == "gpu":
        if not _has_gpu():
            assumptions.append("--device gpu: this machine has no GPU, so the times are CPU times; only the "
                               "index memory is given for GPUs")
        if on_cpu_only:
            assumptions.append("index memory: " + ", ".join(f"{_method_of(i['key'])} ({i['factory']})"
                                                             for i in on_cpu_only) +
                               " stay in CPU memory: FAISS has no GPU version of that kind")
    return {"target": want, "workers": workers, "cores_per_worker": cores_per_worker, "device": device,
            "stages": rows, "total_seconds": total, "storage_bytes": storage, "indices": indices,
            "index_memory_bytes": memory, "assumptions": assumptions}


def _method_of(key: str) -> str:
    """The method folder of a stage key (RUN/work/METHOD/...), or the key's last part."""
    parts = key.split("/")
    return parts[2] if len(parts) > 3 and parts[1] == "work" else parts[-1]


def _has_gpu() -> bool:
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
        label = f"{r['name']} {r['split']}".strip() + f" [{_method_of(r['key'])}]"
        lines.append(f"  {label[:44]:44s} {where:8s} {r['units']:14,d} {_human_seconds(r['seconds']):>10s} "
                     f"{_human_bytes(r['output_bytes']):>10s}")
    lines += ["", f"  total time    {_human_seconds(result['total_seconds'])}",
              f"  storage       {_human_bytes(result['storage_bytes'])} (features, models, indices)",
              f"  index memory  {_human_bytes(result['index_memory_bytes'])} ({result['device'].upper()}, all indices)"]
    for i in result["indices"]:
        gpu = "CPU only" if i["gpu_bytes"] is None else _human_bytes(i["gpu_bytes"])
        lines.append(f"    {_method_of(i['key'])}: {i['vectors']:,} x {i['dim']} as {i['factory']}: CPU "
                     f"{_human_bytes(i['cpu_bytes'])}, GPU {gpu}")
    lines += ["", "assumptions:"] + [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# a plan


def parse_target(text: str, have: dict) -> dict:
    """'train=1000000,classes=13000,queries=100000' over the manifests' own sizes."""
    want = dict(have)
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in want or not value.replace("_", "").isdigit():
            raise CairnError(f"--target {item!r}: expected train=N, classes=N or queries=N")
        want[name] = int(value.replace("_", ""))
    return want


def make_plan(compare_argv: list[str], train: str, queries: str, out: str, child: list[str], sample: int = 800,
              worker_counts: tuple[int, ...] = (1,), cores_per_worker: int = 0, device: str = "cpu", target: str = "",
              reuse: bool = False, force: bool = False, memory_budget: int = 0, factory: str = "auto",
              search: str = "") -> dict:
    """Measure the run `cairn compare` ``compare_argv`` on two samples (``sample`` and a quarter of it database
    images; ``child`` runs each: :func:`measure`), fit every stage and project the manifests (or the ``target``
    sizes) on each of ``worker_counts``; writes OUT/plan.json and OUT/plan.csv and returns plan.json's content.
    ``reuse``: the samples measured in OUT/work with the same flags and manifests (unless ``force``)."""
    if sample < 20:
        raise CairnError("--sample must be at least 20 database images")
    if fs.has_scheme(out):
        raise CairnError(f"--out {out}: the plan and its sample runs are written to a local folder")
    fs.makedirs(out)
    source = {"compare_argv": compare_argv, "manifests": [manifest_fingerprint(fs.absolute(m)) for m in
                                                          (train, queries)], "model": MODEL_VERSION}
    runs = []
    for size in (max(10, sample // 4), sample):
        folder = fs.join(out, "work", f"sample-{size}")
        record_path = fs.join(folder, "measured.json")
        if reuse and not force and fs.exists(record_path) and cfg.load_json(record_path).get("source") == source:
            runs.append(cfg.load_json(record_path))
            log.info("plan: reusing the sample of %d database images measured in %s", size, folder)
            continue
        log.info("plan: measuring every stage on a sample of %d database images (its comparison: %s)", size,
                 fs.join(folder, "run"))
        runs.append({**measure(compare_argv, train, queries, size, folder, child), "source": source})
        cfg.save_json(record_path, runs[-1])
    fitted = fit(*runs)
    have = runs[1]["quantities"]
    want = parse_target(target, quantities(train, queries))
    cores = cores_per_worker or (os.cpu_count() or 1)
    budget = memory_budget or available_memory() // 2
    results = [plan(fitted, have, want, w, cores, device, budget, factory, search) for w in worker_counts]
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
    return record
