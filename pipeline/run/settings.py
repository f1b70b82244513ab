"""Every method's parameters as typed frozen dataclasses: one section per method family, all of them in
:class:`MethodsConfig`. `cairn compare --set sift-bovw.vocabulary.k=4096` (``NAME.FIELD=VALUE``) changes one, the
value checked against the field's type; which sections a method reads is in its registry record
(pipeline/run/methods.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from features.base import check_scales, check_side
from features.delf import DelfConfig
from features.detect import DetectConfig
from features.hog import HogConfig
from features.preprocessing import PREPROCESSING
from features.sift import SiftConfig
from features.verify import RerankConfig, VerifyConfig
from models.delf import DelfTrainConfig
from models.detector import DetectorConfig
from models.finetune import FinetuneConfig
from pipeline import config as cfg


@dataclass(frozen=True)
class VocabularyConfig:
    """k-means visual vocabulary (features/vocabulary.py)."""

    k: int = 1024  # visual words (up to 65,536; ~20k-65k for a million images)
    niter: int = 20  # k-means iterations
    sample_size: int = 1_000_000  # database descriptors k-means learns from (a seeded share of each image's)
    seed: int = 0  # sampling and k-means initialisation
    use_gpu: bool = False  # run k-means on the GPUs when faiss-gpu sees some (falls back to the CPU)

    def __post_init__(self):
        cfg.check_numbers(self)
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

    encoder: ClassVar[str] = "bovw"  # what the vocabulary's encoder is (and this section's name)

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

    encoder: ClassVar[str] = "vlad"  # what the vocabulary's encoder is (and this section's name)

    sift: SiftConfig = SiftConfig()  # local features (features/sift.py)
    vocabulary: VocabularyConfig = VocabularyConfig(k=64)  # VLAD uses a small vocabulary (dim = k x 128)
    power: float = 0.5  # signed power normalisation exponent
    pca_dim: int = 256  # PCA-whitening to this many dimensions (0 = raw k x 128 VLAD)
    whiten: bool = True  # whiten the PCA projection (Jegou & Chum 2012)
    pca_sample: int = 50_000  # database images the PCA is learned on
    pca_min_images: int = 10  # database images needed per PCA dimension; with fewer, raw VLAD (0 = always PCA)

    def __post_init__(self):
        cfg.check_numbers(self)
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
        cfg.check_numbers(self)
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
        cfg.check_numbers(self)
        check_scales(self.scales)
        if self.pca_dim < 0 or self.batch_size < 1:
            raise ValueError("pca_dim must be >= 0 and batch_size >= 1")


@dataclass(frozen=True)
class PretrainedConfig:
    """cnn-pretrained: a frozen pretrained extractor, kNN over its embeddings, no training."""

    model: str = ""  # a .tflite file, a SavedModel folder (pure tensor ops only), a .keras export, or keras:<backbone>
    input_size: int = 0  # square input side (0 = the model's own; a SavedModel without one gets 224)
    preprocessing: str = "tf"  # float TFLite/SavedModel inputs: tf ([-1, 1]), caffe, torch or none (0..255)
    scales: tuple[float, ...] = (1.0,)  # test-time scales (models with a fixed input size take only 1.0)
    batch_size: int = 32  # images per inference call
    pca_dim: int = 0  # PCA-whitening learned on the database embeddings (0 = none: it needs many images)
    whiten: bool = True  # divide by the square root of the eigenvalues
    pca_min_images: int = 10  # database images needed per PCA dimension; with fewer, no PCA (0 = always)

    def __post_init__(self):
        cfg.check_numbers(self)
        check_scales(self.scales)
        if self.input_size:  # 0 = the model's own
            check_side("input_size", self.input_size, 32)
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
        cfg.check_numbers(self)
        self.extraction("")  # validates the extraction fields

    def extraction(self, model: str, pca: str = "") -> DelfConfig:
        """The features.delf.DelfConfig of these settings with a model (and PCA) file."""
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


def parse_overrides(items: list[str] | None, config: MethodsConfig = MethodsConfig()) -> MethodsConfig:
    """Apply ``NAME.FIELD=VALUE`` items (--set) in order."""
    return cfg.apply_settings(config, items, "--set", "bovw.vocabulary.k=4096", form="NAME.FIELD")


def describe_settings() -> list[str]:
    """Every settable method parameter as ``name=default`` lines (for --help)."""
    return cfg.describe_fields(MethodsConfig())
