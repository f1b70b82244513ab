"""cairn compare: run every chosen method on the same train and query manifests and compare them.

For each method: extract database and query descriptors (Beam jobs), train what the method learns, build the
index, recognise the queries; then score all methods together. Writes to OUT:
    report.html                   the comparison as one self-contained page (tables, plots, examples, Grad-CAM)
    metrics.json                  one entry per method: quality (gap, accuracy, map_at_100, recall_at_k, ...;
                                  null with a note where undefined, e.g. GAP when no query shows a landmark),
                                  cost (images_per_second, bytes_per_image, ...), counts and config
    per_class.csv                 per method and landmark class: accuracy and AP
    predictions/<method>.csv      Google Landmark Recognition submission format: every query id of the manifest,
                                  in its order (an empty landmarks cell: no landmark, or a dead letter)
    neighbours/<method>.parquet   top database images per query (query_id, rank, id, score, landmark_id)
    work/<method>/embeddings/     for +det methods: one row per region (full image + detected boxes) with its box
    dead_letters.csv              method,split,id,stage,reason,path for every image a method could not use
    run.json                      the resolved config
    accounting.json               per method: for each split the manifest rows, images used and dead letters by
                                  stage (rows = used + dead letters), and the index it searched
    work/<method>/...             intermediate outputs (features, index), reused by reruns with the same config
A rerun into OUT removes the predictions, confidences and neighbours of methods it does not run (logged).
OUT is held by one run at a time: a second run writing there ends with a line naming the run holding it.
"""

from __future__ import annotations

from jobs import common
from pipeline.run import methods
from pipeline.run.compare import compare


def build_parser():
    p = common.parser("cairn compare", __doc__ + "\nMethods:\n" + methods.describe(), beam=True)
    common.add_compare_args(p)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    """``test_pipeline``: a function that gives a new test pipeline for each of the run's Beam jobs."""
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    kwargs = common.compare_kwargs(args, beam_args)
    with common.writing(args.out, "compare", argv):
        metrics = compare(**kwargs, test_pipeline=test_pipeline)
        common.print_compare(args.out, metrics)
    return metrics
