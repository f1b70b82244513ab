"""Benchmark "plan": `cairn plan`'s projection for a million images, this checkout against a baseline commit.

The same `cairn plan` command line (every method, the settings of `make bench-scale`, one worker, a target of
1,000,000 database images over 13,000 classes and 120,000 queries) runs four times in one bench run, each on
two fresh sample runs of the 20k synthetic set (800 and 200 database images): with the code of a baseline
commit (BASELINE, unpacked with `git archive` into the scratch folder), this checkout, this checkout again and
the baseline again. Each runs in a process of its own whose imports come from its own tree, so they differ only
in the code, and the order cancels a steady drift of the machine's speed, which on this machine moves by 10-20%
over minutes. A tree's figure is the mean of its two plans; each plan's own total is kept beside it, so the
spread between two plans of the same code shows how far a difference can be noise: a stage is fitted from two
samples, and a Beam job's per-image cost is the difference between two short jobs.

Then, on the last plan's larger sample, its extraction jobs run again with either tree's code, alternating
which goes first, on the same images with the same models and settings (2 worker processes x 1 thread, as the
plan's samples ran them): the direct before/after of the extraction code, without the plan's fitting.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time

from bench.common import ROOT, entry, skipped

log = logging.getLogger("bench.plan")

NAME = "plan"
TITLE = "cairn plan's one-worker projection for a million images: this checkout against a baseline commit"
DESCRIPTION = __doc__.split("\n", 2)[2].strip()

# the commit before issue 25's extraction work (decode ahead of the model, batched HoG/SIFT, Arrow tables)
BASELINE = "1ec4088"
QUICK_SAMPLE = "40"
ORDER = ("baseline", "this", "this", "baseline")
AB_REPEATS = 2
RUN_PLAN = "import sys; from jobs import plan; plan.run(sys.argv[1:])"
RUN_CAIRN = "import sys; from jobs.cli import entry; sys.argv[0] = 'cairn'; sys.exit(entry())"


def _data(workdir: str, quick: bool) -> str:
    """The 20k synthetic set (bench-scale's when it is there), or the quick one; returns its folder."""
    from bench.bench_scale import QUICK_SETS, SETS

    name, sizes = ("quick", QUICK_SETS["quick"]) if quick else ("20k", SETS["20k"])
    for folder in (os.path.join(os.path.dirname(workdir), "scale", name, "data"), os.path.join(workdir, f"data-{name}")):
        if os.path.exists(os.path.join(folder, "train.csv")):
            log.info("plan: using the synthetic set in %s", folder)
            return folder
    from jobs import synth

    synth.run([folder, *sizes, "--no-progress"])
    return folder


def _baseline_tree(workdir: str, rev: str) -> str:
    """The baseline commit's files in WORKDIR/baseline-REV (unpacked once); raises RuntimeError without git."""
    dest = os.path.join(workdir, f"baseline-{rev}")
    if os.path.exists(os.path.join(dest, "jobs", "plan.py")):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    try:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip() or str(e)
        raise RuntimeError(f"cannot unpack commit {rev} with git archive ({detail}); the baseline needs a git "
                           "checkout that has it") from e
    return dest


def _plan(tree: str, data: str, out: str, quick: bool) -> dict:
    """`cairn plan` with the code in ``tree``, in a process of its own, on fresh samples; returns its plan.json."""
    from bench.bench_scale import MILLION, compare_args
    from pipeline import config as cfg

    argv = [a for a in compare_args(data, out) if a != "--runner=DirectRunner"]
    argv += ["--workers", "1", "--target", MILLION, "--force", "--runner=DirectRunner"]
    if quick:
        argv += ["--sample", QUICK_SAMPLE]
    env = {**os.environ, "PYTHONPATH": tree}
    log.info("plan: cairn plan with the code in %s -> %s", tree, out)
    subprocess.run([sys.executable, "-c", RUN_PLAN, *argv], cwd=tree, env=env, check=True)
    return cfg.load_json(os.path.join(out, "plan.json"))


def _mean(plans: list[dict]) -> dict:
    """One plan whose stage seconds and total are the means of ``plans`` (the same command line and code, so the
    same stages; a stage missing from one counts 0 there)."""
    first = plans[0]["plans"][0]
    seconds: dict[tuple, float] = {}
    for p in plans:
        for r in p["plans"][0]["stages"]:
            seconds[(r["key"], r["split"])] = seconds.get((r["key"], r["split"]), 0.0) + r["seconds"] / len(plans)
    stages = [{**r, "seconds": seconds[(r["key"], r["split"])]} for r in first["stages"]]
    return {**first, "stages": stages,
            "total_seconds": sum(p["plans"][0]["total_seconds"] for p in plans) / len(plans)}


def entries_of(before: list[dict], after: list[dict], rev: str) -> list[dict]:
    """Whole run, per kind of stage and per method's extraction: the mean of the baseline's plans (the reference)
    and of this checkout's, with each plan's own total beside them."""
    from bench.bench_scale import _by_kind, _method

    t = after[0]["plans"][0]["target"]
    group = (f"{t['train']:,} database images over {t['classes']:,} classes and {t['queries']:,} queries, 1 worker "
             "(2 cores like this machine), every method; mean of two plans each")
    old, new = _mean(before), _mean(after)

    def each(plans: list[dict]) -> list[float]:
        return [round(p["plans"][0]["total_seconds"] / 3600, 2) for p in plans]

    out = [entry(group, f"whole run, baseline {rev}", round(old["total_seconds"] / 3600, 2), "h",
                 note="plans: " + ", ".join(f"{h} h" for h in each(before)), plans_hours=each(before)),
           entry(group, "whole run, this checkout", round(new["total_seconds"] / 3600, 2), "h",
                 f"whole run, baseline {rev}", better="lower",
                 note="plans: " + ", ".join(f"{h} h" for h in each(after)), plans_hours=each(after))]
    old_kinds, new_kinds = _by_kind(old["stages"]), _by_kind(new["stages"])
    for kind in old_kinds:
        if old_kinds[kind] >= 360 or new_kinds[kind] >= 360:
            out.append(entry(group, f"{kind}, baseline {rev}", round(old_kinds[kind] / 3600, 2), "h"))
            out.append(entry(group, f"{kind}, this checkout", round(new_kinds[kind] / 3600, 2), "h",
                             f"{kind}, baseline {rev}", better="lower"))

    def extraction(plan: dict) -> dict:
        hours: dict[str, float] = {}
        for r in plan["stages"]:
            if r["kind"] == "extract":
                hours[_method(r)] = hours.get(_method(r), 0.0) + r["seconds"] / 3600
        return hours

    old_x, new_x = extraction(old), extraction(new)
    mgroup = f"{group}: extraction per method (database and queries)"
    for method in sorted(set(old_x) | set(new_x)):
        if method in old_x:
            out.append(entry(mgroup, f"{method}, baseline {rev}", round(old_x[method], 2), "h"))
        if method in new_x:
            out.append(entry(mgroup, f"{method}, this checkout", round(new_x[method], 2), "h",
                             f"{method}, baseline {rev}" if method in old_x else None, better="lower"))
    return out


# -----------------------------------------------------------------------------------------------------------
# the extraction jobs of a plan's sample, with either tree's code


def extraction_jobs(run_dir: str, manifest: str) -> list[dict]:
    """The database extractions a sample's comparison ran (RUN/work/...) from ``manifest``, without a detector:
    {"folder" (the method folder under work), "method", "images", "manifest", "argv" (the `cairn extract` flags
    that repeat its config)}. One per distinct config."""
    jobs, seen = [], set()
    for record_path in sorted(glob.glob(os.path.join(run_dir, "work", "**", "train.cairn", "extract.json"),
                                        recursive=True)):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        config = record["config"]
        if config.get("detect") or record.get("regional"):
            continue
        key = json.dumps(config["extractor"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        params = []
        for field, value in sorted(config["extractor"]["config"].items()):
            text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
            params += ["--param", f"{field}={text}"]
        decode = config["decode"]
        folder = os.path.relpath(os.path.dirname(os.path.dirname(record_path)), os.path.join(run_dir, "work"))
        jobs.append({"folder": folder, "method": config["extractor"]["method"], "images": record["counts"]["inputs"],
                     "manifest": manifest,
                     "argv": ["--method", config["extractor"]["method"], *params,
                              "--max-side", str(decode["max_side"]), "--min-side", str(decode["min_side"]),
                              "--max-pixels", str(decode["max_pixels"]),
                              "--workers", str(record["workers"]),
                              "--threads-per-worker", str(record["threads_per_worker"])]})
    return jobs


def _extract(tree: str, job: dict, out: str) -> tuple[float, float]:
    """One `cairn extract` of ``job`` with the code in ``tree``, in a process of its own: (its wall seconds, the
    job's own seconds as its record says: from pipeline construction to the record, without the imports)."""
    env = {**os.environ, "PYTHONPATH": tree}
    argv = [sys.executable, "-c", RUN_CAIRN, "extract", "--manifest", job["manifest"], "--out", out, *job["argv"],
            "--force"]
    started = time.perf_counter()
    subprocess.run(argv, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    with open(os.path.join(f"{out}.cairn", "extract.json"), encoding="utf-8") as f:
        return wall, float(json.load(f)["seconds"])


def ab_entries(trees: dict, run_dir: str, workdir: str, rev: str, repeats: int = AB_REPEATS) -> list[dict]:
    """Each extraction job of the sample in ``run_dir`` with both trees' code, ``repeats`` times, the tree that
    goes first alternating; per job the best wall time of each (the process's start-up, imports and model load
    included)."""
    out = []
    for job in extraction_jobs(run_dir, os.path.join(os.path.dirname(run_dir), "manifests", "train.csv")):
        times: dict[str, list[float]] = {"baseline": [], "this": []}
        inside: dict[str, list[float]] = {"baseline": [], "this": []}
        for i in range(repeats):
            for name in (("baseline", "this") if i % 2 == 0 else ("this", "baseline")):
                dest = os.path.join(workdir, "ab", job["folder"].replace(os.sep, "-"), name)
                wall, job_seconds = _extract(trees[name], job, dest)
                times[name].append(round(wall, 2))
                inside[name].append(round(job_seconds, 2))
                log.info("plan: extraction %s with %s's code: %.1f s", job["folder"], name, wall)
        workers, threads = (job["argv"][job["argv"].index(flag) + 1] for flag in ("--workers", "--threads-per-worker"))
        group = (f"the extraction jobs of the plan's larger sample ({job['images']:,} database images, {workers} "
                 f"worker process(es) x {threads} thread(s)), the baseline's code and this checkout's in turn")
        label = f"{job['folder']} ({job['method']})"
        out.append(entry(group, f"{label}, baseline {rev}", min(times["baseline"]), "s", better="lower",
                         repeats=repeats, times=times["baseline"], job_seconds=inside["baseline"]))
        out.append(entry(group, f"{label}, this checkout", min(times["this"]), "s", f"{label}, baseline {rev}",
                         better="lower", repeats=repeats, times=times["this"], job_seconds=inside["this"]))
    return out


def run(workdir: str, quick: bool, rev: str = BASELINE) -> list[dict]:
    """bench/run.py's entry point: the set, the baseline's tree, the four plans, then the extraction A/B."""
    os.makedirs(workdir, exist_ok=True)
    try:
        trees = {"baseline": _baseline_tree(workdir, rev), "this": ROOT}
    except RuntimeError as e:
        log.warning("plan: %s", e)
        return [skipped("cairn plan, baseline against this checkout", f"baseline {rev}", str(e))]
    data = _data(workdir, quick)
    size = "quick" if quick else "20k"
    plans: dict[str, list[dict]] = {"baseline": [], "this": []}
    last = ""
    for name in ORDER:
        last = os.path.join(workdir, f"plan-{size}-{rev if name == 'baseline' else 'this'}-{len(plans[name]) + 1}")
        plans[name].append(_plan(trees[name], data, last, quick))
    sample = max(int(d.rsplit("-", 1)[1]) for d in glob.glob(os.path.join(last, "work", "sample-*")))
    run_dir = os.path.join(last, "work", f"sample-{sample}", "run")
    return entries_of(plans["baseline"], plans["this"], rev) + ab_entries(trees, run_dir, workdir, rev,
                                                                          1 if quick else AB_REPEATS)


def main(argv=None) -> int:
    """Against another baseline by hand: python -m bench.bench_plan --baseline REV (results are only logged)."""
    p = argparse.ArgumentParser(prog="python -m bench.bench_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE, help=f"the commit to compare with (default {BASELINE})")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", NAME))
    p.add_argument("--quick", action="store_true", help="the quick synthetic set and samples of 40 images")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for e in run(args.out, args.quick, args.baseline):
        log.info("%s | %s: %s %s", e["group"], e["name"], e.get("value"), e.get("unit"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
