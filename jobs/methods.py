"""The recognition methods `cairn compare` knows, and which of them are built yet."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import CairnError


@dataclass(frozen=True)
class MethodInfo:
    summary: str  # one line for --help and the report
    family: str  # "baseline" (classic) or "deep"
    issue: int | None = None  # the issue that builds it, while it is not built
    issue_title: str = ""


METHODS = {
    "hog": MethodInfo("HoG global descriptor, kNN votes over a FAISS index", "baseline"),
    "sift-bovw": MethodInfo("RootSIFT bag of visual words, tf-idf, inverted file, kNN votes", "baseline"),
    "sift-vlad": MethodInfo("RootSIFT VLAD with PCA-whitening, kNN votes over a FAISS index", "baseline"),
    "sift-bovw+sv": MethodInfo("sift-bovw, top neighbours re-ranked by spatial verification (RANSAC)", "baseline"),
    "hog-linear": MethodInfo("HoG + calibrated linear softmax classifier (scikit-learn style, 13k classes)",
                             "baseline"),
    "sift-vlad-linear": MethodInfo("VLAD + calibrated linear softmax classifier", "baseline"),
    "cnn": MethodInfo("CNN fine-tuned with GeM + ArcFace on the database, kNN over embeddings", "deep"),
    "cnn-untrained": MethodInfo("the cnn network before fine-tuning (GeM over its initial weights), kNN", "deep"),
    "cnn-pretrained": MethodInfo("frozen pretrained extractor (TFLite/SavedModel/.keras), kNN over embeddings",
                                 "deep"),
    "cnn+delf": MethodInfo("cnn, its top neighbours re-ranked by DELF local-feature matching + RANSAC", "deep"),
    "delf+sv": MethodInfo("DELF alone: attention-pooled DELF features, kNN, re-ranked by DELF + RANSAC", "deep"),
    "cnn+det": MethodInfo("cnn on detected landmark regions (full image + top boxes), regional kNN per image",
                          "deep"),
    "cnn-pretrained+det": MethodInfo("cnn-pretrained on detected landmark regions, regional kNN per image",
                                     "deep"),
}


NEEDS_MODEL = ("cnn-pretrained", "cnn-pretrained+det")  # run only when given a model file (--set cnn_pretrained.model=...)
NEEDS_BOXES = ("cnn+det", "cnn-pretrained+det")  # need a detector: --boxes to train one, or --set detect.detect.model


def available() -> list[str]:
    return [name for name, info in METHODS.items() if info.issue is None]


def defaults(has_pretrained_model: bool, has_detector: bool = False) -> list[str]:
    """The methods a run compares when none are named: every built one (cnn-pretrained only with a model, the
    +det methods only with a detector or boxes to train one)."""
    return [m for m in available() if (has_pretrained_model or m not in NEEDS_MODEL)
            and (has_detector or m not in NEEDS_BOXES)]


def check(names: list[str]) -> list[str]:
    """Validate method names; raises CairnError naming what is unknown or not built yet."""
    if not names:
        raise CairnError(f"no methods given; available: {', '.join(available())}")
    for name in names:
        if name not in METHODS:
            raise CairnError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
        info = METHODS[name]
        if info.issue is not None:
            raise CairnError(
                f"method {name!r} ({info.summary}) is not built yet: it is planned in issue #{info.issue} "
                f"({info.issue_title}). Available now: {', '.join(available())}"
            )
    return list(dict.fromkeys(names))


def describe() -> str:
    lines = []
    for name, info in METHODS.items():
        status = "ready" if info.issue is None else f"not built yet (issue #{info.issue})"
        lines.append(f"  {name:<15} {info.family:<9} {info.summary} [{status}]")
    return "\n".join(lines)
