"""For Beam's --setup_file: Beam workers build and install Cairn from this file (`python setup.py sdist`).

Everything is declared in pyproject.toml; this file only lets the Beam stager find the project. Use
`--setup_file ./setup.py` on DataflowRunner, FlinkRunner and SparkRunner (README, "Scaling out").
"""

from setuptools import setup

setup()
