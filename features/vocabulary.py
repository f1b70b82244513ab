"""Visual vocabularies (k-means on local descriptors) and the two classic encoders built on them.

* :class:`Vocabulary`: k-means centroids of local descriptors ("visual words"), Sivic & Zisserman 2003
  ("Video Google"), at the scale of Nister & Stewenius 2006 and Philbin et al. 2007. The k-means itself is
  FAISS's (``faiss.Kmeans``: Lloyd iterations with exact assignment, random initialisation, empty clusters
  split); a GPU is used only when asked for and present. Assignment is exact (``faiss.IndexFlatL2``).
  FAISS's default initialisation (``init="random"``: k distinct training points) is the classic choice at
  large k; on few, well-separated clusters it nearly always starts two centroids in one cluster and Lloyd
  iterations cannot undo that, so ``init="k-means++"`` (or the cheaper "afk-mc2") is offered for small k.
* :class:`BoVWEncoder`: bag of visual words, a sparse [k] histogram per image with tf-idf weights (Sivic &
  Zisserman 2003) and optional square-rooted term frequencies against burstiness (Jegou et al. 2009).
* :class:`VLADEncoder`: VLAD (Jegou et al. 2010, "Aggregating local descriptors into a compact image
  representation"): residuals to the nearest centroid summed per centroid, intra-normalised (Arandjelovic &
  Zisserman 2013, "All about VLAD"), signed-power and L2 normalised, optionally PCA-whitened (Jegou & Chum 2012).

All three follow scikit-learn's estimator contract: ``__init__`` stores hyperparameters only, ``fit`` returns
self, learned attributes end in ``_``. A "descriptor set" is the [n_i, D] float32 (or uint8) descriptors of
one image, n_i >= 0. The encoders accept any iterable of sets (a list or a generator) and stream over it:
sets are grouped into batches whose descriptors are assigned to the vocabulary in one FAISS call, and no more
than one batch is held at a time. Every artefact is one self-contained ``.npz`` (:mod:`features.artifacts`):
an encoder's file holds its vocabulary's centroids too.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from features import artifacts
from features.base import l2_normalize
from features.pca import PCAWhitening, as_matrix, check_fitted

log = logging.getLogger(__name__)

BATCH_ROWS = 1 << 16  # descriptors assigned to the vocabulary in one FAISS call
BATCH_FLOATS = 1 << 24  # cap on nsets * k * D floats of one VLAD batch (64 MiB)
BURSTINESS = ("none", "sqrt")
INIT_METHODS = {"random": "ClusteringInitMethod_RANDOM", "k-means++": "ClusteringInitMethod_KMEANS_PLUS_PLUS",
                "afk-mc2": "ClusteringInitMethod_AFK_MC2"}  # Vocabulary(init=...) -> faiss constant


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class Vocabulary:
    """k visual words: FAISS k-means centroids of local descriptors.

    Args:
        k: number of centroids (visual words); up to 65,536 and more.
        niter: Lloyd iterations (full passes over the training sample).
        sample_size: ``fit`` trains on at most this many rows, a seeded random subset of X.
        seed: seed of the subsampling and of FAISS's initialisation.
        spherical: L2-normalise the centroids after every update (for L2-normalised descriptors).
        use_gpu: train (and assign) on the GPUs when FAISS has any; otherwise the CPU, with a log line.
        init: FAISS's initialisation: "random" (its default), "k-means++" (D^2 sampling: better on few,
            well-separated clusters, but k sequential passes over the sample) or "afk-mc2" (an MCMC
            approximation of k-means++).

    Learned attributes: ``centroids_`` [k, D] float32; ``inertia_``: mean squared L2 distance of the
    training points to their centroid at the last assignment step of training; ``n_features_in_`` (D);
    ``n_samples_fit_`` (rows trained on, after subsampling).
    """

    def __init__(self, k: int = 1024, niter: int = 20, sample_size: int = 1_000_000, seed: int = 0,
                 spherical: bool = False, use_gpu: bool = False, init: str = "random"):
        self.k = k
        self.niter = niter
        self.sample_size = sample_size
        self.seed = seed
        self.spherical = spherical
        self.use_gpu = use_gpu
        self.init = init

    def get_params(self) -> dict:
        """The hyperparameters (``__init__`` arguments), JSON-ready."""
        return {"k": int(self.k), "niter": int(self.niter), "sample_size": int(self.sample_size),
                "seed": int(self.seed), "spherical": bool(self.spherical), "use_gpu": bool(self.use_gpu),
                "init": self.init}

    def _gpu(self) -> bool:
        if not self.use_gpu:
            return False
        if _faiss_gpus() > 0:
            return True
        log.info("Vocabulary: use_gpu=True but FAISS sees no GPU; using the CPU")
        return False

    def fit(self, X, y=None) -> Vocabulary:
        """k-means on X [N, D] float32 (at most ``sample_size`` rows of it). Returns self."""
        import faiss

        X = as_matrix(X)
        n, d = X.shape
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {sorted(INIT_METHODS)}, got {self.init!r}")
        if n < self.k:
            raise ValueError(f"k-means with k={self.k} needs at least k training descriptors, got N={n}; "
                             f"give it more descriptors or choose a smaller k")
        if n > self.sample_size:
            if self.sample_size < self.k:
                raise ValueError(f"sample_size={self.sample_size} is smaller than k={self.k}")
            rows = np.sort(np.random.default_rng(self.seed).choice(n, self.sample_size, replace=False))
            X = X[rows]
            n = len(X)
        if n < 39 * self.k:
            log.info("Vocabulary: %d points for %d centroids (FAISS advises at least 39 per centroid)", n, self.k)
        km = faiss.Kmeans(d, int(self.k), niter=int(self.niter), seed=int(self.seed), spherical=bool(self.spherical),
                          gpu=self._gpu(), verbose=False, max_points_per_centroid=n // self.k + 1,
                          min_points_per_centroid=1, init_method=getattr(faiss, INIT_METHODS[self.init]))
        km.train(X)
        obj = float(km.obj[-1]) if len(km.obj) else 0.0
        if self.spherical:  # FAISS's objective is then the sum of inner products with unit centroids
            sq = float(np.einsum("ij,ij->", X, X, dtype=np.float64))
            obj = sq + n - 2.0 * obj
        self.centroids_ = np.ascontiguousarray(km.centroids, dtype=np.float32)
        self.inertia_ = obj / n
        self.n_features_in_ = d
        self.n_samples_fit_ = n
        self._index = None
        return self

    @property
    def dim(self) -> int:
        """Descriptor dimension D (after ``fit``)."""
        check_fitted(self, "centroids_")
        return int(self.centroids_.shape[1])

    def _get_index(self):
        """The exact assignment index over the centroids, built once (and again after load)."""
        index = getattr(self, "_index", None)
        if index is None:
            import faiss

            check_fitted(self, "centroids_")
            index = faiss.IndexFlatL2(self.dim)
            index.add(self.centroids_)
            if self._gpu():
                index = faiss.index_cpu_to_all_gpus(index)
            self._index = index
        return index

    def assign(self, X, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` nearest centroids of each row of X [N, D] float32.

        Returns D [N, n] float32 squared L2 distances (ascending) and I [N, n] int64 centroid numbers.
        """
        X = as_matrix(X)
        index = self._get_index()
        if X.shape[1] != self.dim:
            raise ValueError(f"X has {X.shape[1]} features; this vocabulary has {self.dim}")
        if not 1 <= n <= self.k:
            raise ValueError(f"n must be in 1..k={self.k}, got {n}")
        if len(X) == 0:
            return np.zeros((0, n), np.float32), np.zeros((0, n), np.int64)
        out_D = np.empty((len(X), n), np.float32)
        out_I = np.empty((len(X), n), np.int64)
        for lo in range(0, len(X), BATCH_ROWS):
            D, I = index.search(X[lo:lo + BATCH_ROWS], n)
            out_D[lo:lo + len(D)] = D
            out_I[lo:lo + len(I)] = I
        np.maximum(out_D, 0.0, out=out_D)  # ||x||^2 + ||c||^2 - 2<x, c> can round to a tiny negative
        return out_D, out_I

    def predict(self, X) -> np.ndarray:
        """[N] int64 nearest centroid of each row of X."""
        return self.assign(X, 1)[1][:, 0]

    # ------------------------------------------------------------------------------------------------------
    # persistence

    def state(self) -> tuple[dict[str, np.ndarray], dict, dict]:
        """(arrays, config, meta) of the fitted vocabulary, for its own file or one that embeds it."""
        check_fitted(self, "centroids_")
        meta = {"n_train": int(self.n_samples_fit_), "inertia": float(self.inertia_), "dim": self.dim}
        return {"centroids": self.centroids_}, self.get_params(), meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], config: dict, meta: dict) -> Vocabulary:
        """The inverse of :meth:`state`."""
        voc = cls(**config)
        voc.centroids_ = np.ascontiguousarray(arrays["centroids"], dtype=np.float32)
        voc.inertia_ = float(meta.get("inertia", math.nan))
        voc.n_features_in_ = int(voc.centroids_.shape[1])
        voc.n_samples_fit_ = int(meta.get("n_train", 0))
        return voc

    def save(self, path: str) -> None:
        """Write a self-describing ``.npz`` artefact (kind "vocabulary") to ``path``."""
        arrays, config, meta = self.state()
        artifacts.save(path, "vocabulary", arrays, config, meta)

    @classmethod
    def load(cls, path: str) -> Vocabulary:
        """Read an artefact written by :meth:`save`; CairnError for another kind or an unsafe file."""
        arrays, header = artifacts.load(path, "vocabulary")
        return cls.from_state(arrays, header["config"], header["meta"])

    def __repr__(self) -> str:
        return "Vocabulary(" + ", ".join(f"{k}={v!r}" for k, v in self.get_params().items()) + ")"


# ----------------------------------------------------------------------------------------------------------
# batching of descriptor sets


def _as_set(desc, d: int) -> np.ndarray:
    """One image's descriptors as [n, d] float32; an empty array of any shape is an empty set."""
    a = np.asarray(desc)
    if a.size == 0:
        return np.zeros((0, d), np.float32)
    if a.ndim != 2 or a.shape[1] != d:
        raise ValueError(f"a descriptor set must be [n, {d}], got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _batches(descriptor_sets: Iterable, d: int, max_sets: int) -> Iterator[list[np.ndarray]]:
    """Consecutive groups of sets with at most BATCH_ROWS descriptors (or one bigger set) and max_sets sets."""
    batch: list[np.ndarray] = []
    rows = 0
    for desc in descriptor_sets:
        a = _as_set(desc, d)
        if batch and (rows + len(a) > BATCH_ROWS or len(batch) >= max_sets):
            yield batch
            batch, rows = [], 0
        batch.append(a)
        rows += len(a)
    if batch:
        yield batch


def _assign_batch(vocabulary: Vocabulary, batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All descriptors of a batch, [M] int64 the set of each, [M] int64 the nearest word of each."""
    counts = np.fromiter((len(a) for a in batch), np.int64, len(batch))
    X = np.concatenate(batch) if len(batch) > 1 else batch[0]
    doc = np.repeat(np.arange(len(batch), dtype=np.int64), counts)
    words = vocabulary.assign(X, 1)[1][:, 0] if len(X) else np.zeros(0, np.int64)
    return X, doc, words


def _embed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{name}": a for name, a in arrays.items()}


def _unembed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    head = prefix + "."
    return {name[len(head):]: a for name, a in arrays.items() if name.startswith(head)}


def _save_with_vocabulary(path: str, kind: str, vocabulary: Vocabulary, arrays: dict, config: dict,
                          meta: dict) -> None:
    """An encoder artefact that embeds its vocabulary (arrays ``vocabulary.*``, config and meta ``vocabulary``),
    so that one file is self-contained."""
    v_arrays, v_config, v_meta = vocabulary.state()
    artifacts.save(path, kind, {**_embed("vocabulary", v_arrays), **arrays}, {**config, "vocabulary": v_config},
                   {"vocabulary": v_meta, **meta})


def _load_with_vocabulary(cls, path: str, kind: str):
    """(encoder built from the stored hyperparameters and vocabulary, its arrays, its meta)."""
    arrays, header = artifacts.load(path, kind)
    config, meta = dict(header["config"]), header["meta"]
    vocabulary = Vocabulary.from_state(_unembed("vocabulary", arrays), config.pop("vocabulary"), meta["vocabulary"])
    return cls(vocabulary, **config), arrays, meta


# ----------------------------------------------------------------------------------------------------------
# bag of visual words


class BoVWEncoder:
    """Bag of visual words with tf-idf: one sparse, L2-normalised [k] vector per image.

    Every descriptor votes for its nearest word (hard assignment). The term frequency of a word is its
    number of votes in the image (not divided by the image's descriptor count: the final L2 normalisation
    removes that scale). With ``burstiness="sqrt"`` it is the square root of the count, which tames bursts
    (a repeated structure such as a window grid or a fence voting hundreds of times for the same few words
    and drowning the rest; Jegou, Douze & Schmid, CVPR 2009). With ``tfidf`` it is multiplied by
    ``idf_ = log(n_documents_ / df)``, df being the number of training images with the word; a word that
    no training image contains gets idf 0 (no evidence about it; it could not match a database image
    anyway). Rows are L2-normalised, so the dot product of two rows is their cosine similarity; an image
    without descriptors gives an empty row.

    Args:
        vocabulary: a fitted :class:`Vocabulary`.
        tfidf: weight words by idf (needs ``fit``); without it, ``fit`` is optional.
        burstiness: "none" (raw counts) or "sqrt" (square-rooted counts).

    Learned attributes: ``df_`` [k] int64 document frequencies, ``n_documents_``, ``idf_`` [k] float32.
    For a distributed job: :meth:`document_frequencies` per shard, sum, :meth:`from_document_frequencies`.
    """

    def __init__(self, vocabulary: Vocabulary, tfidf: bool = True, burstiness: str = "sqrt"):
        self.vocabulary = vocabulary
        self.tfidf = tfidf
        self.burstiness = burstiness

    def get_params(self) -> dict:
        return {"vocabulary": self.vocabulary, "tfidf": self.tfidf, "burstiness": self.burstiness}

    def _check_params(self) -> None:
        if self.burstiness not in BURSTINESS:
            raise ValueError(f"burstiness must be one of {BURSTINESS}, got {self.burstiness!r}")
        check_fitted(self.vocabulary, "centroids_")

    @property
    def dim(self) -> int:
        """Output dimension: the number of words k."""
        return int(self.vocabulary.k)

    def document_frequencies(self, descriptor_sets: Iterable) -> tuple[np.ndarray, int]:
        """(df [k] int64: how many of the sets contain each word, number of sets). Changes nothing."""
        self._check_params()
        voc = self.vocabulary
        k = len(voc.centroids_)
        df = np.zeros(k, np.int64)
        n_docs = 0
        for batch in _batches(descriptor_sets, voc.dim, max_sets=BATCH_ROWS):
            _, doc, words = _assign_batch(voc, batch)
            present = np.unique(doc * k + words) % k  # each (set, word) pair once
            df += np.bincount(present, minlength=k)
            n_docs += len(batch)
        return df, n_docs

    def _set_frequencies(self, df: np.ndarray, n_docs: int) -> None:
        df = np.asarray(df, np.int64)
        if df.shape != (self.dim,):
            raise ValueError(f"df must have shape [{self.dim}], got {df.shape}")
        self.df_ = df
        self.n_documents_ = int(n_docs)
        idf = np.zeros(len(df), np.float64)
        seen = df > 0
        idf[seen] = np.log(self.n_documents_ / df[seen])
        self.idf_ = idf.astype(np.float32)

    def fit(self, descriptor_sets: Iterable, y=None) -> BoVWEncoder:
        """Document frequencies over the sets (streamed once). Returns self."""
        df, n_docs = self.document_frequencies(descriptor_sets)
        if n_docs == 0:
            raise ValueError("BoVWEncoder.fit needs at least one descriptor set")
        self._set_frequencies(df, n_docs)
        return self

    def partial_fit(self, descriptor_sets: Iterable, y=None) -> BoVWEncoder:
        """Add the sets' document frequencies to those learned so far (the first call starts from 0)."""
        df, n_docs = self.document_frequencies(descriptor_sets)
        if getattr(self, "df_", None) is not None:
            df, n_docs = df + self.df_, n_docs + self.n_documents_
        self._set_frequencies(df, n_docs)
        return self

    @classmethod
    def from_document_frequencies(cls, vocabulary: Vocabulary, df, n_docs: int, **params) -> BoVWEncoder:
        """An encoder fitted from summed per-shard document frequencies (df [k] int64, n_docs sets)."""
        encoder = cls(vocabulary, **params)
        encoder._check_params()
        encoder._set_frequencies(df, n_docs)
        return encoder

    def transform(self, descriptor_sets: Iterable) -> sp.csr_matrix:
        """Sets -> [N, k] float32 CSR matrix, one L2-normalised row per set (empty for an empty set)."""
        self._check_params()
        if self.tfidf:
            check_fitted(self, "idf_")
        voc = self.vocabulary
        k = len(voc.centroids_)
        data, cols, row_counts = [], [], []
        for batch in _batches(descriptor_sets, voc.dim, max_sets=BATCH_ROWS):
            _, doc, words = _assign_batch(voc, batch)
            keys, tf = np.unique(doc * k + words, return_counts=True)  # sorted by set, then word
            rows, words = keys // k, keys % k
            w = np.sqrt(tf) if self.burstiness == "sqrt" else tf.astype(np.float64)
            if self.tfidf:
                w = w * self.idf_[words]
            keep = w != 0  # words with idf 0 are not stored
            rows, words, w = rows[keep], words[keep], w[keep]
            norms = np.sqrt(np.bincount(rows, weights=w * w, minlength=len(batch)))
            data.append((w / norms[rows]).astype(np.float32))
            cols.append(words.astype(np.int32))
            row_counts.append(np.bincount(rows, minlength=len(batch)))
        if not data:
            return sp.csr_matrix((0, k), dtype=np.float32)
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_counts))])
        n = len(indptr) - 1
        return sp.csr_matrix((np.concatenate(data), np.concatenate(cols), indptr), shape=(n, k), dtype=np.float32)

    def fit_transform(self, descriptor_sets: Sequence, y=None) -> sp.csr_matrix:
        """fit then transform (iterates the sets twice, so it needs a sequence, not a generator)."""
        return self.fit(descriptor_sets).transform(descriptor_sets)

    # ------------------------------------------------------------------------------------------------------
    # persistence

    def save(self, path: str, meta: dict | None = None) -> None:
        """One self-contained artefact (kind "bovw"): the vocabulary's centroids, df and idf; ``meta`` is added to
        its header (e.g. ``trained_on``)."""
        self._check_params()
        arrays, meta = {}, dict(meta or {})
        if getattr(self, "df_", None) is not None:
            arrays.update(df=self.df_, idf=self.idf_)
            meta["n_documents"] = self.n_documents_
        config = {"tfidf": bool(self.tfidf), "burstiness": self.burstiness}
        _save_with_vocabulary(path, "bovw", self.vocabulary, arrays, config, meta)

    @classmethod
    def load(cls, path: str) -> BoVWEncoder:
        encoder, arrays, meta = _load_with_vocabulary(cls, path, "bovw")
        if "df" in arrays:
            encoder._set_frequencies(arrays["df"], meta["n_documents"])
        return encoder

    def __repr__(self) -> str:
        return f"BoVWEncoder({self.vocabulary!r}, tfidf={self.tfidf}, burstiness={self.burstiness!r})"


# ----------------------------------------------------------------------------------------------------------
# VLAD


class VLADEncoder:
    """VLAD: one dense [k * D] (or [pca_dim]) float32 vector per image.

    For each set: every descriptor's residual to its nearest centroid, summed per centroid ([k, D]); with
    ``intra_norm`` each centroid's block is L2-normalised (Arandjelovic & Zisserman 2013); flattened;
    signed power normalisation ``sign(x) |x|^power`` (1.0: none); L2 normalisation; then, when ``pca_dim``
    > 0, PCA-whitening to ``pca_dim`` and L2 again (:class:`features.pca.PCAWhitening`). An empty set gives
    a zero vector, before and after PCA (not the projected negative mean).

    Args:
        vocabulary: a fitted :class:`Vocabulary`.
        intra_norm: L2-normalise each centroid's residual sum.
        power: exponent of the signed power normalisation (0.5: signed square root).
        pca_dim: dimension after PCA; 0: no PCA (``fit`` then learns nothing and is optional).
        whiten: whiten the PCA components.
        pca_sample: ``fit`` learns the PCA from the raw VLADs of at most this many sets: a seeded random
            choice when given a sequence, the first ones when given an iterator.
        seed: seed of that choice.

    Learned attributes: ``pca_`` (a fitted PCAWhitening, or None), ``n_features_in_`` (D).
    """

    def __init__(self, vocabulary: Vocabulary, intra_norm: bool = True, power: float = 0.5, pca_dim: int = 0,
                 whiten: bool = True, pca_sample: int = 50_000, seed: int = 0):
        self.vocabulary = vocabulary
        self.intra_norm = intra_norm
        self.power = power
        self.pca_dim = pca_dim
        self.whiten = whiten
        self.pca_sample = pca_sample
        self.seed = seed

    def get_params(self) -> dict:
        return {"vocabulary": self.vocabulary, "intra_norm": self.intra_norm, "power": self.power,
                "pca_dim": self.pca_dim, "whiten": self.whiten, "pca_sample": self.pca_sample, "seed": self.seed}

    @property
    def raw_dim(self) -> int:
        """k * D, the dimension before PCA."""
        check_fitted(self.vocabulary, "centroids_")
        return int(self.vocabulary.centroids_.size)

    @property
    def dim(self) -> int:
        """Output dimension: k * D without PCA; the fitted PCA's output (``pca_dim`` before fit) with it."""
        if self.pca_dim <= 0:
            return self.raw_dim
        pca = getattr(self, "pca_", None)
        return pca.dim_out if pca is not None else int(self.pca_dim)

    def _max_sets(self) -> int:
        return max(1, BATCH_FLOATS // max(1, self.raw_dim))

    def _raw_batch(self, batch: list[np.ndarray]) -> np.ndarray:
        """[len(batch), k * D] float32 power- and L2-normalised VLADs (zero rows for empty sets)."""
        voc = self.vocabulary
        C = voc.centroids_
        k, d = C.shape
        X, doc, words = _assign_batch(voc, batch)
        n = len(batch)
        if len(X) == 0:
            return np.zeros((n, k * d), np.float32)
        residuals = X - C[words]
        # segment sums by (set, word) as a sparse one-hot [n * k, M] times [M, D] product
        onehot = sp.csr_matrix((np.ones(len(X), np.float32), (doc * k + words, np.arange(len(X)))),
                               shape=(n * k, len(X)))
        V = np.asarray(onehot @ residuals, dtype=np.float32).reshape(n, k, d)
        if self.intra_norm:
            V = l2_normalize(V)
        V = V.reshape(n, k * d)
        if self.power != 1.0:
            V = np.sign(V) * np.abs(V) ** np.float32(self.power)
        return l2_normalize(V)

    def _raw(self, descriptor_sets: Iterable) -> Iterator[np.ndarray]:
        check_fitted(self.vocabulary, "centroids_")
        for batch in _batches(descriptor_sets, self.vocabulary.dim, self._max_sets()):
            yield self._raw_batch(batch)

    def fit(self, descriptor_sets: Iterable, y=None) -> VLADEncoder:
        """Learn the PCA-whitening (when ``pca_dim`` > 0) from the raw VLADs of up to ``pca_sample`` sets,
        leaving out empty sets. Returns self."""
        check_fitted(self.vocabulary, "centroids_")
        self.n_features_in_ = self.vocabulary.dim
        if self.pca_dim <= 0:
            self.pca_ = None
            return self
        if isinstance(descriptor_sets, Sequence) and len(descriptor_sets) > self.pca_sample:
            chosen = np.sort(np.random.default_rng(self.seed).choice(len(descriptor_sets), self.pca_sample,
                                                                     replace=False))
            sample = (descriptor_sets[i] for i in chosen)
        else:
            sample = itertools.islice(descriptor_sets, self.pca_sample)
        raw = [v[np.any(v, axis=1)] for v in self._raw(sample)]
        X = np.concatenate(raw) if raw else np.zeros((0, self.raw_dim), np.float32)
        if len(X) < 2:
            raise ValueError(f"VLADEncoder.fit needs at least 2 non-empty descriptor sets for PCA, got {len(X)}")
        self.pca_ = PCAWhitening(dim=int(self.pca_dim), whiten=bool(self.whiten)).fit(X)
        return self

    def transform(self, descriptor_sets: Iterable) -> np.ndarray:
        """Sets -> [N, dim] float32, L2-normalised rows (zero rows for empty sets)."""
        if self.pca_dim > 0:
            check_fitted(self, "pca_")
        out = []
        for V in self._raw(descriptor_sets):
            if self.pca_dim > 0:
                empty = ~np.any(V, axis=1)
                V = self.pca_.transform(V)
                V[empty] = 0.0
            out.append(V)
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def transform_one(self, descriptors) -> np.ndarray:
        """One set [n, D] -> [dim] float32."""
        return self.transform([descriptors])[0]

    def fit_transform(self, descriptor_sets: Sequence, y=None) -> np.ndarray:
        """fit then transform (iterates the sets twice, so it needs a sequence, not a generator)."""
        return self.fit(descriptor_sets).transform(descriptor_sets)

    # ------------------------------------------------------------------------------------------------------
    # persistence

    def save(self, path: str, meta: dict | None = None) -> None:
        """One self-contained artefact (kind "vlad"): the vocabulary's centroids and the PCA's arrays; ``meta`` is
        added to its header (e.g. ``trained_on``)."""
        if self.pca_dim > 0:
            check_fitted(self, "pca_")
        arrays, meta = {}, {**(meta or {}), "dim": self.dim}
        pca = getattr(self, "pca_", None)
        if pca is not None:
            p_arrays, p_config, p_meta = pca.state()
            arrays.update(_embed("pca", p_arrays))
            meta["pca"] = {"config": p_config, "meta": p_meta}
        params = self.get_params()
        params.pop("vocabulary")
        _save_with_vocabulary(path, "vlad", self.vocabulary, arrays, params, meta)

    @classmethod
    def load(cls, path: str) -> VLADEncoder:
        encoder, arrays, meta = _load_with_vocabulary(cls, path, "vlad")
        encoder.n_features_in_ = encoder.vocabulary.dim
        encoder.pca_ = None
        if "pca" in meta:
            encoder.pca_ = PCAWhitening.from_state(_unembed("pca", arrays), meta["pca"]["config"],
                                                   meta["pca"]["meta"])
        return encoder

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if k != "vocabulary")
        return f"VLADEncoder({self.vocabulary!r}, {params})"
