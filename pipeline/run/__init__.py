"""Orchestration: what a method is and how a run chains the stages (pipeline/stages/) into results.

    methods.py    the method registry: one record per method (name, family, summary, config sections, needs,
                  the index it searches, its trainer, its recipe); everything that lists methods reads it
    settings.py   every method's typed parameters (`--set NAME.FIELD=VALUE`)
    recipes.py    the recipes: how each method's features, models and index are built from stages, with every
                  stage's cost recorded (ledger.py)
    compare.py    `cairn compare`: every chosen method on the same manifests, scored together, and the report
    plan.py       `cairn plan`: a run's cost projected from two measured samples
    demo.py       `cairn demo`: the synthetic set and its comparison
    trainers.py   `cairn train`: a method's trainer, found in the registry
"""
