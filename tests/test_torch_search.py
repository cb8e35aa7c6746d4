"""The torch search backend against faiss-cpu on the same index: Flat and IVF-Flat, every nprobe, few entries."""

import faiss
import numpy as np
import pytest
import torch

from arrag.errors import ArragError
from arrag.retrieval.torch_search import TorchIndex, supports


def _data(n=3000, d=32, q=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(q, d)).astype(np.float32)


def _agree(faiss_index, torch_index, queries, k):
    fd, fi = faiss_index.search(queries, k)
    td, ti = torch_index.search(queries, k)
    np.testing.assert_array_equal(ti, fi)  # continuous random data: no ties, so the very same ids in order
    np.testing.assert_allclose(td, fd, rtol=1e-4, atol=1e-3)


def test_flat_matches_faiss():
    xb, xq = _data()
    index = faiss.IndexFlatL2(32)
    index.add(xb)
    _agree(index, TorchIndex.from_faiss(index), xq, 10)
    small = faiss.IndexFlatL2(32)
    small.add(xb[:3])
    _agree(small, TorchIndex.from_faiss(small), xq, 5)  # fewer entries than k: -1 and the largest float


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("nprobe", [1, 3, 16])
def test_ivf_flat_matches_faiss_at_every_nprobe(nprobe, padded):
    xb, xq = _data()
    index = faiss.index_factory(32, "IVF16,Flat")
    index.train(xb)
    index.add(xb)
    index.nprobe = nprobe
    backend = TorchIndex.from_faiss(index)
    assert backend.nprobe == nprobe and backend.ntotal == 3000
    assert backend.padded  # k-means lists of random data are about equal: the sync-free scan is the default
    backend.padded = padded  # both scans give FAISS's answers
    _agree(index, backend, xq, 10)
    # torch tensors in, torch tensors out; one query at a time gives the same rows
    d, i = backend.search(torch.from_numpy(xq[:1]), 10)
    assert isinstance(d, torch.Tensor) and i.tolist() == index.search(xq[:1], 10)[1].tolist()


@pytest.mark.parametrize("padded", [True, False])
def test_sparse_lists_and_large_k(padded):
    xb, xq = _data(n=40)
    index = faiss.index_factory(32, "IVF8,Flat")
    index.train(np.concatenate([xb, _data(n=400, seed=1)[0]]))
    index.add(xb)  # some lists hold one or no entry
    index.nprobe = 2
    backend = TorchIndex.from_faiss(index)
    backend.padded = padded
    _agree(index, backend, xq, 30)  # often fewer than 30 in the probed lists


def test_very_unequal_lists_are_scanned_exactly():
    xb, xq = _data(n=2000)
    index = faiss.index_factory(32, "IVF16,Flat")
    index.train(xb)
    index.add(np.concatenate([xb, np.repeat(xb[:1], 3000, 0)]))  # one list holds 3,000 copies of one key
    index.nprobe = 4
    backend = TorchIndex.from_faiss(index)
    assert not backend.padded and backend.longest > 8 * backend.ntotal / 16
    xq = np.concatenate([xq, xb[:2] + 0.01])  # two queries next to the repeated key
    fd, fi = index.search(xq, 10)
    td, ti = backend.search(xq, 10)
    np.testing.assert_allclose(td, fd, rtol=1e-4, atol=1e-3)
    copy_of_0 = lambda ids: np.where(ids >= 2000, 0, ids)  # noqa: E731  (the copies tie, in any order)
    np.testing.assert_array_equal(copy_of_0(ti), copy_of_0(fi))
    assert (fi >= 2000).any()  # the copies were found


def test_the_padded_scan_reads_no_value_back_to_the_host():
    """On the meta device tensors have shapes but no values: whatever needs a value on the host (a GPU sync)
    fails there. The padded IVF scan runs; the exact scan, which counts its candidates on the host, cannot."""
    xb, xq = _data()
    index = faiss.index_factory(32, "IVF16,Flat")
    index.train(xb)
    index.add(xb)
    index.nprobe = 4
    backend = TorchIndex.from_faiss(index).to("meta")
    d, i = backend.search(torch.from_numpy(xq).to("meta"), 10)
    assert d.shape == i.shape == (40, 10) and d.device.type == "meta"
    backend.padded = False
    with pytest.raises((NotImplementedError, RuntimeError)):
        backend.search(torch.from_numpy(xq).to("meta"), 10)


def test_other_index_types_are_refused():
    xb, _ = _data(n=2000)
    pq = faiss.index_factory(32, "IVF8,PQ8")
    pq.train(xb)
    assert not supports(pq) and supports(faiss.IndexFlatL2(32))
    with pytest.raises(ArragError, match="IVF-Flat and CodePQ indexes, not IndexIVFPQ"):
        TorchIndex.from_faiss(pq)


def test_patch_retriever_on_the_torch_backend_returns_faiss_codes(tmp_path):
    from test_retrieval import make_store

    from arrag.build_retriever.build_index import build_index
    from arrag.retrieval.retriever import PatchRetriever

    make_store(tmp_path / "store", n=60, grid=6)
    build_index(tmp_path / "store", tmp_path / "idx", factory="IVF8,Flat", nprobe=3, progress=False)
    ref = PatchRetriever.load(tmp_path / "idx")
    torch_backed = PatchRetriever.load(tmp_path / "idx", backend="torch")
    assert torch_backed.backend == "torch:cpu" and torch_backed.nprobe == ref.nprobe == 3
    q = np.random.default_rng(3).normal(size=(12, 32)).astype(np.float32)
    for k in (1, 10):
        d_ref, c_ref = ref.search(torch.from_numpy(q), k)
        d, c = torch_backed.search(torch.from_numpy(q), k)
        torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=1e-3)
        assert torch.equal(c, c_ref)
    torch_backed.set_nprobe(8)
    ref.set_nprobe(8)
    assert torch.equal(torch_backed.search(torch.from_numpy(q), 5)[1], ref.search(torch.from_numpy(q), 5)[1])
    if not torch.cuda.is_available():  # without CUDA, asking for the GPU is a clear error (or a CPU fallback)
        with pytest.raises(ArragError, match="cannot put the index .* on the GPU: no CUDA device"):
            PatchRetriever.load(tmp_path / "idx", device="cuda")
        with pytest.warns(UserWarning, match="stays on the CPU"):
            assert PatchRetriever.load(tmp_path / "idx", device="cuda", gpu_fallback=True).backend == "faiss-cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_faiss_cpu_without_synchronising():
    xb, xq = _data(n=20000)
    index = faiss.index_factory(32, "IVF64,Flat")
    index.train(xb)
    index.add(xb)
    index.nprobe = 8
    fd, fi = index.search(xq, 10)
    backend = TorchIndex.from_faiss(index, "cuda")
    assert backend.padded
    q = torch.from_numpy(xq).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a search that waited for the GPU would raise here
    try:
        td, ti = backend.search(q, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    np.testing.assert_array_equal(ti.cpu().numpy(), fi)
    np.testing.assert_allclose(td.cpu().numpy(), fd, rtol=1e-4, atol=1e-3)
