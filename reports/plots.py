"""The report's plots, drawn with matplotlib (Agg, no display) and returned as PNG bytes to inline in the HTML.

Every method has its own colour and marker, the same in every plot and every run (:func:`styles`): baseline
methods in cool colours with dashed lines, deep ones in warm colours with solid lines, so that the family reads
at a glance too.
"""

from __future__ import annotations

import io

import numpy as np

# 8 cool and 8 warm colours, each with a marker of its own: 16 methods without two alike
BASELINE_STYLES = (("#1f77b4", "o"), ("#2ca02c", "^"), ("#17becf", "v"), ("#9467bd", "D"), ("#7f7f7f", "<"),
                   ("#bcbd22", ">"), ("#08306b", "p"), ("#00441b", "h"))
DEEP_STYLES = (("#d62728", "s"), ("#ff7f0e", "P"), ("#e377c2", "X"), ("#8c564b", "*"), ("#ff1493", "d"),
               ("#b8860b", "H"), ("#7f0000", "8"), ("#f4a582", "p"))
# the built methods' places, so that a method keeps its style whichever others a run compares
KNOWN = {"baseline": ("hog", "hog-linear", "sift-bovw", "sift-bovw+sv", "sift-vlad", "sift-vlad-linear"),
         "deep": ("cnn", "cnn-untrained", "cnn-pretrained", "cnn+delf", "delf+sv", "cnn+det", "cnn-pretrained+det")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def styles(families: dict[str, str]) -> dict[str, tuple[str, str]]:
    """method -> (colour, marker): a built method's own (:data:`KNOWN`), the others the free ones of their
    family's palette in name order; all distinct for up to 8 methods per family (beyond, the palette repeats)."""
    out = {}
    for kind, palette in (("baseline", BASELINE_STYLES), ("deep", DEEP_STYLES)):
        names = [n for n, f in families.items() if (f == "deep") == (kind == "deep")]
        taken = {KNOWN[kind].index(n) for n in names if n in KNOWN[kind]}
        free = [i for i in range(len(palette)) if i not in taken]
        others = sorted(n for n in names if n not in KNOWN[kind])
        for k, name in enumerate(others):
            out[name] = palette[free[k] if k < len(free) else k % len(palette)]
        for name in names:
            if name in KNOWN[kind]:
                out[name] = palette[KNOWN[kind].index(name)]
    return {name: out[name] for name in families}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def quality_vs_cost(points: dict[str, dict], families: dict[str, str]) -> bytes:
    """Two scatter plots side by side: GAP vs images/s (extraction) and GAP vs bytes/image (log x axes).

    points: method -> {"gap", "images_per_second", "bytes_per_image"} (a missing cost or an undefined GAP, None,
    leaves the point out)."""
    plt = _pyplot()
    style = styles(families)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = {}  # axis -> [(x, GAP, method)] of the points drawn on it
    for ax, key, label, better in ((axes[0], "images_per_second", "extraction speed (images/s, log scale)", "right"),
                                   (axes[1], "bytes_per_image", "bytes per database image (log scale)", "left")):
        shown[ax] = [(p[key], p["gap"], name) for name, p in points.items()
                     if p.get(key) and p[key] > 0 and p.get("gap") is not None]
        for x, gap, name in shown[ax]:
            colour, marker = style[name]
            ax.scatter([x], [gap], s=70, c=colour, marker=marker, edgecolors="black", linewidths=0.5,
                       label=name, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("GAP")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"GAP vs {'speed' if key == 'images_per_second' else 'storage'} (better: up and {better})",
                     fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # beside the plots, one method per line: below them it covered the axes' labels
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    for ax, drawn in shown.items():
        _label_points(fig, ax, drawn)
    return _png(fig)


# where a point's name may go, in points from the marker: right, left, above, below, then further out
LABEL_OFFSETS = ((7, 3), (7, -11), (-7, 3), (-7, -11), (0, 9), (0, -17), (12, 12), (12, -20), (-12, 12),
                 (-12, -20), (18, -4), (-18, -4), (7, 20), (-7, 20), (7, -28), (-7, -28), (30, 4), (-30, 4))


def _label_points(fig, ax, points: list[tuple[float, float, str]]) -> None:
    """Names beside the points where they overlap no other name and no marker (the first free place of
    :data:`LABEL_OFFSETS`); a point with no free place keeps only its legend entry and colour."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pixels = [ax.transData.transform((x, y)) for x, y, _ in points]
    blocked = [Bbox.from_extents(px - 6, py - 6, px + 6, py + 6) for px, py in pixels]  # the markers
    inside = ax.get_window_extent(renderer)
    for x, y, name in points:
        for dx, dy in LABEL_OFFSETS:
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center")
            box = text.get_window_extent(renderer)
            free = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if free and not any(box.overlaps(other) for other in blocked):
                blocked.append(box)
                break
            text.remove()


def pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], families: dict[str, str]) -> bytes:
    """Recognition precision vs recall per method; curves: method -> (precision, recall, gap)."""
    plt = _pyplot()
    style = styles(families)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, (precision, recall, g) in curves.items():
        colour, _ = style[name]
        if len(precision):
            # a step from (0, first precision), as GAP integrates it
            ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", color=colour,
                    linestyle="--" if families.get(name) != "deep" else "-", label=f"{name} (GAP {'n/a' if g is None else f'{g:.3f}'})")
        else:
            ax.plot([], [], color=colour, label=f"{name} (no predictions)")
    ax.set_xlabel("recall (correct predictions / queries that show a landmark)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title("Precision-recall of the recognition, predictions taken by decreasing confidence", fontsize=10)
    return _png(fig)


def recall_at_k(values: dict[str, dict[str, float]], families: dict[str, str]) -> bytes:
    """Retrieval recall@k per method as lines over k; values: method -> {"1": r, "5": r, ...}."""
    plt = _pyplot()
    style = styles(families)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rec in values.items():
        ks = sorted(rec, key=int)
        colour, marker = style[name]
        if any(rec[k] is None for k in ks):  # undefined: no query's landmark has database images
            ax.plot([], [], color=colour, label=f"{name} (n/a: no query's landmark has database images)")
            continue
        ax.plot([int(k) for k in ks], [rec[k] for k in ks], marker=marker, color=colour, label=name,
                linestyle="--" if families.get(name) != "deep" else "-")
    ax.set_xscale("log")
    ax.set_xlabel("k (nearest database images)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title("Retrieval: queries with a database image of their landmark in the top k", fontsize=10)
    return _png(fig)


def open_set(methods: dict[str, dict], families: dict[str, str]) -> bytes:
    """Per method (one row each): left, the confidence before the no-landmark threshold of the queries that show
    a database landmark and of those that do not, as two histograms; right, GAP and accuracy of the queries
    against the threshold, with the method's own threshold marked.

    methods: name -> {"landmark": confidences [n], "other": confidences [m] (0: no answer at all),
    "thresholds": [t], "gap": [t], "accuracy": [t], "threshold": float, "auc": float | None, "span": (lo, hi) of
    the x axes}."""
    plt = _pyplot()
    n = max(1, len(methods))
    fig, axes = plt.subplots(n, 2, figsize=(10, 2.3 * n), squeeze=False)
    style = styles(families)
    for row, (name, d) in enumerate(methods.items()):
        left, right = axes[row]
        lo, hi = d.get("span", (0.0, 1.0))
        bins = np.linspace(lo, hi, 41)
        for values, colour, label in ((np.asarray(d["landmark"]), "#2ca02c", "database landmark"),
                                      (np.asarray(d["other"]), "#d62728", "no database landmark")):
            unanswered = int(np.sum(values <= 0))
            extra = f", {unanswered} without any answer" if unanswered else ""
            left.hist(values[values > 0], bins=bins, alpha=0.6, color=colour, label=f"{label} ({len(values)}{extra})")
        left.axvline(d["threshold"], color="black", linestyle=":", linewidth=1)
        auc = "" if d.get("auc") is None else f", AUC {d['auc']:.3f}"
        left.set_title(f"{name}: confidence before the threshold{auc}", fontsize=9)
        left.set_xlim(lo, hi)
        left.tick_params(labelsize=7)
        left.legend(fontsize=7, loc="upper left")
        colour, _ = style[name]
        right.plot(d["thresholds"], d["gap"], color=colour, label="GAP")
        right.plot(d["thresholds"], d["accuracy"], color=colour, linestyle="--", label="accuracy")
        right.axvline(d["threshold"], color="black", linestyle=":", linewidth=1,
                      label=f"threshold used ({d['threshold']:.3f})")
        right.set_xlim(lo, hi)
        right.set_ylim(0, 1.02)
        right.grid(True, alpha=0.3)
        right.tick_params(labelsize=7)
        right.set_title(f"{name}: GAP and accuracy of these queries against the threshold", fontsize=9)
        right.legend(fontsize=7, loc="lower left")
    axes[-1][0].set_xlabel("confidence", fontsize=8)
    axes[-1][1].set_xlabel("no-landmark threshold (a prediction is kept when its confidence is at least this)",
                           fontsize=8)
    fig.tight_layout()
    return _png(fig)
