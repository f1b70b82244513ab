"""Building a FAISS index the way a million-vector corpus needs: choose, train, add shards, merge.

The steps are separate (CONVENTIONS 3) so that each can run where it fits, and so that the scale-out issue can
put the middle one on Beam workers:

1. :func:`choose_factory` picks an ``index_factory`` string and its search parameters from the number of
   vectors, their dimension and a memory budget, when the user gives no factory.
2. :func:`train_index` trains the empty index on a seeded sample (IVF centroids, PQ/OPQ codebooks) and the
   trained, empty index is saved (``trained.faiss``): more vectors can be added to it later.
3. :func:`add_shard` adds one shard of vectors, with their global int64 ids, to a copy of the trained index.
4. :func:`merge_shards` merges the filled shards into one index, in memory or, for IVF indices that do not fit
   in RAM, with the inverted lists in one on-disk file (``faiss.contrib.ondisk.merge_ondisk``) that FAISS
   memory-maps at search time.

Ids: Cairn's global ids are the rows of the id table, 0..N-1, and shards hold consecutive ranges of them.
IVF indices store the ids in their inverted lists. Every other kind (Flat, HNSW, IVF with a refinement stage)
numbers its vectors by position; those are filled and merged in id order, which :func:`add_shard` and
:func:`merge_into` check, so their positions are the global ids and no ``IndexIDMap`` (8 bytes per vector) is
needed. HNSW graphs and fast-scan IVF lists cannot be merged (:func:`mergeable`), so those take their shards
one after the other into one index.

GPU: with ``use_gpu`` and a GPU visible to FAISS, IVF training and adding run on all GPUs
(``index_cpu_to_all_gpus``, float16 look-up tables when asked, sharded across GPUs); index kinds the GPU does
not implement (HNSW, fast-scan PQ, refinement) and machines without a GPU fall back to the CPU with a log line.
GPU indices are always converted back to CPU indices before they are saved.
"""

from __future__ import annotations

import logging
import math
import os
import re

import faiss
import numpy as np

from pipeline.errors import CairnError
from pipeline.resources import available_memory as available_memory  # sizes the index; callers import it here

log = logging.getLogger(__name__)
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}

EXACT_MAX = 50_000  # up to this many vectors, exact search is fast enough (a few ms per query)
ID_BYTES = 8  # an int64 id per vector, in the inverted lists or the IDMap


def gpu_count() -> int:
    """GPUs FAISS can use here (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4 sqrt(n) (FAISS's guideline), 16..65536."""
    return int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def choose_factory(n: int, d: int, memory_budget: int, mergeable_only: bool = False) -> tuple[str, str]:
    """(factory string, default search parameters) for ``n`` vectors of dimension ``d`` whose index may take
    ``memory_budget`` bytes of RAM.

    - up to EXACT_MAX vectors: ``Flat``: exact, nothing to train, fast enough;
    - more: ``IVF{~4 sqrt(n)},PQ{d/8}x4fs,Refine(PQ{d/4})``: an inverted file whose 4-bit fast-scan PQ codes
      (d/16 bytes) shortlist ``k_factor_rf x k`` candidates in ``nprobe`` lists, re-ranked by 8-bit PQ codes of
      d/4 bytes: 5d/16 + 8 bytes per vector with the id (168 for d=512, a twelfth of the float32 vectors). The
      README's "Indices" section and `make bench` (section "index") give its measured recall and speed on a
      million landmark-shaped vectors beside Flat, IVF-Flat, IVF-PQ and HNSW;
    - when that does not fit in the budget, or ``mergeable_only`` (an index built from shards filled apart, on
      Beam workers: fast-scan lists cannot be merged): ``IVF{nlist},PQ{d/8}`` (d/8 + 8 bytes per vector), whose
      inverted lists are merged on disk and memory-mapped above the budget.
    """
    if n <= EXACT_MAX:
        return "Flat", ""
    nlist = nlist_for(n)
    fast = _largest_divisor(d, max(2, d // 8))
    refine = _largest_divisor(d, max(1, d // 4))
    if not mergeable_only and fast % 2 == 0 and n * (fast // 2 + refine + ID_BYTES) + nlist * d * 4 <= memory_budget:
        return f"IVF{nlist},PQ{fast}x4fs,Refine(PQ{refine})", DEFAULT_SEARCH
    return f"IVF{nlist},PQ{_largest_divisor(d, max(1, d // 8))}", "nprobe=64"


DEFAULT_SEARCH = "nprobe=128,k_factor_rf=64"  # measured by `make bench` (index section) on 1M x 512


def _largest_divisor(d: int, at_most: int) -> int:
    return max(m for m in range(1, min(d, at_most) + 1) if d % m == 0)


def parse_memory(text: str) -> int:
    """'8G', '512M', '1.5GB', '0' -> bytes (0 = automatic)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise CairnError(f"memory size {text!r}: give a number with an optional unit, e.g. 512M or 8G")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2) or "b"))


# ---------------------------------------------------------------------------------------------------------------
# The index objects


# Sizes in a factory string that FAISS takes without complaint but then aborts, crashes, hangs or answers zeros
# on (HNSW0 and HNSW1 abort or crash at the first add, PQ4x0 divides by zero, NSG2 never ends, PCA0 maps every
# vector to nothing...): (pattern, (name, smallest, largest or None) of each of its numbers). Every size must
# also be at least 1.
FACTORY_SIZES = (
    (r"HNSW(\d+)", (("M (links per node)", 2, 512),)),
    (r"NSG(\d+)", (("R (graph degree)", 4, 512),)),
    (r"IVF(\d+)", (("nlist (inverted lists)", 1, 1 << 24),)),
    (r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", (("M (sub-quantizers)", 1, None), ("bits per code", 1, 16))),
    (r"(?<![A-Za-z])(?:RQ|LSQ)(\d+)x(\d+)", (("M (quantizers)", 1, None), ("bits per code", 1, 16))),
    (r"(?:PRQ|PLSQ)(\d+)x(\d+)x(\d+)", (("splits", 1, None), ("quantizers", 1, None), ("bits per code", 1, 16))),
)
_TRANSFORM_DIM = r"(?:OPQ\d+_|PCAW?R?|RR|ITQ|Pad)(\d+)"  # pre-transforms that set the dimension after them


def check_factory(factory: str, d: int | None = None) -> None:
    """Refuse a factory string whose sizes FAISS would accept and then abort the process on (or hang, or answer
    zeros with): every size at least 1, the ranges of FACTORY_SIZES and, given the dimension ``d``, PQ and OPQ
    sub-quantizers that divide the dimension they see. FAISS itself still checks the rest (unknown components
    are a RuntimeError, made a CairnError by :func:`new_index`)."""
    if "idmap" in factory.lower():
        raise CairnError(f"factory {factory!r}: give it without IDMap; Cairn adds the id mapping itself")
    zero = re.search(r"[A-Za-z_]*(?<!\d)0+(?![\d.])", factory)
    if zero:
        raise CairnError(f"factory {factory!r}: {zero.group(0)!r} has a size of 0; every size in a factory string "
                         "must be at least 1 (e.g. HNSW32,Flat or IVF1024,PQ64)")
    for pattern, sizes in FACTORY_SIZES:
        for m in re.finditer(pattern, factory):
            for value, (name, low, high) in zip(m.groups(), sizes, strict=True):
                if value is not None and not (low <= int(value) and (high is None or int(value) <= high)):
                    limit = f"at least {low}" if high is None else f"between {low} and {high}"
                    raise CairnError(f"factory {factory!r}: in {m.group(0)}, the {name} must be {limit}, not {value}")
    if d is not None:
        _check_pq_divides(factory, d)


def _check_pq_divides(factory: str, d: int) -> None:
    """A PQ's (and OPQ's) sub-quantizer count must divide the dimension it sees (``d`` after pre-transforms)."""
    dim = d
    for m in re.finditer(rf"{_TRANSFORM_DIM}|(?<![A-Za-z])(O?PQ)(\d+)", factory):
        if m.group(1) is not None:
            dim = int(m.group(1))
            continue
        parts = int(m.group(3))
        if dim % parts:
            raise CairnError(f"factory {factory!r}: {m.group(2)}{parts} splits the {dim}-d vectors into {parts} "
                             f"parts, but {parts} does not divide {dim}; use a divisor of {dim}, e.g. "
                             f"{_largest_divisor(dim, max(1, dim // 8))}")


def new_index(factory: str, d: int, metric: str) -> faiss.Index:
    """An empty index from a factory string (without an IDMap: see the module docstring on ids), checked first
    (:func:`check_factory`): FAISS aborts the process on some sizes it accepts."""
    if metric not in METRICS:
        raise CairnError(f"unknown metric {metric!r}; use one of {sorted(METRICS)}")
    check_factory(factory, d)
    try:
        index = faiss.index_factory(d, factory, METRICS[metric])
    except RuntimeError as e:
        raise CairnError(f"FAISS cannot make an index from {factory!r} for dimension {d}: {_faiss_error(e)}. "
                         "See https://github.com/facebookresearch/faiss/wiki/The-index-factory") from e
    return index


def stores_ids(index: faiss.Index) -> bool:
    """True for indices that keep int64 ids themselves (IVF, possibly behind a pre-transform)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return stores_ids(index.index)
    return isinstance(index, faiss.IndexIVF)


def ivf_of(index: faiss.Index):
    """The IndexIVF inside ``index`` (through IDMap, pre-transforms and refinement), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def is_hnsw(index: faiss.Index) -> bool:
    inner = _unwrap(index)
    return isinstance(inner, faiss.IndexHNSW)


def mergeable(index: faiss.Index) -> bool:
    """Whether filled copies of ``index`` can be merged. HNSW graphs cannot; fast-scan IVF lists
    (BlockInvertedLists) corrupt memory when merged in FAISS 1.15 (caught by our tests), so both take their
    shards one after the other into one index instead."""
    if is_hnsw(index):
        return False
    ivf = ivf_of(index)
    return not (ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan))


def _unwrap(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform | faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index if isinstance(index, faiss.IndexRefine) else index.index)
    return index


def _faiss_error(e: Exception) -> str:
    """The message of a FAISS exception without its C++ location."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    m = re.search(r"\.(?:cpp|h):\d+: (.*)$", last)
    return m.group(1) if m else last


def train_size_for(index: faiss.Index, n: int, requested: int = 0) -> int:
    """Vectors to train on: ``requested``, or 40 per IVF list (FAISS wants 39+) and at least 65,536 (PQ
    codebooks train on up to 65,536), at most n."""
    if index.is_trained:
        return 0
    if requested > 0:
        return min(requested, n)
    ivf = ivf_of(index)
    wanted = max(65_536, 40 * ivf.nlist) if ivf is not None else 65_536
    return min(n, wanted)


def train_index(index: faiss.Index, sample: np.ndarray, use_gpu: bool = False, gpu_float16: bool = True,
                seed: int = 0) -> faiss.Index:
    """Train ``index`` in place on ``sample`` [S, D] float32 (no-op for indices that need no training)."""
    if index.is_trained:
        return index
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = ivf_of(index)
    if ivf is not None:
        if len(sample) < ivf.nlist:
            raise CairnError(f"an IVF index with {ivf.nlist} lists needs at least that many training vectors, "
                             f"there are {len(sample)}; use a smaller IVF or Flat")
        ivf.cp.seed = seed
        if use_gpu:
            gpu = _gpu_clustering_index(ivf.d, ivf.metric_type)
            if gpu is not None:
                ivf.clustering_index = gpu
    try:
        index.train(sample)
    except RuntimeError as e:
        raise CairnError(f"FAISS could not train the index on {len(sample)} vectors: {_faiss_error(e)}; use a "
                         "factory that needs fewer training vectors (fewer IVF lists, PQ with fewer bits) or Flat") from e
    if ivf is not None and use_gpu:
        ivf.clustering_index = None  # a GPU object must not be serialised with the index
    return index


def _gpu_clustering_index(d: int, metric: int):
    if gpu_count() == 0:
        log.info("index: no GPU visible to FAISS; training on the CPU")
        return None
    try:
        flat = faiss.IndexFlatIP(d) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(d)
        return faiss.index_cpu_to_all_gpus(flat)
    except (RuntimeError, AttributeError) as e:
        log.warning("index: k-means on the GPU is unavailable (%s); training on the CPU", _faiss_error(e))
        return None


def to_gpu(index: faiss.Index, use_gpu: bool, float16: bool = True, shard: bool = True):
    """``index`` on all GPUs when asked and possible, else ``index`` itself. Returns (index, on_gpu)."""
    if not use_gpu:
        return index, False
    if gpu_count() == 0:
        log.info("index: no GPU visible to FAISS; using the CPU")
        return index, False
    try:
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = float16
        options.useFloat16LookupTables = float16
        options.shard = shard
        return faiss.index_cpu_to_all_gpus(index, co=options), True
    except (RuntimeError, AttributeError) as e:  # kinds the GPU does not implement (HNSW, fast-scan, refine)
        log.warning("index: this index kind cannot run on the GPU (%s); using the CPU", _faiss_error(e))
        return index, False


def add_shard(trained: faiss.Index, xb: np.ndarray, ids: np.ndarray, use_gpu: bool = False,
              gpu_float16: bool = True, chunk: int = 65_536, into: faiss.Index | None = None) -> faiss.Index:
    """Add ``xb`` [N, D] float32 with global ``ids`` [N] int64 to a copy of ``trained`` (or into ``into``)."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if xb.ndim != 2 or xb.shape[1] != trained.d:
        raise CairnError(f"vectors of shape {xb.shape} cannot go into an index of dimension {trained.d}")
    if len(ids) != len(xb):
        raise ValueError(f"{len(xb)} vectors but {len(ids)} ids")
    index = into if into is not None else faiss.clone_index(trained)
    native = stores_ids(index)
    if not native and len(ids):
        # positions are the ids: a shard holds consecutive ids, continuing the index it is added into
        contiguous = np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids)))
        if not contiguous or (index.ntotal and ids[0] != index.ntotal):
            raise CairnError(f"this index kind numbers vectors by position: ids must run on from {index.ntotal} "
                             f"without gaps (got {ids[0]}..{ids[-1]})")
    target, on_gpu = to_gpu(index, use_gpu and ivf_of(index) is not None and not is_hnsw(index), gpu_float16)
    for lo in range(0, len(xb), chunk):
        if native:
            target.add_with_ids(xb[lo:lo + chunk], ids[lo:lo + chunk])
        else:
            target.add(xb[lo:lo + chunk])
    return faiss.index_gpu_to_cpu(target) if on_gpu else target  # GPU objects are never merged or saved


def merge_into(dst: faiss.Index, src: faiss.Index, src_first_id: int | None = None) -> None:
    """Move the vectors of ``src`` (a filled copy of the same trained index) into ``dst``.

    For kinds that number vectors by position, ``src`` must hold the ids that follow ``dst``'s: its first id,
    ``src_first_id`` (when given), must equal ``dst.ntotal``.
    """
    dst_d, src_d = faiss.downcast_index(dst), faiss.downcast_index(src)
    if not stores_ids(dst_d):
        first = src_first_id if src_first_id is not None else dst.ntotal
        if first != dst.ntotal:
            raise CairnError(f"shards of this index kind must be merged in id order: the next one should start at "
                             f"id {dst.ntotal}, this one starts at {first}")
    try:
        if isinstance(dst_d, faiss.IndexRefine):
            # FAISS cannot merge IndexRefine: merge its base and refinement indices. Inside the refinement ids
            # are positions: an IVF base stores them, so the source's continue after the destination's; a
            # flat-codes base appends in order.
            base = faiss.downcast_index(dst_d.base_index)
            add_id = dst_d.ntotal if ivf_of(base) is not None else 0
            base.merge_from(faiss.downcast_index(src_d.base_index), add_id)
            faiss.downcast_index(dst_d.refine_index).merge_from(faiss.downcast_index(src_d.refine_index), 0)
            dst_d.ntotal = dst_d.base_index.ntotal
            return
        dst_d.merge_from(src_d, 0)  # flat codes append in order; IVF lists keep their stored ids
    except RuntimeError as e:
        raise CairnError(f"FAISS cannot merge indices of this kind: {_faiss_error(e)}") from e


def on_disk_capable(index: faiss.Index) -> bool:
    """Plain IVF indices whose inverted lists hold everything (not fast-scan blocks, not IVFPQR's extra codes,
    no pre-transform or refinement around them)."""
    index = faiss.downcast_index(index)
    return (isinstance(index, faiss.IndexIVF) and mergeable(index)
            and not isinstance(index, faiss.IndexIVFPQR))


def merge_on_disk(trained: faiss.Index, shard_paths: list[str], ivfdata: str) -> faiss.Index:
    """One IVF index whose inverted lists are the shards' lists, concatenated into the file ``ivfdata``."""
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.clone_index(trained)
    if not on_disk_capable(index):
        raise CairnError("on-disk inverted lists need a plain IVF index (IVF..,Flat / PQ / SQ, without a "
                         "pre-transform or Refine); give such a factory or build in memory (--on-disk off)")
    if os.path.exists(ivfdata):
        os.remove(ivfdata)
    merge_ondisk(index, shard_paths, ivfdata)
    return index
