"""A FAISS index over database descriptors, with an id table that maps FAISS ids back to image ids.

The index is described by an ``index_factory`` string (``Flat`` for exact search here; the FAISS issue adds
IVF/PQ/HNSW) and a metric (``ip``: inner product, i.e. cosine on L2-normalised vectors; ``l2``). Vectors get
int64 ids 0..N-1 (their row in the id table) via ``add_with_ids``; ids, not list positions, come back from
``search``.

Saved as a folder:
    index.faiss        FAISS's own binary format (never a pickle)
    ids.parquet        faiss_id int64, id string, landmark_id int64 (nullable)
    index.json         factory, metric, dim, count, the features' metadata and the config
"""

from __future__ import annotations

import dataclasses
import logging
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import config as cfg
from pipeline.errors import CairnError

log = logging.getLogger(__name__)
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
ID_TABLE_SCHEMA = pa.schema(
    [
        pa.field("faiss_id", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("landmark_id", pa.int64(), nullable=True),
    ]
)


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the index is built."""

    factory: str = "Flat"  # faiss.index_factory description, without the IDMap prefix
    metric: str = "ip"  # "ip" (cosine on normalised vectors) or "l2"
    use_gpu: bool = False  # move the index to the GPUs for search when some are present (falls back to CPU)


def labels_of_ids(labels: np.ndarray, I: np.ndarray) -> np.ndarray:
    """Landmark ids [Q, K] of the rows I [Q, K] of an id table's ``labels`` (-1 for missing neighbours)."""
    out = np.full(I.shape, -1, np.int64)
    valid = I >= 0
    out[valid] = labels[I[valid]]
    return out


def gpu_count() -> int:
    """GPUs FAISS can use here (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class VectorIndex:
    """FAISS index + id table. Build with :meth:`build`, or :meth:`load` a saved one."""

    def __init__(self, index: faiss.Index, image_ids: list[str], labels: np.ndarray, config: IndexConfig,
                 features_metadata: dict | None = None):
        self.index = index  # an IndexIDMap around the factory index
        self.image_ids = image_ids  # [N] image id of faiss id i
        self.labels = np.asarray(labels, dtype=np.int64)  # [N] landmark id of faiss id i (-1 = none)
        self.config = config
        self.features_metadata = features_metadata or {}
        self._search_index = index

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @classmethod
    def build(cls, xb: np.ndarray, image_ids: list[str], labels: np.ndarray, config: IndexConfig = IndexConfig(),
              features_metadata: dict | None = None) -> VectorIndex:
        """Index ``xb`` ([N, D] float32) with ids 0..N-1 standing for ``image_ids``."""
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        if xb.ndim != 2 or len(xb) != len(image_ids) or len(xb) != len(labels):
            raise ValueError(f"xb {xb.shape}, {len(image_ids)} ids and {len(labels)} labels must agree")
        if config.metric not in METRICS:
            raise CairnError(f"unknown metric {config.metric!r}; use one of {sorted(METRICS)}")
        try:
            inner = faiss.index_factory(xb.shape[1], config.factory, METRICS[config.metric])
            index = faiss.IndexIDMap(inner)
            if not index.is_trained:
                index.train(xb)
            index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
        except RuntimeError as e:
            detail = [line for line in str(e).splitlines() if line.strip()][-1]
            raise CairnError(f"FAISS cannot build {config.factory!r} over {len(xb)} vectors of dim {xb.shape[1]}: "
                             f"{detail}. Give a factory string without IDMap that suits this many vectors "
                             "(e.g. Flat)") from e
        return cls(index, list(image_ids), labels, config, features_metadata)

    def _searcher(self) -> faiss.Index:
        if self.config.use_gpu and self._search_index is self.index:
            if gpu_count() > 0:
                self._search_index = faiss.index_cpu_to_all_gpus(self.index)
                log.info("index: searching on %d GPU(s)", gpu_count())
            else:
                log.info("index: no GPU available to FAISS; searching on the CPU")
        return self._search_index

    def search(self, xq: np.ndarray, k: int, batch_size: int = 4096, progress: bool = False,
               ) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of each query: D [Q, k] float32 scores, I [Q, k] int64 faiss ids (-1 where fewer than k)."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise CairnError(
                f"query vectors have dimension {xq.shape[-1] if xq.ndim else '?'} but the index holds "
                f"dimension {self.dim}; extract queries with the same method and config as the database"
            )
        from tqdm import tqdm

        index = self._searcher()
        D = np.empty((len(xq), k), np.float32)
        I = np.empty((len(xq), k), np.int64)
        for lo in tqdm(range(0, len(xq), batch_size), desc="search", unit="batch", disable=not progress):
            D[lo:lo + batch_size], I[lo:lo + batch_size] = index.search(xq[lo:lo + batch_size], k)
        return D, I

    def labels_of(self, I: np.ndarray) -> np.ndarray:
        """Landmark ids of faiss ids (-1 for missing neighbours and unlabelled images)."""
        return labels_of_ids(self.labels, I)

    def ids_of(self, I: np.ndarray) -> list[list[str]]:
        return [[self.image_ids[j] for j in row if j >= 0] for row in I]

    def save(self, folder: str) -> None:
        from pipeline.fs import makedirs

        makedirs(folder)
        stale = os.path.join(folder, "postings.npz")  # a sparse index built here before
        if os.path.exists(stale):
            os.remove(stale)
        tmp = os.path.join(folder, ".index.faiss.tmp")
        faiss.write_index(self.index, tmp)
        os.replace(tmp, os.path.join(folder, "index.faiss"))
        labels = [None if v < 0 else int(v) for v in self.labels]
        table = pa.table({"faiss_id": np.arange(self.ntotal, dtype=np.int64), "id": self.image_ids,
                          "landmark_id": labels}, schema=ID_TABLE_SCHEMA)
        pq.write_table(table, os.path.join(folder, "ids.parquet"))
        cfg.save_json(os.path.join(folder, "index.json"), {
            "config": cfg.to_dict(self.config), "dim": self.dim, "count": self.ntotal,
            "faiss_version": faiss.__version__, "features": self.features_metadata,
        })

    @classmethod
    def load(cls, folder: str) -> VectorIndex:
        paths = [os.path.join(folder, n) for n in ("index.faiss", "ids.parquet", "index.json")]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise CairnError(f"index folder {folder} lacks {', '.join(map(os.path.basename, missing))}; "
                             "build it with `cairn index`")
        meta = cfg.load_json(paths[2])
        index = faiss.read_index(paths[0])
        table = pq.read_table(paths[1])
        if table.num_rows != index.ntotal or meta["count"] != index.ntotal or meta["dim"] != index.d:
            raise CairnError(f"index folder {folder} is inconsistent (index {index.ntotal} vectors of dim {index.d}, "
                             f"id table {table.num_rows} rows, manifest {meta['count']}); rebuild it")
        faiss_ids = table.column("faiss_id").to_numpy()
        if not np.array_equal(faiss_ids, np.arange(len(faiss_ids))):
            raise CairnError(f"id table of {folder} is not in faiss-id order; rebuild the index")
        from pipeline.schemas import labels_of

        return cls(index, table.column("id").to_pylist(), labels_of(table), IndexConfig(**meta["config"]),
                   meta.get("features"))
