"""An inverted file over sparse bag-of-visual-words vectors (tf-idf), the classic BoVW retrieval index.

Sivic & Zisserman's "Video Google" (2003) scores a query against the database through an inverted file:
for each visual word of the query, the database images that contain it. With L2-normalised tf-idf rows the
score is their inner product (cosine similarity). Stored as a CSC matrix (column j = the posting list of word
j: image rows and weights) the query product ``Xb @ xq.T`` only touches the posting lists of the query's
words, which is exactly what an inverted file does; scipy's sparse product runs it in C.
A dense FAISS index would need ``vocabulary size x 4`` bytes per image (256 KB at 65,536 words), where the
inverted file needs ~8 bytes per distinct word of each image.

Saved as a folder, beside the FAISS index format (index/faiss_index.py):
    postings.npz     the CSC matrix (data, indices, indptr, shape) as a Cairn artefact (features/artifacts.py)
    ids.parquet      faiss_id int64 (row), id string, landmark_id int64 (nullable)
    index.json       kind "sparse-inverted-file", dim, count, the features' metadata, the sha256 and size of the
                     files above ("files", checked on load)
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from features import artifacts
from index.faiss_index import (
    ID_TABLE_SCHEMA,
    VectorIndex,
    file_checksums,
    invalidate,
    labels_of_ids,
    verify_files,
)
from index.regions import wrap
from pipeline import config as cfg
from pipeline.errors import CairnError
from pipeline.fs import local_path, makedirs
from pipeline.parquet_io import write_table
from pipeline.schemas import labels_of


@dataclasses.dataclass(frozen=True)
class SparseIndexConfig:
    """How the inverted file scores."""

    metric: str = "ip"  # inner product of L2-normalised tf-idf rows (cosine); the only metric
    factory: str = "InvertedFile"  # shown in reports beside FAISS factory strings


class SparseIndex:
    """Inverted file over [N, dim] sparse rows with the same search API as VectorIndex."""

    def __init__(self, postings: sp.csc_matrix, image_ids: list[str], labels: np.ndarray,
                 features_metadata: dict | None = None):
        self.postings = postings  # [N, dim] float32 CSC: column j = images holding word j
        self.image_ids = image_ids
        self.labels = np.asarray(labels, dtype=np.int64)
        self.features_metadata = features_metadata or {}
        self.config = SparseIndexConfig()

    @property
    def dim(self) -> int:
        return self.postings.shape[1]

    @property
    def ntotal(self) -> int:
        return self.postings.shape[0]

    @classmethod
    def build(cls, xb, image_ids: list[str], labels: np.ndarray, features_metadata: dict | None = None,
              ) -> SparseIndex:
        """Index ``xb`` (scipy sparse [N, dim]) with ids 0..N-1 standing for ``image_ids``."""
        if xb.shape[0] != len(image_ids) or len(image_ids) != len(labels):
            raise ValueError(f"xb {xb.shape}, {len(image_ids)} ids and {len(labels)} labels must agree")
        return cls(sp.csc_matrix(xb, dtype=np.float32), list(image_ids), labels, features_metadata)

    def search(self, xq, k: int, batch_size: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """k-NN by inner product: D [Q, k] float32, I [Q, k] int64 (-1 where fewer than k images share a word).

        Neighbours are sorted by score, then by row id among the k kept (which of several images tied at the
        k-th score is kept is not specified). ``batch_size`` 0 bounds a batch's score matrix (up to B x N
        non-zeros: common words reach most images) to about 2**25 entries.
        """
        xq = sp.csr_matrix(xq, dtype=np.float32)
        if xq.shape[1] != self.dim:
            raise CairnError(f"query vectors have dimension {xq.shape[1]} but the index holds dimension {self.dim}; "
                             "encode queries with the same vocabulary as the database")
        from tqdm import tqdm

        k = min(k, max(1, self.ntotal))
        D = np.full((xq.shape[0], k), -np.inf, np.float32)
        I = np.full((xq.shape[0], k), -1, np.int64)
        xbt = self.postings.T  # [dim, N] CSR view (no copy): row j is the posting list of word j
        batch_size = batch_size or max(1, 2**25 // max(1, self.ntotal))
        for lo in tqdm(range(0, xq.shape[0], batch_size), desc="search", unit="batch", disable=not progress):
            scores = (xq[lo:lo + batch_size] @ xbt).tocsr()  # [B, N] sparse: only images sharing a word
            for r in range(scores.shape[0]):
                a, b = scores.indptr[r], scores.indptr[r + 1]
                hits, values = scores.indices[a:b].astype(np.int64), scores.data[a:b]
                if len(hits) > k:
                    keep = np.argpartition(-values, k - 1)[:k]
                    hits, values = hits[keep], values[keep]
                order = np.lexsort((hits, -values))  # best first, ties by row id
                D[lo + r, :len(order)] = values[order]
                I[lo + r, :len(order)] = hits[order]
        return D, I

    def labels_of(self, I: np.ndarray) -> np.ndarray:
        return labels_of_ids(self.labels, I)

    def index_bytes(self) -> int:
        p = self.postings
        return int(p.data.nbytes + p.indices.nbytes + p.indptr.nbytes)

    def save(self, folder: str) -> None:
        makedirs(folder)
        invalidate(folder)
        stale = os.path.join(folder, "index.faiss")  # a dense index built here before
        if os.path.exists(stale):
            os.remove(stale)
        p = self.postings
        artifacts.save(os.path.join(folder, "postings.npz"), "sparse_index",
                       {"data": p.data, "indices": p.indices, "indptr": p.indptr, "shape": np.array(p.shape)},
                       cfg.to_dict(self.config))
        labels = [None if v < 0 else int(v) for v in self.labels]
        write_table(pa.table({"faiss_id": np.arange(self.ntotal, dtype=np.int64), "id": self.image_ids,
                              "landmark_id": labels}, schema=ID_TABLE_SCHEMA), os.path.join(folder, "ids.parquet"))
        cfg.save_json(os.path.join(folder, "index.json"), {
            "kind": "sparse-inverted-file", "config": cfg.to_dict(self.config), "dim": self.dim,
            "count": self.ntotal, "nnz": int(p.nnz), "features": self.features_metadata,
            "files": file_checksums(folder),
        })

    @classmethod
    def load(cls, folder: str) -> SparseIndex:
        meta = cfg.load_json(os.path.join(folder, "index.json"))
        verify_files(folder, meta, ("postings.npz", "ids.parquet"))
        arrays, _ = artifacts.load(os.path.join(folder, "postings.npz"), "sparse_index")
        shape = tuple(int(v) for v in arrays["shape"])
        postings = sp.csc_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape)
        table = pq.read_table(os.path.join(folder, "ids.parquet"))
        if table.num_rows != shape[0] or meta["count"] != shape[0]:
            raise CairnError(f"index folder {folder} is inconsistent ({shape[0]} rows, id table {table.num_rows}); "
                             "rebuild it")
        return cls(postings, table.column("id").to_pylist(), labels_of(table), meta.get("features"))


def load_any(folder: str):
    """A VectorIndex or a SparseIndex, whichever ``folder`` holds; an index of detected regions comes as an
    index of images (index/regions.py)."""
    folder = local_path(folder)  # an index on gs:// etc.: downloaded once per process
    record = os.path.join(folder, "index.json")
    if os.path.exists(record) and cfg.load_json(record).get("kind") == "sparse-inverted-file":
        return SparseIndex.load(folder)
    return wrap(VectorIndex.load(folder))
