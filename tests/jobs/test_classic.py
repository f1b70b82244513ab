import pytest

from pipeline.errors import CairnError
from pipeline.run.settings import MethodsConfig, describe_settings, parse_overrides


def test_overrides_convert_to_the_field_types():
    c = parse_overrides(["bovw.vocabulary.k=4096", "vlad.whiten=false", "vlad.power=0.25", "sv.verify.model=affine",
                         "hog.hog.size=64"])
    assert c.bovw.vocabulary.k == 4096 and c.vlad.whiten is False and c.vlad.power == 0.25
    assert c.sv.verify.model == "affine" and c.hog.hog.size == 64
    assert c.vlad.vocabulary.k == MethodsConfig().vlad.vocabulary.k  # untouched fields keep their defaults
    assert parse_overrides([]) == MethodsConfig()


@pytest.mark.parametrize("item, message", [
    ("bovw.vocabulary.k=lots", "is not an integer"),
    ("bovw.nope=1", "has no field 'nope'"),
    ("bovw.vocabulary=3", "is a group"),
    ("bovw.burstiness.x=3", "is a value, not a group"),
    ("vlad.whiten=maybe", "is not a boolean"),
    ("bovw.sift.dtype=int4", "dtype"),  # the config's own validation
    ("sv.top_k=0", "top_k"),
    ("no-equals-sign", "expected NAME.FIELD=VALUE"),
])
def test_bad_overrides_say_what_is_wrong(item, message):
    with pytest.raises(CairnError, match=message):
        parse_overrides([item])


def test_every_field_is_listed_for_help():
    lines = describe_settings()
    assert "bovw.vocabulary.k=1024" in lines and "vlad.pca_dim=256" in lines and "sv.top_k=20" in lines
    for line in lines:  # every listed default can be given back unchanged
        path, _, value = line.partition("=")
        assert parse_overrides([f"{path}={value}"]) == MethodsConfig()


def test_chance_level_of_the_porto_benchmark_matches_enumeration():
    import itertools

    import numpy as np

    from bench.bench_porto import _chance
    from reports.metrics import mean_average_precision_at_k

    labels = np.array([0, 0, 0, 1, 1, 2])  # a class with one photo has no relevant neighbour: not a query
    aps, hits, queries = [], [], 0
    for q in range(len(labels)):
        others = [i for i in range(len(labels)) if i != q]
        relevant = {i for i in others if labels[i] == labels[q]}
        if not relevant:
            continue
        queries += 1
        perms = list(itertools.permutations(others))
        aps.append(np.mean([mean_average_precision_at_k([list(p)], [relevant], 100) for p in perms]))
    for q in range(len(labels)):
        hits.append(np.mean([labels[i] == labels[q] for i in range(len(labels)) if i != q]))
    ap, acc = _chance(labels)
    assert ap == pytest.approx(np.mean(aps)) and acc == pytest.approx(np.mean(hits))
