"""Cairn's benchmarks: ``make bench`` (``python -m bench.run``) writes BENCHMARKS.md and bench/results.json.

Each benchmark is a module with ``NAME``, ``TITLE``, ``DESCRIPTION`` and ``run(workdir, quick) -> list[dict]``
(entries built with :func:`bench.common.entry`). Every figure is compared with a reference measured in the
same run (the raw library call or a bare loop); nothing here asserts a time.
"""
