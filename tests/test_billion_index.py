"""Indexes for billions of entries, on tiny data with the thresholds forced down: the HNSW coarse quantiser of
--factory auto, nprobe tuned at every size, memory estimates checked before training, torch k-means, and the
compact sharded torch CodePQ search against faiss-cpu."""

import faiss
import numpy as np
import pytest
import torch
from test_retrieval import make_store

from arrag.build_retriever.build_index import build_index
from arrag.errors import ArragError
from arrag.retrieval import index as faiss_index
from arrag.retrieval.index import unpack_codes
from arrag.retrieval.kmeans import kmeans
from arrag.retrieval.retriever import PatchRetriever
from arrag.retrieval.torch_search import TorchIndex


def test_auto_factory_grows_lists_and_takes_an_hnsw_quantizer_from_the_threshold():
    assert faiss_index.default_nlist(10_000_000) == 16384  # below the threshold: as before (the 10M bench index)
    assert faiss_index.default_nlist(50_000_000) == 1 << 16
    assert faiss_index.default_nlist(500_000_000) == 1 << 17
    assert faiss_index.default_nlist(2_000_000_000) == 1 << 18
    assert faiss_index.default_nlist(70_000_000_000) == 1 << 18  # capped
    budget = faiss_index.parse_bytes("64G")
    factory, reason = faiss_index.choose_factory(2_000_000_000, 32, budget, (16384, 8))
    assert factory == "IVF262144_HNSW32,CodePQ" and "HNSW32 coarse quantiser" in reason
    assert faiss_index.choose_factory(20_000_000, 32, budget, (16384, 8))[0] == "IVF16384,Flat"
    # the flag moves the threshold, so that the branch runs on small data
    assert faiss_index.choose_factory(200_000, 32, budget, (64, 8), hnsw_above=100_000)[0] == "IVF4096_HNSW32,Flat"


def test_search_memory_estimates():
    n = 100_000_000
    need = faiss_index.search_memory("IVF65536_HNSW32,CodePQ", n, 32, (16384, 8), dedup=True, occurrences=3 * n)
    # 7 bytes of codes + an 8-byte id, values (2) and counts (4); the quantiser: 65,536 x (128 + 274) bytes
    assert need["ram"] == n * (15 + 6) + int(65536 * (128 + 2 * 32 * 4 * 1.07))
    assert need["gpu_backend"] == "torch" and need["gpu"] / n <= 20  # int16 sub-codes, int32 ids, the tables
    assert need["disk"] > need["ram"] + 4 * 3 * n  # the entry maps: one image id per occurrence
    flat = faiss_index.search_memory("IVF4096,Flat", n, 32)
    assert flat["ram"] == n * (4 * 32 + 8 + 2) + 4096 * 128
    assert faiss_index.search_memory("OPQ8,IVF4096,PQ8", n, 32)["gpu_backend"] == "faiss-gpu"


def test_a_budget_the_search_would_exceed_is_refused_before_training(tmp_path, monkeypatch):
    make_store(tmp_path / "store", n=40, grid=8)

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the memory budget")

    monkeypatch.setattr(faiss_index, "train", no_training)
    with pytest.raises(ArragError, match=r"--memory-budget 10K \(10 KiB\): searching IVF16,Flat over ~.* entries "
                                         r"needs ~.* of RAM; raise --memory-budget"):
        build_index(tmp_path / "store", tmp_path / "idx", factory="IVF16,Flat", memory_budget="10K", progress=False)
    assert not (tmp_path / "idx").exists()


def test_hnsw_code_pq_build_end_to_end(tmp_path, capsys):
    codes, book = make_store(tmp_path / "store", n=120, grid=8)
    m = build_index(tmp_path / "store", tmp_path / "idx", memory_budget="400K", hnsw_above=1000, progress=True)
    out = capsys.readouterr().out
    assert m["factory"].endswith("_HNSW32,CodePQ") and "HNSW32 coarse quantiser" in m["factory_reason"]
    assert "will need ~" in out and "torch backend" in out  # the estimate, printed before training
    r = PatchRetriever.load(tmp_path / "idx")
    assert faiss_index.has_hnsw_quantizer(r.index)
    assert faiss.downcast_index(faiss.extract_index_ivf(r.index).quantizer).hnsw.efSearch == max(16, 2 * r.nprobe)
    assert m["nprobe_tuning"]["reference"] == "all lists"  # small: tuned against every list
    # The torch backend over two "devices" gives faiss-cpu's hits (an HNSW quantiser probes exactly there).
    q = np.random.default_rng(1).normal(size=(50, 32)).astype(np.float32)
    r.set_nprobe(r.index.nlist if hasattr(r.index, "nlist") else faiss_index.nlist_of(r.index))
    t = PatchRetriever.load(tmp_path / "idx", backend="torch")
    t.index = TorchIndex.from_faiss(faiss_index.read_index(tmp_path / "idx" / "index.faiss"), ["cpu", "cpu"])
    t.set_nprobe(t.index.nlist)
    d_ref, c_ref = r.search(q, 10)
    d, c = t.search(q, 10)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-5)
    assert (c == c_ref).mean() > 0.9  # equal distances may hold different codes at the k-th place
    assert t.backend == "torch:cpu,cpu"


def test_the_cli_passes_the_threshold_and_refuses_a_small_budget_in_one_line(tmp_path, capsys):
    import json

    from arrag.cli import main

    make_store(tmp_path / "store", n=120, grid=8)
    assert main(["build-index", str(tmp_path / "store"), "--out", str(tmp_path / "idx"), "--hnsw-above", "1000",
                 "--memory-budget", "400K"]) == 0
    assert "_HNSW32," in json.loads((tmp_path / "idx" / "manifest.json").read_text())["factory"]
    capsys.readouterr()
    assert main(["build-index", str(tmp_path / "store"), "--out", str(tmp_path / "x"), "--factory", "IVF16,Flat",
                 "--memory-budget", "100K"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arrag: error: --memory-budget 100K")


def test_nprobe_is_tuned_at_every_size_against_each_querys_nearest_lists(tmp_path, monkeypatch):
    make_store(tmp_path / "store", n=200, grid=8)
    full = build_index(tmp_path / "store", tmp_path / "full", factory="IVF64,Flat", progress=False, dedup=False)
    assert full["nprobe_tuning"]["reference"] == "all lists" and full["nprobe_tuning"]["reference_lists"] == 64
    # As if the index held billions: probing every list is over the work limit, so the reference probes each
    # query's nearest 16 lists; the tuning is recorded, never skipped.
    monkeypatch.setattr(faiss_index, "TUNE_MAX_WORK", 1e6)
    monkeypatch.setattr(faiss_index, "MIN_REFERENCE_LISTS", 16)
    m = build_index(tmp_path / "store", tmp_path / "big", factory="IVF64,Flat", progress=False, dedup=False)
    tuning = m["nprobe_tuning"]
    assert tuning["reference_lists"] == 16 and "nearest 16 of 64 lists" in tuning["reference"]
    assert m["nprobe"] <= 16 and tuning["recall"] >= 0.95 and tuning["table"][-1][0] == m["nprobe"]
    # against a subset of lists recall can only look higher: the nprobe is no larger than the full tuning's
    assert m["nprobe"] <= full["nprobe"]


def test_reference_lists():
    assert faiss_index.reference_lists(4096, 200, 10_000_000, 32) == 4096  # within the work limit: every list
    # 2B entries and 2^18 lists: probing all of them would be 1.3e13; the largest power of two within 2e12
    assert faiss_index.reference_lists(1 << 18, 200, 2_000_000_000, 32) == 32768
    assert faiss_index.reference_lists(1 << 18, 200, 10 ** 13, 32) == faiss_index.MIN_REFERENCE_LISTS


def _code_pq(n=6000, k=300, seed=0, factory="IVF32,CodePQ"):
    rng = np.random.default_rng(seed)
    book = rng.normal(size=(k, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    keys = book[rng.integers(0, k, (n, 4))].reshape(n, 32)
    index = faiss_index.create_index(factory, 32, book)
    faiss_index.train(index, keys)
    index.add(keys)
    return index, book, rng


def test_unpack_codes_reads_faiss_packed_codes():
    index, book, rng = _code_pq(n=500)
    keys = book[rng.integers(0, 300, (40, 4))].reshape(40, 32)
    packed = index.pq.compute_codes(keys)  # 4 x 9 bits in 5 bytes
    codes = unpack_codes(packed, 4, index.pq.nbits)
    np.testing.assert_array_equal(book[codes].reshape(40, 32), keys)


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"], ["cpu", "cpu", "cpu"]])
@pytest.mark.parametrize("padded", [True, False])
def test_torch_code_pq_is_compact_sharded_and_finds_faiss_hits(devices, padded):
    index, book, rng = _code_pq()
    faiss.extract_index_ivf(index).nprobe = 4
    queries = book[rng.integers(0, 300, (300, 4))].reshape(300, 32)
    queries[::2] += rng.normal(scale=0.05, size=queries[::2].shape).astype(np.float32)  # off-database queries too
    fd, fi = index.search(queries, 10)
    t = TorchIndex.from_faiss(index, devices)
    t.padded = padded
    assert len(t.parts) == len(devices) and sum(len(p.data) for p in t.parts) == 6000
    assert t.parts[0].data.dtype == torch.int16 and t.parts[0].ids.dtype == torch.int32
    assert t.bytes_per_entry() < 12.5  # 4 int16 sub-codes + an int32 id (+ list offsets)
    td, ti = t.search(queries, 10)
    np.testing.assert_allclose(td, fd, rtol=1e-5, atol=1e-5)
    kth = fd[:, -1:]
    inside = fd < kth - 1e-5  # hits strictly inside the k-th distance are the same entries
    for row in range(len(queries)):
        assert set(ti[row][inside[row]]) == set(fi[row][inside[row]])
    assert (ti == fi).mean() > 0.95


def test_torch_kmeans_is_seeded_and_as_good_as_faiss():
    x = np.random.default_rng(0).normal(size=(4000, 16)).astype(np.float32)
    ours = kmeans(x, 32, seed=3)
    np.testing.assert_array_equal(ours, kmeans(x, 32, seed=3))
    km = faiss.Kmeans(16, 32, niter=25, seed=3)
    km.train(x)
    objective = lambda c: ((x[:, None] - c[None]) ** 2).sum(-1).min(1).sum()  # noqa: E731
    assert objective(ours) <= 1.03 * objective(km.centroids)
    with pytest.raises(ArragError, match="32 clusters need at least 32 training points"):
        kmeans(x[:10], 32)


def test_torch_kmeans_trains_ivf_and_code_pq_quantizers():
    x = np.random.default_rng(0).normal(size=(3000, 32)).astype(np.float32)
    for factory in ("IVF16,Flat", "IVF16_HNSW32,Flat"):
        index = faiss_index.create_index(factory, 32)
        faiss_index.train(index, x, kmeans_device="cpu", seed=1)
        assert index.is_trained and faiss.extract_index_ivf(index).quantizer.ntotal == 16
        index.add(x)
        assert index.ntotal == 3000
    _, book, rng = _code_pq(n=500)  # its codebook; a fresh CodePQ over it trained with torch
    keys = book[rng.integers(0, 300, (2000, 4))].reshape(2000, 32)
    fresh = faiss_index.create_index("IVF32,CodePQ", 32, book)
    faiss_index.train(fresh, keys, kmeans_device="cpu")
    fresh.add(keys)
    np.testing.assert_allclose(fresh.pq.decode(fresh.pq.compute_codes(keys)), keys)  # the codebook was kept


@pytest.mark.parametrize("factory", ["IVF16,CodePQ", "IVF16_HNSW32,CodePQ"])
def test_adding_known_codes_makes_the_index_faiss_encoding_makes(factory):
    rng = np.random.default_rng(4)
    book = rng.normal(size=(1000, 8)).astype(np.float32)  # 10-bit codes: packing crosses byte boundaries
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codes = rng.integers(0, 1000, (3000, 4))
    keys = book[codes].reshape(3000, 32)
    ours = faiss_index.create_index(factory, 32, book)
    faiss_index.train(ours, keys)
    theirs = faiss.deserialize_index(faiss.serialize_index(ours))
    theirs.add(keys)
    faiss_index.add_code_pq(ours, keys[:1000], codes[:1000])
    faiss_index.add_code_pq(ours, keys[1000:], codes[1000:], ids=np.arange(1000, 3000))
    np.testing.assert_array_equal(faiss.serialize_index(ours), faiss.serialize_index(theirs))
    np.testing.assert_array_equal(unpack_codes(faiss_index.pack_codes(codes, 10), 4, 10), codes)


def test_two_level_kmeans_costs_less_and_quantises_nearly_as_well(monkeypatch):
    from arrag.retrieval import kmeans as km
    from arrag.retrieval.kmeans import _shares, two_level_kmeans

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8000, 16)) + 3 * rng.normal(size=(40, 16))[rng.integers(0, 40, 8000)]).astype(np.float32)
    ours = two_level_kmeans(x, 256, seed=2)
    assert ours.shape == (256, 16)
    np.testing.assert_array_equal(ours, two_level_kmeans(x, 256, seed=2))
    flat = faiss.Kmeans(16, 256, niter=10, seed=2)
    flat.train(x)
    objective = lambda c: faiss.knn(x, c, 1)[0].sum()  # noqa: E731
    assert objective(ours) <= 1.15 * objective(flat.centroids)
    share = _shares(np.array([5, 0, 100, 3]), 20)
    assert share.sum() == 20 and share[1] == 0 and (share <= [5, 0, 100, 3]).all()
    # build-side: an IVF at or over the threshold trains its quantiser in two levels
    monkeypatch.setattr(km, "TWO_LEVEL_LISTS", 64)
    index = faiss_index.create_index("IVF64_HNSW32,Flat", 16)
    faiss_index.train(index, x, seed=2)
    assert faiss.extract_index_ivf(index).quantizer.ntotal == 64
    index.add(x)
    assert faiss_index.list_sizes(index).min() > 0


@pytest.mark.parametrize("factory", ["IVF16_HNSW32,Flat", "OPQ4,IVF16,PQ4x4"])
def test_the_tuning_reference_finds_lists_exactly_behind_any_quantizer_or_transform(factory):
    rng = np.random.default_rng(0)
    x, q = rng.normal(size=(3000, 32)).astype(np.float32), rng.normal(size=(50, 32)).astype(np.float32)
    index = faiss_index.create_index(factory, 32)
    if "OPQ" in factory:
        faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0)).niter = 4  # the layout matters here
    faiss_index.train(index, x)
    index.add(x)
    for lists in (16, 4):
        faiss_index.set_nprobe(index, lists)
        np.testing.assert_array_equal(faiss_index._reference_search(index, q, 10, lists), index.search(q, 10)[0])
