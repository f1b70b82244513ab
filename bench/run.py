"""Run Cairn's benchmarks and write their figures: ``make bench`` (``python -m bench.run``).

A full run writes bench/results.json (every figure, all timings, the machine) and BENCHMARKS.md at the
project root. ``--quick`` (smaller sizes, a smoke test) writes the same two files into the scratch folder
instead, so that a smoke run never replaces the published figures. ``--only NAME`` runs one benchmark and
keeps the other sections of the existing results. Nothing here uses the network, and no test asserts a time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
import time

from bench.common import ROOT, load_average, machine_info, now

log = logging.getLogger("bench")

# benchmark name -> module (each has NAME, TITLE, DESCRIPTION and run(workdir, quick) -> list[dict])
BENCHMARKS = {
    "extract": "bench.bench_extract",
    "faiss_flat": "bench.bench_faiss",
    "vocabulary": "bench.bench_vocabulary",
    "classifier": "bench.bench_classifier",
    "index": "bench.bench_index",
    "recognize_1m": "bench.bench_recognize",
    "embed": "bench.bench_embed",
    "delf": "bench.bench_delf",
    "detect": "bench.bench_detect",
    "porto": "bench.bench_porto",
    "open_set": "bench.bench_open_set",
    "scale": "bench.bench_scale",
    "plan": "bench.bench_plan",
}
# run only when named: scale (`make bench-scale`) about two hours, plan (`make bench-plan`) about an hour
ON_DEMAND = ("scale", "plan")
COMMAND = "make bench"
QUICK_COMMAND = ".venv/bin/python -m bench.run --quick"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test, about a minute); "
                   "results go to OUT/results.json and OUT/BENCHMARKS.md")
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                   help="run only this benchmark (repeatable); other sections of the results are kept")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out"),
                   help="scratch folder for generated data and job outputs (default: bench/out, git-ignored)")
    return p.parse_args(argv)


def add_ratios(entries: list[dict]) -> None:
    """ratio = value / reference value, for entries whose reference (same group) is a number in the same unit."""
    by_name = {(e["group"], e["name"]): e for e in entries if "skipped" not in e}
    for e in entries:
        ref = by_name.get((e["group"], e.get("reference")))
        e["ratio"] = None
        if ref is None or e["unit"] != ref["unit"]:
            continue
        v, r = e["value"], ref["value"]
        if isinstance(v, int | float) and isinstance(r, int | float) and r and math.isfinite(v):
            e["ratio"] = v / r
        ref["is_reference"] = True


def run_benchmark(name: str, out: str, quick: bool) -> dict:
    module = importlib.import_module(BENCHMARKS[name])
    workdir = os.path.join(out, name)
    log.info("bench: %s (%s) in %s", name, "quick" if quick else "full", workdir)
    started = time.perf_counter()
    section = {"name": name, "title": module.TITLE, "description": module.DESCRIPTION, "quick": quick,
               "measured_at": now(), "load_average_before": load_average()}
    try:
        entries = module.run(workdir, quick)
    except Exception as e:  # noqa: BLE001 - one failing benchmark must not lose the others' figures
        log.exception("bench: %s failed", name)
        section.update(entries=[], error=f"{type(e).__name__}: {e}")
    else:
        add_ratios(entries)
        section["entries"] = entries
    section["seconds"] = round(time.perf_counter() - started, 1)
    section["load_average_after"] = load_average()
    log.info("bench: %s done in %.1f s", name, section["seconds"])
    return section


# ----------------------------------------------------------------------------------------------------------
# BENCHMARKS.md


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def fmt_ratio(e: dict) -> str:
    if e.get("ratio") is not None:
        return f"{e['ratio']:.3f}x"
    if e.get("is_reference"):
        return "reference"
    if e.get("reference"):
        return f"vs {e['reference']}" if not isinstance(e["value"], int | float) else "n/a"
    return ""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_section(section: dict) -> list[str]:
    lines = [f"## {section['name']}: {section['title']}", ""]
    mode = "quick (smoke-test sizes)" if section.get("quick") else "full"
    load = section.get("load_average_before")
    load = f" (1/5/15-min load average at its start, earlier sections of the run included: " \
        f"{' / '.join(map(str, load))})" if load else ""
    lines += [f"Measured {section.get('measured_at', '?')}, {mode}, in {section.get('seconds', '?')} s{load}.", ""]
    lines += [section["description"], ""]
    if section.get("error"):
        lines += [f"**Failed:** `{_cell(section['error'])}` (see the log of the run).", ""]
    groups: dict[str, list[dict]] = {}
    for e in section.get("entries", []):
        groups.setdefault(e["group"], []).append(e)
    for group, entries in groups.items():
        lines += [f"### {group}", ""]
        measured = [e for e in entries if "skipped" not in e]
        if measured:
            lines += ["| Figure | Value | Unit | Ratio (value / reference) | Best of | Note |",
                      "|---|---:|---|---:|---:|---|"]
            for e in measured:
                better = {"higher": "higher is better", "lower": "lower is better"}.get(e.get("better"), "")
                note = "; ".join(x for x in (e.get("note", ""), better if e.get("ratio") is not None else "") if x)
                lines.append(f"| {_cell(e['name'])} | {fmt(e['value'])} | {e['unit']} | {fmt_ratio(e)} | "
                             f"{e.get('repeats') or ''} | {_cell(note)} |")
            lines.append("")
        for e in entries:
            if "skipped" in e:
                lines += [f"*Skipped: {_cell(e['name'])}: {_cell(e['skipped'])}.*", ""]
    return lines


def render(results: dict) -> str:
    m = results["machine"]
    v = m["versions"]
    git = m.get("git") or {}
    commit = f"`{git['commit']}`{' (with uncommitted changes)' if git.get('dirty') else ''}" \
        if git.get("commit") else "unknown"
    lines = [
        "# Benchmarks",
        "",
        "Performance is measured, not asserted: every figure below is compared with a reference measured in the "
        "same run on the same machine (the raw library call or a bare loop). No test checks these numbers; "
        "they describe one machine and move with it.",
        "",
        f"Reproduce with `{COMMAND}` (about 15 minutes on 2 cores; figures also in `bench/results.json`). "
        f"Smoke test: `{QUICK_COMMAND}` (smaller sizes; writes into `bench/out/`). One benchmark: "
        "`.venv/bin/python -m bench.run --only NAME`.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {_cell(m['cpu'])} |",
        f"| Cores | {m['cores']} logical ({m['cores_usable']} usable by this process) |",
        f"| RAM | {fmt(m['ram_gib'])} GiB |",
        f"| OS | {_cell(m['os'])} |",
        f"| Python | {m['python']} |",
        f"| numpy / faiss / opencv | {v['numpy']} / {v['faiss']} / {v['opencv']} |",
        f"| apache-beam / pyarrow / pillow | {v['apache-beam']} / {v['pyarrow']} / {v['pillow']} |",
        f"| Date | {m['date']} |",
        f"| Project commit | {commit} |",
        f"| Command | `{results.get('command', COMMAND)}` |",
        "",
    ]
    for section in results["benchmarks"].values():
        lines += render_section(section)
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "jobs"):  # every job logs its start and counts; the bench logs the figures
        logging.getLogger(noisy).setLevel(logging.WARNING)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.quick:
        results_path, page_path = os.path.join(out, "results.json"), os.path.join(out, "BENCHMARKS.md")
    else:
        results_path, page_path = os.path.join(ROOT, "bench", "results.json"), os.path.join(ROOT, "BENCHMARKS.md")
    names = args.only or [n for n in BENCHMARKS if n not in ON_DEMAND]

    previous: dict = {}
    if args.only and os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as f:
            previous = json.load(f).get("benchmarks", {})
        log.info("bench: keeping %s from %s", ", ".join(sorted(set(previous) - set(names))) or "nothing",
                 results_path)

    started = time.perf_counter()
    machine = machine_info()
    sections = {name: run_benchmark(name, out, args.quick) for name in names}
    benchmarks = {name: sections.get(name) or previous[name] for name in BENCHMARKS
                  if name in sections or name in previous}
    command = QUICK_COMMAND if args.quick else COMMAND
    if args.only:
        command += "".join(f" --only {n}" for n in names) if args.quick else \
            "; this run: .venv/bin/python -m bench.run" + "".join(f" --only {n}" for n in names)
    results = {"machine": machine, "command": command, "quick": args.quick,
               "seconds": round(time.perf_counter() - started, 1), "benchmarks": benchmarks}

    os.makedirs(os.path.dirname(results_path), exist_ok=True)
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=_json_default)
        f.write("\n")
    with open(page_path, "w", encoding="utf-8") as f:
        f.write(render(results))
    log.info("bench: wrote %s and %s in %.1f s", results_path, page_path, results["seconds"])
    failed = [n for n, s in sections.items() if s.get("error")]
    if failed:
        log.error("bench: failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
