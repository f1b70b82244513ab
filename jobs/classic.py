"""The methods' configurations, and how `cairn compare` runs each of them end to end.

Every method is a chain of the individual jobs (extract -> train -> encode -> index -> recognize), so what
`cairn compare` does can be done step by step with the individual commands, and every step reuses its outputs
when its config is unchanged (SIFT features are extracted once and shared by all SIFT methods).

    hog               HoG (features/hog.py), optional PCA-whitening, kNN votes over a FAISS index
    sift-bovw         SIFT/RootSIFT -> k-means vocabulary (FAISS) -> tf-idf BoVW -> inverted file, kNN votes
    sift-vlad         SIFT/RootSIFT -> small vocabulary -> VLAD (intra-norm, power, L2) -> PCA-whitening -> FAISS
    sift-bovw+sv      sift-bovw, its top neighbours re-ranked by spatial verification (features/verify.py)
    hog-linear        a linear softmax classifier (models/classifiers.py) on HoG, calibrated confidences
    sift-vlad-linear  the same classifier on VLAD
    cnn               a Keras backbone fine-tuned with GeM + ArcFace (models/finetune.py), kNN over embeddings
    cnn-untrained     the same network before fine-tuning (what the fine-tuning must beat)
    cnn-pretrained    a frozen pretrained extractor (TFLite, SavedModel, .keras), kNN over its embeddings
    cnn+delf          cnn, its top neighbours re-ranked by DELF (features/delf.py) matching + RANSAC
    delf+sv           DELF alone: attention-pooled DELF vectors, kNN, re-ranked by DELF matching + RANSAC
    cnn+det           cnn on detected landmark regions: the full image and the detector's top boxes embedded,
                      regional kNN aggregated per image (features/detect.py, models/detector.py)
    cnn-pretrained+det  the same with the frozen pretrained extractor

Parameters are typed frozen dataclasses; `cairn compare --set sift-bovw.vocabulary.k=4096` changes one, with
the value checked against the field's type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from features.detect import DetectConfig
from features.hog import HogConfig
from features.preprocessing import PREPROCESSING
from features.sift import SiftConfig
from features.verify import RerankConfig, VerifyConfig
from models.delf import DelfTrainConfig
from models.detector import DetectorConfig
from models.finetune import FinetuneConfig
from pipeline import config as cfg
from pipeline import fs, stages
from pipeline.errors import CairnError


@dataclass(frozen=True)
class VocabularyConfig:
    """k-means visual vocabulary (features/vocabulary.py)."""

    k: int = 1024  # visual words (up to 65,536; ~20k-65k for a million images)
    niter: int = 20  # k-means iterations
    sample_size: int = 1_000_000  # database descriptors k-means learns from (a seeded share of each image's)
    seed: int = 0  # sampling and k-means initialisation
    use_gpu: bool = False  # run k-means on the GPUs when faiss-gpu sees some (falls back to the CPU)

    def __post_init__(self):
        if not 1 <= self.k <= 1 << 20:
            raise ValueError(f"k must be between 1 and {1 << 20:,}, not {self.k}")
        if self.niter < 1:
            raise ValueError(f"niter must be >= 1, not {self.niter}")
        if self.sample_size < self.k:
            raise ValueError(f"sample_size ({self.sample_size:,}) must be at least k ({self.k:,})")


@dataclass(frozen=True)
class HogMethodConfig:
    """hog: the descriptor and its optional PCA-whitening."""

    hog: HogConfig = HogConfig()  # descriptor parameters (features/hog.py)
    pca_dim: int = 0  # PCA-whitening to this many dimensions, learned on the database (0 = raw HoG)
    whiten: bool = True  # divide by the square root of the eigenvalues (else plain PCA)
    pca_min_images: int = 10  # database images needed per PCA dimension; with fewer, no PCA (0 = always PCA)

    def __post_init__(self):
        if self.pca_dim < 0:
            raise ValueError(f"pca_dim must be >= 0 (0 = no PCA), not {self.pca_dim}")


@dataclass(frozen=True)
class BovwConfig:
    """sift-bovw: bag of visual words with tf-idf over an inverted file."""

    sift: SiftConfig = SiftConfig()  # local features (features/sift.py)
    vocabulary: VocabularyConfig = VocabularyConfig()  # k-means vocabulary
    burstiness: str = "sqrt"  # term frequency transform: "sqrt" (tames repeated structures) or "none"
    idf_sample: int = 100_000  # database images the document frequencies are counted on

    def __post_init__(self):
        if self.burstiness not in ("sqrt", "none"):
            raise ValueError(f"burstiness must be 'sqrt' or 'none', not {self.burstiness!r}")
        if self.idf_sample < 1:
            raise ValueError(f"idf_sample must be >= 1, not {self.idf_sample}")


@dataclass(frozen=True)
class VladConfig:
    """sift-vlad: VLAD with intra-normalisation and PCA-whitening."""

    sift: SiftConfig = SiftConfig()  # local features (features/sift.py)
    vocabulary: VocabularyConfig = VocabularyConfig(k=64)  # VLAD uses a small vocabulary (dim = k x 128)
    power: float = 0.5  # signed power normalisation exponent
    pca_dim: int = 256  # PCA-whitening to this many dimensions (0 = raw k x 128 VLAD)
    whiten: bool = True  # whiten the PCA projection (Jegou & Chum 2012)
    pca_sample: int = 50_000  # database images the PCA is learned on
    pca_min_images: int = 10  # database images needed per PCA dimension; with fewer, raw VLAD (0 = always PCA)

    def __post_init__(self):
        if self.pca_dim < 0:
            raise ValueError(f"pca_dim must be >= 0 (0 = no PCA), not {self.pca_dim}")
        if self.pca_dim and self.pca_sample < 2:
            raise ValueError(f"pca_sample must be >= 2 to learn a PCA, not {self.pca_sample}")
        if not 0 < self.power <= 1:
            raise ValueError(f"power must be in (0, 1], not {self.power}")


@dataclass(frozen=True)
class ClassifierConfig:
    """-linear: a classifier on the method's global descriptors (models/classifiers.py)."""

    kind: str = "softmax"  # "softmax" (linear, SGD) or "ncm" (nearest class mean)
    epochs: int = 5  # passes over the training set (softmax)
    batch_size: int = 1024  # mini-batch size (softmax)
    validation_fraction: float = 0.1  # share held out for temperature calibration
    seed: int = 0  # data order and the held-out split

    def __post_init__(self):
        if self.kind not in ("softmax", "ncm"):
            raise ValueError(f"kind must be 'softmax' or 'ncm', not {self.kind!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), not {self.validation_fraction}")


@dataclass(frozen=True)
class CnnMethodConfig:
    """cnn (and cnn-untrained): a Keras backbone fine-tuned on the database, kNN over its embeddings."""

    finetune: FinetuneConfig = FinetuneConfig()  # backbone, head, loss, schedule (models/finetune.py)
    scales: tuple[float, ...] = (1.0,)  # test-time scales, e.g. 0.707,1,1.414 (embeddings averaged)
    batch_size: int = 32  # images per inference call
    pca_dim: int = 0  # PCA-whitening learned on the database embeddings (0 = none)
    whiten: bool = True  # divide by the square root of the eigenvalues
    pca_min_images: int = 10  # database images needed per PCA dimension; with fewer, no PCA (0 = always)

    def __post_init__(self):
        if self.pca_dim < 0 or self.batch_size < 1:
            raise ValueError("pca_dim must be >= 0 and batch_size >= 1")


@dataclass(frozen=True)
class PretrainedConfig:
    """cnn-pretrained: a frozen pretrained extractor, kNN over its embeddings, no training."""

    model: str = ""  # a .tflite file, a SavedModel folder, a .keras export, or keras:<backbone> (downloads)
    input_size: int = 0  # square input side (0 = the model's own; a SavedModel without one gets 224)
    preprocessing: str = "tf"  # float TFLite/SavedModel inputs: tf ([-1, 1]), caffe, torch or none (0..255)
    scales: tuple[float, ...] = (1.0,)  # test-time scales (models with a fixed input size take only 1.0)
    batch_size: int = 32  # images per inference call
    pca_dim: int = 0  # PCA-whitening learned on the database embeddings (0 = none: it needs many images)
    whiten: bool = True  # divide by the square root of the eigenvalues
    pca_min_images: int = 10  # database images needed per PCA dimension; with fewer, no PCA (0 = always)

    def __post_init__(self):
        if self.pca_dim < 0 or self.batch_size < 1 or self.input_size < 0:
            raise ValueError("pca_dim and input_size must be >= 0 and batch_size >= 1")
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be tf, caffe, torch or none, not {self.preprocessing!r}")


@dataclass(frozen=True)
class DelfMethodConfig:
    """cnn+delf and delf+sv: DELF local features (features/delf.py) trained on the database (models/delf.py)."""

    train: DelfTrainConfig = DelfTrainConfig()  # backbone, block, attention, the two stages, the PCA
    scales: tuple[float, ...] = (0.7071, 1.0, 1.4142)  # extraction pyramid (the paper: 0.25 .. 2 in sqrt(2) steps)
    max_side: int = 512  # long side of an image at scale 1.0 (smaller images are not enlarged)
    max_features: int = 500  # features kept per image, by attention score
    score_threshold: float = 0.0  # minimum attention score of a kept feature
    batch_size: int = 8  # images per model call
    # matching + RANSAC of the top neighbours (features/verify.py): mutual nearest neighbours, because Lowe's ratio
    # test rejects most true DELF matches (40-d descriptors of repeated structures have close second neighbours)
    sv: RerankConfig = RerankConfig(top_k=20, verify=VerifyConfig(matcher="mutual", min_inliers=15))

    def __post_init__(self):
        self.extraction("")  # validates the extraction fields

    def extraction(self, model: str, pca: str = ""):
        """The features.delf.DelfConfig of these settings with a model (and PCA) file."""
        from features.delf import DelfConfig

        return DelfConfig(model=model, pca=pca, scales=tuple(self.scales), max_side=self.max_side,
                          max_features=self.max_features, score_threshold=self.score_threshold,
                          batch_size=self.batch_size)


@dataclass(frozen=True)
class DetectMethodConfig:
    """cnn+det and cnn-pretrained+det: landmark detection before embedding (features/detect.py)."""

    detect: DetectConfig = DetectConfig()  # the detector ("" = train one on --boxes) and the regions it gives
    train: DetectorConfig = DetectorConfig()  # the detector trained on the database's boxes (models/detector.py)
    negatives: bool = True  # also train on the database's non-landmark images, as images without a box
    max_images: int = 20_000  # training images held in memory (a seeded sample of them when there are more)

    def __post_init__(self):
        if self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, not {self.max_images}")


@dataclass(frozen=True)
class MethodsConfig:
    """Every method's parameters; `--set NAME.FIELD=VALUE` overrides one."""

    hog: HogMethodConfig = HogMethodConfig()  # hog (and hog-linear's descriptor)
    bovw: BovwConfig = BovwConfig()  # sift-bovw (and sift-bovw+sv's)
    vlad: VladConfig = VladConfig()  # sift-vlad (and sift-vlad-linear's)
    sv: RerankConfig = RerankConfig()  # sift-bovw+sv's re-ranking (features/verify.py)
    classifier: ClassifierConfig = ClassifierConfig()  # hog-linear, sift-vlad-linear
    cnn: CnnMethodConfig = CnnMethodConfig()  # cnn, cnn-untrained
    cnn_pretrained: PretrainedConfig = PretrainedConfig()  # cnn-pretrained
    delf: DelfMethodConfig = DelfMethodConfig()  # cnn+delf, delf+sv
    detect: DetectMethodConfig = DetectMethodConfig()  # cnn+det, cnn-pretrained+det


def _coerce(text: str, current, where: str):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise CairnError(f"{where}: {text!r} is not a boolean (true/false)")
    for typ in (int, float):
        if isinstance(current, typ):
            try:
                return typ(text)
            except ValueError:
                raise CairnError(f"{where}: {text!r} is not {'an integer' if typ is int else 'a number'}") \
                    from None
    if isinstance(current, str):
        return text
    if isinstance(current, tuple) and current and isinstance(current[0], tuple):  # groups: 0.2,0.35;0.55,0.8
        try:
            return tuple(tuple(float(t) for t in group.split(",") if t.strip()) for group in text.split(";"))
        except ValueError:
            raise CairnError(f"{where}: {text!r} is not groups of numbers, e.g. 0.2,0.35;0.55,0.8") from None
    if isinstance(current, tuple):  # comma-separated numbers, e.g. scales=0.707,1,1.414
        try:
            return tuple(float(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise CairnError(f"{where}: {text!r} is not a comma-separated list of numbers") from None
    raise CairnError(f"{where}: this field cannot be set from the command line")


def override(config, path: str, text: str, where: str = ""):
    """``config`` with the field at dotted ``path`` set to ``text`` converted to the field's type."""
    where = where or f"--set {path}"
    head, _, rest = path.partition(".")
    names = [f.name for f in dataclasses.fields(config)]
    if head not in names:
        raise CairnError(f"{where}: {type(config).__name__} has no field {head!r}; fields: {', '.join(names)}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise CairnError(f"{where}: {head} is a value, not a group")
        value = override(current, rest, text, where)
    elif dataclasses.is_dataclass(current):
        raise CairnError(f"{where}: {head} is a group; give one of its fields, e.g. {path}."
                         f"{dataclasses.fields(current)[0].name}=...")
    else:
        value = _coerce(text, current, where)
    try:
        return dataclasses.replace(config, **{head: value})
    except (ValueError, TypeError) as e:
        raise CairnError(f"{where}: {e}") from e


def parse_overrides(items: list[str] | None, config: MethodsConfig = MethodsConfig()) -> MethodsConfig:
    """Apply ``NAME.FIELD=VALUE`` items in order."""
    for item in items or []:
        path, eq, text = item.partition("=")
        if not eq or not path:
            raise CairnError(f"--set {item!r}: expected NAME.FIELD=VALUE, e.g. bovw.vocabulary.k=4096")
        config = override(config, path.strip(), text.strip())
    return config


def describe_fields(config=MethodsConfig(), prefix: str = "") -> list[str]:
    """Every settable field as ``name=default`` lines (for --help)."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple) and value and isinstance(value[0], tuple):
            lines.append(f"{prefix}{f.name}={';'.join(','.join(str(v) for v in g) for g in value)}")
        elif isinstance(value, tuple):
            lines.append(f"{prefix}{f.name}={','.join(str(v) for v in value)}")
        else:
            lines.append(f"{prefix}{f.name}={value}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Running a method end to end (used by `cairn compare`)


@dataclass(frozen=True)
class RunContext:
    """What every method run shares: the data, the decoding, the parallelism, recognition."""

    train: str  # database manifest (absolute)
    queries: str  # query manifest (absolute)
    work: str  # OUT/work of the compare run
    decode: object  # pipeline.images.DecodeConfig
    workers: int = 0  # DirectRunner worker processes (0 = automatic)
    threads: int = 0  # threads per worker (0 = automatic)
    beam_args: tuple[str, ...] = ()  # Beam flags passed through
    vote: object = None  # index.recognize.VoteConfig
    neighbours: int = 100  # database images listed per query
    force: bool = False  # recompute everything
    splits: tuple[str, ...] = ("train", "queries")  # ("train",): database only (leave-one-out evaluations)
    tune: object = None  # index.recognize.TuneConfig: tune the vote on held-out database images (None = off)
    index: object = None  # index.faiss_index.IndexConfig of the dense methods (None = the default)
    boxes: str = ""  # landmark boxes of the database (and query) images: trains the +det methods' detector


def _folder_bytes(prefix: str) -> int:
    from pipeline.parquet_io import shard_pattern

    return sum(fs.size(p) for p in fs.glob(shard_pattern(prefix)))


def _extract_both(ctx: RunContext, extractor: str, params: dict, folder: str, detect=None) -> dict:
    """Extract database and query features into WORK/folder/{train,queries}; returns their records."""
    from jobs.extract import extract

    kw = dict(method=extractor, params=params, decode=ctx.decode, workers=ctx.workers, threads=ctx.threads,
              beam_args=list(ctx.beam_args), force=ctx.force, detect=detect)
    manifests = {"train": ctx.train, "queries": ctx.queries}
    records = {}
    for split in ctx.splits:
        out = fs.join(ctx.work, folder, split)
        with stages.stage("extract", out, name=f"extract {extractor}{'+det' if detect else ''}", split=split) as st:
            records[split] = extract(manifests[split], out, **kw)
            _beam_stage(st, records[split], split, out)
    return records


def _beam_stage(st: dict, record: dict, split: str, out: str) -> None:
    """Fill a stage record from a Beam job's record (extract.json, encode.json): per-image work on workers."""
    counts = record.get("counts", {})
    st.update(units=int(counts.get("inputs", 0)), images=int(counts.get("outputs", 0)), grows=[[split, None]],
              parallel=True, cores=int(record.get("workers", 1)) * int(record.get("threads_per_worker", 1)),
              workers=int(record.get("workers", 1)), output_bytes=_tree_bytes(out))


def _tree_bytes(folder: str) -> int:
    """Bytes of the files under a local folder (0 for remote ones: not measured)."""
    import os

    if fs.has_scheme(folder):
        return 0
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(folder) for n in names)


def _train(name: str, out: str, fn, grows: list | None = None, cap=None, units_of=None, subset_cap=None,
           pca_cap=None, probe_of=None, output_grows: list | None = None):
    """Run a training step (``fn()`` -> its train.json record) as a launcher stage growing with ``grows``. A
    vocabulary's record splits into its Beam descriptor sampling, k-means (the stage itself, on a capped sample)
    and the encoder's fit on a subset of images. ``probe_of(record)``: the kernel cairn plan times at the
    target's shape instead of extrapolating the sample's time (jobs/plan.py, probe_seconds); ``output_grows``:
    what the artefact's size grows with (default: nothing, but a classifier's grows with its classes)."""
    with stages.stage("train", out, name=name, grows=grows or [["train", None]], cap=cap,
                      output_grows=output_grows or []) as st:
        record = fn()
        st.update(units=int(units_of(record) if units_of else record.get("images", 0) or 0),
                  images=int(record.get("images", 0) or 0), output_bytes=_tree_bytes(out))
        if probe_of is not None and (probe := probe_of(record)):
            st["probe"] = probe
        pca = record.get("pca") if isinstance(record.get("pca"), dict) else None
        if pca and pca.get("seconds") and not st["reused"]:  # DELF: its PCA learns from a capped image sample
            stages.add("train", fs.join(out, "pca"), pca["seconds"], name=f"PCA, {name}",
                       units=int(pca.get("images", 0)), grows=[["train", None]], cap=pca_cap)
            st["minus_seconds"] = float(pca["seconds"])
        parts = record.get("seconds") if isinstance(record.get("seconds"), dict) else None
        if parts and not st["reused"]:
            counts = record.get("counts", {})
            stages.add("sample", fs.join(out, "sample"), parts.get("sample", 0.0), name="descriptor sampling",
                       units=int(counts.get("images", 0)), images=int(counts.get("images", 0)),
                       grows=[["train", None]], parallel=True)
            stages.add("train", fs.join(out, "encoder"), parts.get("encoder", 0.0), name=f"encoder fit, {name}",
                       units=int(counts.get("subset_images", 0)), grows=[["train", None]], cap=subset_cap)
            st["minus_seconds"] = float(parts.get("sample", 0.0)) + float(parts.get("encoder", 0.0))
            st["name"] = f"k-means, {name}"
    return record


def _sift_folder(sift) -> str:

    return f"local/sift-{cfg.fingerprint(sift)[:8]}"  # one folder per SIFT config, shared by every SIFT method


def _encode_both(ctx: RunContext, source: str, encoder: str, folder: str) -> dict:
    from jobs.encode import encode

    records = {}
    for split in ctx.splits:
        out = fs.join(folder, split)
        with stages.stage("encode", out, name=f"encode ({encoder.rsplit('/', 2)[-2]})", split=split) as st:
            records[split] = encode(fs.join(source, split), encoder, out, workers=ctx.workers, threads=ctx.threads,
                                    beam_args=list(ctx.beam_args), force=ctx.force)
            _beam_stage(st, records[split], split, out)
    return records


def build_base(method: str, config: MethodsConfig, ctx: RunContext) -> dict:
    """Features, models and index of a base method (hog, sift-bovw, sift-vlad); reused when already built.

    Returns {"vectors": folder with train/ and queries/ vectors, "index", "extract", "encode", "train",
    "local": folder with SIFT local features (or None)}.
    """
    from jobs.train import train

    home = fs.join(ctx.work, method)
    if method == "hog":
        extracted = _extract_both(ctx, "hog", cfg.to_dict(config.hog.hog), "hog")
        vectors, encoded, trained = fs.join(ctx.work, "hog"), None, {"train_seconds": 0.0}
        if config.hog.pca_dim > 0:
            trained = _train("PCA (hog)", fs.join(home, "model"), lambda: train(
                "hog", fs.join(vectors, "train"), fs.join(home, "model"), config, force=ctx.force))
            if trained.get("trained", True):  # False: too few images to learn the PCA (logged)
                encoded = _encode_both(ctx, vectors, fs.join(home, "model", "encoder.npz"), fs.join(home, "pca"))
                vectors = fs.join(home, "pca")
        local = None
    else:
        sift = config.bovw.sift if method == "sift-bovw" else config.vlad.sift
        local = fs.join(ctx.work, _sift_folder(sift))
        extracted = _extract_both(ctx, "sift", cfg.to_dict(sift), _sift_folder(sift))
        voc = (config.bovw if method == "sift-bovw" else config.vlad).vocabulary
        subset = config.bovw.idf_sample if method == "sift-bovw" else config.vlad.pca_sample
        trained = _train(f"vocabulary ({method})", fs.join(home, "model"), lambda: train(
            method, fs.join(local, "train"), fs.join(home, "model"), config, workers=max(1, ctx.workers),
            beam_args=list(ctx.beam_args), force=ctx.force), cap=voc.sample_size,
            units_of=lambda r: r.get("counts", {}).get("descriptors", 0), subset_cap=subset)
        encoded = _encode_both(ctx, local, fs.join(home, "model", "encoder.npz"), fs.join(home, "vectors"))
        vectors = fs.join(home, "vectors")
    indexed = _index(ctx, fs.join(vectors, "train"), fs.join(home, "index"))
    return {"vectors": vectors, "index": fs.join(home, "index"), "indexed": indexed, "extract": extracted,
            "encode": encoded, "train": trained, "local": local}


def _index(ctx: RunContext, features: str, out: str) -> dict:
    from index.faiss_index import IndexConfig
    from jobs.index import build_index

    with stages.stage("index", out, name="index build") as st:
        record = build_index(features, out, ctx.index or IndexConfig(), beam="auto", beam_args=list(ctx.beam_args),
                             workers=ctx.workers, threads=ctx.threads)
        st.update(units=record["count"], grows=[["train", None]], output_bytes=record["index_bytes"],
                  vectors=record["count"], dim=record["dim"], factory=record["factory"])
        build = cfg.load_json(fs.join(out, "index.json")).get("build", {}) if record["factory"] != \
            "sparse-inverted-file" else {}
        if build.get("add_seconds") and not st["reused"]:  # the adds go to Beam workers with a cluster runner
            stages.add("index", fs.join(out, "add"), build["add_seconds"], name="index adds", units=record["count"],
                       grows=[["train", None]], parallel=bool(build.get("beam")), cluster_parallel=True)
            st["minus_seconds"] = float(build["add_seconds"])
            st["name"] = "index training and merge"
    return record


DEEP = ("cnn", "cnn-untrained", "cnn-pretrained")


def _deep_model(method: str, config: MethodsConfig, ctx: RunContext) -> tuple[object, dict, dict]:
    """(method config, cnn extraction params, training record) of cnn, cnn-untrained or cnn-pretrained: the
    fine-tuned model (trained when needed) or the frozen one."""
    from jobs.train import train

    trained = {"train_seconds": 0.0}
    if method == "cnn-pretrained":
        mc = config.cnn_pretrained
        if not mc.model:
            raise CairnError("cnn-pretrained needs a frozen model: --set cnn_pretrained.model=PATH, a .tflite file "
                             "(e.g. ../shared/weights/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite), a "
                             "SavedModel folder, a .keras export, or keras:resnet50 (downloads ImageNet weights)")
        model = mc.model if mc.model.startswith("keras:") else fs.absolute(mc.model)
    else:
        mc = config.cnn
        folder = fs.join(ctx.work, "cnn", "model")
        fine_tuned = _train("fine-tune (cnn)", folder, lambda: train("cnn", ctx.train, folder, config, force=ctx.force,
                                                                     decode=ctx.decode),
                            units_of=lambda r: r.get("counts", {}).get("used", 0))
        model = fs.join(folder, "model.keras" if method == "cnn" else "untrained.keras")
        if method == "cnn":
            trained = fine_tuned
    params = {"model": model, "scales": list(mc.scales), "batch_size": mc.batch_size}
    if method == "cnn-pretrained":
        params.update(input_size=mc.input_size, preprocessing=mc.preprocessing)
    return mc, params, trained


def build_deep(method: str, config: MethodsConfig, ctx: RunContext, detect=None) -> dict:
    """Embeddings and index of cnn (fine-tuned), cnn-untrained (the same network before fine-tuning) or
    cnn-pretrained (a frozen model); the same record as :func:`build_base`. With ``detect``
    (features.detect.DetectConfig), ``method`` is cnn+det or cnn-pretrained+det: regions are embedded."""
    from jobs.train import train_pca

    home = fs.join(ctx.work, method)
    mc, params, trained = _deep_model(method.removesuffix("+det"), config, ctx)
    extracted = _extract_both(ctx, "cnn", params, fs.join(method, "embeddings"), detect)
    vectors, encoded = fs.join(ctx.work, method, "embeddings"), None
    if mc.pca_dim > 0:
        pca = _train(f"PCA ({method})", fs.join(home, "pca-model"), lambda: train_pca(
            method, fs.join(vectors, "train"), fs.join(home, "pca-model"), mc, force=ctx.force))
        if pca.get("trained", True):  # False: too few images to learn the PCA (logged)
            encoded = _encode_both(ctx, vectors, fs.join(home, "pca-model", "encoder.npz"), fs.join(home, "pca"))
            vectors = fs.join(home, "pca")
        trained = {**trained, "train_seconds": float(trained.get("train_seconds", 0.0)) + pca["train_seconds"]}
    indexed = _index(ctx, fs.join(vectors, "train"), fs.join(home, "index"))
    return {"vectors": vectors, "index": fs.join(home, "index"), "indexed": indexed, "extract": extracted,
            "encode": encoded, "train": trained, "local": None}


def detector_for(config: MethodsConfig, ctx: RunContext) -> tuple[object, dict]:
    """(features.detect.DetectConfig with its model, training record): the detector named by
    detect.detect.model, or one trained on the database's boxes (--boxes) in WORK/detector."""
    import dataclasses

    from jobs.extract import check_detector, resolve_detector
    from jobs.train import train

    dc = config.detect.detect
    if dc.model:
        detect = dataclasses.replace(dc, model=resolve_detector(dc.model))
        check_detector(detect)
        return detect, {"train_seconds": 0.0}
    if not ctx.boxes:
        raise CairnError("cnn+det and cnn-pretrained+det need a detector: --boxes FILE (landmark boxes of the "
                         "database images, to train one), or --set detect.detect.model=PATH (a trained .keras, an "
                         "Object Detection API SavedModel, or activation:WEIGHTS for the training-free fallback)")
    folder = fs.join(ctx.work, "detector")
    record = _train("detector", folder, lambda: train("detector", ctx.train, folder, config, force=ctx.force,
                                                      decode=ctx.decode, boxes=ctx.boxes),
                    cap=config.detect.max_images)
    return dataclasses.replace(dc, model=fs.join(folder, "model.keras")), record


def build_det(method: str, config: MethodsConfig, ctx: RunContext) -> dict:
    """cnn+det / cnn-pretrained+det: the detector (trained or given), then the base method's embeddings of every
    region (the full image and the top boxes) of both splits, indexed with their parent ids."""
    detect, det_train = detector_for(config, ctx)
    base = build_deep(method, config, ctx, detect=detect)
    seconds = float(base["train"].get("train_seconds", 0.0)) + float(det_train.get("train_seconds", 0.0))
    return {**base, "train": {**base["train"], "train_seconds": seconds}, "detector": detect,
            "detector_train": det_train}


def build_delf(config: MethodsConfig, ctx: RunContext) -> dict:
    """DELF trained on the database and extracted from both splits (WORK/delf/model, WORK/delf/local/{split});
    reused when built. Returns {"local", "extract", "train", "model"}."""
    from jobs.train import train

    folder = fs.join(ctx.work, "delf", "model")
    trained = _train("DELF", folder, lambda: train("delf", ctx.train, folder, config, force=ctx.force,
                                                   decode=ctx.decode),
                     units_of=lambda r: r.get("counts", {}).get("used", 0), pca_cap=config.delf.train.pca_images)
    pca = fs.join(folder, "pca.npz") if config.delf.train.pca_dim else ""
    params = cfg.to_dict(config.delf.extraction(fs.join(folder, "model.keras"), pca))
    params = {k: v for k, v in params.items() if k != "device"}
    extracted = _extract_both(ctx, "delf", params, "delf/local")
    return {"local": fs.join(ctx.work, "delf", "local"), "extract": extracted, "train": trained, "model": folder}


def build_delf_sv(config: MethodsConfig, ctx: RunContext) -> dict:
    """delf+sv's base: DELF features pooled by attention into global vectors (WORK/delf+sv/vectors) and their
    index; the same record as :func:`build_base`, with the DELF local features for verification."""
    delf = build_delf(config, ctx)
    home = fs.join(ctx.work, "delf+sv")
    encoded = _encode_both(ctx, delf["local"], fs.join(delf["model"], "pool.npz"), fs.join(home, "vectors"))
    indexed = _index(ctx, fs.join(home, "vectors", "train"), fs.join(home, "index"))
    return {"vectors": fs.join(home, "vectors"), "index": fs.join(home, "index"), "indexed": indexed,
            "extract": delf["extract"], "encode": encoded, "train": delf["train"], "local": delf["local"]}


def build_cnn_delf(config: MethodsConfig, ctx: RunContext) -> dict:
    """cnn+delf's base: the fine-tuned cnn's embeddings and index, with DELF local features for re-ranking."""
    base = build_deep("cnn", config, ctx)
    delf = build_delf(config, ctx)
    seconds = float(base["train"].get("train_seconds", 0.0)) + float(delf["train"].get("train_seconds", 0.0))
    return {**base, "local": delf["local"], "extra_extract": delf["extract"],
            "train": {**base["train"], "train_seconds": seconds}}


BASE = {"hog": "hog", "sift-bovw": "sift-bovw", "sift-vlad": "sift-vlad", "sift-bovw+sv": "sift-bovw",
        "hog-linear": "hog", "sift-vlad-linear": "sift-vlad", **{m: m for m in DEEP}}


def index_owner(method: str) -> str:
    """The method whose index ``method`` searches (WORK/<owner>/index): its base method's, cnn's for cnn+delf."""
    return "cnn" if method == "cnn+delf" else BASE.get(method, method)


def run_method(method: str, config: MethodsConfig, ctx: RunContext) -> dict:
    """Run ``method`` end to end; returns {"costs", "recognize" (folder), "dead_letters" {split: csv path},
    "counts" {split: the extraction's record counts (inputs, outputs, dead_letters, dead_by_stage)},
    "index" (the folder of the index the queries were searched in)}."""
    from jobs.recognize import recognize
    from jobs.train import train

    if method.endswith("+det"):
        base = build_det(method, config, ctx)
    elif method == "cnn+delf":
        base = build_cnn_delf(config, ctx)
    elif method == "delf+sv":
        base = build_delf_sv(config, ctx)
    elif method in DEEP:
        base = build_deep(method, config, ctx)
    else:
        base = build_base(BASE[method], config, ctx)
    home = fs.join(ctx.work, method)
    classifier, verify, trained = None, None, base["train"]
    if method.endswith("-linear"):
        cc = config.classifier
        # softmax: SGD steps of batch x dim x classes, priced by cairn plan at the target's classes (probe);
        # nearest class mean: one pass over the images
        softmax = cc.kind == "softmax"
        trained = _train(f"classifier ({method})", fs.join(home, "classifier"), lambda: train(
            method, fs.join(base["vectors"], "train"), fs.join(home, "classifier"), config, force=ctx.force),
            grows=[["train", None], ["classes", None]] if softmax else [["train", None]],
            units_of=lambda r: r.get("images", 0) * (r.get("classes", 1) if softmax else 1),
            probe_of=lambda r: {"kernel": "softmax-step", "dim": int(r.get("dim", 0)), "batch": cc.batch_size,
                                "epochs": cc.epochs, "validation_fraction": cc.validation_fraction}
            if softmax and r.get("dim") else None, output_grows=[["classes", None]])
        classifier = fs.join(home, "classifier", "classifier.npz")
    if method.endswith("+sv") or method == "cnn+delf":
        sv = config.delf.sv if "delf" in method else config.sv
        verify = (fs.join(base["local"], "train"), fs.join(base["local"], "queries"), sv)
    with stages.stage("recognize", fs.join(home, "recognize"), name="recognize (vote, I/O)") as st:
        rec = recognize(base["index"], fs.join(base["vectors"], "queries"), fs.join(home, "recognize"), ctx.vote,
                        ctx.neighbours, classifier=classifier, verify=verify,
                        tune_config=None if classifier else ctx.tune, db_features=fs.join(base["vectors"], "train"))
        _recognize_parts(st, rec, base["indexed"]["count"], home,
                         classes=int(trained.get("classes", 0) or 0) if classifier else None)
    return {"costs": _costs(method, base, trained, rec), "recognize": fs.join(home, "recognize"),
            "dead_letters": {split: r["outputs"]["dead_letters"] for split, r in base["extract"].items()},
            "counts": {split: r["counts"] for split, r in base["extract"].items()}, "index": base["index"],
            "regions": {split: fs.join(base["vectors"], split) for split in base["extract"]}
            if "detector" in base else None}


def _recognize_parts(st: dict, rec: dict, database: int, home: str, classes: int | None = None) -> None:
    """Split a recognition's stage record into its search (queries x database vectors), a classifier's scoring
    (queries x its ``classes``), tuning (held-out database images), verification (queries) and the rest (per
    query)."""
    queries = int(rec["counts"]["queries"])
    st.update(units=queries, grows=[["queries", None]])
    tuning = rec.get("tuning") or {}
    parts = [("search", "search", rec.get("search_seconds", 0.0), queries * database,
              [["queries", None], ["train", None]]),
             ("verify", "spatial verification", rec.get("verify_seconds", 0.0), queries, [["queries", None]])]
    if tuning.get("seconds"):
        held_out = int(tuning.get("queries", 0) or 0)
        # the vote grid over the held-out images' neighbour lists: per held-out image (their own search of the
        # database is one query batch, small beside the grid)
        parts.append(("tune", "vote tuning", tuning["seconds"], held_out, [["classes", 2000]]))
    if classes:  # the search above still runs (the neighbour lists); the labels come from the classifier
        parts.append(("classify", "classifier scoring", rec.get("decide_seconds", 0.0), queries * classes,
                      [["queries", None], ["classes", None]]))
    for kind, name, seconds, units, grows in parts:
        if seconds:
            stages.add(kind, fs.join(home, "recognize", kind), seconds, name=name, units=units, grows=grows)
            st["minus_seconds"] = st.get("minus_seconds", 0.0) + float(seconds)


def _costs(method: str, base: dict, trained: dict, rec: dict) -> dict:
    from jobs.extract import features_prefix

    ex = base["extract"]
    images = sum(r["counts"]["outputs"] for r in ex.values())
    seconds = sum(r["seconds"] for r in ex.values()) + sum(r["seconds"] for r in (base["encode"] or {}).values())
    seconds += sum(r["seconds"] for r in base.get("extra_extract", {}).values())  # cnn+delf: DELF extraction
    index_record = cfg.load_json(fs.join(base["index"], "index.json"))
    dim = int(index_record["dim"])
    if index_record.get("kind") == "sparse-inverted-file":  # bytes of the stored non-zeros (int32 + float32)
        representation = round(8 * index_record["nnz"] / max(1, index_record["count"]))
    else:
        representation = dim * 4
    vector_bytes = sum(_folder_bytes(features_prefix(fs.join(base["vectors"], s), k))
                       for s in ("train", "queries") for k in ("global", "sparse"))
    local_bytes = sum(_folder_bytes(features_prefix(fs.join(base["local"], s), "local"))
                      for s in ("train", "queries")) if base["local"] else 0
    costs = {
        "images_per_second": round(images / seconds, 2) if seconds else None,
        "extract_seconds": round(seconds, 3),
        # a classifier method also pays for its descriptor's training (vocabulary, PCA)
        "train_seconds": round(float(trained.get("train_seconds", 0.0)) +
                               (float(base["train"].get("train_seconds", 0.0)) if trained is not base["train"]
                                else 0.0), 3),
        "index_seconds": round(base["indexed"]["seconds"], 4),
        "search_seconds": rec["search_seconds"],
        "verify_seconds": rec.get("verify_seconds", 0.0),
        "dim": dim,
        "bytes_per_image": representation,
        "feature_bytes_per_image": round(vector_bytes / images) if images else None,
        "index_bytes": base["indexed"]["index_bytes"],
        "dead_letters": sum(r["counts"]["dead_letters"] for r in (*ex.values(), *base.get("extra_extract", {}).values())),
        "index_factory": index_record.get("factory", index_record.get("kind")),
        "vote": (rec.get("tuning") or {}).get("tuned") or rec["config"]["vote"],
    }
    if base.get("detector") is not None:  # every region of a database image is a vector in the index
        train_images = ex["train"]["counts"]["outputs"] if "train" in ex else 0
        costs["regions_per_image"] = round(index_record["count"] / max(1, train_images), 3)
        costs["bytes_per_image"] = round(representation * index_record["count"] / max(1, train_images))
        costs["regional_features"] = {split: fs.join(base["vectors"], split) for split in ex}
        costs["detector"] = cfg.to_dict(base["detector"])
        costs["detector_train_seconds"] = float(base["detector_train"].get("train_seconds", 0.0))
    if method.endswith("+sv") or method == "cnn+delf":  # the local features must be kept for verification
        costs["local_feature_bytes_per_image"] = round(local_bytes / images) if images else None
        costs["bytes_per_image"] += costs["local_feature_bytes_per_image"] or 0
    return costs
