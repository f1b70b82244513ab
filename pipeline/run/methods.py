"""The method registry: one frozen record per recognition method, and the trainers `cairn train` runs.

Everything that lists or branches on methods reads it: the CLI's help and checks, `cairn compare` (what to build
and how to recognise), `cairn train` (which trainer), `cairn plan` (whose index a method searches) and the report
(family, summary, the config sections shown, which models Grad-CAM can explain). A new method is one
:func:`register` call with a recipe (pipeline/run/recipes.py shows how recipes chain the stages):

    register(Method("hog-small", "baseline", "HoG at 64 px", sections=("hog",), recipe=my_recipe))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import CairnError

FAMILIES = ("baseline", "deep")


@dataclass(frozen=True)
class Method:
    """A recognition method `cairn compare --methods` knows."""

    name: str  # as given to --methods; also its folder under OUT/work
    family: str  # "baseline" (classic) or "deep"
    summary: str  # one line for --help and the report
    recipe: str | Callable  # (MethodsConfig, RunContext) -> what it built (recipes.build_global's record), or
    # "module:function" naming one (imported when the method runs: listing methods loads no Beam or FAISS)
    sections: tuple[str, ...] = ()  # the MethodsConfig sections it reads (--set NAME.FIELD; shown in metrics.json)
    index_of: str = ""  # the method whose index (WORK/<it>/index) it searches ("": its own)
    trainer: str = ""  # what `cairn train --method NAME` runs (a key of TRAINERS; "": nothing of its own)
    learns_nothing: str = ""  # why `cairn train --method NAME` has nothing to do, when trainer is ""
    classifier: bool = False  # decides with a classifier trained on its vectors (the classifier section)
    rerank: str = ""  # the MethodsConfig field of its spatial verification's RerankConfig, e.g. delf.sv ("": none)
    needs_model: bool = False  # runs only when given a pretrained model (--set cnn_pretrained.model=...)
    needs_boxes: bool = False  # needs a detector: --boxes to train one, or --set detect.detect.model
    keras_embedding: str = ""  # its vectors come from a Keras embedding model (Grad-CAM can explain it): one
    # "fine-tuned" in the run (WORK/cnn/model) or a "frozen" one given by the user; "": none
    variant_of: str = ""  # the method it changes one thing of (the report shows what that changed: +det vs cnn)
    issue: int | None = None  # the issue that builds it, while it is not built
    issue_title: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name}: family must be one of {FAMILIES}, not {self.family!r}")
        if self.trainer and self.trainer not in TRAINERS:
            raise ValueError(f"method {self.name}: no trainer {self.trainer!r}; trainers: {', '.join(TRAINERS)}")

    def build(self, config, ctx) -> dict:
        """Run its recipe: its features, models and index (recipes.build_global's record)."""
        return resolve(self.recipe)(config, ctx)

    def check_sections(self, config) -> None:
        """ValueError unless every section it names is a field of ``config`` (a MethodsConfig)."""
        unknown = [s for s in self.sections if not hasattr(config, s)]
        if unknown:
            raise ValueError(f"method {self.name} names config sections {unknown} that MethodsConfig does not have")

    def rerank_config(self, config):
        """The features.verify.RerankConfig of its spatial verification in ``config`` (None: it has none)."""
        value = config
        for part in filter(None, self.rerank.split(".")):
            value = getattr(value, part)
        return value if self.rerank else None


@dataclass(frozen=True)
class Trainer:
    """What `cairn train --method NAME` runs."""

    on: str  # "features" (a features folder, --features) or "images" (the database manifest, --manifest)
    train: str | Callable  # (source, out, MethodsConfig, trainers.TrainOptions) -> the train.json record, or
    # "module:function" naming one


def resolve(ref: str | Callable) -> Callable:
    """A function given as itself or as "module:function"."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# the trainers (pipeline/run/trainers.py): each method's own, and those of no method of their own (cnn+delf and
# delf+sv use DELF, cnn+det and cnn-pretrained+det the detector)
TRAINERS: dict[str, Trainer] = {name: Trainer(on, f"pipeline.run.trainers:{name.replace('-', '_')}") for name, on in (
    ("sift-bovw", "features"), ("sift-vlad", "features"), ("hog", "features"), ("hog-linear", "features"),
    ("sift-vlad-linear", "features"), ("cnn", "images"), ("delf", "images"), ("detector", "images"))}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (replacing one of the same name); returns it."""
    METHODS[method.name] = method
    return method


def available() -> list[str]:
    return [name for name, m in METHODS.items() if m.issue is None]


def defaults(has_pretrained_model: bool, has_detector: bool = False) -> list[str]:
    """The methods a run compares when none are named: every built one (those that need a pretrained model
    only with one, those that need a detector only with a detector or boxes to train one)."""
    return [name for name in available() if (has_pretrained_model or not METHODS[name].needs_model)
            and (has_detector or not METHODS[name].needs_boxes)]


def check(names: list[str]) -> list[str]:
    """Validate method names; raises CairnError naming what is unknown or not built yet."""
    if not names:
        raise CairnError(f"no methods given; available: {', '.join(available())}")
    for name in names:
        if name not in METHODS:
            raise CairnError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
        m = METHODS[name]
        if m.issue is not None:
            raise CairnError(
                f"method {name!r} ({m.summary}) is not built yet: it is planned in issue #{m.issue} "
                f"({m.issue_title}). Available now: {', '.join(available())}"
            )
    return list(dict.fromkeys(names))


def describe() -> str:
    lines = []
    for name, m in METHODS.items():
        status = "ready" if m.issue is None else f"not built yet (issue #{m.issue})"
        lines.append(f"  {name:<15} {m.family:<9} {m.summary} [{status}]")
    return "\n".join(lines)


def index_owner(name: str) -> str:
    """The method whose index ``name`` searches (WORK/<owner>/index); a name the registry does not know (a
    stage folder) is its own."""
    m = METHODS.get(name)
    return (m.index_of or m.name) if m else name


def descriptions() -> dict[str, dict]:
    """What the report needs to know of each method (reports/results.py): family, summary, config sections,
    whether it answers with a classifier, whether a Keras embedding model makes its vectors, which method it is a
    variant of."""
    return {name: {"family": m.family, "summary": m.summary, "sections": list(m.sections),
                   "classifier": m.classifier, "keras_embedding": m.keras_embedding, "variant_of": m.variant_of}
            for name, m in METHODS.items()}


def trains_on(name: str) -> str:
    """What the trainer of ``name`` reads: "images" (the database manifest) or "features" (a features folder)."""
    m = METHODS.get(name)
    key = m.trainer if m is not None else name
    return TRAINERS[key].on if key in TRAINERS else "features"


def trainable() -> list[str]:
    """What `cairn train --method` takes: the trainers (each method's own, delf, the detector), then the other
    methods that have one (pipeline/run/trainers.py runs them)."""
    return [*TRAINERS, *(name for name, m in METHODS.items() if m.trainer and name not in TRAINERS)]


# ---------------------------------------------------------------------------------------------------------------
# the built-in methods


_OTHERS = "learns nothing with `cairn train`: it uses another method's models"
_R = "pipeline.run.recipes:"  # the built-in recipes
for _m in (
    Method("hog", "baseline", "HoG global descriptor, kNN votes over a FAISS index", _R + "hog",
           sections=("hog",), trainer="hog"),
    Method("sift-bovw", "baseline", "RootSIFT bag of visual words, tf-idf, inverted file, kNN votes",
           _R + "sift_bovw", sections=("bovw",), trainer="sift-bovw"),
    Method("sift-vlad", "baseline", "RootSIFT VLAD with PCA-whitening, kNN votes over a FAISS index",
           _R + "sift_vlad", sections=("vlad",), trainer="sift-vlad"),
    Method("sift-bovw+sv", "baseline", "sift-bovw, top neighbours re-ranked by spatial verification (RANSAC)",
           _R + "sift_bovw", sections=("bovw", "sv"), index_of="sift-bovw", rerank="sv",
           learns_nothing=f"{_OTHERS} (sift-bovw)"),
    Method("hog-linear", "baseline", "HoG + calibrated linear softmax classifier (scikit-learn style, 13k classes)",
           _R + "hog", sections=("hog", "classifier"), index_of="hog", trainer="hog-linear", classifier=True),
    Method("sift-vlad-linear", "baseline", "VLAD + calibrated linear softmax classifier", _R + "sift_vlad",
           sections=("vlad", "classifier"), index_of="sift-vlad", trainer="sift-vlad-linear", classifier=True),
    Method("cnn", "deep", "CNN fine-tuned with GeM + ArcFace on the database, kNN over embeddings", _R + "cnn",
           sections=("cnn",), trainer="cnn", keras_embedding="fine-tuned"),
    Method("cnn-untrained", "deep", "the cnn network before fine-tuning (GeM over its initial weights), kNN",
           _R + "cnn_untrained", sections=("cnn",), keras_embedding="fine-tuned",
           learns_nothing="learns nothing: it embeds with the untrained.keras that `cairn train --method cnn` writes"),
    Method("cnn-pretrained", "deep", "frozen pretrained extractor (TFLite/SavedModel/.keras), kNN over embeddings",
           _R + "cnn_pretrained", sections=("cnn_pretrained",), needs_model=True, keras_embedding="frozen",
           learns_nothing="learns nothing: it embeds with a frozen pretrained model (cnn_pretrained.model)"),
    Method("cnn+delf", "deep", "cnn, its top neighbours re-ranked by DELF local-feature matching + RANSAC",
           _R + "cnn_delf", sections=("cnn", "delf"), index_of="cnn", rerank="delf.sv",
           learns_nothing=f"{_OTHERS} (cnn+delf)"),
    Method("delf+sv", "deep", "DELF alone: attention-pooled DELF features, kNN, re-ranked by DELF + RANSAC",
           _R + "delf_sv", sections=("delf",), rerank="delf.sv", learns_nothing=f"{_OTHERS} (delf+sv)"),
    Method("cnn+det", "deep", "cnn on detected landmark regions (full image + top boxes), regional kNN per image",
           _R + "cnn_det", sections=("cnn", "detect"), needs_boxes=True, variant_of="cnn",
           learns_nothing=f"{_OTHERS} (cnn+det)"),
    Method("cnn-pretrained+det", "deep", "cnn-pretrained on detected landmark regions, regional kNN per image",
           _R + "cnn_pretrained_det", sections=("cnn_pretrained", "detect"), needs_model=True, needs_boxes=True,
           variant_of="cnn-pretrained", learns_nothing=f"{_OTHERS} (cnn-pretrained+det)"),
):
    register(_m)
