"""report.html: one self-contained page that puts every method of a compare run side by side.

Everything is inline (CSS, plots as PNG data URIs, thumbnails as JPEG data URIs); the page runs no script and
needs no network to view. Sections: summary table, quality vs cost, precision-recall and recall@k, per-class
accuracy of the most and least frequent classes, most confused class pairs, query grids (baseline vs deep: both
right, baseline right and deep wrong, deep right and baseline wrong, both wrong), Grad-CAM heatmaps of the deep
model, dead letters, the run config and the metric definitions.

    page = build_report(results, metrics, ReportConfig())
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from features.cnn import resize_square
from features.embedding import load_embedding_model
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.featuresets import features_prefix, record_path
from pipeline.images import DecodeConfig, ImageError, load_image
from pipeline.parquet_io import find_shards
from pipeline.schemas import vectors_of
from reports import metrics as M
from reports import plots
from reports.detection import detections_of
from reports.gradcam import grad_cam, overlay
from reports.metrics import iou_matrix
from reports.results import RunResults, _box_set, detection_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows."""

    baseline: str = ""  # baseline method of the query grids ("" = the baseline with the best GAP)
    deep: str = ""  # deep method of the query grids and Grad-CAM ("" = the deep method with the best GAP)
    examples: int = 3  # queries shown per query-grid category
    neighbours: int = 5  # database images shown per query in the grids
    classes: int = 8  # classes shown among the most and among the least frequent
    confused: int = 5  # confused class pairs shown per method
    gradcam: int = 4  # Grad-CAM examples (0 = none)
    thumb: int = 112  # thumbnail side in pixels

    def __post_init__(self):
        for name in ("examples", "neighbours", "classes", "confused", "gradcam"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 32 <= self.thumb <= 512:
            raise ValueError(f"thumb must be between 32 and 512 pixels, not {self.thumb}")


# (key path in metrics.json, header, format, better: "high" / "low")
SUMMARY_COLUMNS = (
    ("quality.gap", "GAP", "{:.3f}", "high"),
    ("quality.accuracy", "accuracy", "{:.3f}", "high"),
    ("quality.landmark_accuracy", "lm acc.", "{:.3f}", "high"),
    ("quality.map_at_100", "mAP@100", "{:.3f}", "high"),
    ("quality.recall_at_k.1", "R@1", "{:.3f}", "high"),
    ("quality.recall_at_k.10", "R@10", "{:.3f}", "high"),
    ("quality.mean_class_ap", "class AP", "{:.3f}", "high"),
    ("cost.images_per_second", "img/s", "{:,.1f}", "high"),
    ("cost.bytes_per_image", "B/image", "{:,}", "low"),
    ("cost.index_bytes", "index B", "{:,}", "low"),
    ("cost.train_seconds", "train s", "{:,.1f}", "low"),
    ("cost.index_seconds", "index s", "{:,.2f}", "low"),
    ("cost.search_seconds", "search s", "{:,.2f}", "low"),
    ("counts.dead_letters", "dead", "{:,}", "low"),
)

CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",Arial,sans-serif;margin:0 auto;max-width:1280px;
padding:0 24px 48px;color:#1d2329;line-height:1.45}
h1{margin:24px 0 4px}h2{margin-top:40px;border-bottom:2px solid #dde3e9;padding-bottom:4px}
p.lead{color:#4a5560;margin-top:0}.note{color:#5b6670;font-size:.92em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.86em}
th,td{border:1px solid #d5dbe1;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f1f4f7}td.name,th.name{text-align:left}td.text{white-space:normal;min-width:260px;overflow-wrap:anywhere}td.best{font-weight:700;background:#e3f4e1}
tr.deep td.name{border-left:4px solid #d62728}tr.baseline td.name{border-left:4px solid #1f77b4}
.fam{font-size:.8em;color:#5b6670}
nav a{margin-right:14px}.plot{max-width:100%;height:auto;border:1px solid #e4e8ec}
.grid{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;margin:4px 0 14px}
.query{border:1px solid #d5dbe1;border-radius:6px;padding:8px;margin:10px 0;background:#fafbfc}
.row{display:flex;gap:6px;align-items:center;margin:4px 0}.row.wrap{flex-wrap:wrap}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:middle}
.row .lab{width:210px;font-size:.85em;flex:none}
figure{margin:0;text-align:center;font-size:.75em;color:#33404c}
figure img{display:block;border:4px solid #cfd6dc;border-radius:3px}
figure.ok img{border-color:#2ca02c}figure.bad img{border-color:#d62728}figure.na img{border-color:#b0b8bf}
figure.q img{border-color:#33404c}
.tag{display:inline-block;padding:0 6px;border-radius:8px;font-size:.8em;color:#fff}
.tag.ok{background:#2ca02c}.tag.bad{background:#d62728}
.acc{min-width:44px}pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:.8em;max-height:480px}
details{margin:8px 0}.scroll{overflow-x:auto;max-width:100%}th.vertical{vertical-align:bottom;padding:4px 2px}
th.vertical span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap}figure img.thumb{height:auto}
"""


def _get(entry: dict, path: str):
    value = entry
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _or_low(value) -> float:
    """A figure for ranking methods: an undefined one (None) ranks last."""
    return float("-inf") if value is None else value


def _fmt(value, fmt: str, none: str = "–") -> str:
    if value is None:
        return none
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return html.escape(str(value))


def explain(chosen: dict) -> str:
    """One line, for people, on the confidence function tuning chose (metrics.json's tuning group: what
    index/recognize.describe records, or a classifier's)."""
    rule = chosen.get("rule")
    if rule == "classifier":
        text = "the classifier's calibrated probability"
    elif rule == "verified" and chosen.get("calibration"):
        c = chosen["calibration"]
        text = (f"calibrated inliers: sigmoid({c['log1p_inliers']:.2f} log(1 + inliers) + {c['similarity']:.2f} "
                f"similarity {c['bias']:+.2f})")
    elif rule == "verified" or chosen.get("aggregate") == "max":
        text = "top-1 similarity"
    else:
        norm = chosen.get("class_norm") or 0
        text = f"sum of the top {chosen.get('k')} similarities" + (f" / class size^{norm:g}" if norm else "")
    if chosen.get("margin"):
        text += f", minus {chosen['margin']:g} x the best other landmark's"
    if chosen.get("nonlandmark_weight"):
        text += f", minus {chosen['nonlandmark_weight']:g} x the similarity to non-landmark images"
    text += f"; no landmark below {chosen.get('min_confidence', 0):.3g}"
    fitted = chosen.get("query_threshold") or {}
    if chosen.get("threshold_from") == "queries" and fitted.get("landmark_share") is not None:
        text += (f", fitted to the queries (about {100 * fitted['landmark_share']:.0f}% of them estimated to show a "
                 f"database landmark; validation's threshold: {fitted['validation_threshold']:.3g})")
    return text


def _confidence(c: float) -> str:
    """A confidence for people: 3 significant digits (a re-ranking score of 0.0008 is not "0.00")."""
    return f"{float(c):.3g}"


def _short(v) -> str:
    """A setting's value in a table: floats at 4 significant digits, lists of them alike."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data: bytes, alt: str, mime: str = "image/png", cls: str = "plot", width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{_data_uri(data, mime)}"{size}>'


def _jpeg(image: np.ndarray, quality: int = 82) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _rect(box, sx: float, sy: float) -> list[float]:
    """A box in thumbnail pixels for PIL's rectangle (inclusive corners; never inverted for a tiny box)."""
    x0, y0 = box[0] * sx, box[1] * sy
    return [x0, y0, max(x0, box[2] * sx - 1), max(y0, box[3] * sy - 1)]


class Thumbnails:
    """Decoded, shrunk and JPEG-encoded images by path, each made once; a failure is remembered as None."""

    def __init__(self, side: int, decode):
        self.side, self.decode, self.cache = side, decode, {}

    def image(self, path: str) -> np.ndarray | None:
        from PIL import Image

        try:
            img = Image.fromarray(load_image(path, self.decode))
        except (ImageError, OSError, ValueError) as e:
            log.warning("report: cannot show %s: %s", path, e)
            return None
        img.thumbnail((self.side, self.side))
        return np.asarray(img)

    def __call__(self, path: str) -> bytes | None:
        if path not in self.cache:
            img = self.image(path)
            self.cache[path] = None if img is None else _jpeg(img)
        return self.cache[path]


class Page:
    """Builds the report's sections from a run's results."""

    def __init__(self, res: RunResults, metrics: dict, config: ReportConfig):
        self.res, self.metrics, self.config = res, metrics, config
        self.families = {name: m.family for name, m in res.methods.items()}
        self.truth = res.truth
        decode = res.run["config"].get("decode") or {}
        self.thumbs = Thumbnails(config.thumb, DecodeConfig(**decode) if decode else DecodeConfig())
        self.train_path = dict(zip(res.train.ids, res.train.paths, strict=True))
        self.query_path = dict(zip(res.queries.ids, res.queries.paths, strict=True))
        self.class_example = {}
        for image_id, label in zip(res.train.ids, res.train.labels, strict=True):
            if label is not None:
                self.class_example.setdefault(label, image_id)
        self.names = {**res.train.label_names, **res.queries.label_names}
        self.baseline, self.deep = self._pair()

    # ---- helpers

    def label(self, landmark: int | None) -> str:
        if landmark is None:
            return "no landmark"
        name = self.names.get(landmark)
        return f"{landmark} ({name})" if name else str(landmark)

    def _best(self, family: str, exclude: str = "") -> str:
        cands = [n for n, f in self.families.items() if f == family and n != exclude]
        return max(cands, key=lambda n: _or_low(self.metrics["methods"][n]["quality"]["gap"]), default="")

    def _pair(self) -> tuple[str, str]:
        c = self.config
        for name in (c.baseline, c.deep):
            if name and name not in self.res.methods:
                raise CairnError(f"method {name!r} is not in this run; its methods: {', '.join(self.res.methods)}")
        baseline = c.baseline or self._best("baseline", exclude=c.deep)
        deep = c.deep or self._best("deep", exclude=baseline)
        if not baseline:  # a run of deep methods only: compare the two best
            baseline = self._best("deep", exclude=deep)
        if not deep:
            deep = self._best("baseline", exclude=baseline)
        return baseline, deep

    def figure(self, path: str | None, caption: str, state: str = "", title: str = "", width: int = 0) -> str:
        data = self.thumbs(path) if path else None
        cap = html.escape(caption)
        side = width or self.config.thumb
        if data is None:
            return (f'<figure class="{state}"><div style="width:{side}px;height:{side * 3 // 4}px;'
                    f'background:#eee;display:flex;align-items:center;justify-content:center">unavailable</div>'
                    f"<figcaption>{cap}</figcaption></figure>")
        tip = f' title="{html.escape(title)}"' if title else ""
        return (f'<figure class="{state}"{tip}>{_img(data, caption or "thumbnail", "image/jpeg", "thumb", width or None)}'
                f"<figcaption>{cap}</figcaption></figure>")

    # ---- sections

    def header(self) -> str:
        d = self.metrics["data"]
        cfg_ = self.res.run["config"]
        return f"""
<h1>Cairn: baseline vs deep landmark recognition</h1>
<p class="lead">Run <code>{html.escape(fs.absolute(self.res.run_dir))}</code>, report written
{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}. Database: <b>{d['train_images']:,}</b> images of
<b>{d['train_classes']:,}</b> landmarks (<code>{html.escape(str(cfg_['train']))}</code>); queries: <b>{d['queries']:,}</b>,
of which <b>{d['queries_with_landmark']:,}</b> show a landmark and {d['queries'] - d['queries_with_landmark']:,} do not
(<code>{html.escape(str(cfg_['queries']))}</code>).</p>
<p>Every method below answers the same queries against the same database. For each query it predicts a landmark
with a confidence, or "no landmark", and lists its nearest database images. <b>GAP</b> rewards right answers given
with high confidence and punishes confident wrong ones (including a landmark "found" in a photo that shows none);
<b>accuracy</b> counts right answers, where saying "no landmark" for such a photo is right. Every method has its own
colour and marker in the plots (baseline methods cool colours, deep ones warm; the swatch in the summary table).
Definitions are at the <a href="#definitions">end
</a>.</p>
<nav><a href="#summary">Summary</a><a href="#cost">Quality vs cost</a><a href="#curves">Curves</a>
<a href="#no-landmark">No landmark</a><a href="#classes">Per class</a><a href="#confused">Confusions</a><a href="#grids">Examples</a>
<a href="#detection">Detection</a><a href="#gradcam">Grad-CAM</a><a href="#dead">Dead letters</a>
<a href="#config">Config</a></nav>
"""

    def summary(self) -> str:
        entries = self.metrics["methods"]
        best = {}
        for key, _, _, better in SUMMARY_COLUMNS:
            values = [v for v in (_get(e, key) for e in entries.values()) if isinstance(v, (int, float))]
            if values and len(set(values)) > 1:
                best[key] = max(values) if better == "high" else min(values)
        head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _, _ in SUMMARY_COLUMNS)
        methods = "".join(
            f'<tr class="{m.family}"><td class="name">{html.escape(n)}</td><td class="name">{m.family}</td>'
            f'<td class="name">{html.escape(m.summary)}</td></tr>' for n, m in self.res.methods.items())
        rows = []
        style = plots.styles(self.families)
        for name, e in entries.items():
            cells = []
            for key, _, fmt, _ in SUMMARY_COLUMNS:
                v = _get(e, key)
                cls = ' class="best"' if key in best and v == best[key] else ""
                none = "n/a" if key.startswith("quality.") else "–"  # an undefined figure (metrics.json null)
                cells.append(f'<td{cls} data-key="{key}" data-value="{html.escape(json.dumps(v))}">'
                             f'{_fmt(v, fmt, none)}</td>')
            colour, marker = style[name]  # the method's colour and marker in every plot
            rows.append(f'<tr class="{e["family"]}" data-method="{html.escape(name)}" data-colour="{colour}" '
                        f'data-marker="{html.escape(marker)}"><td class="name"><span class="swatch" '
                        f'style="background:{colour}" title="its colour in the plots"></span>'
                        f'{html.escape(name)} <span class="fam">{e["family"]}</span></td>{"".join(cells)}</tr>')
        notes = "".join(f'<p class="note">n/a: {html.escape(n)}</p>'
                        for n in sorted({e["quality"].get("note") for e in entries.values()} - {None}))
        return f"""
<h2 id="summary">Summary</h2>
<p>One row per method, the best value of each column in bold green. Quality first (higher is better), then cost
(images/s higher is better; bytes and seconds lower). <code>metrics.json</code> holds the same numbers unrounded.</p>
<div class="scroll"><table id="summary-table"><tr><th class="name">method</th>{head}</tr>{''.join(rows)}</table></div>
{notes}<table><tr><th class="name">method</th><th class="name">family</th><th class="name">what it is</th></tr>{methods}</table>
"""

    def cost(self) -> str:
        points = {n: {"gap": e["quality"]["gap"], "images_per_second": e["cost"].get("images_per_second"),
                      "bytes_per_image": e["cost"].get("bytes_per_image")}
                  for n, e in self.metrics["methods"].items()}
        png = plots.quality_vs_cost(points, self.families)
        return f"""
<h2 id="cost">Quality vs cost</h2>
<p>Each point is a method. Left: GAP against how many images per second its descriptor extraction handles (the
Beam job's wall time, including start-up). Right: GAP against the bytes each database image costs in the index.
The best methods sit top right on the left plot and top left on the right plot.</p>
{_img(png, "GAP vs images per second and GAP vs bytes per image")}
"""

    def curves(self) -> str:
        curves = {}
        for name, m in self.res.methods.items():
            precision, recall, _ = M.precision_recall_curve(m.pred, m.conf, self.truth, self.res.queries.ids)
            curves[name] = (precision, recall, self.metrics["methods"][name]["quality"]["gap"])
        pr = plots.pr_curves(curves, self.families)
        rk = plots.recall_at_k({n: e["quality"]["recall_at_k"] for n, e in self.metrics["methods"].items()},
                               self.families)
        return f"""
<h2 id="curves">Precision-recall and recall@k</h2>
<p>Recognition: each method's predictions are taken from the most confident down; the curve shows the precision of
the predictions taken so far against the share of landmark queries already answered right. The area under the curve
is the GAP. A curve that ends early on the right is a method that leaves many landmark queries unanswered or wrong.</p>
{_img(pr, "precision-recall curves of the recognition")}
<p>Retrieval: the share of landmark queries that have a database image of their landmark among their k nearest
neighbours.</p>
{_img(rk, "recall at k of the retrieval")}
"""

    def open_set(self) -> str:
        """Per method: the confidence of landmark and no-landmark queries side by side, GAP and accuracy against
        the no-landmark threshold, and what tuning chose on its validation queries."""
        head = '<h2 id="no-landmark">No landmark: confidence and threshold</h2>'
        data, rows = {}, []
        truth = self.truth
        has = np.array([t is not None for t in truth])
        for name, m in self.res.methods.items():
            if m.raw_conf is None:
                continue
            raw = np.array([-1 if p is None else p for p in m.raw_pred], np.int64)
            conf = np.where(raw >= 0, m.raw_conf, 0.0)
            answered = conf[conf > 0]  # zoom on the confidences there are (zero: no answer at all)
            span = [float(answered.min()), float(answered.max())] if len(answered) else [0.0, 1.0]
            span = [max(0.0, min(span[0], m.threshold or 1.0) - 0.02), min(1.0, max(span[1], m.threshold or 0.0) + 0.02)]
            thresholds = np.linspace(span[0], span[1], 201)
            gaps, accs = M.threshold_curve([int(p) if p >= 0 else None for p in raw], conf.tolist(), truth,
                                           thresholds, self.res.queries.ids)
            entry = self.metrics["methods"][name]
            data[name] = {"landmark": conf[has], "other": conf[~has], "thresholds": thresholds, "gap": gaps,
                          "accuracy": accs, "threshold": m.threshold or 0.0, "auc": entry["quality"].get("auc"),
                          "span": span}
            tuning = entry.get("tuning") or {}
            val = tuning.get("validation") or {}
            chosen = explain(tuning) if tuning else ""
            rows.append(f"<tr><td class=\"name\">{html.escape(name)}</td><td class=\"name text\">"
                        f"{html.escape(chosen) or 'not tuned'}</td>"
                        + "".join(f"<td>{_fmt(val.get(k), f)}</td>" for k, f in (
                            ("landmark_queries", "{:,}"), ("unseen_queries", "{:,}"), ("nonlandmark_queries", "{:,}"),
                            ("gap", "{:.3f}"), ("top1_gap", "{:.3f}"), ("accuracy", "{:.3f}")))
                        + f"<td>{_fmt(entry['quality'].get('auc'), '{:.3f}')}</td></tr>")
        if not data:
            return head + "<p>This run did not record the confidences before the threshold (a run of an older " \
                          "version); rerun <code>cairn compare</code> to see them.</p>"
        png = plots.open_set(data, self.families)
        return f"""{head}
<p>Most photos users query show no landmark the database has, and GAP punishes every confident wrong answer. Each
method ranks its answers by a confidence and answers "no landmark" below a threshold; both were tuned on validation
queries made from the database itself: held-out landmark images, the same images with their own landmark removed
from their neighbours (a landmark the database does not have) and held-out non-landmark images. With 100 or more
answered queries, the neighbour methods' threshold is then fitted to the queries themselves: the share of them
that show a database landmark is estimated from their confidences beside the validation landmark queries' (a real
unseen landmark can look much more like the database's than the validation's do). The table shows what tuning
chose and its validation figures beside the plain top-1 rule (the nearest image's landmark, ranked by its
similarity); AUC: how well the confidence tells these queries with a database landmark from those without.</p>
<div class="scroll"><table><tr><th class="name">method</th><th class="name">chosen</th><th>val. landmark</th>
<th>val. unseen</th><th>val. non-landmark</th><th>val. GAP</th><th>val. GAP top-1</th><th>val. accuracy</th>
<th>AUC (queries)</th></tr>{''.join(rows)}</table></div>
<p>Left: the confidence of the queries that show a database landmark (green) and of those that do not (red); the
dotted line is the threshold used. Right: GAP and accuracy of these queries for every threshold.</p>
{_img(png, "confidence of landmark and no-landmark queries, and GAP and accuracy against the threshold")}
"""

    def classes(self) -> str:
        counts = self.res.train_counts
        acc = {n: M.per_class_accuracy(m.pred, self.truth) for n, m in self.res.methods.items()}
        with_queries = sorted({c for a in acc.values() for c in a}, key=lambda c: (-counts.get(c, 0), c))
        if not with_queries:
            return '<h2 id="classes">Per-class accuracy</h2><p>No query shows a landmark.</p>'
        k = self.config.classes
        most = with_queries[:k]
        least = [c for c in with_queries[::-1][:k] if c not in most][::-1]
        names = list(self.res.methods)
        head = "".join(f'<th class="vertical"><span>{html.escape(n)}</span></th>' for n in names)

        def rows(classes):
            out = []
            for c in classes:
                cells = []
                for n in names:
                    right, total = acc[n].get(c, (0, 0))
                    share = right / total if total else 0.0
                    colour = f"hsl({int(120 * share)},60%,{88 - 8 * share:.0f}%)"
                    cells.append(f'<td class="acc" style="background:{colour}" title="{right} of {total} right">'
                                 f"{share:.2f}</td>")
                ex = self.class_example.get(c)
                thumb = self.figure(self.train_path.get(ex), "", width=64) if ex else ""
                out.append(f'<tr><td class="name">{thumb}</td><td class="name">{html.escape(self.label(c))}</td>'
                           f"<td>{counts.get(c, 0)}</td><td>{acc[names[0]][c][1]}</td>{''.join(cells)}</tr>")
            return "".join(out)

        table_head = f'<tr><th class="name">example</th><th class="name">landmark</th><th>database images</th>' \
                     f"<th>queries</th>{head}</tr>"
        least_part = (f"<h3>The {len(least)} least frequent classes</h3><div class=\"scroll\"><table>{table_head}"
                      f"{rows(least)}</table></div>"
                      if least else "")
        return f"""
<h2 id="classes">Per-class accuracy</h2>
<p>Share of each class's queries answered with the right landmark, for the classes with the most database images and
for those with the fewest (the long tail, where methods that learn from many examples suffer). Green is right,
red is wrong; hover a cell for the counts. <code>per_class.csv</code> has every class.</p>
<h3>The {len(most)} most frequent classes</h3><div class="scroll"><table>{table_head}{rows(most)}</table></div>
{least_part}
"""

    def confused(self) -> str:
        blocks = []
        for name, m in self.res.methods.items():
            pairs = M.confused_pairs(m.pred, self.truth, self.config.confused)
            if not pairs:
                blocks.append(f"<div><h3>{html.escape(name)}</h3><p>No wrong answers.</p></div>")
                continue
            rows = []
            for true, pred, count in pairs:
                cells = []
                for c in (true, pred):
                    ex = self.class_example.get(c) if c is not None else None
                    pic = self.figure(self.train_path.get(ex), "", width=56) if ex else ""
                    cells.append(f'<td class="name">{pic}</td><td class="name">{html.escape(self.label(c))}</td>')
                rows.append(f"<tr>{cells[0]}<td>→</td>{cells[1]}<td>{count}</td></tr>")
            blocks.append(f'<div><h3>{html.escape(name)}</h3><table><tr><th class="name" colspan="2">true</th><th></th>'
                          f'<th class="name" colspan="2">answered</th><th>queries</th></tr>{"".join(rows)}</table></div>')
        return f"""
<h2 id="confused">Most confused class pairs</h2>
<p>For each method, the (true landmark → answered landmark) pairs it gets wrong most often, with a database image of
each class. "no landmark" on the left is a photo without a landmark that the method recognised as one; on the
right, a landmark the method did not recognise at all.</p>
<div class="grid" style="gap:24px">{''.join(blocks)}</div>
"""

    def _query_block(self, qi: int) -> str:
        q = self.res.queries.ids[qi]
        t = self.truth[qi]
        parts = [f'<div class="query"><div class="row">'
                 f'{self.figure(self.query_path.get(q), f"query {q[:10]}", "q")}'
                 f'<div class="lab">truth: <b>{html.escape(self.label(t))}</b></div></div>']
        for name in (self.baseline, self.deep):
            m = self.res.methods[name]
            p, c = m.pred[qi], m.conf[qi]
            ok = p == t
            answer = f"{html.escape(self.label(p))}" + (f" ({_confidence(c)})" if p is not None else "")
            figs = []
            for rank, (db, score, lab) in enumerate(m.neighbours.get(q, [])[: self.config.neighbours], start=1):
                if t is None:
                    state, mark = "na", ""
                else:
                    state, mark = ("ok", "✓") if lab == t else ("bad", "✗")
                figs.append(self.figure(self.train_path.get(db), f"{rank}. {mark} {self.label(lab)}", state,
                                        f"{db} score {score:.3f}"))
            tag = f'<span class="tag {"ok" if ok else "bad"}">{"right" if ok else "wrong"}</span>'
            parts.append(f'<div class="row"><div class="lab"><b>{html.escape(name)}</b> {tag}<br>answer: {answer}'
                         f'</div>{"".join(figs)}</div>')
        return "".join(parts) + "</div>"

    def grids(self) -> str:
        b, d = self.baseline, self.deep
        if not b or not d:
            return ('<h2 id="grids">Examples</h2><p>The query grids compare two methods; this run has only one '
                    "method.</p>")
        rb = self.res.methods[b].right(self.truth)
        rd = self.res.methods[d].right(self.truth)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(self.truth))
        order = sorted(order, key=lambda i: self.truth[i] is None)  # landmark queries first
        cats = [("both right", rb & rd), (f"{b} right, {d} wrong", rb & ~rd), (f"{d} right, {b} wrong", ~rb & rd),
                ("both wrong", ~rb & ~rd)]
        out = [f"""
<h2 id="grids">Examples: {html.escape(b)} ({self.families[b]}) vs {html.escape(d)} ({self.families[d]})</h2>
<p>Queries picked at random (landmark queries first) in four groups. For each: the query and its true landmark,
then each method's answer and its {self.config.neighbours} nearest database images, framed
<span class="tag ok">green ✓</span> when they show the query's landmark and <span class="tag bad">red ✗</span> when
not (grey for a query without a landmark). Hover a thumbnail for its id and score. Pick the methods with
<code>cairn report RUN --baseline M --deep M</code>.</p>"""]
        for title, mask in cats:
            chosen = [i for i in order if mask[i]][: self.config.examples]
            body = "".join(self._query_block(i) for i in chosen) or "<p>No such query.</p>"
            out.append(f"<h3>{html.escape(title)}: {int(mask.sum())} of {len(mask)} queries</h3>{body}")
        return "".join(out)

    def detection(self) -> str:
        """Detection AP / IoU per +det method, the GAP it gained or lost over its whole-image method, and query
        images with the cropped boxes (and the annotated ones) drawn."""
        head = '<h2 id="detection">Landmark detection</h2>'
        det = [n for n in self.res.methods if self.metrics["methods"][n]["detection"]["regions_per_image"]]
        if not det:
            return (head + "<p>No method of this run detects landmarks (cnn+det, cnn-pretrained+det: "
                    "<code>cairn compare --boxes FILE</code> or <code>--set detect.detect.model=PATH</code>).</p>")
        rows = []
        for n in det:
            d, q = self.metrics["methods"][n]["detection"], self.metrics["methods"][n]["quality"]
            base = self.res.methods[n].variant_of
            base_gap = self.metrics["methods"][base]["quality"]["gap"] if base in self.metrics["methods"] else None
            change = ("" if base_gap is None or q["gap"] is None
                      else f"{q['gap'] - base_gap:+.3f} (vs {html.escape(base)} {base_gap:.3f})")
            rows.append(f"<tr><td>{html.escape(n)}</td><td>{_fmt(d['ap_50'], '{:.3f}')}</td>"
                        f"<td>{_fmt(d['mean_iou'], '{:.3f}')}</td><td>{_fmt(d['annotated_images'], '{:,}')}</td>"
                        f"<td>{_fmt(d['detections_per_image'], '{:.2f}')}</td>"
                        f"<td>{_fmt(d['regions_per_image'], '{:.2f}')}</td><td>{_fmt(q['gap'], '{:.3f}', 'n/a')}</td>"
                        f"<td>{change}</td></tr>")
        out = [head, """<p>A +det method crops the detector's top boxes (above its score threshold) besides the full
image, embeds every region, and ranks database images by their best region against the query's best region. AP@0.5
and mean IoU score the cropped query boxes against the annotated ones (<code>--boxes</code>); "–" without them.</p>
<table><tr><th>method</th><th>AP@0.5</th><th>mean IoU</th><th>annotated queries</th><th>boxes / query</th>
<th>vectors / db image</th><th>GAP</th><th>GAP change from cropping</th></tr>""" + "".join(rows) + "</table>"]
        table = detection_table(self.res.methods[det[0]])
        if table is not None and self.config.examples:
            out.append(f"<h3>Boxes on queries ({html.escape(det[0])})</h3><p>Cropped boxes "
                       '<span class="tag ok">green</span> when they overlap an annotated box by IoU ≥ 0.5, '
                       '<span class="tag bad">red</span> otherwise, with their scores; annotated boxes in blue.</p>')
            out.append(self._box_examples(table))
        return "".join(out)

    def _box_examples(self, table) -> str:
        from PIL import Image, ImageDraw, ImageFont

        dets, sizes = detections_of(table)
        boxes = self.res.run["config"].get("boxes") or ""
        truth = {}
        if boxes and fs.exists(boxes):
            from contextlib import suppress

            with suppress(CairnError):
                bs = _box_set(boxes, self.res.queries.source)
                truth = {i: bs.for_image(i, *sizes[i]) for i in sizes}
        by_image: dict[str, list] = {}
        for i, score, box in dets:
            by_image.setdefault(i, []).append((score, box))
        ids = [q for q in self.res.queries.ids if q in sizes]
        landmark = [q for q, t in zip(self.res.queries.ids, self.truth, strict=True) if t is not None and q in sizes]
        other = [q for q in ids if q not in set(landmark)]
        chosen = landmark[: 2 * self.config.examples] + other[: self.config.examples]
        figs = []
        large = Thumbnails(2 * self.config.thumb, self.thumbs.decode)  # boxes need room
        for q in chosen:
            img = large.image(self.query_path.get(q, ""))
            if img is None:
                continue
            w, h = sizes[q]
            sx, sy = img.shape[1] / w, img.shape[0] / h
            pil = Image.fromarray(img)
            draw = ImageDraw.Draw(pil)
            font = ImageFont.load_default(size=max(13, img.shape[0] // 12))  # readable at the thumbnail's size
            gt = truth.get(q, np.zeros((0, 4), np.float32))
            for b in gt:
                draw.rectangle(_rect(b, sx, sy), outline=(40, 110, 240), width=2)
            for score, b in by_image.get(q, []):
                hit = len(gt) and float(iou_matrix(b[None], gt).max()) >= 0.5
                colour = (30, 160, 60) if hit else (210, 40, 40)
                draw.rectangle(_rect(b, sx, sy), outline=colour, width=2)
                at = (b[0] * sx + 3, b[1] * sy + 2)
                draw.rectangle(draw.textbbox(at, f"{score:.2f}", font=font), fill=(255, 255, 255))
                draw.text(at, f"{score:.2f}", fill=colour, font=font)
            caption = f"{q[:10]}: {len(by_image.get(q, []))} box(es)" + ("" if len(gt) else ", no landmark")
            figs.append(f'<figure>{_img(_jpeg(np.asarray(pil)), caption, "image/jpeg", "thumb")}'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return f'<div class="row wrap">{"".join(figs)}</div>' if figs else "<p>No query image could be shown.</p>"

    def gradcam(self) -> str:
        head = '<h2 id="gradcam">Grad-CAM: where the deep model looked</h2>'
        if self.config.gradcam == 0:
            return head + "<p>Turned off (<code>--gradcam 0</code>).</p>"
        try:
            found = self._gradcam_model()
            if found is None:
                return head + ("<p>No method of this run has a Keras embedding model (cnn, cnn-untrained, or "
                               "cnn-pretrained from a .keras file); Grad-CAM needs one.</p>")
            return head + self._gradcam_examples(*found)
        except Exception as e:  # noqa: BLE001 - the report stays useful without this section
            log.warning("report: Grad-CAM failed: %s", e)
            return head + f"<p>Grad-CAM could not be drawn: {html.escape(str(e))}</p>"

    def _gradcam_model(self) -> tuple[str, str, dict] | None:
        """(method, .keras model path, its extractor record) of the deep method to explain, if there is one."""
        candidates = [self.deep] + [n for n in self.res.methods if n != self.deep]
        for name in candidates:
            m = self.res.methods.get(name)
            if m is None or not m.keras_embedding:
                continue
            record = record_path(fs.join(self.res.run_dir, "work", name, "embeddings", "train"), "extract.json")
            if not fs.exists(record):
                continue
            extractor = cfg.load_json(record)["config"]["extractor"]
            model = extractor["config"].get("model", "")
            if not model.endswith(".keras"):
                continue
            if not fs.exists(model) and m.keras_embedding == "fine-tuned":  # recorded where the run started
                model = fs.join(self.res.run_dir, "work", "cnn", "model", model.rsplit("/", 1)[-1])
            if fs.exists(model):
                return name, model, extractor
        return None

    def _gradcam_examples(self, name: str, path: str, extractor: dict) -> str:
        m = self.res.methods[name]
        # the landmark each query is explained against: the method's answer, or where it answered nothing, the
        # landmark of its nearest database image that shows one (what it looked most like)
        target: dict[int, int] = {}
        for i, q in enumerate(self.res.queries.ids):
            if m.pred[i] is not None:
                target[i] = m.pred[i]
            else:
                nearest = [lab for _, _, lab in m.neighbours.get(q, []) if lab is not None][:1]
                if nearest:
                    target[i] = nearest[0]
        right = {i: t == self.truth[i] for i, t in target.items()}
        made = sorted(target, key=lambda i: (m.pred[i] is None, self.truth[i] is None, -m.conf[i]))
        good, bad = [i for i in made if right[i]], [i for i in made if not right[i]]
        n = self.config.gradcam
        take_bad = min(len(bad), n // 2, n - min(len(good), n - n // 2))  # half each, the rest filled from either
        chosen = good[: n - take_bad] + bad[:take_bad]
        if not chosen:
            return f"<p>{html.escape(name)} has neither answers nor labelled neighbours: nothing to explain.</p>"
        side = int(extractor.get("input_size") or 224)  # what the extractor fed the model (scale 1.0)
        images, shown = [], []
        for i in chosen:
            try:
                img = load_image(self.query_path[self.res.queries.ids[i]], self.thumbs.decode)
            except (ImageError, OSError, ValueError) as e:
                log.warning("report: Grad-CAM skips query %s: %s", self.res.queries.ids[i], e)
                continue
            images.append(resize_square(img, side))
            shown.append(i)
        centroids = class_centroids(features_prefix(fs.join(self.res.run_dir, "work", name, "embeddings", "train")),
                                    {target[i] for i in shown})
        keep = [k for k, i in enumerate(shown) if target[i] in centroids]
        images, shown = [images[k] for k in keep], [shown[k] for k in keep]
        if not shown:
            return "<p>The answered classes have no database embeddings to explain against.</p>"
        model, _ = load_embedding_model(path)
        targets = [centroids[target[i]] for i in shown]
        cams = grad_cam(model, np.stack(images).astype(np.float32), np.stack(targets))
        blocks = []
        for i, img, cam in zip(shown, images, cams, strict=True):
            q = self.res.queries.ids[i]
            ok = bool(right[i])
            ex = self.class_example.get(target[i])
            tag = f'<span class="tag {"ok" if ok else "bad"}">{"right" if ok else "wrong"}</span>'
            answer = (f"answered <b>{html.escape(self.label(m.pred[i]))}</b> ({_confidence(m.conf[i])})"
                      if m.pred[i] is not None
                      else f"no answer; nearest landmark <b>{html.escape(self.label(target[i]))}</b>")
            blocks.append(
                f'<div class="query"><div class="row">{self.figure(self.query_path[q], f"query {q[:10]}", "q")}'
                f'<figure>{_img(_jpeg(overlay(img, cam)), f"Grad-CAM of query {q}", "image/jpeg", "thumb", 160)}'
                f"<figcaption>Grad-CAM</figcaption></figure>"
                f'{self.figure(self.train_path.get(ex), "explained: " + self.label(target[i])) if ex else ""}'
                f'<div class="lab">{tag} truth <b>{html.escape(self.label(self.truth[i]))}</b>, {answer}'
                f"</div></div></div>")
        return f"""
<p>For a few queries of {html.escape(name)} (its most confident right and wrong answers; where it answered
nothing, the landmark of the nearest database image that shows one), the regions of the photo that made it
look like that landmark: red is strong evidence, blue none. The score explained is the
cosine similarity between the query's embedding and the mean embedding of that landmark's database images; the
map is Grad-CAM over the backbone's last feature map, on the query resized as the extractor resized it (at scale
1.0; the centroid is taken in the embedding space before any PCA), model <code>{html.escape(path)}</code>. A model
that looks at the building, not the sky or the people in front of it, is what we want.</p>{''.join(blocks)}"""

    def dead(self) -> str:
        rows = self.res.dead_letters
        if not rows:
            return ('<h2 id="dead">Dead letters</h2><p>None: every database and query image of every method was '
                    "used.</p>")
        counts = Counter((r["method"], r["split"], r["stage"]) for r in rows)
        table = "".join(f'<tr><td class="name">{html.escape(m)}</td><td class="name">{html.escape(s)}</td>'
                        f'<td class="name">{html.escape(st)}</td><td>{n}</td></tr>'
                        for (m, s, st), n in sorted(counts.items()))
        seen, examples = set(), []
        for r in rows:
            key = (r["split"], r["id"])
            if key in seen:
                continue
            seen.add(key)
            examples.append(f'<tr><td class="name">{html.escape(r["split"])}</td><td class="name">'
                            f'{html.escape(r["id"])}</td><td class="name">{html.escape(r["stage"])}</td>'
                            f'<td class="name text">{html.escape(r["reason"])}</td></tr>')
        return f"""
<h2 id="dead">Dead letters</h2>
<p>Images a method could not use (unreadable, corrupt, too small...). They are not dropped silently: a dead query
counts as unanswered in GAP and accuracy. Full list: <code>dead_letters.csv</code>.</p>
<table id="dead-table"><tr><th class="name">method</th><th class="name">split</th><th class="name">stage</th>
<th>images</th></tr>{table}</table>
<details><summary>{len(examples)} distinct images and why</summary><table><tr><th class="name">split</th>
<th class="name">id</th><th class="name">stage</th><th class="name">reason</th></tr>{''.join(examples[:200])}</table>
</details>"""

    def run_config(self) -> str:
        c = self.res.run["config"]
        rows = [("database manifest", c.get("train")), ("query manifest", c.get("queries")),
                ("methods", ", ".join(self.res.run["methods"])),
                ("index", (c.get("index") or {}).get("factory")), ("neighbours per query", c.get("neighbours")),
                ("vote tuning", "on" if c.get("tune") else "off"), ("Beam flags", " ".join(c.get("beam_args") or [])
                                                                       or "(none: DirectRunner)")]
        per_method = "".join(
            f'<tr><td class="name">{html.escape(n)}</td><td class="name">{html.escape(str(e["config"]["index_factory"]))}'
            f'</td><td class="name text"><code>{self._vote(e["config"]["vote"])}</code></td></tr>'
            for n, e in self.metrics["methods"].items())
        table = "".join(f'<tr><td class="name">{html.escape(k)}</td><td class="name text">{html.escape(str(v))}</td>'
                        "</tr>" for k, v in rows)
        full = html.escape(json.dumps(self.res.run, indent=2, sort_keys=True))
        return f"""
<h2 id="config">Run config</h2>
<table>{table}</table>
<h3>Per method: index and the recognition vote</h3>
<table><tr><th class="name">method</th><th class="name">index</th><th class="name">vote (tuned on held-out database
images)</th></tr>{per_method}</table>
<details><summary>The whole run.json</summary><pre>{full}</pre></details>"""

    @staticmethod
    def _vote(vote) -> str:
        if vote is None:
            return "(none: a classifier answers)"
        figures = ("gap", "accuracy", "weighted_accuracy")  # the validation's, shown in the open-set section
        return html.escape(", ".join(f"{k}={_short(v)}" for k, v in sorted(vote.items()) if k not in figures))

    def definitions(self) -> str:
        rows = "".join(f'<tr><td class="name"><code>{html.escape(k)}</code></td><td class="name" '
                       f'style="white-space:normal">{html.escape(v)}</td></tr>'
                       for k, v in self.metrics["definitions"].items())
        return f'<h2 id="definitions">Definitions</h2><table>{rows}</table>'


def class_centroids(prefix: str, labels: set[int]) -> dict[int, np.ndarray]:
    """[D] float32 mean vector of each of ``labels`` over the feature shards under ``prefix``, read batch by batch
    (only the running sums of the wanted classes stay in memory)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sums: dict[int, np.ndarray] = {}
    counts: Counter = Counter()
    value_set = pa.array(sorted(labels), type=pa.int64())
    for path in find_shards(prefix):
        with fs.FileSystems.open(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["landmark_id", "vector"], batch_size=65536):
                rows = pa.Table.from_batches([batch])
                rows = rows.filter(pc.is_in(rows.column("landmark_id"), value_set=value_set))
                if rows.num_rows == 0:
                    continue
                xb = vectors_of(rows).astype(np.float64)
                yb = np.asarray(rows.column("landmark_id").to_pylist())
                for label in np.unique(yb):
                    label = int(label)
                    sums[label] = sums.get(label, 0.0) + xb[yb == label].sum(axis=0)
                    counts[label] += int((yb == label).sum())
    return {label: (sums[label] / counts[label]).astype(np.float32) for label in sums}


def build_report(res: RunResults, metrics: dict, config: ReportConfig = ReportConfig()) -> str:
    """The whole report.html as a string."""
    page = Page(res, metrics, config)
    sections = [page.header(), page.summary(), page.cost(), page.curves(), page.open_set(), page.classes(), page.confused(),
                page.grids(), page.detection(), page.gradcam(), page.dead(), page.run_config(), page.definitions()]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Cairn report: '
            f'{html.escape(res.run_dir)}</title><meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>\n")
