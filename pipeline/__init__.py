"""Beam plumbing and data contracts: manifests, image decoding, Parquet schemas, job options."""
