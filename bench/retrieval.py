"""Retrieval benchmarks: key construction speed, build-index memory, code-store size, recall and queries/s.

    .venv/bin/python bench/retrieval.py            # ~5 min on 2 cores the first time (the store is cached)

1. Key construction throughput as a ratio to np.copy of the same output bytes (the memory bound).
   Target >= 0.5.
2. Peak RSS of `build-index` at two database sizes (same factory), minus the index's own bytes. Target: flat.
3. Code-store bytes per token and per image. Target: 2 bytes per token (the original HDF5 layout stored
   int32 codes plus float32 vectors: about 20 KB per 384-px image).
4. Recall@10 against exact search (tie-aware, see arrag.retrieval.recall) and queries/s at batch 1, 16, 64
   for the auto-chosen index on a >= 1M-entry database at its default nprobe. Target: recall >= 0.9.
5. Scale (issue 18): 10M entries from a random-code store, built by 1 process and by 2 processes plus merge
   (`--train-only` with every core, then the 2 ranks side by side with one core each, then `merge-index`):
   wall time of each, peak RSS per process, bytes per entry on disk, recall@10 at the default nprobe against
   exact search, and each process's CPU seconds (their sum over the cores is the 2-process build's floor).
   Targets: 2 processes + merge <= 0.6x the wall time of 1 process; recall >= 0.9.
6. De-duplication on the ShapesWorld index: entries, IVF imbalance factor (target <= 3 de-duplicated), distinct
   codes per top-10, and DAiD's search time per step (16 queries, k 256 and 2048) de-duplicated vs full.
7. CodePQ (code keys stored as their codes, exact distances) against IVF-Flat, same lists and nprobe, on the
   de-duplicated ShapesWorld database: index bytes per entry, recall@10, the share of identical top-k codes,
   search time per 16 queries. Targets: the same answers at a fraction of the bytes.
8. build-index under torchrun with 1, 2 and 4 processes: store bytes each rank reads (target <= 1.1x its share).
9. The torch backend's compact CodePQ (int16 sub-codes, int32 ids, distance tables) on 1 and 2 "devices" (CPU)
   against faiss-cpu's CodePQ search of item 7's index on 1,000 queries at k 10: identical id lists (and
   identical up to entries tied at the k-th distance), device bytes per entry. Target: identical; <= 20 B with
   the code and count tables.
10. A large index (--large-entries, default 100M; `--large-hnsw-above` forces the HNSW branch on smaller runs):
   a random-code store built by `build-index --memory-budget 4G` in a fresh process: the factory auto picks,
   build time and peak RSS (target <= 4 GiB), the tuned nprobe and its reference, recall@10 against exact search,
   queries/s at batch 16. Random codes are IVF's worst case (no cluster structure).
The database: ShapesWorld images encoded by a seeded VQ-tiny-8 at 128 px (16x16 tokens, 210 entries each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arrag.build_retriever.encode import encode  # noqa: E402
from arrag.demo.shapes import ShapesWorld  # noqa: E402
from arrag.fileops import remove_owned_dir  # noqa: E402
from arrag.image_io import save_image  # noqa: E402
from arrag.retrieval.codestore import STORE_FILES, CodeStore  # noqa: E402
from arrag.retrieval.neighborhood import grid_key_vectors  # noqa: E402
from arrag.vq import VQModel  # noqa: E402
from bench.timing import best_of  # noqa: E402


def key_throughput() -> dict:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16384, (1000, 24, 24)).astype(np.uint16)
    book = rng.normal(size=(16384, 8)).astype(np.float32)
    _, keys = grid_key_vectors(codes, book)
    src = np.ones(keys.nbytes // 4, np.float32)
    t_keys = best_of(lambda: grid_key_vectors(codes, book))
    t_copy = best_of(lambda: np.copy(src))
    return {"output_mb": keys.nbytes / 1e6, "keys_gb_s": keys.nbytes / t_keys / 1e9,
            "copy_gb_s": keys.nbytes / t_copy / 1e9, "ratio": t_copy / t_keys, "target": 0.5}


def make_store(out: Path, images: int, workers: int) -> Path:
    store = out / "store"
    if (store / "manifest.json").exists() and CodeStore.open(store).num_images == images:
        return store
    img_dir = out / "images"
    world = ShapesWorld("database", seed=0, size=128)
    for i in range(images):
        p = img_dir / f"{i // 1000:03d}" / f"{i:06d}.png"
        if not p.exists():
            save_image(world.image(i), p)
    torch.manual_seed(0)
    VQModel("VQ-tiny-8").save(out / "vq.safetensors")
    remove_owned_dir(store, what="code store", owned=STORE_FILES)
    encode(str(img_dir), store, out / "vq.safetensors", image_size=128, batch_size=64, shard_size=500,
           num_workers=workers)
    return store


def sub_store(store: Path, out: Path, shards: int) -> Path:
    """A store made of the first `shards` shards of another (files linked, manifest cut)."""
    remove_owned_dir(out, what="code store", owned=STORE_FILES)
    out.mkdir(parents=True)
    man = json.loads((store / "manifest.json").read_text())
    man["shards"] = man["shards"][:shards]
    man["num_images"] = sum(s["count"] for s in man["shards"])
    for s in man["shards"]:
        (out / s["codes"]).symlink_to((store / s["codes"]).resolve())
    (out / "codebook.npy").symlink_to((store / "codebook.npy").resolve())
    (out / "manifest.json").write_text(json.dumps(man))
    return out


def build_rss(store: Path, out: Path, factory: str) -> dict:
    """Build in a fresh process; return its peak RSS and the index size."""
    code = ("from arrag.build_retriever.build_index import build_index\n"
            f"m = build_index({str(store)!r}, {str(out)!r}, factory={factory!r}, train_size=65536, "
            "overwrite=True, progress=False)\n"
            "print('BUILT', m['entries'], m['build']['seconds'])")
    [(rss, printed)] = finish([run_python(code)])
    entries, seconds = printed.split("BUILT")[-1].split()[:2]
    index_bytes = (out / "index.faiss").stat().st_size
    return {"entries": int(entries), "peak_rss_mb": rss / 2**20, "index_mb": index_bytes / 2**20,
            "rss_minus_index_mb": (rss - index_bytes) / 2**20, "seconds": float(seconds)}


def run_python(code: str, threads: int | None = None) -> subprocess.Popen:
    """Start `code` in a fresh Python (limited to `threads` OpenMP/BLAS threads); it prints its CPU seconds (user +
    system, all threads) and, last, its peak RSS."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    code += ("\nimport resource; _u = resource.getrusage(resource.RUSAGE_SELF); print('CPU_S', _u.ru_utime + "
             "_u.ru_stime); print('PEAK_RSS', _u.ru_maxrss * 1024)")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Wait for every process; return (peak RSS in bytes, what it printed) for each."""
    done = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a benchmark subprocess failed ({p.args[-1][:200]!r})")
        done.append((int(out.split("PEAK_RSS")[-1]), out))
    return done


def random_code_store(folder: Path, entries: int, seed: int = 0) -> Path:
    """A store of uniformly random 16x16 code grids (210 L-entries each) over a random 16384 x 8 codebook."""
    from arrag.retrieval import codestore

    images = -(-entries // 210)
    if (folder / "manifest.json").exists() and CodeStore.open(folder).num_images == images:
        return folder
    remove_owned_dir(folder, what="code store", owned=STORE_FILES)
    rng = np.random.default_rng(seed)
    book = rng.normal(size=(16384, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codestore.write_store(folder, rng.integers(0, 16384, (images, 16, 16)).astype(np.uint16), book,
                          shard_size=4096)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def exchange_build(out: Path, entries: int, worlds=(1, 2, 4)) -> dict:
    """build-index under torchrun with 1, 2 and 4 processes (issue 33): each rank reads 1/W of the store and sends
    each row to its owner; per rank, the store bytes it read and its CPU seconds, from the parts' records."""
    import socket

    store = random_code_store(out / "exchange_store", entries)
    st = CodeStore.open(store)
    store_bytes = sum((store / s["codes"]).stat().st_size for s in st.manifest["shards"])
    res = {"entries": st.num_images * 210, "store_bytes": store_bytes, "runs": {}}
    for world in worlds:
        folder = out / f"exchange_{world}"
        remove_owned_dir(folder, what="index", owned=(r".+",))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = ([sys.executable, "-m", "arrag"] if world == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
                "127.0.0.1", "--master-port", str(port), "-m", "arrag"])
        threads = max(1, (os.cpu_count() or 2) // world)
        t0 = time.perf_counter()
        subprocess.run([*cmd, "build-index", str(store), "--out", str(folder), "--factory", "IVF1024,Flat",
                        "--nprobe", "16"], check=True, capture_output=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"})
        seconds = time.perf_counter() - t0
        build = json.loads((folder / "manifest.json").read_text())["build"]
        read = build.get("store_bytes_read_per_rank") or [build.get("store_bytes_read")]
        res["runs"][world] = {"seconds": round(seconds, 1), "store_bytes_read_per_rank": read,
                              "read_over_share": round(max(read) / (store_bytes / world), 3),
                              "cpu_seconds_per_rank": build.get("cpu_seconds_per_rank"), "target": 1.1}
    return res


def print_torch_code_pq(tc: dict) -> None:
    for n in (1, 2):
        d = tc[f"devices_{n}"]
        print(f"9. torch CodePQ on {n} device(s) vs faiss-cpu ({tc['entries']:,} entries, {tc['factory']}, nprobe "
              f"{tc['nprobe']}, {tc['queries']:,} queries, k 10): identical id lists {d['identical_id_lists']:.1%}, "
              f"identical up to ties at the k-th distance: {d['identical_up_to_kth_ties']}; of the "
              f"{d['differing_queries']} differing queries, {d['differing_with_other_probed_lists']} probed another "
              f"list, its centroid distance within {d['their_centroid_distance_gap']:.1e} (relative) of the one "
              "FAISS probed; distances within "
              f"{d['max_abs_distance_difference']:.1e}; {d['index_bytes_per_entry']:.1f} B/entry on the devices, "
              f"{d['with_code_and_count_tables']:.1f} with the code and count tables (target <= 20); "
              f"{d['ms_per_16q']:.2f} vs {d['faiss_ms_per_16q']:.2f} ms per 16 queries (CPU)")


def print_large(lg: dict) -> None:
    tuning = lg["nprobe_tuning"] or {}
    print(f"10. {lg['entries']:,} random-code entries, --memory-budget {lg['budget']}: {lg['factory']}, built in "
          f"{lg['build_seconds']:.0f} s ({lg['build_cpu_seconds']:.0f} CPU-s; store {lg['store_seconds']:.0f} s), peak "
          f"RSS {lg['peak_rss_gib']:.2f} GiB (target <= 4), {lg['disk_bytes_per_entry']:.1f} B/entry on disk; nprobe "
          f"{lg['nprobe']} (reference: {tuning.get('reference')}); recall@10 {lg['recall@10']:.3f} against exact "
          f"search (target >= 0.95); {lg['queries_per_s_batch16']:,.0f} queries/s at batch 16")


def print_exchange(ex: dict) -> None:
    for world, d in ex["runs"].items():
        cpu = d["cpu_seconds_per_rank"]
        print(f"8. build-index, {world} process(es) ({ex['entries']:,} entries, store "
              f"{ex['store_bytes'] / 2**20:.0f} MiB): {d['seconds']} s; store bytes read per rank "
              + ", ".join(f"{b / 2**20:.1f} MiB" for b in d["store_bytes_read_per_rank"])
              + f" = {d['read_over_share']:.2f}x the store / W (target <= 1.1)"
              + (f"; CPU seconds per rank {cpu}" if cpu else ""))


def scale_build(out: Path, entries: int, queries: int) -> dict:
    """1 process vs 2 processes + merge over the same random store (see the module docstring, item 5)."""
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.recall import exact_distances, recall_at_k
    from arrag.retrieval.retriever import PatchRetriever

    store = random_code_store(out / "random_store", entries)
    cores = os.cpu_count() or 2
    call = "from arrag.build_retriever.build_index import build_index, merge_index\n"

    cpu: list[float] = []  # CPU seconds of every process, in order

    def peaks(*calls: str, threads: int | None = None) -> list[int]:  # side by side; peak RSS of each
        done = finish([run_python(call + c, threads) for c in calls])
        cpu.extend(float(printed.split("CPU_S")[-1].split()[0]) for _, printed in done)
        return [rss for rss, _ in done]

    one, two = out / "scale_1proc", out / "scale_2proc"
    t0 = time.perf_counter()
    peak_one = peaks(f"build_index({str(store)!r}, {str(one)!r}, overwrite=True, progress=False)")
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_peaks = peaks(f"build_index({str(store)!r}, {str(two)!r}, train_only=True, overwrite=True, progress=False)")
    t_train = time.perf_counter() - t0
    all_peaks += peaks(*(f"build_index({str(store)!r}, {str(two)!r}, shard='{r}/2', progress=False)" for r in range(2)),
                       threads=max(1, cores // 2))
    t_add = time.perf_counter() - t0 - t_train
    all_peaks += peaks(f"merge_index({str(two)!r}, progress=False)")
    t_two = time.perf_counter() - t0
    st = CodeStore.open(store)
    q = sample_entry_keys(st, queries, seed=1)
    # The least wall time the 2-process build's CPU work can take on this machine's cores, however well packed:
    # a ratio floor that says whether the target is reachable here at all.
    floor = sum(cpu[1:]) / cores
    res = {"entries": st.num_images * 210, "cores": cores,
           "processes_1": {"seconds": t_one, "peak_rss_mb": peak_one[0] / 2**20, "cpu_seconds": cpu[0]},
           "processes_2": {"seconds": t_two, "train_seconds": t_train, "add_seconds": t_add,
                           "merge_seconds": t_two - t_train - t_add,
                           "cpu_seconds": dict(zip(("train", "rank0", "rank1", "merge"), cpu[1:], strict=True)),
                           "peak_rss_mb": {"train": all_peaks[0] / 2**20, "rank0": all_peaks[1] / 2**20,
                                           "rank1": all_peaks[2] / 2**20, "merge": all_peaks[3] / 2**20}},
           "ratio_2_to_1": t_two / t_one, "cpu_floor_ratio": floor / t_one, "target_ratio": 0.6,
           "target_recall": 0.9}
    exact = exact_distances(PatchRetriever.load(one, verify=False), st, q, 10)
    for name, folder in (("processes_1", one), ("processes_2", two)):
        r = PatchRetriever.load(folder, verify=False)
        res[name].update(factory=r.manifest["factory"], nprobe=r.nprobe, layout=r.manifest["layout"],
                         bytes_per_entry=folder_bytes(folder) / r.entries, dedup_ratio=r.manifest["dedup_ratio"],
                         recall_at_10=recall_at_k(r, st, q, 10, exact=exact))
    return res


def built_manifest(folder: Path) -> dict:
    """The manifest of an index an earlier run left in `folder`, or {} when there is none."""
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def needs_build(folder: Path, dedup: bool) -> bool:
    """An index from an earlier run is reused only when today's build-index would make the same one: the same
    de-duplication, and an nprobe tuned at build time (indexes from before the tuning kept sqrt(nlist)/2)."""
    manifest = built_manifest(folder)
    return manifest.get("dedup", False) != dedup or "nprobe_tuning" not in manifest


def dedup_vs_full(store: Path, out: Path, queries: int) -> dict:
    """The de-duplicated auto index against the full one on ShapesWorld (see the module docstring, item 6)."""
    from arrag.build_retriever.build_index import build_index
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.recall import distinct_codes_per_topk, list_balance, recall_at_k
    from arrag.retrieval.retriever import PatchRetriever

    st = CodeStore.open(store)
    q = sample_entry_keys(st, queries, seed=1)
    res, batch = {}, q[:16]
    for name, dedup in (("dedup", True), ("full", False)):
        folder = out / ("idx_auto" if dedup else "idx_auto_full")
        if needs_build(folder, dedup):
            build_index(store, folder, overwrite=True, dedup=dedup, progress=False)
        r = PatchRetriever.load(folder)
        res[name] = {"entries": r.entries, "factory": r.manifest["factory"], "nprobe": r.nprobe,
                     **(list_balance(r) or {}), "distinct_codes@10": distinct_codes_per_topk(r, q, 10),
                     "recall@10": recall_at_k(r, st, q, 10),
                     "ms_per_step_16q": {k: 1e3 * best_of(lambda r=r, k=k: r.search(batch, k)) for k in (256, 2048)}}
    res["search_time_ratio"] = {k: res["dedup"]["ms_per_step_16q"][k] / res["full"]["ms_per_step_16q"][k]
                                for k in (256, 2048)}
    return res


def code_pq_vs_flat(store: Path, out: Path, queries: int) -> dict:
    """IVF-CodePQ against IVF-Flat built the same way (nlist, seed, nprobe of the auto index), item 7."""
    from arrag.build_retriever.build_index import build_index
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.recall import recall_at_k
    from arrag.retrieval.retriever import PatchRetriever

    st = CodeStore.open(store)
    auto = PatchRetriever.load(out / "idx_auto")
    q = sample_entry_keys(st, queries, seed=1)
    res, found = {}, {}
    for name, kind in (("ivf_flat", "Flat"), ("code_pq", "CodePQ")):
        folder = out / f"idx_{name}"
        factory = f"IVF{auto.manifest['nlist']},{kind}"
        made = built_manifest(folder)
        if made.get("factory") != factory or made.get("nprobe") != auto.nprobe:
            build_index(store, folder, overwrite=True, factory=factory, nprobe=auto.nprobe, progress=False)
        r = PatchRetriever.load(folder)
        found[name] = r.search(q, 256)
        res[name] = {"factory": factory, "nprobe": r.nprobe,
                     "index_bytes_per_entry": (folder / "index.faiss").stat().st_size / r.entries,
                     "recall@10": recall_at_k(r, st, q, 10),
                     "ms_per_16q_k256": 1e3 * best_of(lambda r=r: r.search(q[:16], 256))}
    (da, ca), (db, cb) = found["ivf_flat"], found["code_pq"]
    # Entries at equal distance may come in another order: compare distances, and codes as sorted multisets.
    res["max_abs_distance_difference@256"] = float(np.abs(da - db).max())
    res["same_code_multisets@256"] = float((np.sort(ca, 1) == np.sort(cb, 1)).all(1).mean())
    return res


def torch_code_pq(store: Path | None, out: Path, queries: int = 1000) -> dict:
    """The torch backend's CodePQ against faiss-cpu's on item 7's index, or on a 2M-entry random-code one where
    item 7 has not run (see the module docstring, item 9)."""
    import faiss

    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.retriever import PatchRetriever
    from arrag.retrieval.torch_search import TorchIndex

    folder = out / "idx_code_pq"
    if not (folder / "manifest.json").exists():  # item 7 did not run: a 2M-entry random-code CodePQ of its own
        from arrag.build_retriever.build_index import build_index

        store = random_code_store(out / "random_store_2m", 2_000_000, seed=5)
        folder = out / "idx_code_pq_random"
        if built_manifest(folder).get("factory") != "IVF1024,CodePQ":
            build_index(store, folder, factory="IVF1024,CodePQ", nprobe=64, overwrite=True, progress=False)
    r = PatchRetriever.load(folder)
    q = sample_entry_keys(CodeStore.open(store), queries, seed=7)
    q[1::2] += np.random.default_rng(7).normal(scale=0.05, size=q[1::2].shape).astype(np.float32)  # off-database
    fd, fi = r.index.search(q, 10)
    res = {"entries": r.entries, "queries": len(q), "factory": r.manifest["factory"], "nprobe": r.nprobe}
    for devices in (["cpu"], ["cpu", "cpu"]):
        t = TorchIndex.from_faiss(r.index, devices)
        td, ti = t.search(q, 10)
        inside = fd < fd[:, -1:] - 1e-5  # hits strictly inside the k-th distance: the same entries whatever the order
        same_set = all(set(ti[i][inside[i]]) == set(fi[i][inside[i]]) for i in range(len(q)))
        # Where the id lists differ, did the two scan different lists? Then the nprobe-th and next centroids are
        # within float32 rounding of each other (BLAS and torch sum in other orders): a tie, not a wrong search.
        differ = np.flatnonzero((ti != fi).any(1))
        quantizer = faiss.extract_index_ivf(r.index).quantizer
        centroids = quantizer.reconstruct_n(0, quantizer.ntotal).astype(np.float64)
        faiss_probe = quantizer.search(q[differ], r.nprobe)[1]
        torch_probe = t.probe(torch.from_numpy(q[differ])).numpy()
        other_lists, gap = 0, 0.0
        for j, a, b in zip(differ, faiss_probe, torch_probe, strict=True):
            swapped = sorted(set(a) ^ set(b))
            if swapped:  # the float64 distances of the lists only one of them scanned: how far apart they are
                other_lists += 1
                d = ((centroids[swapped] - q[j].astype(np.float64)) ** 2).sum(1)
                gap = max(gap, float((d.max() - d.min()) / d.max()))
        res[f"devices_{len(devices)}"] = {
            "identical_id_lists": float((ti == fi).all(1).mean()), "identical_up_to_kth_ties": same_set,
            "differing_queries": len(differ), "differing_with_other_probed_lists": other_lists,
            "their_centroid_distance_gap": gap,
            "max_abs_distance_difference": float(np.abs(td - fd).max()),
            "index_bytes_per_entry": t.bytes_per_entry(),
            "with_code_and_count_tables": t.bytes_per_entry() + 2 + (4 if r.counts is not None else 0),
            "ms_per_16q": 1e3 * best_of(lambda t=t: t.search(q[:16], 10)),
            "faiss_ms_per_16q": 1e3 * best_of(lambda: r.index.search(q[:16], 10))}
    return res


def large_build(out: Path, entries: int, hnsw_above: int | None, queries: int, budget: str = "4G") -> dict:
    """A large random-code index built under a 4 GiB budget in a fresh process (module docstring, item 10)."""
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.recall import queries_per_second, recall_at_k
    from arrag.retrieval.retriever import PatchRetriever

    t0 = time.perf_counter()
    store = random_code_store(out / f"large_store_{entries}", entries, seed=3)
    store_seconds = time.perf_counter() - t0
    folder = out / f"large_{entries}"
    extra = "" if hnsw_above is None else f", hnsw_above={hnsw_above}"
    code = ("from arrag.build_retriever.build_index import build_index\n"
            f"m = build_index({str(store)!r}, {str(folder)!r}, memory_budget={budget!r}, overwrite=True{extra})\n")
    t0 = time.perf_counter()
    [(rss, printed)] = finish([run_python(code)])
    seconds = time.perf_counter() - t0
    r = PatchRetriever.load(folder, verify=False)
    st = CodeStore.open(store)
    q = sample_entry_keys(st, queries, seed=1)
    t0 = time.perf_counter()
    recall = recall_at_k(r, st, q, 10)
    return {"entries": r.entries, "budget": budget, "store_seconds": store_seconds, "build_seconds": seconds,
            "build_cpu_seconds": float(printed.split("CPU_S")[-1].split()[0]), "peak_rss_gib": rss / 2**30,
            "factory": r.manifest["factory"], "nprobe": r.nprobe, "nprobe_tuning": r.manifest.get("nprobe_tuning"),
            "disk_bytes_per_entry": folder_bytes(folder) / r.entries, "recall@10": recall,
            "recall_seconds": time.perf_counter() - t0, "queries_per_s_batch16": queries_per_second(r, q, 10, 16),
            "printed": [line for line in printed.splitlines() if line.startswith("[build-index]")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000, help="database images (210 entries each; default 5000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--out", default="bench/out/retrieval")
    ap.add_argument("--scale-entries", type=int, default=10_000_000, help="entries of item 5 (0 skips it)")
    ap.add_argument("--exchange-entries", type=int, default=2_000_000, help="entries of item 8 (0 skips it)")
    ap.add_argument("--large-entries", type=int, default=100_000_000, help="entries of item 10 (0 skips it)")
    ap.add_argument("--large-hnsw-above", type=int, default=None,
                    help="item 10's --hnsw-above (default: build-index's, 50M)")
    ap.add_argument("--large-budget", default="4G", help="item 10's --memory-budget (default 4G)")
    ap.add_argument("--only", default=None, choices=["exchange", "torch-code-pq", "large"],
                    help="run only this item (torch-code-pq needs item 7's index from an earlier run)")
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"torch_threads": torch.get_num_threads()}
    if args.only == "exchange":
        print_exchange(exchange_build(out, args.exchange_entries))
        return
    if args.only == "torch-code-pq":
        has_item_7 = (out / "idx_code_pq" / "manifest.json").exists()
        print_torch_code_pq(torch_code_pq(make_store(out, args.images, args.workers) if has_item_7 else None, out))
        return
    if args.only == "large":
        print_large(large_build(out, args.large_entries, args.large_hnsw_above, args.queries, args.large_budget))
        return

    result["key_construction"] = kc = key_throughput()
    print(f"1. key construction: {kc['keys_gb_s']:.2f} GB/s vs np.copy {kc['copy_gb_s']:.2f} GB/s "
          f"-> ratio {kc['ratio']:.2f} (target >= 0.5)")

    store = make_store(out, args.images, args.workers)
    st = CodeStore.open(store)
    h, w = st.grid
    code_bytes = sum((store / s["codes"]).stat().st_size for s in st.manifest["shards"])
    result["store"] = sb = {"images": st.num_images, "grid": [h, w], "bytes": code_bytes,
                            "bytes_per_image": code_bytes / st.num_images,
                            "bytes_per_token": code_bytes / (st.num_images * h * w),
                            "bytes_per_384px_image_at_2B_per_token": 2 * 24 * 24,
                            "original_hdf5_bytes_per_384px_image": 576 * 4 + 576 * 8 * 4}
    print(f"3. code store: {sb['bytes_per_token']:.3f} bytes/token, {sb['bytes_per_image']:.0f} bytes per "
          f"{h}x{w} image (a 384-px image: {sb['bytes_per_384px_image_at_2B_per_token']} B vs "
          f"{sb['original_hdf5_bytes_per_384px_image']} B in the original layout)")

    shards = len(st.manifest["shards"])
    small = sub_store(store, out / "store_half", max(1, shards // 2))
    rss = {"half": build_rss(small, out / "idx_half", "IVF1024,PQ8x4"),
           "full": build_rss(store, out / "idx_full", "IVF1024,PQ8x4")}
    result["build_rss"] = rss
    for name, r in rss.items():
        print(f"2. build-index {name:4}: {r['entries']:>9,} entries, peak RSS {r['peak_rss_mb']:.0f} MiB, index "
              f"{r['index_mb']:.0f} MiB, RSS - index {r['rss_minus_index_mb']:.0f} MiB ({r['seconds']:.1f} s)")
    growth = rss["full"]["rss_minus_index_mb"] / rss["half"]["rss_minus_index_mb"]
    print(f"   RSS - index grows {growth:.2f}x for {rss['full']['entries'] / rss['half']['entries']:.1f}x entries "
          "(target: flat)")

    from arrag.build_retriever.build_index import build_index
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.recall import queries_per_second, recall_at_k
    from arrag.retrieval.retriever import PatchRetriever

    auto_dir = out / "idx_auto"
    if needs_build(auto_dir, dedup=True):
        build_index(store, auto_dir, overwrite=True)
    r = PatchRetriever.load(auto_dir)
    queries = sample_entry_keys(st, args.queries, seed=1)
    recall = recall_at_k(r, st, queries, 10)
    qps = {b: queries_per_second(r, queries, 10, b) for b in (1, 16, 64)}
    result["search"] = {"entries": r.entries, "factory": r.manifest["factory"], "nprobe": r.nprobe,
                        "recall@10": recall, "queries_per_s": qps, "target_recall": 0.9}
    print(f"4. {r.manifest['factory']} over {r.entries:,} entries, nprobe {r.nprobe}: recall@10 {recall:.3f} "
          f"(target >= 0.9); queries/s " + ", ".join(f"batch {b}: {v:,.0f}" for b, v in qps.items()))

    result["dedup"] = dd = dedup_vs_full(store, out, args.queries)
    for name in ("dedup", "full"):
        d = dd[name]
        print(f"6. {name:5}: {d['entries']:>9,} entries, {d['factory']} nprobe {d['nprobe']}, imbalance "
              f"{d.get('imbalance_factor', float('nan')):.2f} (largest list {d.get('largest_list', 0):,}), "
              f"{d['distinct_codes@10']:.1f} distinct codes per top-10, recall@10 {d['recall@10']:.3f}, search "
              + ", ".join(f"k {k}: {v:.2f} ms" for k, v in d["ms_per_step_16q"].items()) + " per 16 queries")
    print("   search time de-duplicated / full: " + ", ".join(f"k {k}: {v:.2f}x"
                                                          for k, v in dd["search_time_ratio"].items())
          + " (target: imbalance <= 3 de-duplicated)")

    result["code_pq"] = cp = code_pq_vs_flat(store, out, args.queries)
    for name in ("ivf_flat", "code_pq"):
        d = cp[name]
        print(f"7. {d['factory']:15} nprobe {d['nprobe']}: {d['index_bytes_per_entry']:.1f} index bytes/entry, "
              f"recall@10 {d['recall@10']:.3f}, {d['ms_per_16q_k256']:.2f} ms per 16 queries at k 256")
    print(f"   top-256: distances differ by at most {cp['max_abs_distance_difference@256']:.1e}, the same codes in "
          f"{cp['same_code_multisets@256']:.1%} of queries; bytes CodePQ / IVF-Flat: "
          f"{cp['code_pq']['index_bytes_per_entry'] / cp['ivf_flat']['index_bytes_per_entry']:.3f}")

    result["torch_code_pq"] = tc = torch_code_pq(store, out)
    print_torch_code_pq(tc)

    if args.exchange_entries:
        result["exchange"] = ex = exchange_build(out, args.exchange_entries)
        print_exchange(ex)

    if args.scale_entries:
        result["scale"] = sc = scale_build(out, args.scale_entries, args.queries)
        for name in ("processes_1", "processes_2"):
            d = sc[name]
            rss = d["peak_rss_mb"] if isinstance(d["peak_rss_mb"], float) else max(d["peak_rss_mb"].values())
            print(f"5. {name[-1]} process(es): {sc['entries']:,} entries, {d['factory']} ({d['layout']}), "
                  f"{d['seconds']:.1f} s, peak RSS {rss:.0f} MiB per process, {d['bytes_per_entry']:.1f} B/entry "
                  f"on disk, recall@10 {d['recall_at_10']:.3f} at nprobe {d['nprobe']}")
        print(f"   2 processes + merge / 1 process: {sc['ratio_2_to_1']:.2f}x (target <= 0.6; train "
              f"{sc['processes_2']['train_seconds']:.1f} s, add {sc['processes_2']['add_seconds']:.1f} s, merge "
              f"{sc['processes_2']['merge_seconds']:.1f} s)")
        c2 = sc["processes_2"]["cpu_seconds"]
        print(f"   CPU seconds: 1 process {sc['processes_1']['cpu_seconds']:.0f}; 2 processes: train "
              f"{c2['train']:.0f}, ranks {c2['rank0']:.0f} + {c2['rank1']:.0f}, merge {c2['merge']:.0f} -> on "
              f"{sc['cores']} cores the 2-process build cannot beat {sc['cpu_floor_ratio']:.2f}x")
    if args.large_entries:
        result["large"] = lg = large_build(out, args.large_entries, args.large_hnsw_above, args.queries,
                                           args.large_budget)
        print_large(lg)
    (out / "retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'retrieval.json'}")


if __name__ == "__main__":
    main()
