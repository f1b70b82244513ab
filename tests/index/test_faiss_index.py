import json
import logging
import re

import faiss
import numpy as np
import pytest

from features.base import l2_normalize
from index import build as B
from index.faiss_index import IndexConfig, VectorIndex, apply_search_params, gpu_count
from index.synthetic import VectorSet, VectorSetConfig
from pipeline.errors import CairnError


def _data(n=500, d=32, q=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, d))
    xb = l2_normalize(centres[rng.integers(0, 10, n)] + 0.3 * rng.normal(size=(n, d)))
    xq = l2_normalize(centres[rng.integers(0, 10, q)] + 0.3 * rng.normal(size=(q, d)))
    return xb, xq


def _ids(n):
    return [f"img{i:05d}" for i in range(n)]


@pytest.fixture(scope="module")
def corpus():
    """Seeded landmark-shaped embeddings: 20,000 database and 200 query vectors of dimension 64."""
    vs = VectorSet(VectorSetConfig(dim=64, classes=300, seed=3))
    xb, yb = vs.draw(20_000, seed=1, distractors=0.1)
    xq, _ = vs.draw(200, seed=2, distractors=0.3)
    exact = faiss.IndexFlatIP(64)
    exact.add(xb)
    _, gt = exact.search(xq, 10)
    return xb, yb, xq, gt


def _recall_at_10(I, gt):
    """10-recall@10: the share of the exact top 10 found in the returned top 10."""
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I[:, :10], gt, strict=True)]))


def test_flat_search_equals_brute_force():
    xb, xq = _data()
    index = VectorIndex.build(xb, _ids(len(xb)), np.arange(len(xb)) % 7)
    assert index.factory == "Flat"  # auto: exact for small databases
    D, I = index.search(xq, 5, batch_size=7)  # several batches
    sims = xq @ xb.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(I, expected)
    np.testing.assert_allclose(D, np.take_along_axis(sims, expected, 1), rtol=1e-5, atol=1e-5)


def test_ids_labels_and_nonlandmark_index_survive_save_and_load(tmp_path):
    xb, xq = _data()
    ids = [f"id-{i:04d}" for i in range(len(xb))]
    labels = np.where(np.arange(len(xb)) % 5 == 0, -1, np.arange(len(xb)) % 3)
    index = VectorIndex.build(xb, ids, labels, IndexConfig(shard_size=128), features_metadata={"method": "hog"},
                              folder=str(tmp_path / "ix"))
    index.save(str(tmp_path / "ix"))
    back = VectorIndex.load(str(tmp_path / "ix"))
    D1, I1 = index.search(xq, 10)
    D2, I2 = back.search(xq, 10)
    np.testing.assert_array_equal(I1, I2)
    assert back.image_ids == ids and back.labels.tolist() == labels.tolist()
    assert back.features_metadata == {"method": "hog"} and back.config == IndexConfig(shard_size=128)
    assert back.ids_of(I2[:1])[0] == [ids[j] for j in I1[0]]
    np.testing.assert_array_equal(back.labels_of(I2), labels[I2])
    # the non-landmark images have an index of their own, with their image ids
    assert back.nonlandmarks.ntotal == int((labels < 0).sum())
    assert back.nonlandmarks.image_ids == [ids[i] for i in np.nonzero(labels < 0)[0]]
    _, In = back.nonlandmarks.search(xq, 3)
    sims = xq @ xb[labels < 0].T
    np.testing.assert_array_equal(In, np.argsort(-sims, axis=1, kind="stable")[:, :3])
    assert (tmp_path / "ix" / "trained.faiss").exists()


@pytest.mark.parametrize("factory, params, bound", [
    # observed on this seeded corpus (10-recall@10; with nprobe=1): IVF-Flat 0.966 (0.593), IVF-PQ 0.658 (0.46),
    # HNSW 0.967, IVF fast-scan PQ + SQ8 refinement 0.931 (0.584)
    ("IVF128,Flat", "nprobe=16", 0.93),
    ("IVF128,PQ16", "nprobe=16", 0.6),  # 8-bit codes
    ("HNSW16,Flat", "efSearch=64", 0.93),
    ("IVF128,PQ32x4fs,Refine(SQ8)", "nprobe=16,k_factor_rf=8", 0.9),
])
def test_recall_against_exact_search(corpus, factory, params, bound):
    xb, yb, xq, gt = corpus
    index = VectorIndex.build(xb, _ids(len(xb)), yb, IndexConfig(factory=factory, search=params, shard_size=7000,
                                                                 train_size=5000))
    _, I = index.search(xq, 10)
    recall = _recall_at_10(I, gt)
    assert recall >= bound, f"{factory} {params}: recall@10 {recall:.3f}"
    # more probes never lose recall
    if "nprobe" in params:
        _, I1 = index.search(xq, 10, params=params.replace("nprobe=16", "nprobe=1"))
        assert _recall_at_10(I1, gt) < recall


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "IVF64,PQ8x4", "IVF64,PQ8x4fs,Refine(PQ16x4)",
                                     "OPQ8_32,IVF64,PQ8x4", "SQ8,Refine(Flat)"])
def test_shard_add_and_merge_equal_a_single_add(corpus, factory):
    xb, yb, xq, _ = corpus
    xb, yb = xb[:6000, :32].copy(), yb[:6000]
    xb = l2_normalize(xb)
    xq = l2_normalize(xq[:, :32].copy())
    one = VectorIndex.build(xb, _ids(len(xb)), yb, IndexConfig(factory=factory, shard_size=10_000, train_size=3000))
    many = VectorIndex.build(xb, _ids(len(xb)), yb, IndexConfig(factory=factory, shard_size=1000, train_size=3000))
    assert one.build_info["shards"] == 1 and many.build_info["shards"] == 6
    assert one.ntotal == many.ntotal == len(xb)
    D1, I1 = one.search(xq, 20)
    D2, I2 = many.search(xq, 20)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-6)


def test_hnsw_takes_its_shards_into_one_graph(corpus):
    xb, yb, xq, gt = corpus
    index = VectorIndex.build(xb, _ids(len(xb)), yb, IndexConfig(factory="HNSW16,Flat", search="efSearch=64",
                                                                 shard_size=3000))
    assert index.build_info["shards"] == 7 and index.ntotal == len(xb)
    assert _recall_at_10(index.search(xq, 10)[1], gt) >= 0.93  # observed 0.967, as with one add


def test_on_disk_merge_equals_in_memory_and_reloads(corpus, tmp_path):
    xb, yb, xq, _ = corpus
    config = IndexConfig(factory="IVF64,PQ16x4", search="nprobe=8", shard_size=5000, train_size=5000)
    mem = VectorIndex.build(xb, _ids(len(xb)), yb, config)
    disk = VectorIndex.build(xb, _ids(len(xb)), yb, IndexConfig(**{**config.__dict__, "on_disk": "on"}),
                             folder=str(tmp_path / "ix"))
    assert disk.build_info["on_disk"] and (tmp_path / "ix" / "index.ivfdata").exists()
    assert not (tmp_path / "ix" / "shards").exists()  # shard files are removed after the merge
    disk.save(str(tmp_path / "ix"))
    back = VectorIndex.load(str(tmp_path / "ix"))
    np.testing.assert_array_equal(mem.search(xq, 10)[1], back.search(xq, 10)[1])


def test_a_moved_on_disk_index_opens_with_plain_faiss_by_the_readme_recipe(corpus, tmp_path):
    """The recipe of README "Outputs": IO_FLAG_ONDISK_SAME_DIR finds index.ivfdata beside index.faiss wherever
    the folder went (FAISS records the path it was written at), and index.json's search parameters."""
    import json
    import shutil

    import faiss
    import pyarrow.parquet as pq

    xb, yb, xq, _ = corpus
    config = IndexConfig(factory="IVF64,PQ16x4", search="nprobe=8", shard_size=5000, train_size=5000, on_disk="on")
    built = VectorIndex.build(xb, _ids(len(xb)), yb, config, folder=str(tmp_path / "ix"))
    built.save(str(tmp_path / "ix"))
    expected = built.search(xq, 10)[1]
    moved = tmp_path / "elsewhere" / "ix"
    shutil.move(str(tmp_path / "ix"), str(moved))
    index = faiss.read_index(str(moved / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    faiss.ParameterSpace().set_index_parameters(index, json.loads((moved / "index.json").read_text())["search_params"])
    _, rows = index.search(np.ascontiguousarray(xq, np.float32), 10)
    np.testing.assert_array_equal(rows, expected)
    ids = pq.read_table(moved / "ids.parquet").column("id").to_pylist()  # faiss_id = row
    assert ids[rows[0, 0]] == _ids(len(xb))[rows[0, 0]]


def test_auto_on_disk_when_the_budget_is_exceeded(corpus, tmp_path):
    xb, yb, xq, _ = corpus
    config = IndexConfig(factory="IVF64,Flat", memory_budget=1 << 20, nonlandmark_index=False)  # 1 MiB < 5 MB
    index = VectorIndex.build(xb, _ids(len(xb)), yb, config, folder=str(tmp_path / "ix"))
    assert index.build_info["on_disk"]
    for factory in ("HNSW8,Flat", "IVF64,PQ8x4fs"):  # no inverted lists / fast-scan blocks: never on disk
        with pytest.raises(CairnError, match="plain IVF"):
            VectorIndex.build(xb, _ids(len(xb)), yb, IndexConfig(factory=factory, on_disk="on"),
                              folder=str(tmp_path / "h"))
    fast = VectorIndex.build(xb, _ids(len(xb)), yb, IndexConfig(factory="IVF64,PQ8x4fs", memory_budget=1 << 20,
                                                                train_size=3000), folder=str(tmp_path / "f"))
    assert not fast.build_info["on_disk"] and fast.ntotal == len(xb)


def test_trained_index_takes_more_shards_later(corpus, tmp_path):
    xb, yb, xq, _ = corpus
    config = IndexConfig(factory="IVF64,PQ16x4", search="nprobe=8", nonlandmark_index=False, train_size=5000)
    built = VectorIndex.build(xb, _ids(len(xb)), yb, config, folder=str(tmp_path / "ix"))
    trained = faiss.read_index(str(tmp_path / "ix" / "trained.faiss"))
    assert trained.ntotal == 0 and trained.is_trained
    a = B.add_shard(trained, xb[:12_000], np.arange(12_000))
    B.merge_into(a, B.add_shard(trained, xb[12_000:], np.arange(12_000, len(xb))))
    flat = B.add_shard(faiss.IndexFlatIP(xb.shape[1]), xb[:10], np.arange(10))
    later = B.add_shard(faiss.IndexFlatIP(xb.shape[1]), xb[20:30], np.arange(20, 30))
    with pytest.raises(CairnError, match="in id order"):  # position-numbered kinds merge in id order only
        B.merge_into(flat, later, src_first_id=20)
    with pytest.raises(CairnError, match="without gaps"):
        B.add_shard(flat, xb[20:30], np.arange(20, 30), into=flat)
    apply_search_params(a, "nprobe=8")
    np.testing.assert_array_equal(a.search(xq, 10)[1], built.search(xq, 10)[1])


def test_choose_factory_follows_size_and_budget():
    assert B.choose_factory(10_000, 512, 1 << 40) == ("Flat", "")
    assert B.choose_factory(1_000_000, 512, 8 << 30) == ("IVF4096,PQ64x4fs,Refine(PQ128)", B.DEFAULT_SEARCH)
    # 64 MiB cannot hold 168 bytes per vector: a plain IVF-PQ whose lists go on disk
    assert B.choose_factory(1_000_000, 512, 64 << 20) == ("IVF4096,PQ64", "nprobe=64")
    assert B.nlist_for(1_000_000) == 4096 and B.nlist_for(100) == 32  # 4 sqrt(100) = 40 -> 32
    assert B.parse_memory("1.5G") == int(1.5 * 2**30) and B.parse_memory("512m") == 512 * 2**20
    with pytest.raises(CairnError, match="memory size"):
        B.parse_memory("lots")


def test_search_params_are_checked():
    xb, xq = _data(n=2000)
    index = VectorIndex.build(xb, _ids(len(xb)), np.zeros(len(xb)), IndexConfig(factory="IVF16,Flat"))
    with pytest.raises(CairnError, match="does not apply"):
        index.search(xq, 5, params="efSearch=32")
    with pytest.raises(CairnError, match="NAME=NUMBER"):
        index.search(xq, 5, params="nprobe")
    flat = VectorIndex.build(xb, _ids(len(xb)), np.zeros(len(xb)), IndexConfig(factory="Flat"))
    D, I = index.search(xq, 5, params="nprobe=16")  # every list probed: exact
    np.testing.assert_array_equal(I, flat.search(xq, 5)[1])


def test_dimension_mismatch_is_a_clear_error():
    xb, _ = _data(d=32)
    index = VectorIndex.build(xb, _ids(len(xb)), np.zeros(len(xb)))
    with pytest.raises(CairnError, match="dimension 16 but the index holds dimension 32"):
        index.search(np.zeros((3, 16), np.float32), 5)


def test_fewer_vectors_than_k_pads_with_minus_one():
    xb, xq = _data(n=3)
    index = VectorIndex.build(xb, ["a", "b", "c"], np.array([1, 2, 3]))
    _, I = index.search(xq, 5)
    assert (I[:, 3:] == -1).all() and (index.labels_of(I)[:, 3:] == -1).all()


def test_bad_factory_and_metric_are_user_errors():
    xb, _ = _data(n=10)
    with pytest.raises(CairnError, match="could not parse index string NoSuchIndex"):
        VectorIndex.build(xb, _ids(10), np.zeros(10), IndexConfig(factory="NoSuchIndex"))
    with pytest.raises(CairnError, match="without IDMap"):
        VectorIndex.build(xb, _ids(10), np.zeros(10), IndexConfig(factory="IDMap,Flat"))
    with pytest.raises(CairnError, match="at least that many training vectors"):
        VectorIndex.build(xb, _ids(10), np.zeros(10), IndexConfig(factory="IVF64,Flat"))
    with pytest.raises(ValueError, match="metric"):
        IndexConfig(metric="cos")


def test_gpu_request_falls_back_to_cpu_without_a_gpu(caplog):
    xb, xq = _data(n=3000)
    config = IndexConfig(factory="IVF16,Flat", search="nprobe=4")
    cpu = VectorIndex.build(xb, _ids(len(xb)), np.zeros(len(xb)), config)
    with caplog.at_level(logging.INFO, logger="index.build"):
        gpu = VectorIndex.build(xb, _ids(len(xb)), np.zeros(len(xb)), IndexConfig(**{**config.__dict__,
                                                                                       "use_gpu": True}))
        D, I = gpu.search(xq, 5)
    np.testing.assert_array_equal(cpu.search(xq, 5)[1], I)
    if gpu_count() == 0:
        assert "no GPU visible to FAISS" in caplog.text
        assert gpu._search_index is gpu.index


def test_gpu_failure_falls_back_to_cpu(monkeypatch, caplog):
    """A GPU that FAISS sees but cannot use for this index kind (e.g. HNSW) leaves the work on the CPU."""
    xb, xq = _data(n=3000)

    def no_such_kernel(*args, **kwargs):
        raise RuntimeError("Error in index_cpu_to_gpu at GpuCloner.cpp:1: This index type is not implemented")

    monkeypatch.setattr(B, "gpu_count", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", no_such_kernel, raising=False)
    cpu = VectorIndex.build(xb, _ids(len(xb)), np.zeros(len(xb)), IndexConfig(factory="IVF16,Flat"))
    with caplog.at_level(logging.INFO, logger="index.build"):
        gpu = VectorIndex.build(xb, _ids(len(xb)), np.zeros(len(xb)), IndexConfig(factory="IVF16,Flat",
                                                                                   use_gpu=True))
        _, I = gpu.search(xq, 5)
    np.testing.assert_array_equal(cpu.search(xq, 5)[1], I)
    assert "not implemented" in caplog.text and "using the CPU" in caplog.text


def test_a_folder_from_another_format_version_is_refused(tmp_path):

    xb, _ = _data(n=50)
    index = VectorIndex.build(xb, _ids(50), np.zeros(50))
    index.save(str(tmp_path / "ix"))
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(CairnError, match="another version of Cairn"):
        VectorIndex.load(str(tmp_path / "ix"))


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["index.faiss", "ids.parquet", "nonlandmarks/index.faiss"])
def test_a_damaged_index_file_is_refused_on_load(tmp_path, name):
    """A flipped byte in index.faiss used to load and answer every query with a confidence near 1e24."""
    xb, _ = _data(n=200)
    labels = np.where(np.arange(200) % 4 == 0, -1, np.arange(200) % 3)
    VectorIndex.build(xb, _ids(200), labels).save(str(tmp_path / "ix"))
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert set(meta["files"]) == {"index.faiss", "ids.parquet"}
    assert meta["files"]["index.faiss"]["bytes"] == (tmp_path / "ix" / "index.faiss").stat().st_size
    VectorIndex.load(str(tmp_path / "ix"))  # intact: loads
    _flip_byte(tmp_path / "ix" / name)
    with pytest.raises(CairnError, match=rf"{name}.*sha256.*rebuild the index with `cairn index`"):
        VectorIndex.load(str(tmp_path / "ix"))


def test_a_truncated_or_missing_index_file_is_refused(tmp_path):
    xb, _ = _data(n=100)
    VectorIndex.build(xb, _ids(100), np.zeros(100)).save(str(tmp_path / "ix"))
    path = tmp_path / "ix" / "index.faiss"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CairnError, match=r"index.faiss holds .* bytes where the build wrote .*`cairn index`"):
        VectorIndex.load(str(tmp_path / "ix"))
    VectorIndex.build(xb, _ids(100), np.zeros(100)).save(str(tmp_path / "iy"))
    (tmp_path / "iy" / "ids.parquet").unlink()
    with pytest.raises(CairnError, match="lacks ids.parquet"):
        VectorIndex.load(str(tmp_path / "iy"))


def test_an_on_disk_index_records_and_checks_its_inverted_lists(corpus, tmp_path):
    xb, yb, xq, _ = corpus
    config = IndexConfig(factory="IVF16,Flat", on_disk="on", shard_size=5000, train_size=2000,
                         nonlandmark_index=False)
    VectorIndex.build(xb[:6000], _ids(6000), yb[:6000], config, folder=str(tmp_path / "ix")).save(str(tmp_path / "ix"))
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert {"index.faiss", "index.ivfdata", "trained.faiss", "ids.parquet"} <= set(meta["files"])
    VectorIndex.load(str(tmp_path / "ix")).search(xq, 5)
    _flip_byte(tmp_path / "ix" / "index.ivfdata")
    with pytest.raises(CairnError, match="index.ivfdata does not match the sha256"):
        VectorIndex.load(str(tmp_path / "ix"))


def test_an_index_without_checksums_loads_with_a_warning(tmp_path, caplog):
    xb, xq = _data(n=100)
    VectorIndex.build(xb, _ids(100), np.zeros(100)).save(str(tmp_path / "ix"))
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    del meta["files"]  # as written before checksums were recorded
    (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="index.faiss_index"):
        back = VectorIndex.load(str(tmp_path / "ix"))
    assert "recorded no checksums" in caplog.text and "cairn index" in caplog.text
    assert back.search(xq, 3)[1].shape == (len(xq), 3)


@pytest.mark.parametrize("factory", ["HNSW0", "HNSW1", "HNSW0,Flat", "IVF16_HNSW1,Flat", "L2norm,HNSW0", "PQ4x0",
                                     "IVF16,PQ4x0", "NSG0", "NSG2", "RR0,Flat", "OPQ4_0,PQ4", "PCA0,Flat",
                                     "IVF0,Flat", "IVF16,RQ0x8", "LSQ0x8", "PRQ0x0x8", "PQ4x17", "IVF99999999,Flat"])
def test_factory_sizes_that_abort_faiss_are_refused_before_it_runs(factory):
    """FAISS accepts these strings and then aborts, crashes, hangs or answers zeros (HNSW0 aborted the process)."""
    with pytest.raises(CairnError, match=rf"factory '{re.escape(factory)}': .*(size of 0|must be)"):
        IndexConfig(factory=factory)  # checked with the flags, before any extraction


def test_pq_sub_quantizers_must_divide_the_dimension_they_see():
    with pytest.raises(CairnError, match=r"PQ3 splits the 8-d vectors into 3 parts.*divisor of 8"):
        B.new_index("PQ3", 8, "ip")
    with pytest.raises(CairnError, match=r"PQ3 splits the 16-d vectors"):
        B.new_index("OPQ4_16,PQ3", 8, "ip")  # the dimension after the rotation
    for factory in ("HNSW2", "HNSW32,Flat", "IVF16,PQ4x4fs", "OPQ4_16,IVF16,PQ8", "PCAR4,Flat", "IVF16,SQ8",
                    "SQfp16", "IVF16,Flat,RFlat", "IVF1024,PQ8", "NSG32"):
        IndexConfig(factory=factory)
        B.new_index(factory, 8, "ip")
