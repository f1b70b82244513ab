"""`make bench-scale`: synthetic corpora of 3,200 and 20,000 images through every method, stage by stage, and
what `cairn plan` projected for them from its own samples.

For each set (the data and the measured run are reused when they are there; delete OUT/SET/scale-run.json to
measure again):
1. ``cairn synth``: "3k" is 2,600 database images over 100 classes (100 of them without a landmark) and 600
   queries (half without one); "20k" is 16,800 database images over 800 classes (800 without a landmark) and
   3,200 queries (half without one).
2. ``measure``: `cairn compare` over every method with the settings below (DirectRunner, the automatic
   worker processes), its stages recorded (pipeline/run/ledger.py): seconds, images/s per core, peak memory,
   bytes written. Written to OUT/SET/scale-run.json.
3. ``plan``: `cairn plan` on the same manifests and flags, measured on its own samples of 800 and 200
   database images, projecting the set's run on this machine (1 worker); for "20k" also a million images
   over 13,000 classes and 120,000 queries on 1, 10 and 100 workers.
4. BENCHMARKS.md's section "scale" from them (bench/run.py writes the page).

The deep methods use small inputs and one epoch (SETTINGS) so that the runs take about an hour and a half on
two cores (and each cairn plan's two sample runs about 10 minutes more); the figures say per-stage throughput
with those settings, not with the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time

from bench.common import ROOT

log = logging.getLogger("bench.scale")

NAME = "scale"
TITLE = "Scale: 3,200 and 20,000 synthetic images through every method, and cairn plan's projections"
DESCRIPTION = __doc__.split("\n", 2)[2].strip()

PRETRAINED = os.path.join(os.path.dirname(ROOT), "shared", "weights",
                          "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")
SYNTH = ["--classes", "800", "--views", "20", "--tail", "0", "--queries-per-class", "2",
         "--non-landmark-queries", "1600", "--non-landmark-train", "800"]
SETS = {"3k": ["--classes", "100", "--views", "25", "--tail", "0", "--non-landmark-queries", "300",
               "--non-landmark-train", "100"],
        "20k": SYNTH}
QUICK_SETS = {"quick": ["--classes", "12", "--views", "6"]}
SETTINGS = ["cnn.finetune.input_size=96", "cnn.finetune.epochs=1", "cnn.finetune.head_epochs=1",
            "delf.train.input_size=96", "delf.train.epochs=1", "delf.train.attention_epochs=1", "delf.max_side=160",
            "delf.max_features=200", "detect.train.input_size=96", "detect.train.epochs=1"]


def compare_args(data: str, out: str, pretrained: str = PRETRAINED) -> list[str]:
    """The `cairn compare` arguments of the measured run (and of its `cairn plan`)."""
    deep = ["cnn.finetune.backbone.name=mobilenet", "delf.train.backbone.name=mobilenet",
            "detect.train.backbone.name=mobilenet"]
    if os.path.isfile(pretrained):
        p = os.path.abspath(pretrained)
        deep += [f"cnn.finetune.backbone.weights={p}", f"cnn_pretrained.model={p}",
                 f"delf.train.backbone.weights={p}", f"detect.train.backbone.weights={p}"]
    else:
        deep += ["cnn.finetune.backbone.weights=none", "delf.train.backbone.weights=none",
                 "detect.train.backbone.weights=none"]
    sets = [a for s in deep + SETTINGS for a in ("--set", s)]
    return ["--train", os.path.join(data, "train.csv"), "--queries", os.path.join(data, "queries.csv"),
            "--boxes", os.path.join(data, "boxes.csv"), "--out", out, *sets, "--runner=DirectRunner"]


def measure(data: str, out: str) -> dict:
    """Run the comparison with its stages recorded; returns (and writes OUT/scale-run.json) the record."""
    from jobs import compare
    from pipeline.run import ledger as stages
    from pipeline.run.plan import quantities

    argv = compare_args(data, os.path.join(out, "run"))
    shutil.rmtree(os.path.join(out, "run"), ignore_errors=True)  # from scratch, sharing what compare shares
    started = time.perf_counter()
    with stages.recording() as ledger:
        compare.run(argv)
    seconds = time.perf_counter() - started
    work = os.path.join(out, "run")
    for r in ledger:
        r["key"] = r["key"].replace(work, "RUN")
    record = {"argv": argv, "seconds": round(seconds, 1), "stages": ledger,
              "quantities": quantities(os.path.join(data, "train.csv"), os.path.join(data, "queries.csv")),
              "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "worker_peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
              "cpu_count": os.cpu_count()}
    with open(os.path.join(out, "scale-run.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return record


def plan(data: str, out: str, target: str = "", workers: str = "1") -> dict:
    """`cairn plan` for the measured run's command line (its samples reused when already measured)."""
    from jobs import plan as planner

    argv = [a for a in compare_args(data, os.path.join(out, "plan")) if a != "--runner=DirectRunner"]
    argv += ["--workers", workers, "--reuse", "--runner=DirectRunner"] + (["--target", target] if target else [])
    return planner.run(argv)


KINDS = ("extract", "train", "encode", "index", "search", "classify", "tune", "verify", "recognize", "report",
         "other")


def _by_kind(rows: list[dict], key: str = "seconds") -> dict:
    """Seconds per kind of stage; the descriptor sampling counts as training (it is part of a vocabulary's)."""
    totals = dict.fromkeys(KINDS, 0.0)
    for r in rows:
        kind = "train" if r["kind"] == "sample" else r["kind"]
        totals[kind if kind in totals else "other"] += float(r.get(key, 0.0))
    return totals


def entries_of(runs: dict, million: dict | None) -> list[dict]:
    """The BENCHMARKS.md figures: ``runs`` {set: (measured run, its plan)}, ``million`` the 1M plan."""
    from bench.common import entry

    out = []
    largest = max(runs, key=lambda k: runs[k][0]["quantities"]["train"])
    for name, (measured, projected) in runs.items():
        out += _measured_entries(measured, detailed=name == largest)
        out += _projection_entries(measured, projected)
    if million is None:
        return out
    t = million["plans"][0]["target"]
    mgroup = (f"cairn plan's projection for {t['train']:,} database images over {t['classes']:,} classes and "
              f"{t['queries']:,} queries (the same methods and settings; 2-core workers like this machine; fitted "
              f"on the {largest} set's samples)")
    first = None
    for res in million["plans"]:
        name = f"{res['workers']} worker{'s' if res['workers'] > 1 else ''}: whole run"
        first = first or name
        out.append(entry(mgroup, name, round(res["total_seconds"] / 3600, 2), "h",
                         None if name == first else first, better="lower",
                         note="; ".join(f"{k} {v / 3600:.1f} h" for k, v in _by_kind(res["stages"]).items()
                                        if v > 360)))
    for res in million["plans"]:
        cpu = sum(i["cpu_bytes"] for i in res["indices"])
        gpu = sum(i["gpu_bytes"] or 0 for i in res["indices"])
        label = f"{res['workers']} worker{'s' if res['workers'] > 1 else ''}"
        out.append(entry(mgroup, f"{label}: storage (features, models, indices)", res["storage_bytes"], "bytes"))
        out.append(entry(mgroup, f"{label}: index memory, CPU (all indices)", cpu, "bytes",
                         note="; ".join(f"{_method({'key': i['key']})}: {i['factory']}" for i in res["indices"])))
        out.append(entry(mgroup, f"{label}: index memory, GPU (indices FAISS can hold there)", gpu, "bytes",
                         note="; ".join(f"{_method({'key': i['key']})} stays on the CPU" for i in res["indices"]
                                        if i["gpu_bytes"] is None)))
    return out


def _measured_entries(measured: dict, detailed: bool) -> list[dict]:
    from bench.common import entry

    q = measured["quantities"]
    cores = measured["cpu_count"]
    group = (f"Measured: {q['train'] + q['queries']:,} synthetic images ({q['train']:,} database over {q['classes']} "
             f"classes, {q['queries']:,} queries), every method, DirectRunner on this machine ({cores} cores)")
    out = []
    stage_rows = measured["stages"]
    if detailed:
        reference = None
        for r in stage_rows:
            if r["kind"] not in ("extract", "encode", "train", "sample", "index"):
                continue
            if r["name"].startswith("k-means"):
                count, unit = r.get("units") or 0, "descriptors/s/core"
            elif r["kind"] == "index":
                count, unit = r.get("vectors") or r.get("units") or 0, "vectors/s/core"
            else:
                count, unit = r.get("images") or r.get("units") or 0, "images/s/core"
            per_core = count / r["seconds"] / max(1, r.get("cores", cores)) if r["seconds"] else None
            name = f"{r['name']} {r.get('split', '')} [{_method(r)}]".replace("  ", " ")
            if reference is None and r["kind"] == "extract":
                reference = name  # the first extraction (hog's): the others' ratios say how much slower
            memory = [f"peak {r['peak_bytes'] / 1e6:,.0f} MB"] if r.get("peak_bytes") else []
            if r.get("worker_peak_bytes"):
                memory.append(f"largest worker process so far {r['worker_peak_bytes'] / 1e6:,.0f} MB")
            note = "; ".join([f"{r['seconds']:.1f} s on {r.get('cores', cores)} cores "
                              f"({'Beam workers' if r['parallel'] else 'launcher'})", *memory,
                              f"wrote {r.get('output_bytes', 0) / 1e6:,.1f} MB"])
            out.append(entry(group, name, per_core, unit, reference if unit == "images/s/core" and name != reference
                             else None,
                             note=note, seconds=r["seconds"], peak_bytes=r.get("peak_bytes"),
                             output_bytes=r.get("output_bytes"), units=r.get("units")))
    for kind, seconds in _by_kind(stage_rows).items():
        if seconds:
            out.append(entry(group, f"all {kind} stages", round(seconds, 1), "s", better="lower"))
    out.append(entry(group, "whole run", measured["seconds"], "s", better="lower",
                     note=f"peak memory: launcher {measured['peak_bytes'] / 1e9:.2f} GB, largest worker process "
                          f"{measured['worker_peak_bytes'] / 1e9:.2f} GB"))
    out.append(entry(group, "bytes written (features, models, indices)",
                     sum(r.get("output_bytes", 0) for r in stage_rows), "bytes"))
    return out


def _projection_entries(measured: dict, projected: dict) -> list[dict]:
    from bench.common import entry

    q = measured["quantities"]
    samples = [r["quantities"]["train"] for r in projected["sample_runs"]]
    pgroup = (f"cairn plan's projection of the {q['train'] + q['queries']:,}-image run on this machine (1 worker), "
              f"from samples of {' and '.join(f'{n:,}' for n in samples)} database images; ratio = projected / "
              "measured")
    out = []
    mine = projected["plans"][0]
    error = 100 * (mine["total_seconds"] / measured["seconds"] - 1)
    out.append(entry(pgroup, "measured whole run", measured["seconds"], "s", better=""))
    out.append(entry(pgroup, "projected whole run", round(mine["total_seconds"], 1), "s", "measured whole run",
                     better="", note=f"error {error:+.1f}%", error_percent=round(error, 1)))
    measured_kinds, projected_kinds = _by_kind(measured["stages"]), _by_kind(mine["stages"])
    for kind, seconds in measured_kinds.items():
        if seconds >= 1:
            out.append(entry(pgroup, f"measured {kind}", round(seconds, 1), "s", better=""))
            out.append(entry(pgroup, f"projected {kind}", round(projected_kinds[kind], 1), "s", f"measured {kind}",
                             better=""))
    out.append(entry(pgroup, "measured storage", sum(r.get("output_bytes", 0) for r in measured["stages"]), "bytes",
                     better=""))
    out.append(entry(pgroup, "projected storage", mine["storage_bytes"], "bytes", "measured storage", better=""))
    return out


def _method(record: dict) -> str:
    from pipeline.run.plan import _method_of

    return _method_of(record["key"])


def run(workdir: str, quick: bool) -> list[dict]:
    """bench/run.py's entry point: per set, synth and measure (both reused when there), then plan."""
    runs, million = {}, None
    for name, sizes in (QUICK_SETS if quick else SETS).items():
        folder = os.path.join(workdir, name)
        data = os.path.join(folder, "data")
        if not os.path.exists(os.path.join(data, "train.csv")):
            from jobs import synth

            synth.run([data, *sizes, "--no-progress"])
        record_path = os.path.join(folder, "scale-run.json")
        if os.path.exists(record_path):
            with open(record_path, encoding="utf-8") as f:
                measured = json.load(f)
            log.info("scale: reusing the measured run in %s (delete it to measure again)", record_path)
        else:
            measured = measure(data, folder)
        runs[name] = (measured, plan(data, folder))
        if name == "20k" or quick:
            million = plan(data, folder, target=MILLION, workers="1,10,100")
    return entries_of(runs, million)


MILLION = "train=1000000,classes=13000,queries=120000"


def main(argv=None) -> int:
    """One step of one set by hand (bench/run.py --only scale runs them all)."""
    p = argparse.ArgumentParser(prog="python -m bench.bench_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["synth", "measure", "plan"])
    p.add_argument("--set", dest="name", choices=sorted(SETS), default="20k")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "scale"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = os.path.join(args.out, args.name)
    data = os.path.join(folder, "data")
    if args.step == "synth":
        from jobs import synth

        synth.run([data, *SETS[args.name], "--no-progress"])
    elif args.step == "measure":
        measure(data, folder)
    else:
        plan(data, folder)
        if args.name == "20k":
            plan(data, folder, target=MILLION, workers="1,10,100")
    return 0


if __name__ == "__main__":
    sys.exit(main())
