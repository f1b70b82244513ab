"""Beam jobs and data contracts, in three layers (README "Layout"): the orchestration (run/) above the stage
bodies and Beam jobs (stages/), which sit above index/, models/, reports/ and features/; this package's own
modules are the data contracts every layer shares (manifests, image decoding, schemas, Parquet shards, feature
folders, boxes, submissions, configs, options, errors, file systems, the synthetic generator)."""
