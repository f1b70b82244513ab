"""Benchmark "plan": `cairn plan`'s projection for a million images, this checkout against a baseline commit.

The same `cairn plan` command line (every method, the settings of `make bench-scale`, one worker, a target of
1,000,000 database images over 13,000 classes and 120,000 queries) runs twice in one bench run, each on its own
two sample runs of the 20k synthetic set: once with the code of a baseline commit (BASELINE, unpacked with
`git archive` into the scratch folder) and once with this checkout. Each runs in a process of its own whose
imports come from its own tree, so the two differ only in the code. The ratios say how much the code between
the two commits moved the projected hours; the samples are small (800 and 200 database images), so a stage's
projection also moves with the machine's noise, by up to a tenth between two runs of the same code.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys

from bench.common import ROOT, entry, skipped

log = logging.getLogger("bench.plan")

NAME = "plan"
TITLE = "cairn plan's one-worker projection for a million images: this checkout against a baseline commit"
DESCRIPTION = __doc__.split("\n", 2)[2].strip()

# the commit before issue 25's extraction work (decode ahead of the model, batched HoG/SIFT, Arrow tables)
BASELINE = "1ec4088"
QUICK_SAMPLE = "40"
RUN_PLAN = "import sys; from jobs import plan; plan.run(sys.argv[1:])"


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
    """`cairn plan` with the code in ``tree``, in a process of its own; returns its plan.json."""
    from bench.bench_scale import MILLION, compare_args
    from pipeline import config as cfg

    argv = [a for a in compare_args(data, out) if a != "--runner=DirectRunner"]
    argv += ["--workers", "1", "--target", MILLION, "--reuse", "--runner=DirectRunner"]
    if quick:
        argv += ["--sample", QUICK_SAMPLE]
    env = {**os.environ, "PYTHONPATH": tree}
    log.info("plan: cairn plan with the code in %s -> %s", tree, out)
    subprocess.run([sys.executable, "-c", RUN_PLAN, *argv], cwd=tree, env=env, check=True)
    return cfg.load_json(os.path.join(out, "plan.json"))


def entries_of(before: dict, after: dict, rev: str) -> list[dict]:
    """Whole run, per kind of stage and per method's extraction, before (the reference) and after."""
    from bench.bench_scale import _by_kind, _method

    t = after["plans"][0]["target"]
    group = (f"{t['train']:,} database images over {t['classes']:,} classes and {t['queries']:,} queries, 1 worker "
             "(2 cores like this machine), every method")
    old, new = before["plans"][0], after["plans"][0]
    out = [entry(group, f"whole run, baseline {rev}", round(old["total_seconds"] / 3600, 2), "h"),
           entry(group, "whole run, this checkout", round(new["total_seconds"] / 3600, 2), "h",
                 f"whole run, baseline {rev}", better="lower")]
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


def run(workdir: str, quick: bool, rev: str = BASELINE) -> list[dict]:
    """bench/run.py's entry point: the set, the baseline's tree, then both plans (their samples reused)."""
    os.makedirs(workdir, exist_ok=True)
    try:
        tree = _baseline_tree(workdir, rev)
    except RuntimeError as e:
        log.warning("plan: %s", e)
        return [skipped("cairn plan, baseline against this checkout", f"baseline {rev}", str(e))]
    data = _data(workdir, quick)
    size = "quick" if quick else "20k"
    before = _plan(tree, data, os.path.join(workdir, f"plan-{size}-{rev}"), quick)
    after = _plan(ROOT, data, os.path.join(workdir, f"plan-{size}-this"), quick)
    return entries_of(before, after, rev)


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
