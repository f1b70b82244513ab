"""The Google Landmark Recognition submission format.

A CSV with the header ``id,landmarks``; ``landmarks`` is ``"<landmark_id> <confidence>"`` or empty for
"no landmark". One row per query, in the order given.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from pipeline import fs
from pipeline.errors import CairnError


def format_prediction(image_id: str, pred: int, conf: float) -> str:
    """One CSV line (no line end) of the submission: quoted as CSV needs it."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow((image_id, f"{int(pred)} {float(conf):.6f}" if pred >= 0 else ""))
    return buf.getvalue()


def write_submission(path: str, ids: list[str], pred: np.ndarray, conf: np.ndarray) -> None:
    """ids [Q], pred [Q] int64 (-1 = no landmark), conf [Q] float32."""
    lines = ["id,landmarks"]
    lines += [format_prediction(image_id, p, c) for image_id, p, c in zip(ids, pred, conf, strict=True)]
    fs.write_text(path, "\n".join(lines) + "\n")


def read_submission(path: str) -> dict[str, tuple[int, float] | None]:
    """{query id: (landmark_id, confidence) or None}."""
    rows = csv.DictReader(io.StringIO(fs.read_text(path)))
    if rows.fieldnames is None or {"id", "landmarks"} - set(rows.fieldnames):
        raise CairnError(f"{path} is not a recognition submission (header must be 'id,landmarks')")
    out: dict[str, tuple[int, float] | None] = {}
    for row in rows:
        cell = (row["landmarks"] or "").strip()
        if not cell:
            out[row["id"]] = None
            continue
        parts = cell.split()
        try:
            out[row["id"]] = (int(parts[0]), float(parts[1]))
        except (IndexError, ValueError):
            raise CairnError(f"{path}: bad landmarks cell {cell!r} for id {row['id']}; "
                             "expected '<landmark_id> <confidence>'") from None
    return out
