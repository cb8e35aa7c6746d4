"""DAiD: the retrieval distribution, the merge, every row augmented, fingerprint checks, empty databases."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from readbacks import ReadBacks, WatchFrom

from arrag.build_retriever.build_index import build_index
from arrag.cli import main
from arrag.decoding import DecodingHook, MethodConfig, SamplingConfig, build_hooks, generate, sample_codes
from arrag.decoding.daid import DAiD, retrieval_distribution
from arrag.errors import ArragError
from arrag.retrieval import codestore
from arrag.retrieval.neighborhood import get_neighborhood, keys_for_grid
from arrag.retrieval.retriever import PatchRetriever

KW = dict(image_size=64, progress=False, seed=7)  # 4x4 tokens with the tiny VQ-16: valid targets 5, 6, 9, 10, 13, 14


def _codes(model, prompts, parallel_size=1, hooks=()):
    """sample_codes with this file's sampling settings (KW)."""
    return sample_codes(model, prompts, SamplingConfig(parallel_size=parallel_size, image_size=64, seed=7),
                        hooks=hooks, progress=False)


@pytest.fixture(scope="module")
def retriever_dir(tmp_path_factory, tiny_janus):
    """An exact index over random 4x4 grids drawn from 40 codes, built with the tiny model's own codebook."""
    root = tmp_path_factory.mktemp("daid")
    codes = np.random.default_rng(0).integers(0, 40, (300, 4, 4)).astype(np.uint16)
    codestore.write_store(root / "store", codes, tiny_janus.vq)
    build_index(root / "store", root / "index", progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def retriever(retriever_dir):
    return PatchRetriever.load(retriever_dir)


@pytest.fixture(scope="module")
def ivf_dir(retriever_dir):
    """An IVF index (4 lists) over the same store, for the torch search backend's IVF scans."""
    build_index(retriever_dir.parent / "store", retriever_dir.parent / "ivf", factory="IVF4,Flat", progress=False)
    return retriever_dir.parent / "ivf"


def test_retrieval_distribution_by_hand():
    d = torch.tensor([[0.5, 1.0, 2.0, 0.7, 9.0], [1.0, 3.0, 0.0, 0.0, 0.0]])
    c = torch.tensor([[3, 3, 1, 4, -1], [2, -1, -1, -1, -1]])
    # nearest: code 3 -> min(0.5, 1.0) = 0.5, code 1 -> 2.0, code 4 -> 0.7; tau 0.5.
    w = {3: np.exp(-0.5 / 0.5), 1: np.exp(-2.0 / 0.5), 4: np.exp(-0.7 / 0.5)}
    p = retrieval_distribution(d, c, 6, tau=0.5)
    z = sum(w.values())
    np.testing.assert_allclose(p[0].numpy(), [0, w[1] / z, 0, w[3] / z, w[4] / z, 0], rtol=1e-5)
    np.testing.assert_allclose(p[1].numpy(), [0, 0, 1, 0, 0, 0])
    # sum: code 3 -> exp(-1) + exp(-2).
    ws = {3: np.exp(-1.0) + np.exp(-2.0), 1: np.exp(-4.0), 4: np.exp(-1.4)}
    zs = sum(ws.values())
    ps = retrieval_distribution(d, c, 6, tau=0.5, aggregate="sum")
    np.testing.assert_allclose(ps[0].numpy(), [0, ws[1] / zs, 0, ws[3] / zs, ws[4] / zs, 0], rtol=1e-5)
    # No hits at all: a zero row. Huge distances do not underflow to an empty distribution.
    empty = retrieval_distribution(torch.zeros(1, 3), torch.full((1, 3), -1), 6)
    assert float(empty.sum()) == 0
    far = retrieval_distribution(torch.tensor([[5000.0, 5001.0]]), torch.tensor([[0, 1]]), 3, tau=0.01)
    assert float(far.sum()) == pytest.approx(1.0) and float(far[0, 0]) == pytest.approx(1.0)


def test_lambda_zero_is_exactly_base(tiny_janus, retriever):
    base = _codes(tiny_janus, ["a red circle", "two squares"], parallel_size=2)
    daid = _codes(tiny_janus, ["a red circle", "two squares"], parallel_size=2,
                  hooks=build_hooks(tiny_janus, MethodConfig("daid", daid_lambda=0.0), retriever))
    torch.testing.assert_close(daid, base, rtol=0, atol=0)


def _retrieved_sets(codes, retriever, vq, k):
    """For each image and valid target: the set of codes the search returns for its sampled neighbours."""
    nb = get_neighborhood("L")
    pos, nbr = keys_for_grid(codes, nb)
    q = vq.code_embeddings(nbr).flatten(2)
    _, got = retriever.search(q.reshape(-1, q.shape[-1]).detach(), k)
    return pos, got.reshape(codes.shape[0], len(pos), k)


def test_lambda_one_samples_only_retrieved_codes_in_every_row(tiny_janus, retriever):
    prompts = ["a red circle", "three blue diamonds left of a square", "a yellow triangle"]
    k = 5
    base = _codes(tiny_janus, prompts, parallel_size=3)
    hooks = build_hooks(tiny_janus, MethodConfig("daid", daid_lambda=1.0, daid_k=k), retriever)
    daid = _codes(tiny_janus, prompts, parallel_size=3, hooks=hooks)
    pos, sets = _retrieved_sets(daid, retriever, tiny_janus.vq, k)
    flat = daid.reshape(9, -1)
    for i in range(9):  # every image of the multi-prompt, multi-sample batch, not only the first
        for j, t in enumerate(pos):
            assert int(flat[i, t]) in set(sets[i, j].tolist()), (i, t)
    # Cells before the first valid target (row 0 and cell (1, 0)) are untouched: same as base.
    torch.testing.assert_close(flat[:, :5], base.reshape(9, -1)[:, :5], rtol=0, atol=0)
    assert hooks[0].stats["steps_augmented"] == len(pos) and hooks[0].stats["rows_augmented"] == 9 * len(pos)


def test_prefetched_search_gives_the_same_images(tiny_janus, retriever):
    """The background search (on by default for CUDA models) changes timing, never results."""
    runs = []
    for prefetch in (False, True):
        hook = DAiD(retriever, lam=0.7, k=6, prefetch=prefetch)
        runs.append(_codes(tiny_janus, ["a circle", "two squares"], parallel_size=2, hooks=[hook]))
        assert hook.prefetcher is None and hook.stats["steps_augmented"] == 6
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_invalid_targets_keep_the_model_distribution(tiny_janus, retriever):
    class Spy(DecodingHook):
        def __init__(self):
            self.seen = {}

        def adjust_probs(self, state, target, probs):
            self.seen.setdefault(target, []).append(probs.clone())
            return probs

    before, after = Spy(), Spy()
    daid = DAiD(retriever, lam=0.5, k=4)
    _codes(tiny_janus, ["a circle"], hooks=[before, daid, after])
    valid = set(get_neighborhood("L").positions(4, 4).tolist())
    for t in range(16):
        same = torch.equal(before.seen[t][0], after.seen[t][0])
        assert same == (t not in valid), t
        torch.testing.assert_close(after.seen[t][0].sum(1), torch.ones(1))


def test_fingerprint_mismatch_is_refused(tmp_path, tiny_janus):
    book = np.random.default_rng(1).normal(size=(1024, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codestore.write_store(tmp_path / "store", np.zeros((2, 4, 4), np.uint16), book)
    build_index(tmp_path / "store", tmp_path / "index", progress=False)
    other = PatchRetriever.load(tmp_path / "index")
    with pytest.raises(ArragError, match="built with another tokenizer"):
        generate(tiny_janus, ["a"], method="daid", retriever=other, **KW)


def test_empty_database_degrades_to_base_with_a_warning(tmp_path, tiny_janus):
    (tmp_path / "empty").mkdir()
    faiss.write_index(faiss.IndexFlatL2(32), str(tmp_path / "empty" / "index.faiss"))
    np.save(tmp_path / "empty" / "values.npy", np.zeros(0, np.uint16))
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({
        "format": "arrag-index/1", "neighborhood": {"shape": "L"}, "key_source": "code", "dim": 32,
        "vq_fingerprint": tiny_janus.vq.fingerprint(), "values": "values.npy"}))
    with pytest.warns(UserWarning, match="an unverified index; used unchecked"):  # a hand-made manifest lists no files
        r = PatchRetriever.load(tmp_path / "empty", verify=False)
    base = generate(tiny_janus, ["a circle"], **KW)
    with pytest.warns(UserWarning, match="is empty: DAiD decodes as base"):
        daid = generate(tiny_janus, ["a circle"], method="daid", retriever=r, daid_lambda=0.5, **KW)
    np.testing.assert_array_equal(daid, base)


def test_bad_settings_are_clear(retriever):
    with pytest.raises(ArragError, match="--daid-lambda must lie in \\[0, 1\\]"):
        DAiD(retriever, lam=1.5)
    with pytest.raises(ArragError, match="--daid-tau must be > 0"):
        DAiD(retriever, tau=0)
    with pytest.raises(ArragError, match="--daid-aggregate 'mean'"):
        DAiD(retriever, aggregate="mean")


def test_cli_daid_and_script(tmp_path, tiny_janus_dir, retriever_dir):
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(tiny_janus_dir), "--prompt", "a red circle", "--method", "daid",
               "--retriever", str(retriever_dir), "--daid-lambda", "0.5", "--daid-k", "8", "--image-size", "64",
               "--out", str(out), "--device", "cpu", "--parallel-size", "2"])
    assert rc == 0
    meta = json.loads((out / "settings.json").read_text())["settings"]
    assert meta["daid_lambda"] == 0.5 and meta["daid_k"] == 8 and meta["retriever_entries"] == 300 * 6
    assert meta["method_stats"]["rows_augmented"] == 2 * 6
    script = Path(__file__).parents[1] / "arrag" / "t2i_example" / "t2i_daid_L.sh"
    env = {"PATH": "/usr/bin:/bin", "MODEL": str(tiny_janus_dir), "RETRIEVER": str(retriever_dir),
           "OUTPUT": str(tmp_path / "example_t2i_daid.jpg"), "IMAGE_SIZE": "64", "PARALLEL_SIZE": "2",
           "DEVICE": "cpu", "ARRAG": f"{sys.executable} -m arrag"}
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "example_t2i_daid.jpg").exists() and (tmp_path / "example_t2i_daid.jpg.json").exists()
    # A rerun is refused in the script's own words, and OVERWRITE=1 replaces the images.
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "rerun with OVERWRITE=1 to replace them" in p.stderr, p.stderr[-2000:]
    assert "--overwrite" not in p.stderr
    p = subprocess.run(["bash", str(script)], env={**env, "OVERWRITE": "1"}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["generate", "--model", str(tiny_janus_dir), "--prompt", "a", "--retriever", str(retriever_dir),
                   "--out", str(out)])
    assert rc == 2


def test_an_index_of_another_grid_is_refused(tmp_path, tiny_janus):
    codestore.write_store(tmp_path / "store", np.zeros((3, 6, 6), np.uint16), tiny_janus.vq)  # 96-px grids
    build_index(tmp_path / "store", tmp_path / "index", progress=False)
    r = PatchRetriever.load(tmp_path / "index")
    with pytest.raises(ArragError, match="built from 6x6 code grids, but this model decodes 4x4 tokens"):
        generate(tiny_janus, ["a"], method="daid", retriever=r, **KW)  # 64 px = 4x4 with the tiny VQ-16
    # The model's own size is the default: 64 px for the tiny VQ-16 preset.
    assert generate(tiny_janus, ["a"], progress=False, seed=0).shape == (1, 64, 64, 3)


def test_the_read_back_recorder_sees_what_would_make_a_gpu_wait():
    x = torch.arange(10.0)
    with ReadBacks() as rb:
        x.sum()  # not yet on
        rb.on = True
        _ = x[x > 3], int(x.sum()), torch.nonzero(x), x.repeat_interleave(torch.ones(10, dtype=torch.long))
        _ = x[torch.tensor([1, 2])], x.repeat_interleave(2), x.repeat_interleave(torch.ones(10, dtype=torch.long),
                                                                                 output_size=10)  # these do not
    assert rb.seen == ["aten::index", "aten::_local_scalar_dense", "aten::nonzero", "aten::repeat_interleave"]


def test_daid_steps_read_nothing_back(tiny_janus, ivf_dir):
    """Past the first step, a DAiD step with the torch search backend (query, IVF search, copies, p_ret, merge,
    sampling, the fixed-shape step a CUDA graph replays) runs no operation that makes a GPU wait; the exact
    IVF gather over very unequal lists does, and is caught."""
    retriever = PatchRetriever.load(ivf_dir, backend="torch")
    assert retriever.index.padded
    cfg = SamplingConfig(parallel_size=2, image_size=64, seed=7)
    with ReadBacks() as rb:
        hooks = [WatchFrom(rb), *build_hooks(tiny_janus, MethodConfig("daid", daid_k=8), retriever)]
        watched = sample_codes(tiny_janus, ["a red circle"], cfg, hooks=hooks, progress=False, step_mode="static")
    assert rb.seen == []
    assert torch.equal(watched, sample_codes(tiny_janus, ["a red circle"], cfg, hooks=hooks[1:], progress=False))
    retriever.index.padded = False
    with ReadBacks() as rb:
        hooks = [WatchFrom(rb), *build_hooks(tiny_janus, MethodConfig("daid", daid_k=8), retriever)]
        sample_codes(tiny_janus, ["a red circle"], cfg, hooks=hooks, progress=False, step_mode="static")
    assert "aten::_local_scalar_dense" in rb.seen


def test_code_tables_reach_the_search_device_before_decoding(tiny_janus, ivf_dir):
    """The code and count tables that turn hits into codes are copied to the search's device when decoding
    begins: copied inside the first search instead, on a GPU that copy would stall the loop mid-image."""
    retriever = PatchRetriever.load(ivf_dir, backend="torch")
    assert retriever.counts is not None and not retriever._values_torch and not retriever._counts_torch
    seen = []

    class Look(DecodingHook):
        def before_forward(self, state, target):
            if target == 0:  # the prefill: no search has run yet
                seen.append((sorted(retriever._values_torch), sorted(retriever._counts_torch)))

    _codes(tiny_janus, ["a"], hooks=[*build_hooks(tiny_janus, MethodConfig("daid", daid_k=8), retriever), Look()])
    assert seen == [(["cpu"], ["cpu"])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_daid_steps_on_cuda_read_nothing_back(tiny_janus, ivf_dir):
    """The same on CUDA, with its sync debug mode set to error from the third target on (the search runs in
    DAiD's thread there; the step is a replayed CUDA graph)."""
    retriever = PatchRetriever.load(ivf_dir, device="cuda", backend="torch")  # even beside faiss-gpu

    class SyncErrors:  # stands in for ReadBacks: CUDA itself raises on a synchronising call
        def __setattr__(self, name, on):
            if on:
                torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if on else "default")

    model = tiny_janus.to("cuda")
    try:
        cfg = SamplingConfig(parallel_size=2, image_size=64, seed=7)
        hooks = [WatchFrom(SyncErrors()), *build_hooks(model, MethodConfig("daid", daid_k=8), retriever)]
        guarded = sample_codes(model, ["a red circle"], cfg, hooks=hooks, progress=False)
        plain = sample_codes(model, ["a red circle"], cfg, hooks=hooks[1:], progress=False)
        torch.testing.assert_close(guarded, plain, rtol=0, atol=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        tiny_janus.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_search_on_cuda_is_ordered_by_events(tiny_janus, ivf_dir, monkeypatch):
    """DAiD's prefetched search runs on its own CUDA stream. The GPU is made slow (torch.cuda._sleep) where a
    missing wait would show: before the query's kernels on the caller's stream, and before the search's on the
    side stream. With the events in place the images equal the inline search's; without them the side stream
    would read an unwritten query, or the merge unwritten hits."""
    from arrag.decoding.step_queries import StepQueries

    retriever = PatchRetriever.load(ivf_dir, device="cuda", backend="torch")
    query, search = StepQueries.query, retriever.search_counted

    def slow_query(self, state, target):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time on the current stream, then the query's kernels
        return query(self, state, target)

    def slow_search(queries, k):
        torch.cuda._sleep(20_000_000)
        return search(queries, k)

    monkeypatch.setattr(StepQueries, "query", slow_query)
    monkeypatch.setattr(retriever, "search_counted", slow_search)
    model = tiny_janus.to("cuda")
    try:
        runs = {}
        for name, kw in (("inline", dict(prefetch=False)), ("thread", dict(prefetch=True, side_stream=False)),
                         ("side stream", dict(prefetch=True))):
            hook = DAiD(retriever, lam=0.9, k=8, **kw)
            runs[name] = _codes(model, ["a circle", "two squares"], parallel_size=2, hooks=[hook]).cpu()
            assert hook.stats["steps_augmented"] == 6
        torch.testing.assert_close(runs["thread"], runs["inline"], rtol=0, atol=0)
        torch.testing.assert_close(runs["side stream"], runs["inline"], rtol=0, atol=0)
    finally:
        tiny_janus.to("cpu")
