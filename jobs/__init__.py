"""Entry points: the ``cairn`` command and one module per job, each with ``run(argv=None, test_pipeline=None)``."""
