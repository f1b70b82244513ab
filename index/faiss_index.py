"""A FAISS index over database descriptors, with an id table that maps FAISS ids back to image ids.

The index is described by an ``index_factory`` string (``Flat``, ``IVF4096,Flat``, ``IVF4096,PQ64``,
``OPQ64_256,IVF4096,PQ64``, ``HNSW32,Flat``, ``IVF4096,PQ128x4fs,Refine(PQ128)``...) or ``auto``: chosen from the
number of vectors, their dimension and a memory budget (index/build.py). It is built in separate steps: train
on a seeded sample, save the trained empty index, add the vectors shard by shard with global int64 ids (their
row in the id table), merge the shards (in memory, or with the inverted lists on disk). ``search`` returns those
ids, never list positions.

Database images without a landmark id (known non-landmark images: clutter, indoor, people) are indexed like
the others, and also in a second, small index of their own (``nonlandmarks/``) that recognition uses to
penalise queries that look like them (index/recognize.py).

Saved as a folder:
    index.faiss        FAISS's own binary format (never a pickle)
    index.ivfdata      the inverted lists, when they were merged on disk (memory-mapped at search time)
    trained.faiss      the trained, empty index: more shards can be added to it later
    ids.parquet        faiss_id int64, id string, landmark_id int64 (nullable)
    index.json         factory (as built), metric, dim, count, search parameters, build figures, the
                       features' metadata, the config, and the sha256 and size of every file above ("files"),
                       checked when the index is loaded (:func:`verify_files`)
    nonlandmarks/      the same layout, over the non-landmark database images (when there are some)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index import build as B
from index.build import gpu_count  # noqa: F401 - part of this module's API
from pipeline import config as cfg
from pipeline.errors import CairnError
from pipeline.fs import local_path, sha256
from pipeline.parquet_io import write_table
from pipeline.schemas import labels_of

log = logging.getLogger(__name__)
METRICS = B.METRICS
ID_TABLE_SCHEMA = pa.schema(
    [
        pa.field("faiss_id", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("landmark_id", pa.int64(), nullable=True),
    ],
    metadata={b"cairn": json.dumps({"kind": "index ids", "faiss_id": "the row FAISS returns from a search of "
                                    "index.faiss (the BoVW index: of postings.npz)", "landmark_id": "null: a known "
                                    "non-landmark image"}).encode()},
)
FORMAT_VERSION = 2  # index.json layout
# the files of an index folder whose checksums index.json records (the FAISS index and the inverted file alike);
# nonlandmarks/ records its own
INDEX_FILES = ("index.faiss", "index.ivfdata", "trained.faiss", "ids.parquet", "postings.npz")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the index is built."""

    factory: str = "auto"  # faiss.index_factory description without IDMap, or "auto" (from count, dim, budget)
    metric: str = "ip"  # "ip" (cosine on normalised vectors) or "l2"
    search: str = ""  # default search parameters, FAISS ParameterSpace syntax ("" = the auto choice's)
    memory_budget: int = 0  # bytes of RAM the index may take (0 = half of the RAM available at build time)
    train_size: int = 0  # vectors the index is trained on (0 = 40 per IVF list, at least 65,536)
    shard_size: int = 200_000  # vectors added per shard (bounds the memory of one add)
    on_disk: str = "auto"  # IVF inverted lists on disk: "auto" (when the index exceeds the budget), "on", "off"
    nonlandmark_index: bool = True  # also index the non-landmark database images on their own
    seed: int = 0  # training sample and k-means initialisation
    use_gpu: bool = False  # train, add and search on the GPUs when FAISS sees some (falls back to the CPU)
    gpu_float16: bool = True  # float16 vectors and look-up tables on the GPU (half the memory)

    def __post_init__(self):
        cfg.check_numbers(self)
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, not {self.metric!r}")
        if self.on_disk not in ("auto", "on", "off"):
            raise ValueError(f"on_disk must be auto, on or off, not {self.on_disk!r}")
        if self.shard_size < 1 or self.train_size < 0 or self.memory_budget < 0:
            raise ValueError("shard_size must be >= 1, train_size and memory_budget >= 0")
        if self.factory != "auto":
            B.check_factory(self.factory)  # before any work: the dimension-free checks


def labels_of_ids(labels: np.ndarray, I: np.ndarray) -> np.ndarray:
    """Landmark ids [Q, K] of the rows I [Q, K] of an id table's ``labels`` (-1 for missing neighbours)."""
    out = np.full(I.shape, -1, np.int64)
    valid = I >= 0
    out[valid] = labels[I[valid]]
    return out


# A part of the database: a callable that loads (xb [n, D] float32, image ids [n], labels [n] int64)
Part = Callable[[], tuple[np.ndarray, Sequence[str], np.ndarray]]


class VectorIndex:
    """FAISS index + id table. Build with :meth:`build` / :meth:`build_parts`, or :meth:`load` a saved one."""

    def __init__(self, index: faiss.Index, image_ids: Sequence[str], labels: np.ndarray,
                 config: IndexConfig = IndexConfig(), features_metadata: dict | None = None, factory: str = "",
                 search_params: str = "", nonlandmarks: VectorIndex | None = None, build_info: dict | None = None):
        self.index = index  # answers search() with faiss ids = rows of the id table
        self.image_ids = list(image_ids)  # [N] image id of faiss id i
        self.labels = np.asarray(labels, dtype=np.int64)  # [N] landmark id of faiss id i (-1 = none)
        self.config = config
        self.features_metadata = features_metadata or {}
        self.factory = factory or config.factory  # the factory string actually built
        self.search_params = search_params  # ParameterSpace string applied before searching
        self.nonlandmarks = nonlandmarks  # index over the non-landmark database images (ids = their own rows)
        self.build_info = build_info or {}
        self._search_index = None
        self._on_gpu = False
        self._applied = None
        self._ids_array = None
        self._lock = threading.Lock()  # Beam shares one loaded index between threads

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    # -----------------------------------------------------------------------------------------------------------
    # building

    @classmethod
    def build(cls, xb: np.ndarray, image_ids: Sequence[str], labels: np.ndarray, config: IndexConfig = IndexConfig(),
              features_metadata: dict | None = None, folder: str | None = None, progress: bool = False,
              ) -> VectorIndex:
        """Index ``xb`` ([N, D] float32) with ids 0..N-1 standing for ``image_ids``, in shards of
        ``config.shard_size``."""
        xb = np.asarray(xb)
        labels = np.asarray(labels)
        if xb.ndim != 2 or len(xb) != len(image_ids) or len(xb) != len(labels):
            raise ValueError(f"xb {xb.shape}, {len(image_ids)} ids and {len(labels)} labels must agree")
        step = config.shard_size
        parts = [(lambda lo=lo: (xb[lo:lo + step], image_ids[lo:lo + step], labels[lo:lo + step]))
                 for lo in range(0, max(len(xb), 1), step)]
        counts = [min(step, len(xb) - lo) for lo in range(0, max(len(xb), 1), step)]
        return cls.build_parts(parts, counts, xb.shape[1], config, features_metadata, folder, progress)

    @classmethod
    def build_parts(cls, parts: list[Part], counts: list[int], dim: int, config: IndexConfig = IndexConfig(),
                    features_metadata: dict | None = None, folder: str | None = None, progress: bool = False,
                    ) -> VectorIndex:
        """Build from database parts loaded one at a time (e.g. one Parquet feature shard each).

        ``counts`` [P] gives each part's size up front (the training sample is drawn from all of them); parts
        larger than ``config.shard_size`` are added in several shards. ``folder`` is where the on-disk inverted
        lists go (required for on-disk merges; the index is then saved there).
        """
        from tqdm import tqdm

        n = int(sum(counts))
        started = time.perf_counter()
        index, factory, default_search, budget, on_disk = empty_index(n, dim, config)
        if on_disk and folder is None:
            raise CairnError("an on-disk index needs an output folder")
        if folder is not None:  # the files below replace the folder's: it is no complete index until saved
            invalidate(folder)
        sequential = not B.mergeable(index)

        # 1. train on a seeded sample drawn across all parts
        size, train_seconds = train_on_sample(index, parts, counts, dim, config, progress)
        trained = faiss.clone_index(index)
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            _write_index(trained, os.path.join(folder, "trained.faiss"))

        # 2. add shard by shard with global ids, 3. merge
        image_ids: list[str] = []
        labels = np.empty(n, np.int64)
        nl_vectors, nl_rows = [], []
        shard_paths, merged = [], None
        t0 = time.perf_counter()
        offset = 0
        bar = tqdm(total=n, desc="index: add", unit="vec", unit_scale=True, disable=not progress)
        shard_count = sum(-(-c // config.shard_size) for c in counts)
        for part, count in zip(parts, counts, strict=True):
            xb, ids, labs = part()
            xb = np.asarray(xb, dtype=np.float32)
            if len(xb) != count or len(ids) != count or len(labs) != count:
                raise CairnError(f"a database part holds {len(xb)} vectors where {count} were counted; "
                                 "the features changed during the build, rerun it")
            if xb.ndim != 2 or xb.shape[1] != dim:
                raise CairnError(f"a database part has vectors of shape {xb.shape}; the index is {dim}-d")
            image_ids.extend(ids)
            labs = np.asarray(labs, dtype=np.int64)
            labels[offset:offset + count] = labs
            if config.nonlandmark_index and (labs < 0).any():
                nl_vectors.append(xb[labs < 0].copy())
                nl_rows.append(np.nonzero(labs < 0)[0] + offset)
            for lo in range(0, count, config.shard_size):
                chunk = xb[lo:lo + config.shard_size]
                gids = np.arange(offset + lo, offset + lo + len(chunk), dtype=np.int64)
                if sequential:  # HNSW graphs and fast-scan lists cannot be merged: one index takes every shard
                    merged = B.add_shard(trained, chunk, gids, into=merged if merged is not None else index)
                elif on_disk:
                    shard = B.add_shard(trained, chunk, gids, config.use_gpu, config.gpu_float16)
                    path = os.path.join(folder, "shards", f"shard-{len(shard_paths):05d}-of-{shard_count:05d}.faiss")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    _write_index(shard, path)
                    shard_paths.append(path)
                    del shard
                else:
                    shard = B.add_shard(trained, chunk, gids, config.use_gpu, config.gpu_float16)
                    if merged is None:
                        merged = shard
                    else:
                        B.merge_into(merged, shard, src_first_id=int(gids[0]))
                bar.update(len(chunk))
            offset += count
        bar.close()
        add_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        if on_disk:
            merged = B.merge_on_disk(trained, shard_paths, os.path.join(folder, "index.ivfdata"))
            shutil.rmtree(os.path.join(folder, "shards"), ignore_errors=True)
        merge_seconds = time.perf_counter() - t0
        nonlandmarks = cls.nonlandmark_index(nl_vectors, nl_rows, image_ids, labels, config, features_metadata)
        info = {"train_size": int(size), "train_seconds": round(train_seconds, 3),
                "add_seconds": round(add_seconds, 3), "merge_seconds": round(merge_seconds, 3),
                "seconds": round(time.perf_counter() - started, 3), "shards": shard_count, "on_disk": on_disk,
                "memory_budget": int(budget)}
        log.info("index: %s over %d vectors of dim %d (train %.1f s on %d, add %.1f s, merge %.1f s)", factory, n,
                 dim, train_seconds, size, add_seconds, merge_seconds)
        return cls(merged, image_ids, labels, config, features_metadata, factory,
                   config.search or default_search, nonlandmarks, info)

    @classmethod
    def nonlandmark_index(cls, vectors: list[np.ndarray], rows: list[np.ndarray], image_ids: Sequence[str],
                          labels: np.ndarray, config: IndexConfig, features_metadata: dict | None) -> VectorIndex | None:
        """The side index of the database's non-landmark images (``vectors`` at global ``rows``, in parts), or
        None without any: exact unless the main index's factory is automatic, never on disk."""
        if not vectors:
            return None
        rows = np.concatenate(rows)
        nl_config = dataclasses.replace(config, factory="auto" if config.factory == "auto" else "Flat", search="",
                                        nonlandmark_index=False, on_disk="off")
        return cls.build(np.concatenate(vectors), [image_ids[r] for r in rows], labels[rows], nl_config,
                         features_metadata)

    # -----------------------------------------------------------------------------------------------------------
    # searching

    def _searcher(self, params: str) -> faiss.Index:
        """The index to search, with ``params`` applied. Called under self._lock."""
        if self._search_index is None:
            self._search_index, self._on_gpu = B.to_gpu(self.index, self.config.use_gpu, self.config.gpu_float16)
            if self._on_gpu:
                log.info("index: searching on %d GPU(s)", gpu_count())
        if params != self._applied:
            apply_search_params(self._search_index, params, self._on_gpu)
            self._applied = params
        return self._search_index

    def search(self, xq: np.ndarray, k: int, batch_size: int = 4096, progress: bool = False,
               params: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of each query: D [Q, k] float32 scores, I [Q, k] int64 faiss ids (-1 where fewer than k).

        ``params`` (FAISS ParameterSpace syntax, e.g. ``nprobe=32`` or ``efSearch=128``) overrides the index's
        default search parameters for this call.
        """
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise CairnError(
                f"query vectors have dimension {xq.shape[-1] if xq.ndim else '?'} but the index holds "
                f"dimension {self.dim}; extract queries with the same method and config as the database"
            )
        if k < 1:
            raise CairnError(f"k must be >= 1, not {k}")
        from tqdm import tqdm

        D = np.empty((len(xq), k), np.float32)
        I = np.empty((len(xq), k), np.int64)
        # one search at a time per index: parameters are index state, and GPU indices are not thread-safe
        # (FAISS parallelises each batch itself)
        with self._lock:
            index = self._searcher(self.search_params if params is None else params)
            for lo in tqdm(range(0, len(xq), batch_size), desc="search", unit="batch", disable=not progress):
                D[lo:lo + batch_size], I[lo:lo + batch_size] = index.search(xq[lo:lo + batch_size], k)
        return D, I

    def labels_of(self, I: np.ndarray) -> np.ndarray:
        """Landmark ids of faiss ids (-1 for missing neighbours and unlabelled images)."""
        return labels_of_ids(self.labels, I)

    def ids_of(self, I: np.ndarray) -> list[list[str]]:
        return [[self.image_ids[j] for j in row if j >= 0] for row in I]

    def id_array(self) -> pa.Array:
        """The image ids as an Arrow string array (``.take(I)`` maps many faiss ids at once)."""
        if self._ids_array is None:
            self._ids_array = pa.array(self.image_ids, pa.string())
        return self._ids_array

    # -----------------------------------------------------------------------------------------------------------
    # saving and loading

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        invalidate(folder)
        for stale in ("postings.npz",):  # a sparse index built here before
            if os.path.exists(os.path.join(folder, stale)):
                os.remove(os.path.join(folder, stale))
        _write_index(self.index, os.path.join(folder, "index.faiss"))  # always a CPU index
        ivfdata = os.path.join(folder, "index.ivfdata")
        if os.path.exists(ivfdata) and not self.build_info.get("on_disk"):
            os.remove(ivfdata)  # left by an earlier on-disk build in this folder
        labels = pa.array(self.labels, pa.int64(), mask=self.labels < 0)
        table = pa.table({"faiss_id": np.arange(self.ntotal, dtype=np.int64), "id": self.id_array(),
                          "landmark_id": labels}, schema=ID_TABLE_SCHEMA)
        write_table(table, os.path.join(folder, "ids.parquet"))
        sub = os.path.join(folder, "nonlandmarks")
        if self.nonlandmarks is not None:
            self.nonlandmarks.save(sub)
        elif os.path.exists(sub):
            shutil.rmtree(sub)
        cfg.save_json(os.path.join(folder, "index.json"), {
            "format_version": FORMAT_VERSION, "factory": self.factory, "metric": self.config.metric,
            "dim": self.dim, "count": self.ntotal, "search_params": self.search_params,
            "nonlandmarks": 0 if self.nonlandmarks is None else self.nonlandmarks.ntotal,
            "build": self.build_info, "config": cfg.to_dict(self.config), "faiss_version": faiss.__version__,
            "features": self.features_metadata, "files": file_checksums(folder),
        })

    @classmethod
    def load(cls, folder: str, mmap: bool = False) -> VectorIndex:
        """Load a saved index; ``mmap`` maps index.faiss instead of reading it (large read-only indices). An
        index folder on a Beam filesystem (gs://...) is downloaded once per process first."""
        folder = local_path(folder)
        paths = [os.path.join(folder, n) for n in ("index.faiss", "ids.parquet", "index.json")]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise CairnError(f"index folder {folder} lacks {', '.join(map(os.path.basename, missing))}; "
                             "build it with `cairn index`")
        meta = cfg.load_json(paths[2])
        if meta.get("format_version") != FORMAT_VERSION:
            raise CairnError(f"index folder {folder} was written by another version of Cairn (format "
                             f"{meta.get('format_version', 1)}, expected {FORMAT_VERSION}); rebuild it with "
                             "`cairn index`")
        verify_files(folder, meta, ("index.faiss", "ids.parquet"))
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap else 0)
        try:
            index = faiss.read_index(paths[0], flags)
        except RuntimeError as e:
            raise CairnError(f"cannot read {paths[0]}: {B._faiss_error(e)}; rebuild the index") from e
        table = pq.read_table(paths[1])
        if table.num_rows != index.ntotal or meta["count"] != index.ntotal or meta["dim"] != index.d:
            raise CairnError(f"index folder {folder} is inconsistent (index {index.ntotal} vectors of dim {index.d}, "
                             f"id table {table.num_rows} rows, manifest {meta['count']}); rebuild it")
        faiss_ids = table.column("faiss_id").to_numpy()
        if not np.array_equal(faiss_ids, np.arange(len(faiss_ids))):
            raise CairnError(f"id table of {folder} is not in faiss-id order; rebuild the index")

        sub = os.path.join(folder, "nonlandmarks")
        nonlandmarks = cls.load(sub) if meta.get("nonlandmarks") else None
        out = cls(index, table.column("id").to_pylist(), labels_of(table), IndexConfig(**meta["config"]),
                  meta.get("features"), meta["factory"], meta.get("search_params", ""), nonlandmarks,
                  meta.get("build"))
        out._ids_array = table.column("id").combine_chunks()
        return out


def apply_search_params(index: faiss.Index, params: str, on_gpu: bool = False) -> None:
    """Set ``params`` ("nprobe=32,efSearch=64,k_factor_rf=8") on ``index``; a clear error for unknown ones."""
    if not params:
        return
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    for item in params.split(","):
        name, eq, value = item.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not eq or not name or number is None:
            raise CairnError(f"search parameter {item!r}: expected NAME=NUMBER, e.g. nprobe=32 or efSearch=64")
        try:
            space.set_index_parameter(index, name, number)
        except RuntimeError as e:
            raise CairnError(f"search parameter {name}={value} does not apply to this index "
                             f"({type(faiss.downcast_index(index)).__name__}): {B._faiss_error(e)}. "
                             "IVF indices take nprobe, HNSW efSearch, Refine k_factor_rf") from e


def empty_index(n: int, dim: int, config: IndexConfig, mergeable_only: bool = False):
    """(untrained empty index, factory, its default search parameters, memory budget, on-disk lists) of an index
    of ``n`` vectors of ``dim`` under ``config`` (factory "auto": chosen from the size and the budget;
    ``mergeable_only``: among the kinds whose filled shards can be merged, and CairnError for a given one that
    is not)."""
    if n == 0:
        raise CairnError("there are no vectors to index; check the features folder")
    budget = config.memory_budget or B.available_memory() // 2
    if config.factory == "auto":
        factory, search = B.choose_factory(n, dim, budget, mergeable_only=mergeable_only)
    else:
        factory, search = config.factory, ""
    index = B.new_index(factory, dim, config.metric)
    if mergeable_only and not B.mergeable(index):
        raise CairnError(f"{factory}: filled copies of this index kind (HNSW, fast-scan IVF) cannot be merged, so "
                         "its adds cannot be spread over workers; build it with --beam off")
    return index, factory, search, budget, _decide_on_disk(config.on_disk, index, n, dim, budget)


def train_on_sample(index, parts: list[Part], counts: list[int], dim: int, config: IndexConfig,
                    progress: bool = False) -> tuple[int, float]:
    """Train ``index`` on a seeded sample of the vectors drawn across all ``parts`` (rows ``counts``);
    returns (sample size, seconds). Kinds that learn nothing take no sample."""
    n = int(sum(counts))
    size = B.train_size_for(index, n, config.train_size)
    t0 = time.perf_counter()
    if size:
        rows = np.sort(np.random.default_rng(config.seed).choice(n, size, replace=False))
        sample = _gather(parts, counts, rows, dim, progress)
        B.train_index(index, sample, config.use_gpu, config.gpu_float16, config.seed)
        del sample
    return size, time.perf_counter() - t0


def _decide_on_disk(mode: str, index: faiss.Index, n: int, dim: int, budget: int) -> bool:
    if mode == "off":
        return False
    plain_ivf = B.on_disk_capable(index)
    if mode == "on":
        if not plain_ivf:
            raise CairnError("on-disk inverted lists need a plain IVF index (IVF..,Flat / PQ / SQ, without a "
                             "pre-transform, Refine or fast-scan codes); give such a factory or --on-disk off")
        return True
    if not plain_ivf:
        return False
    ivf = faiss.downcast_index(index)
    estimate = n * (ivf.code_size + B.ID_BYTES)
    if estimate > budget:
        log.info("index: about %.1f GB of inverted lists exceed the %.1f GB budget; merging them on disk",
                 estimate / 1e9, budget / 1e9)
        return True
    return False


def _gather(parts: list[Part], counts: list[int], rows: np.ndarray, dim: int, progress: bool) -> np.ndarray:
    """The vectors at global ``rows`` (sorted), loading each part that holds some."""
    out = np.empty((len(rows), dim), np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    filled = 0
    for p, part in enumerate(parts):
        lo, hi = np.searchsorted(rows, [starts[p], starts[p + 1]])
        if hi == lo:
            continue
        xb = part()[0]
        out[filled:filled + hi - lo] = np.asarray(xb, dtype=np.float32)[rows[lo:hi] - starts[p]]
        filled += hi - lo
    if progress:
        log.info("index: training sample of %d vectors drawn from %d parts", len(rows), len(parts))
    return out


def invalidate(folder: str) -> None:
    """Remove ``folder``'s index.json before its files are rewritten: index.json is written last, so a save
    killed part-way leaves a folder that no reader or rerun takes for a complete index."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, "index.json"))


def file_checksums(folder: str) -> dict:
    """{name: {"sha256": hex digest, "bytes": size}} of the INDEX_FILES present in ``folder`` (index.json's
    "files", written after them)."""
    out = {}
    for name in INDEX_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            out[name] = {"sha256": sha256(path), "bytes": os.path.getsize(path)}
    return out


def verify_files(folder: str, meta: dict, required: Sequence[str]) -> None:
    """Check the files of the index folder ``folder`` against the checksums its index.json (``meta``) records:
    a file that changed since the build (damaged, truncated, replaced) is a CairnError that names it, instead of
    an index that answers with garbage. ``required``: the files the loader reads, which the record must list.
    An index written before checksums were recorded loads with a warning."""
    recorded = meta.get("files")
    if recorded is None:
        log.warning("index: %s was written by an older Cairn that recorded no checksums of its files, so they "
                    "cannot be checked for damage; rebuild it with `cairn index` to have them checked", folder)
        return
    rebuild = "the index is damaged or was changed after it was built; rebuild the index with `cairn index`"
    for name in sorted(set(recorded) | set(required)):
        path = os.path.join(folder, name)
        expected = recorded.get(name)
        if expected is None:
            raise CairnError(f"{path}: index.json records no checksum of it; {rebuild}")
        if not os.path.exists(path):
            raise CairnError(f"{path} is missing; {rebuild}")
        size = os.path.getsize(path)
        if size != expected.get("bytes"):
            raise CairnError(f"{path} holds {size:,} bytes where the build wrote {expected.get('bytes'):,}; "
                             f"{rebuild}")
        if sha256(path) != expected.get("sha256"):
            raise CairnError(f"{path} does not match the sha256 recorded when it was built; {rebuild}")


def _write_index(index: faiss.Index, path: str) -> None:
    """FAISS's write_index, atomically: a write that fails (a full disk) leaves no part of the file behind."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
