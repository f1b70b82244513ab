"""`cairn demo`: the synthetic landmark set (pipeline/stages/synth.py) and `cairn compare` on it with every built
method; what it writes is in `cairn demo --help` (jobs/demo.py)."""

from __future__ import annotations

import os
from collections.abc import Callable

from index.recognize import TuneConfig, VoteConfig
from pipeline.errors import CairnError
from pipeline.run import methods
from pipeline.run.compare import compare
from pipeline.run.settings import MethodsConfig, parse_overrides
from pipeline.stages.synth import synth
from pipeline.synthetic import SynthConfig
from reports.html import ReportConfig


def demo_config(pretrained: str, overrides: list[str]) -> MethodsConfig:
    """The demo's method parameters: a MobileNet v1 for the deep methods (from ``pretrained`` when given)."""
    if pretrained and not os.path.isfile(pretrained):
        raise CairnError(f"--pretrained {pretrained}: no such file")
    path = os.path.abspath(pretrained) if pretrained else ""
    deep = ["cnn.finetune.backbone.name=mobilenet", f"cnn.finetune.backbone.weights={path or 'none'}",
            f"cnn_pretrained.model={path}", "delf.train.backbone.name=mobilenet",
            f"delf.train.backbone.weights={path or 'none'}", "detect.train.backbone.name=mobilenet",
            f"detect.train.backbone.weights={path or 'none'}", "detect.train.input_size=224"]
    return parse_overrides(deep + list(overrides))


def demo(out: str, synth_config: SynthConfig = SynthConfig(), method_names: list[str] | None = None,
         pretrained: str = "", overrides: list[str] | None = None, bad_inputs: bool = False, workers: int = 0,
         threads: int = 0, beam_args: list[str] | None = None, force: bool = False, vote: VoteConfig = VoteConfig(),
         tune: TuneConfig | None = TuneConfig(), report: ReportConfig | None = ReportConfig(),
         test_pipeline: Callable | None = None) -> tuple[dict, dict]:
    """Generate (or reuse) the synthetic set in OUT/data and compare ``method_names`` (default: every built
    method; cnn-pretrained only with ``pretrained``) on it in OUT/run; with ``bad_inputs``, on its manifests
    with every kind of broken input mixed in. Returns (the synth summary, the metrics)."""
    config = demo_config(pretrained, overrides or [])
    data = os.path.join(out, "data")
    made = synth(data, synth_config, force=force, bad_inputs=bad_inputs)
    manifests = made["bad_inputs"] if bad_inputs else {split: os.path.join(data, f"{split}.csv")
                                                       for split in ("train", "queries")}
    metrics = compare(manifests["train"], manifests["queries"], os.path.join(out, "run"),
                      method_names or methods.defaults(bool(pretrained), True), workers=workers, threads=threads,
                      beam_args=beam_args, force=force, config=config, vote=vote, tune=tune, report=report,
                      boxes=os.path.join(data, "boxes.csv"), test_pipeline=test_pipeline)
    return made, metrics
