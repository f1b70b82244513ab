"""How well the landmark detector found the annotated boxes: AP@0.5 and mean IoU of a regional features folder.

The detections are the regions `cairn extract --detector` cropped (region > 0: the boxes above the score
threshold, at most ``max_boxes`` per image), scored by the detector; the full-image region is not a detection.
Ground truth is a box file (pipeline/boxes.py) scaled onto each decoded image (the rows' width and height).
Images without an annotated box count too: a box found there is a false positive.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from reports.metrics import detection_ap, mean_iou

REGION_COLUMNS = ["id", "region", "box", "box_score", "width", "height"]


def detections_of(table: pa.Table) -> tuple[list[tuple[str, float, np.ndarray]], dict[str, tuple[int, int]]]:
    """(detections (image id, score, box [4]) of the detected regions, {image id: decoded (width, height)})."""
    ids = table.column("id").to_pylist()
    regions = table.column("region").to_numpy()
    boxes = np.asarray(table.column("box").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                       np.float32).reshape(-1, 4)
    scores = table.column("box_score").to_numpy()
    widths, heights = table.column("width").to_numpy(), table.column("height").to_numpy()
    sizes = {i: (int(w), int(h)) for i, w, h in zip(ids, widths, heights, strict=True)}
    dets = [(ids[r], float(scores[r]), boxes[r]) for r in np.flatnonzero(regions > 0)]
    return dets, sizes


def detection_metrics(table: pa.Table, box_set, iou_threshold: float = 0.5) -> dict:
    """AP@``iou_threshold`` (PASCAL VOC all-point), mean IoU of the best box per annotated box, and counts, for
    the images of a regional features table against ``box_set`` (pipeline.boxes.BoxSet)."""
    dets, sizes = detections_of(table)
    truth = {i: box_set.for_image(i, w, h) for i, (w, h) in sizes.items()}
    annotated = sum(1 for b in truth.values() if len(b))
    return {
        "ap_50": round(float(detection_ap(dets, truth, iou_threshold)), 4) if annotated else None,
        "mean_iou": round(float(mean_iou(dets, truth)), 4) if annotated else None,
        "images": len(sizes),
        "annotated_images": annotated,
        "annotated_boxes": int(sum(len(b) for b in truth.values())),
        "detections": len(dets),
        "detections_per_image": round(len(dets) / max(1, len(sizes)), 3),
    }
