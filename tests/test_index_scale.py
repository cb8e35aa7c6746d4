"""Issue 18: de-duplicated indexes answer as the full one does; parallel builds merge to the single-process index."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from arrag.build_retriever import build_index as bi
from arrag.build_retriever.build_index import build_index, merge_index
from arrag.decoding.daid import retrieval_distribution
from arrag.errors import ArragError
from arrag.retrieval import codestore
from arrag.retrieval import index as faiss_index
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.dedup import copies_in_top, dedup, entry_rows, expand, place
from arrag.retrieval.neighborhood import get_neighborhood, key_vectors, keys_for_grid
from arrag.retrieval.retriever import PatchRetriever

K_CODES = 6


def repetitive_store(folder, n=40, grid=7, seed=0):
    """Codes with many repeated (key, value) rows whose value is a function of the key, over a random continuous
    codebook: distinct keys are at distinct distances from a query, so no top-k boundary splits a tie of two
    different codes and the full and de-duplicated answers must agree exactly."""
    rng = np.random.default_rng(seed)
    book = rng.normal(size=(K_CODES, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codes = rng.integers(0, 2, (n, grid, grid)).astype(np.uint16)  # two colours: backgrounds repeat
    nb = get_neighborhood("L")
    for i, j in (divmod(int(p), grid) for p in nb.positions(grid, grid)):  # raster order: neighbours come first
        nbrs = [codes[:, i + di, j + dj].astype(np.int64) for di, dj in nb.offsets]
        codes[:, i, j] = (nbrs[0] * 5 + nbrs[1] * 3 + nbrs[2] + nbrs[3] * 2) % K_CODES
    codes[::7] = codes[1::7]  # whole repeated images
    codestore.write_store(folder, codes, book, shard_size=16)
    return codes, book


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    codes, book = repetitive_store(root / "store")
    full = build_index(root / "store", root / "full", factory="Flat", dedup=False, progress=False)
    small = build_index(root / "store", root / "dedup", factory="Flat", progress=False)
    return root, codes, book, full, small


def queries_for(codes, book, n=24, seed=1):
    _, nbr = keys_for_grid(codes, "L")
    keys = key_vectors(nbr, book).reshape(-1, 4 * book.shape[1])
    rng = np.random.default_rng(seed)
    picked = keys[rng.choice(len(keys), n, replace=False)]
    return (picked + rng.normal(scale=0.3, size=picked.shape)).astype(np.float32)


def test_dedup_rows_counts_and_csr():
    rows = np.array([[1, 2], [0, 1], [1, 2], [1, 2], [0, 1]], np.uint16)
    images = np.array([0, 0, 1, 3, 3])
    distinct, counts, offsets, ids = dedup(rows, images)
    np.testing.assert_array_equal(distinct, [[0, 1], [1, 2]])
    np.testing.assert_array_equal(counts, [2, 3])
    np.testing.assert_array_equal(offsets, [0, 2, 5])
    np.testing.assert_array_equal(ids, [0, 3, 0, 1, 3])  # per entry, in image order
    # Expanding hits by counts gives what the full multiset would: [d0 x2, d1 x3] cut at k.
    d, i = expand(np.array([[0.5, 0.9]], np.float32), np.array([[0, 1]]), counts, k=4)
    np.testing.assert_array_equal(i, [[0, 0, 1, 1]])
    np.testing.assert_allclose(d, [[0.5, 0.5, 0.9, 0.9]])
    td, ti = expand(torch.tensor([[0.5, 0.9]]), torch.tensor([[1, -1]]), torch.tensor(counts), k=4)
    assert ti.tolist() == [[1, 1, 1, -1]]  # torch in, torch out; missing copies pad with -1
    # Unexpanded, each hit says how many of its copies fall in the top k: 2 of entry 0, then 2 of entry 1's 3.
    np.testing.assert_array_equal(copies_in_top(np.array([[0, 1, -1]]), counts, k=4), [[2, 2, 0]])
    np.testing.assert_array_equal(copies_in_top(np.array([[1, 0]]), counts, k=2), [[2, 0]])
    assert copies_in_top(torch.tensor([[1, 0]]), torch.tensor(counts), k=4).tolist() == [[3, 1]]
    # Every copy of a row is owned by the same process and bucket.
    owner, bucket = place(np.repeat(rows, 3, 0), world=3, buckets=4)
    for r in range(len(rows)):
        assert len(set(owner[r * 3:(r + 1) * 3])) == 1 and len(set(bucket[r * 3:(r + 1) * 3])) == 1


def test_dedup_index_gives_the_full_index_results(built):
    root, codes, book, full, small = built
    assert small["dedup"] and not full["dedup"]
    assert small["occurrences"] == full["entries"] and small["entries"] < full["entries"] / 1.5
    assert small["dedup_ratio"] == pytest.approx(full["entries"] / small["entries"], rel=1e-3)
    a, b = PatchRetriever.load(root / "full"), PatchRetriever.load(root / "dedup")
    q = queries_for(codes, book)
    for k in (1, 9, 60):
        da, ca = a.search(q, k)
        db, cb = b.search(q, k)
        np.testing.assert_array_equal(ca, cb)
        np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-5)
        for aggregate in ("nearest", "sum"):  # DAiD's p_ret, the count-weighted sum included
            pa = retrieval_distribution(torch.from_numpy(da), torch.from_numpy(ca), K_CODES, 1.0, aggregate)
            pb = retrieval_distribution(torch.from_numpy(db), torch.from_numpy(cb), K_CODES, 1.0, aggregate)
            torch.testing.assert_close(pa, pb)
            # DAiD's path: the raw hits with their copies in the top k, not expanded, give the same p_ret.
            dc, cc, copies = b.search_counted(q, k)
            assert a.search_counted(q, k)[2] is None  # nothing to weigh without de-duplication
            assert (copies.sum(1) == k).all()
            pc = retrieval_distribution(*map(torch.from_numpy, (dc, cc)), K_CODES, 1.0, aggregate,
                                        torch.from_numpy(copies))
            torch.testing.assert_close(pc, pa)
    # The torch search backend expands counts the same way, and counts copies the same way.
    t = PatchRetriever.load(root / "dedup", backend="torch")
    _, ct = t.search(torch.from_numpy(q), 9)
    np.testing.assert_array_equal(ct.numpy(), a.search(q, 9)[1])
    for got, want in zip(t.search_counted(torch.from_numpy(q), 9), b.search_counted(q, 9), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_dedup_exclude_self_gives_the_same_candidates(built):
    root, codes, book, _, _ = built
    a, b = PatchRetriever.load(root / "full"), PatchRetriever.load(root / "dedup")
    pos, nbr = keys_for_grid(codes, "L")
    q = key_vectors(nbr[:6], book).reshape(-1, 4 * book.shape[1])
    q = (q + np.random.default_rng(3).normal(scale=0.05, size=q.shape)).astype(np.float32)  # no distance ties
    owners = np.repeat(np.arange(6), len(pos))
    for k in (3, 12):
        np.testing.assert_array_equal(a.search_excluding(q, k, owners), b.search_excluding(q, k, owners))
    # Sanity: excluding changes something (image 0's copies are found without it).
    assert (a.search(q, 3)[1] != a.search_excluding(q, 3, owners)).any()


def test_small_spill_buckets_give_the_same_index(built, tmp_path, monkeypatch):
    root, codes, book, _, _ = built
    monkeypatch.setattr(bi, "SPILL_ROWS", 100)  # many buckets: rows are de-duplicated bucket by bucket
    m = build_index(root / "store", tmp_path / "idx", factory="Flat", progress=False)
    ref = json.loads((root / "dedup" / "manifest.json").read_text())
    assert (m["entries"], m["occurrences"]) == (ref["entries"], ref["occurrences"])
    q = queries_for(codes, book)
    np.testing.assert_array_equal(PatchRetriever.load(tmp_path / "idx").search(q, 20)[1],
                                  PatchRetriever.load(root / "dedup").search(q, 20)[1])
    assert not (tmp_path / "idx" / "spill").exists()


def test_code_pq_index_is_exact_and_small(built, tmp_path):
    """IVF,CodePQ stores each key as its neighbour codes: the IVF-Flat index's answers at a fraction of the bytes,
    on faiss-cpu and on the torch backend; its stored vectors are exact codebook rows."""
    root, codes, book, _, _ = built
    build_index(root / "store", tmp_path / "ivf", factory="IVF4,Flat", seed=2, progress=False)
    m = build_index(root / "store", tmp_path / "cpq", factory="IVF4,CodePQ", seed=2, progress=False)
    assert m["index_type"] == "IndexIVFPQ" and m["factory"] == "IVF4,CodePQ"
    a, b = (PatchRetriever.load(tmp_path / name, nprobe=4) for name in ("ivf", "cpq"))
    t = PatchRetriever.load(tmp_path / "cpq", nprobe=4, backend="torch")
    q = queries_for(codes, book)
    for k in (1, 9, 40):
        da, ca = a.search(q, k)
        db, cb = b.search(q, k)
        dt, ct = t.search(torch.from_numpy(q), k)
        np.testing.assert_array_equal(ca, cb)
        np.testing.assert_array_equal(ca, ct.numpy())
        np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(da, dt.numpy(), rtol=1e-5, atol=1e-5)
    # 6 codes = 3 bits, 4 neighbours: 2 bytes of code + 8 of id per entry, against 4 * 32 + 8.
    assert (tmp_path / "cpq" / "index.faiss").stat().st_size < (tmp_path / "ivf" / "index.faiss").stat().st_size / 5
    stored = faiss_index.sample_stored_vectors(b.index, 20).reshape(-1, book.shape[1])
    assert np.abs(stored[:, None] - book[None]).max(-1).min(1).max() == 0  # every part is exactly a codebook row
    with pytest.raises(ArragError, match="CodePQ stores code keys"):
        faiss_index.create_index("IVF4,CodePQ", 32, None)


@pytest.mark.parametrize("factory,dedup_on,world", [("Flat", True, 2), ("Flat", False, 2), ("IVF8,Flat", True, 2),
                                                    ("IVF8,Flat", True, 3), ("IVF8,Flat", False, 3),
                                                    ("IVF8,CodePQ", True, 2)])
def test_rank_build_and_merge_equals_one_process(built, tmp_path, factory, dedup_on, world):
    """Ranks run one after another (the parts differ in size with 3 ranks), merged; the same answers as one
    process."""
    root, codes, book, _, _ = built
    one = build_index(root / "store", tmp_path / "one", factory=factory, dedup=dedup_on, seed=2, progress=False)
    out = tmp_path / "two"
    plan = build_index(root / "store", out, factory=factory, dedup=dedup_on, seed=2, train_only=True, progress=False)
    assert plan["dedup"] == dedup_on and (out / "parts" / "trained.faiss").is_file()
    with pytest.raises(ArragError, match="lacks every part"):
        merge_index(out, progress=False)
    for rank in range(world - 1, 0, -1):
        build_index(root / "store", out, factory=factory, dedup=dedup_on, seed=2, shard=f"{rank}/{world}",
                    progress=False)
    with pytest.raises(ArragError, match=rf"lacks part\(s\) 0 of {world}"):
        merge_index(out, progress=False)
    build_index(root / "store", out, factory=factory, dedup=dedup_on, seed=2, shard=f"0/{world}", progress=False)
    merged = merge_index(out, progress=False)
    assert merged["layout"] == ("ondisk" if factory.startswith("IVF") else "shards")
    if factory.startswith("IVF"):  # the on-disk lists are checked on load like every other file
        assert merged["files"]["lists.ivfdata"]["bytes"] == (out / "lists.ivfdata").stat().st_size
    assert (merged["entries"], merged["occurrences"]) == (one["entries"], one["occurrences"])
    moved = tmp_path / "moved"  # the on-disk lists are found beside the index wherever the folder goes
    shutil.move(out, moved)
    nprobe = 8 if factory.startswith("IVF") else None  # every list: exact, like Flat
    a = PatchRetriever.load(tmp_path / "one", nprobe=nprobe)
    b = PatchRetriever.load(moved, nprobe=nprobe)
    q = queries_for(codes, book)
    da, ca = a.search(q, 15)
    db, cb = b.search(q, 15)
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-5)
    # Every merged id points at its own entry: the stored key of the id is at the returned distance.
    d_ids, ids = b.search_ids(q, 15)
    true = ((b.entry_keys(ids.ravel(), CodeStore.open(root / "store")).reshape(*ids.shape, -1) - q[:, None]) ** 2
            ).sum(-1)
    np.testing.assert_allclose(true, d_ids, rtol=1e-4, atol=1e-4)
    pos, nbr = keys_for_grid(codes, "L")
    own = key_vectors(nbr[:3], book).reshape(-1, 4 * book.shape[1])
    own = (own + np.random.default_rng(3).normal(scale=0.05, size=own.shape)).astype(np.float32)
    owners = np.repeat(np.arange(3), len(pos))
    np.testing.assert_array_equal(a.search_excluding(own, 4, owners), b.search_excluding(own, 4, owners))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`arrag ARGS` in `nproc` processes under torchrun (a gloo process group on this machine)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "arrag", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})


def sorted_entries(folder) -> list[tuple]:
    """An index's de-duplicated entries as sorted (neighbour codes, value, count, images) tuples."""
    codes, values = np.load(folder / "entry_codes.npy"), np.load(folder / "values.npy")
    counts, offsets = np.load(folder / "counts.npy"), np.load(folder / "entry_image_offsets.npy")
    images = np.load(folder / "entry_images.npy")
    return sorted((tuple(codes[e].tolist()), int(values[e]), int(counts[e]),
                   tuple(images[offsets[e]:offsets[e + 1]].tolist())) for e in range(len(values)))


@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_ranks_build_the_index_one_process_builds(built, tmp_path, world):
    """Under torchrun rank 0 trains and broadcasts the plan, every rank reads 1/W of the store and sends each row to
    its owner (all_to_all), rank 0 merges: the same entries, counts and image lists as one process (the same sorted
    contents: entry ids differ, as each rank's entries come in a block), and the same answers."""
    root, codes, book, _, _ = built
    out = tmp_path / "par"
    run = torchrun(world, "build-index", str(root / "store"), "--out", str(out), "--factory", "IVF4,Flat",
                   "--seed", "1", "--dist-timeout", "120")
    assert run.returncode == 0, run.stderr[-3000:]
    one = build_index(root / "store", tmp_path / "one", factory="IVF4,Flat", seed=1, progress=False)
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["build"]["processes"] == world and (merged["entries"], merged["occurrences"]) == (
        one["entries"], one["occurrences"])
    assert sorted_entries(out) == sorted_entries(tmp_path / "one")
    store_bytes = sum((root / "store" / s["codes"]).stat().st_size - 128 for s in CodeStore.open(root / "store")
                      .manifest["shards"])
    read = merged["build"]["store_bytes_read_per_rank"]
    assert len(read) == world and max(read) <= 1.1 * store_bytes / world + 16 * 49 * 2  # 1/W each (+ one image)
    q = queries_for(codes, book)
    np.testing.assert_array_equal(PatchRetriever.load(tmp_path / "one", nprobe=4).search(q, 10)[1],
                                  PatchRetriever.load(out, nprobe=4).search(q, 10)[1])
    again = torchrun(world, "build-index", str(root / "store"), "--out", str(out), "--factory", "IVF4,Flat",
                     "--seed", "1")
    assert again.returncode == 0 and "already merged" in again.stdout  # a rerun after the merge does nothing


def test_a_rank_that_leaves_stops_the_others_in_one_line(built, tmp_path):
    """Rank 1 joins, takes the plan and exits; rank 0 builds its part and then, at the barrier, stops within the
    timeout with a line naming rank 1: never a hang."""
    import time

    root = built[0]
    port = free_port()
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONWARNINGS": "ignore"}
    leaver = ("from arrag.distributed import Group\n"
              "g = Group.from_env(20)\n"
              "g.broadcast(None)\n"
              "g.all_gather(False)\n")  # takes the plan and says it has no part, like a rank of the build; leaves
    cmd = [sys.executable, "-m", "arrag", "build-index", str(root / "store"), "--out", str(tmp_path / "x"),
           "--factory", "Flat", "--no-dedup", "--dist-timeout", "8"]
    t0 = time.time()
    procs = [subprocess.Popen(cmd, env={**env, "RANK": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True),
             subprocess.Popen([sys.executable, "-c", leaver], env={**env, "RANK": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    out = [p.communicate(timeout=120) for p in procs]  # the leaver is gone (however its process ended)
    err = out[0][1].strip().splitlines()[-1]
    assert procs[0].returncode == 2 and time.time() - t0 < 90, out[0][1][-2000:]
    assert err.startswith("arrag: error: build-index: every rank's part: rank(s) 1 of 2 did not arrive"), err


def test_torchrun_encode_writes_the_store_one_process_writes(tmp_path, vq_file):
    from arrag.demo.shapes import ShapesWorld
    from arrag.image_io import save_image

    world = ShapesWorld("database", size=64)
    for i in range(10):
        save_image(world.image(i), tmp_path / "imgs" / f"{i:03d}.png")
    args = ["encode", str(tmp_path / "imgs"), "--vq", str(vq_file), "--image-size", "64", "--shard-size", "3",
            "--workers", "0", "--device", "cpu"]
    run = torchrun(2, *args, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    from arrag.cli import main

    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = CodeStore.open(tmp_path / "two"), CodeStore.open(tmp_path / "one")  # rank 0 wrote the manifest
    assert two.num_images == one.num_images == 10 and len(two.manifest["shards"]) == 4
    for k in range(4):
        assert (tmp_path / "two" / f"codes-{k:05d}.npy").read_bytes() == (tmp_path / "one" / f"codes-{k:05d}.npy"
                                                                          ).read_bytes()


def test_a_rank_with_other_settings_is_refused(built, tmp_path):
    root = built[0]
    build_index(root / "store", tmp_path / "x", factory="Flat", train_only=True, progress=False)
    with pytest.raises(ArragError, match="differ from the build's plan.*key_source|differ from the build's plan"):
        build_index(root / "store", tmp_path / "x", factory="Flat", shard="1/2", dedup=False, progress=False)


def test_mmap_load_answers_the_same(built):
    root, codes, book, _, _ = built
    q = queries_for(codes, book)
    np.testing.assert_array_equal(PatchRetriever.load(root / "dedup", mmap=True).search(q, 7)[1],
                                  PatchRetriever.load(root / "dedup").search(q, 7)[1])


def test_entry_rows_match_the_key_builder(built):
    _, codes, book, _, _ = built
    rows, images = entry_rows(codes[:3], get_neighborhood("L"), first_image=5)
    pos, nbr = keys_for_grid(codes[:3], "L")
    np.testing.assert_array_equal(rows[:, :-1], nbr.reshape(-1, 4))
    np.testing.assert_array_equal(rows[:, -1], codes[:3].reshape(3, -1)[:, pos].ravel())
    assert images.tolist() == np.repeat([5, 6, 7], len(pos)).tolist()
