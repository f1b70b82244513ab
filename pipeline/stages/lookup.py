"""Searching an index for the queries of a features folder: what local recognition, the neighbour lookup and
the Beam search job share (reading the queries, checking they match the index, the search itself, the neighbour
table they write, and the similarity to the known non-landmark images).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index.faiss_index import VectorIndex
from index.recognize import VoteConfig, keep_first, nonlandmark_similarity
from index.regions import RegionalIndex
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.featuresets import features_kind, features_prefix
from pipeline.parquet_io import find_shards, read_file, read_shards
from pipeline.schemas import cairn_metadata, same_features, sparse_matrix_of, vectors_of

BEAM_MIN_QUERIES = 200_000  # query sets this large are searched by the Beam job (pipeline/stages/search.py)
NEIGHBOURS_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("landmark_id", pa.int64(), nullable=True),
])


COSINE = "cosine"  # the neighbours' score: cosine similarity of the (L2-normalised) vectors searched
RERANKED = "reranked"  # after spatial verification: index/rerank.py's re-ranking score (see SCORE_MEANINGS)
SCORE_MEANINGS = {
    COSINE: "cosine similarity of the query's and the image's vectors (L2-normalised; for BoVW, of their tf-idf "
            "vectors; with detected regions, the best over the query's and the image's regions)",
    RERANKED: "spatial re-ranking score in [0, 1]: verified neighbours (min_inliers or more RANSAC inliers among "
              "the top_k) score 0.999 x min(inliers, saturation) / saturation + 0.001 x cosine, the others "
              "0.001 x cosine (0.000001 x cosine beyond the top_k) (features/verify.py rerank)",
}


def neighbours_schema(score: str = COSINE) -> pa.Schema:
    """The neighbours' schema, with what ``score`` means in its ``cairn`` metadata (``score``: cosine or
    reranked, ``score_meaning``: in words)."""
    return NEIGHBOURS_SCHEMA.with_metadata({b"cairn": json.dumps(
        {"kind": "neighbours", "score": score, "score_meaning": SCORE_MEANINGS[score]}, allow_nan=False).encode()})


def neighbours_table(query_ids: list[str], D: np.ndarray, I: np.ndarray, index, score: str = COSINE) -> pa.Table:
    """Long table: one row per (query, rank) for the neighbours that exist (vectorised: no per-row Python);
    ``score``: what D holds (:data:`COSINE`, or :data:`RERANKED` after spatial verification)."""
    valid = I >= 0
    q_rows, ranks = np.nonzero(valid)
    ids = I[valid]
    labels = index.labels[ids]
    db_ids = index.id_array() if hasattr(index, "id_array") else pa.array(index.image_ids, pa.string())
    return pa.table({
        "query_id": pa.array(query_ids, pa.string()).take(pa.array(q_rows)),
        "rank": (ranks + 1).astype(np.int32),
        "id": db_ids.take(pa.array(ids)),
        "score": D[valid].astype(np.float32),
        "landmark_id": pa.array(labels, pa.int64(), mask=labels < 0),
    }, schema=neighbours_schema(score))


CONFIDENCES_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("landmark_id", pa.int64(), nullable=True),
    pa.field("confidence", pa.float32(), nullable=False),
    pa.field("kept", pa.bool_(), nullable=False),
])


def confidences_schema(threshold: float, rule: str) -> pa.Schema:
    """The confidences' schema with the threshold and the rule in its ``cairn`` metadata."""
    return CONFIDENCES_SCHEMA.with_metadata({b"cairn": json.dumps({"kind": "confidences", "threshold": threshold,
                                                                    "rule": rule}, allow_nan=False).encode()})


def confidences_table(query_ids: list[str], pred: np.ndarray, conf: np.ndarray, threshold: float,
                      rule: str) -> pa.Table:
    """Every query's best answer and its confidence *before* the no-landmark threshold (query_id, landmark_id
    (null: none at all), confidence, kept: it passed the threshold), so that the report can draw GAP and accuracy
    against the threshold and the confidences of landmark and no-landmark queries (OUT/confidences.parquet, or
    the Beam job's OUT/confidences-*.parquet shards)."""
    pred = np.asarray(pred, np.int64)
    return pa.table({"query_id": pa.array(query_ids, pa.string()),
                     "landmark_id": pa.array(pred, pa.int64(), mask=pred < 0),
                     "confidence": pa.array(np.asarray(conf, np.float32)),
                     "kept": pa.array((pred >= 0) & (np.asarray(conf) >= threshold))},
                    schema=confidences_schema(threshold, rule))


def read_queries(features: str):
    """(ids, query vectors (dense [Q, D] or sparse CSR), metadata) of a query features folder."""
    kind = features_kind(features)
    if kind == "local":
        raise CairnError(f"{features} holds local features; encode them first (`cairn encode`)")
    table, meta = read_shards(features_prefix(features, kind))
    xq = sparse_matrix_of(table, meta["dim"]) if kind == "sparse" else vectors_of(table)
    return table.column("id").to_pylist(), xq, meta


def check_same_features(db_meta: dict, meta: dict, features: str) -> None:
    """CairnError when the queries were extracted otherwise than the database the index holds."""
    if db_meta and meta and not same_features(db_meta, meta):
        raise CairnError(
            f"queries in {features} were extracted with {meta.get('method')} {meta.get('config')} but the index "
            f"holds {db_meta.get('method')} {db_meta.get('config')}; extract both with the same method and config"
        )


def search(index, xq, k: int, params: str | None = None, progress: bool = False):
    """D, I of any index kind, with D as similarities (L2 distances of unit vectors turned into cosines)."""
    k = min(k, max(1, index.ntotal))
    if isinstance(index, (VectorIndex, RegionalIndex)):
        D, I = index.search(xq, k, params=params, progress=progress)
        if index.config.metric == "l2":  # squared distances of unit vectors -> cosine similarities
            D = np.where(I >= 0, 1.0 - D / 2.0, -np.inf).astype(np.float32)
        return D, I
    if params:
        raise CairnError("--search-params applies to FAISS indices, not to the BoVW inverted file")
    return index.search(xq, k, progress=progress)


def nonlandmark_sims(index, xq, D: np.ndarray, I: np.ndarray, config: VoteConfig, own: np.ndarray | None = None,
                     ) -> np.ndarray | None:
    """[Q] mean similarity of each query to its ``config.nonlandmark_k`` nearest known non-landmark images.

    Exact from the index's own non-landmark index when it has one; otherwise from the non-landmark images among
    the neighbours in D, I (missing ones count as 0). None when the database has no non-landmark image.
    ``own`` [Q]: the main-index row each query is (validation queries made from the database), left out of its
    own list: every other non-landmark image counts, as for a real query, which sees the whole database (leaving
    out all the held-out ones would make the validation queries' penalty smaller than the real queries').
    """
    nk = config.nonlandmark_k
    sub = getattr(index, "nonlandmarks", None)
    if sub is not None:
        if own is None:
            return nonlandmark_similarity(search(sub, xq, nk)[0], nk)
        row_of = {image_id: r for r, image_id in enumerate(sub.image_ids)}
        own_sub = np.array([row_of.get(index.image_ids[r], -2) for r in own], np.int64)
        Dn, In = search(sub, xq, nk + 1)
        return nonlandmark_similarity(keep_first(Dn, In, In != own_sub[:, None], nk)[0], nk)
    if not (index.labels < 0).any():
        return None
    if own is not None:  # the query itself is not among its neighbours
        D, I = keep_first(D, I, I != np.asarray(own)[:, None], config.k)
    D, I = D[:, :config.k], I[:, :config.k]  # the voting neighbours, as in tuning
    labels = index.labels_of(I)
    mask = (labels < 0) & (I >= 0)
    Dm = np.where(mask, D, -np.inf)
    Dm = -np.sort(-Dm, axis=1)[:, :nk]
    return nonlandmark_similarity(Dm, nk)


def read_rows(features: str, wanted: list[str], with_owner: bool = False):
    """Vectors (dense [n, D] or sparse CSR) of the images ``wanted`` of a features folder, in that order. With
    ``with_owner``: (vectors of every row of those images, owner [rows]: each row's position in ``wanted``),
    for regional features (several rows per image)."""
    kind = features_kind(features)
    tables, meta = [], None
    wanted_arr = pa.array(wanted, pa.string())
    for path in find_shards(features_prefix(features, kind)):
        with fs.FileSystems.open(path) as f:
            t = read_file(f)
        meta = meta or cairn_metadata(t.schema)
        tables.append(t.filter(pc.is_in(t.column("id"), value_set=wanted_arr)))
    table = pa.concat_tables(tables)
    found = table.column("id").to_pylist()
    rows_of: dict[str, list[int]] = {}
    for r, image_id in enumerate(found):
        rows_of.setdefault(image_id, []).append(r)
    missing = [w for w in wanted if w not in rows_of]
    if missing:
        raise CairnError(f"{features} lacks {len(missing)} database images of the index (e.g. {missing[0]}); "
                         "give the features the index was built from (--tune-db)")
    if with_owner:
        take = [(r, n) for n, w in enumerate(wanted) for r in rows_of[w]]
        owner = np.array([n for _, n in take], np.int64)
        table = table.take(pa.array([r for r, _ in take], pa.int64()))
    else:
        table = table.take(pa.array([rows_of[w][0] for w in wanted], pa.int64()))
    x = sparse_matrix_of(table, meta["dim"]) if kind == "sparse" else vectors_of(table)
    return (x, owner) if with_owner else x


def group_max(values: np.ndarray, owner: np.ndarray, groups: int) -> np.ndarray:
    """[groups] the largest of ``values`` [rows] per owner."""
    out = np.full(groups, -np.inf, np.float32)
    np.maximum.at(out, owner, np.asarray(values, np.float32))
    return out
