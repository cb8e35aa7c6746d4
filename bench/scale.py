"""Scale: per-unit costs measured on this machine, the issue-32 targets, and a projection to the paper's databases.

    .venv/bin/python bench/scale.py [--parts sample,quantizer,tars,index,rates] [--images 300000]

Measured (each part in its own process where peak memory matters):
  sample     one FAiD training sample (codes, K=10 candidates, caption) from a store of 24x24 grids (--images),
             split into 30 and into 3,000 shards: microseconds per sample (random order, steady state after every
             shard was read once) and the growth of the process's anonymous memory (RssAnon; file pages are page
             cache, reported apart); at this machine's open-file limit and under `ulimit -n 1024`, each also through
             4 DataLoader workers. Targets: <= 300 us, at most 2x apart; growth <= 100 MB.
  quantizer  peak RSS of the quantizer's training sample, 64 x 65,536 keys from a 100k-image store (code keys, and
             the distinct rows a de-duplicated build samples). Target: <= 3x the sample's bytes.
  tars       120 webdataset tars encoded under `ulimit -n 48` (every image, none skipped); 1,000 tars: seconds
             from the call to the first shard written. Target: <= 5 s.
  index      a 10M-entry index (random codes, auto factory): load with sizes only (the default above 2 GB is the
             same) and `verify-index`, which must find one flipped byte. Target: load <= 2 s.
  rates      encode (VQ-16 at 384 px, CPU, after decoding and resizing JPEGs), de-duplication + FAISS add, and
             construct-train queries, per second; bytes per image and per entry.
Then the projection: wall time, disk and RAM per stage for 1M / 12M / 70M images on 1, 8 and 32 machines like this
one (2 CPU cores, no GPU), each figure marked measured (M) or projected (P). Results: bench/out/scale/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "scale"
GRID, K = 24, 10  # Janus-Pro's 24x24 grid; FAiD's K
P = 22 * 23  # valid L targets of a 24x24 grid (506)


def _rss_anon_mib() -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB of this process, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon", "RssFile")):
            name, value = line.split(":")
            fields[name] = int(value.split()[0]) / 1024
    return fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_subprocess(part: str, *args: str, nofile: int | None = None) -> dict:
    """Run one part in a fresh process; `nofile`: its open-file limit, soft and hard (what `ulimit -n` sets)."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
    p = subprocess.run([sys.executable, __file__, "--one", part, *args], capture_output=True, text=True,
                       preexec_fn=limit)
    if p.returncode:
        raise RuntimeError(f"{part} failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- sample ----------------------------------------------------------------------------------------------------


def _training_store(folder: Path, n: int, shards: int) -> Path:
    """A captioned store of n random 24x24 grids in `shards` shards, with K=10 retrieved codes per cell (cached)."""
    from arrag.retrieval import codestore
    from arrag.train.construct import FORMAT, retrieved_name

    if (folder / "retrieved.json").is_file():
        return folder
    rng = np.random.default_rng(0)
    book = rng.normal(size=(16384, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codes = rng.integers(0, 16384, (n, GRID, GRID)).astype(np.uint16)
    words = ["a red circle", "two blue squares", "a green triangle left of a yellow diamond"]
    store = codestore.write_store(folder, codes, book, shard_size=-(-n // shards),
                                  captions=[words[i % 3] for i in range(n)])
    for s, shard in enumerate(store.manifest["shards"]):
        np.save(folder / retrieved_name(s), rng.integers(-1, 16384, (shard["count"], GRID * GRID, K), dtype=np.int16))
    (folder / "retrieved.json").write_text(json.dumps({"format": FORMAT, "k": K, "vq_fingerprint": store.fingerprint}))
    return folder


def part_sample(images: int, shards: int, samples: int, workers: int = 0) -> dict:
    """In this process: open the training set the way train-faid does and time random samples; with `workers`,
    also the items per second a DataLoader of that many worker processes delivers (each reads on its own)."""
    from arrag.janus import Prompter
    from arrag.retrieval.codestore import CodeStore
    from arrag.train.construct import load_retrieved
    from arrag.train.train_faid import FaidTrainSet

    folder = _training_store(OUT / f"train-{images}-{shards}", images, shards)
    prompter = Prompter.from_folder(ROOT / "arrag" / "demo" / "assets" / "base")
    anon0, file0 = _rss_anon_mib()
    store = CodeStore.open(folder)
    data = FaidTrainSet(store, load_retrieved(folder, store, K), prompter, seed=0, cfg_drop=0.0, max_text_len=64)
    order = np.random.default_rng(1).integers(0, len(data), 2 * samples)
    t0 = time.perf_counter()
    for i in range(len(store.manifest["shards"])):  # open every shard's maps once (what a first pass does)
        data[int(store.bounds[i])]
    warm = time.perf_counter() - t0

    def read(i: int) -> None:  # what the target counts: one image's codes, candidates and caption
        store.gather(np.array([i]))
        np.asarray(data.retrieved[i])
        store.caption(i)

    t0 = time.perf_counter()
    for i in order[:samples]:
        read(int(i))
    per_read = (time.perf_counter() - t0) / samples
    t0 = time.perf_counter()
    for i in order[samples:]:  # other images: pages not read yet either
        data[int(i)]
    per_item = (time.perf_counter() - t0) / samples
    anon1, file1 = _rss_anon_mib()
    out = {"images": images, "shards": shards, "us_per_read": round(per_read * 1e6, 1),
           "us_per_item": round(per_item * 1e6, 1), "first_open_of_every_shard_s": round(warm, 2),
           "rss_anon_growth_mib": round(anon1 - anon0, 1), "rss_file_growth_mib": round(file1 - file0, 1),
           "files_open": len(getattr(store, "_reader", ())), "maps_open": len(store._maps),
           "open_file_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    if workers:
        import torch

        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, collate_fn=lambda x: x,
                                             sampler=order.tolist(), persistent_workers=False)
        it, t0, n = iter(loader), 0.0, 0
        for n, _ in enumerate(it, 1):
            if n == len(order) // 2:  # every worker is up and has read; time the second half
                t0 = time.perf_counter()
        out["workers"] = workers
        out["us_per_item_with_workers"] = round((time.perf_counter() - t0) / (n - len(order) // 2) * 1e6, 1)
    return out


# -- quantizer ---------------------------------------------------------------------------------------------------


def part_quantizer(images: int, keys: int, dedup: bool) -> dict:
    from arrag.retrieval import codestore
    from arrag.retrieval.codestore import CodeStore
    from arrag.retrieval.keys import row_keys, sample_distinct_rows, sample_entry_keys

    folder = OUT / f"quant-{images}"
    if not (folder / "manifest.json").is_file():
        rng = np.random.default_rng(0)
        book = rng.normal(size=(16384, 8)).astype(np.float32)
        book /= np.linalg.norm(book, axis=1, keepdims=True)
        # Blocks of repeated codes, so that de-duplication has copies to find, as in images.
        codes = np.repeat(np.repeat(rng.integers(0, 16384, (images, GRID // 2, GRID // 2)), 2, 1), 2, 2)
        codestore.write_store(folder, codes.astype(np.uint16), book, shard_size=4096)
    store = CodeStore.open(folder)
    before = _peak_mib()
    t0 = time.perf_counter()
    if dedup:
        sample = row_keys(sample_distinct_rows(store, keys, 0)[0], store.codebook())
    else:
        sample = sample_entry_keys(store, keys, 0)
    seconds = time.perf_counter() - t0
    return {"images": images, "keys": len(sample), "dedup": dedup, "sample_mib": round(sample.nbytes / 2**20, 1),
            "peak_rss_mib": round(_peak_mib(), 1), "rss_before_mib": round(before, 1),
            "peak_over_sample": round(_peak_mib() / (sample.nbytes / 2**20), 2), "seconds": round(seconds, 1)}


# -- tars --------------------------------------------------------------------------------------------------------


def _tars(folder: Path, count: int, per_tar: int) -> Path:
    import io
    import tarfile

    from PIL import Image

    from arrag.demo.shapes import ShapesWorld

    folder.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld("database", size=64)
    pngs = []
    for i in range(per_tar * 4):
        buf = io.BytesIO()
        Image.fromarray(world.image(i)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    for t in range(count):
        path = folder / f"{t:05d}.tar"
        if path.exists():
            continue
        with tarfile.open(path, "w") as tf:
            for j in range(per_tar):
                for ext, data in (("png", pngs[(t + j) % len(pngs)]), ("txt", b"a red circle")):
                    info = tarfile.TarInfo(f"{t:05d}{j:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


def part_first_shard(tars: int) -> dict:
    """Seconds from calling encode to its first shard written, over `tars` tars (in this process)."""
    from arrag.build_retriever import encode as enc

    folder = _tars(OUT / f"tars-{tars}", tars, 4)
    vq = _vq_file("VQ-tiny-16")
    first, t0 = [], time.perf_counter()
    flush = enc._flush

    def timed(*a, **k):
        flush(*a, **k)
        if not first:
            first.append(time.perf_counter() - t0)
            raise KeyboardInterrupt  # enough: the first shard is what is measured

    enc._flush = timed
    out = OUT / f"store-tars-{tars}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    try:
        enc.encode(str(folder), out, vq, image_size=64, num_workers=0, progress=False, device="cpu")
    except KeyboardInterrupt:
        pass
    return {"tars": tars, "seconds_to_first_shard": round(first[0], 2)}


def part_low_ulimit(tars: int, limit: int) -> dict:
    """Encode `tars` tars under RLIMIT_NOFILE `limit` in a child process; every image must be encoded."""
    folder = _tars(OUT / f"tars-{tars}", tars, 3)
    out = OUT / f"store-ulimit-{tars}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    code = (f"import resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, "
            "resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\nfrom arrag.cli import main\nsys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, "encode", str(folder), "--out", str(out), "--vq",
                        str(_vq_file("VQ-tiny-16")), "--image-size", "64", "--device", "cpu"],
                       capture_output=True, text=True)
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    return {"tars": tars, "ulimit_n": limit, "exit": p.returncode, "images_expected": tars * 3,
            "images_encoded": manifest.get("num_images"), "skipped": manifest.get("num_skipped"),
            "error": p.stderr.strip().splitlines()[-1] if p.returncode else None}


def _vq_file(preset: str) -> Path:
    import torch

    from arrag.vq import VQModel

    path = OUT / f"{preset}.safetensors"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        VQModel(preset).save(path)
    return path


# -- index -------------------------------------------------------------------------------------------------------


def _index(entries: int) -> tuple[Path, dict]:
    """A de-duplicated auto index over a random-code store of about `entries` entries (cached)."""
    from arrag.build_retriever.build_index import build_index
    from arrag.retrieval import codestore

    folder, store = OUT / f"index-{entries}", OUT / f"store-{entries}"
    if not (folder / "manifest.json").is_file():
        rng = np.random.default_rng(0)
        book = rng.normal(size=(16384, 8)).astype(np.float32)
        book /= np.linalg.norm(book, axis=1, keepdims=True)
        if not (store / "manifest.json").is_file():
            codestore.write_store(store, rng.integers(0, 16384, (-(-entries // P), GRID, GRID)).astype(np.uint16),
                                  book, shard_size=4096)
        t0 = time.perf_counter()
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        build_index(store, folder, progress=True)
        (folder / "build_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return folder, json.loads((folder / "manifest.json").read_text())


def part_index(entries: int) -> dict:
    import shutil

    from arrag.cli import main
    from arrag.retrieval.retriever import PatchRetriever

    folder, manifest = _index(entries)
    t0 = time.perf_counter()
    r = PatchRetriever.load(folder, verify=False)  # what a load above --hash-below does
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rc_clean = main(["verify-index", str(folder)])
    verify_s = time.perf_counter() - t0
    damaged = OUT / "index-flipped"
    subprocess.run(["rm", "-rf", str(damaged)], check=True)
    shutil.copytree(folder, damaged)
    path = damaged / "values.npy"
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    rc_flipped = main(["verify-index", str(damaged)])
    shutil.rmtree(damaged)
    disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    search = sum((folder / n).stat().st_size for n in ("index.faiss", "values.npy", "counts.npy")
                 if (folder / n).is_file())  # what a searching process holds
    return {"entries": r.entries, "factory": manifest["factory"], "load_sizes_only_s": round(load_s, 2),
            "search_bytes_per_entry": round(search / r.entries, 1),
            "verify_index_s": round(verify_s, 1), "verify_clean_exit": rc_clean, "verify_flipped_exit": rc_flipped,
            "bytes_per_entry_on_disk": round(disk / r.entries, 1),
            "build_seconds": float((folder / "build_seconds.txt").read_text())}


# -- rates -------------------------------------------------------------------------------------------------------


def part_rates(entries: int) -> dict:
    import io

    import torch
    from PIL import Image

    from arrag.build_retriever.sources import Item, decode
    from arrag.demo.shapes import ShapesWorld
    from arrag.image_io import resize_crop, to_tensor
    from arrag.retrieval.codestore import CodeStore
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.retriever import PatchRetriever
    from arrag.vq import VQModel

    torch.set_num_threads(os.cpu_count() or 1)
    world = ShapesWorld("database", size=512)
    jpgs = []
    for i in range(16):
        buf = io.BytesIO()
        Image.fromarray(world.image(i)).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    t0 = time.perf_counter()
    arrays = [np.asarray(resize_crop(decode(Item("k", b, None, None, None, "jpg")), 384)) for b in jpgs * 4]
    decode_per_s = len(arrays) / (time.perf_counter() - t0)  # one core: a DataLoader worker's rate
    vq = VQModel("VQ-16").eval()
    x = to_tensor(np.stack(arrays[:8]))
    with torch.no_grad():
        vq.encode_to_codes(x[:2])
        t0 = time.perf_counter()
        vq.encode_to_codes(x)
        encode_per_s = len(x) / (time.perf_counter() - t0)  # every core of this machine
    folder, manifest = _index(entries)
    build_s = float((folder / "build_seconds.txt").read_text())
    r = PatchRetriever.load(folder, verify=False)
    store = CodeStore.open(manifest["store"])
    queries = sample_entry_keys(store, 50_000, 3)
    t0 = time.perf_counter()
    for s in range(0, len(queries), 1012):  # construct-train's batches: two images' worth of targets
        r.search(queries[s:s + 1012], K)
    queries_per_s = len(queries) / (time.perf_counter() - t0)
    return {"decode_resize_per_s_per_core": round(decode_per_s, 1), "vq16_encode_384_per_s": round(encode_per_s, 2),
            "index_build_entries_per_s": round(manifest["occurrences"] / build_s),
            "construct_train_queries_per_s": round(queries_per_s),
            "store_bytes_per_image": round(sum((Path(manifest["store"]) / s["codes"]).stat().st_size
                                               for s in store.manifest["shards"]) / store.num_images, 1),
            "index_factory": manifest["factory"], "nprobe": manifest["nprobe"]}


# -- projection --------------------------------------------------------------------------------------------------


CODE_PQ_SEARCH_BYTES = 15 + 2 + 4  # per entry, searching: 4 x 14-bit codes + the id, the value, the count
CODE_PQ_DISK_BYTES = CODE_PQ_SEARCH_BYTES + 8 + 8 + 4  # + entry codes, CSR offset, one image id per occurrence


def projection(r: dict, idx: dict) -> list[dict]:
    """Per stage, for 1M / 12M / 70M images on 1 / 8 / 32 machines like this one (2 CPU cores, no GPU): hours,
    disk and RAM, projected from the measured rates, with no de-duplication (ratio 1, the worst case). The index
    is the measured IVF-Flat build rate; its size is CodePQ's (what `--factory auto` picks for code keys beyond
    the memory budget), from the file layout."""
    rows = []
    per_image = r["store_bytes_per_image"] + 100 + 8  # codes, a caption of about 100 bytes and its offset
    for images in (1_000_000, 12_000_000, 70_000_000):
        occ = images * P
        train = images // 10  # the original's 10% training split
        for machines in (1, 8, 32):
            rows.append({
                "images": images, "machines": machines,
                "encode_h": images / min(r["vq16_encode_384_per_s"], 2 * r["decode_resize_per_s_per_core"])
                / machines / 3600,
                "index_h": occ / r["index_build_entries_per_s"] / machines / 3600,
                "construct_train_h": train * P / r["construct_train_queries_per_s"] / machines / 3600,
                "store_gb": images * per_image / 1e9, "index_gb": occ * CODE_PQ_DISK_BYTES / 1e9,
                "trainset_gb": train * GRID * GRID * K * 2 / 1e9,
                "index_ram_gb_per_searcher": occ * CODE_PQ_SEARCH_BYTES / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="sample,quantizer,tars,index,rates")
    ap.add_argument("--images", type=int, default=300_000, help="training-store images for the sample part")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--entries", type=int, default=10_000_000, help="index entries for the index and rates parts")
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        part, *rest = args.one
        fn = {"sample": part_sample, "quantizer": part_quantizer, "first_shard": part_first_shard,
              "ulimit": part_low_ulimit, "index": part_index, "rates": part_rates}[part]
        print(json.dumps(fn(*[json.loads(x) for x in rest])))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    result_path = OUT / "scale.json"
    results = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if "sample" in parts:
        # The machine's own open-file limit (raised to its hard limit by arrag), and 1,024 (`ulimit -n 1024`, the
        # usual Linux default, soft and hard: nothing to raise), each without and with 4 DataLoader workers.
        results["sample"] = [_in_subprocess("sample", str(args.images), str(s), str(args.samples), str(w),
                                            nofile=limit)
                             for limit in (None, 1024) for w in (0, 4) for s in (30, 3000)]
        for row in results["sample"]:
            print(f"[scale] training sample, {row['shards']:>5} shards, open-file limit {row['open_file_limit']:,}: "
                  f"codes + candidates + caption {row['us_per_read']} us (target <= 300), the whole item (shuffle, "
                  f"tokenised prompt) {row['us_per_item']} us"
                  + (f", {row['us_per_item_with_workers']} us per item from {row['workers']} DataLoader workers"
                     if row.get("workers") else "")
                  + f"; anonymous memory +{row['rss_anon_growth_mib']} MiB (target <= 100), file pages "
                  f"+{row['rss_file_growth_mib']} MiB; {row['files_open']} files open")
        rows = results["sample"]
        for a, b in zip(rows[0::2], rows[1::2], strict=True):
            print(f"[scale] 3,000 vs 30 shards at open-file limit {a['open_file_limit']:,}"
                  + (f" with {a['workers']} workers" if a.get("workers") else "")
                  + f": {b['us_per_read'] / a['us_per_read']:.2f}x read, "
                  f"{b['us_per_item'] / a['us_per_item']:.2f}x item"
                  + (f", {b['us_per_item_with_workers'] / a['us_per_item_with_workers']:.2f}x with workers"
                     if a.get("workers") else "") + " (target <= 2)")
    if "quantizer" in parts:
        results["quantizer"] = [_in_subprocess("quantizer", "100000", str(64 * 65536), json.dumps(d))
                                for d in (False, True)]
        for row in results["quantizer"]:
            print(f"[scale] quantizer sample ({'distinct rows' if row['dedup'] else 'entries'}): {row['keys']:,} keys "
                  f"= {row['sample_mib']} MiB; peak RSS {row['peak_rss_mib']} MiB = {row['peak_over_sample']}x the "
                  f"sample (target <= 3), {row['seconds']} s")
    if "tars" in parts:
        results["tars"] = {"ulimit": _in_subprocess("ulimit", "120", "48"),
                           "first_shard": _in_subprocess("first_shard", "1000")}
        u, f = results["tars"]["ulimit"], results["tars"]["first_shard"]
        print(f"[scale] 120 tars under ulimit -n 48: exit {u['exit']}, {u['images_encoded']} of {u['images_expected']} "
              f"images encoded, {u['skipped']} skipped; 1,000 tars: first shard after {f['seconds_to_first_shard']} s "
              "(target <= 5)")
    if "index" in parts:
        results["index"] = _in_subprocess("index", str(args.entries))
        i = results["index"]
        print(f"[scale] {i['entries']:,}-entry index ({i['factory']}, built in {i['build_seconds']} s): load with "
              f"sizes only {i['load_sizes_only_s']} s (target <= 2); verify-index {i['verify_index_s']} s, exit "
              f"{i['verify_clean_exit']} clean, {i['verify_flipped_exit']} with one flipped byte (2 = found)")
    if "rates" in parts:
        results["rates"] = _in_subprocess("rates", str(args.entries))
        print(f"[scale] rates: {json.dumps(results['rates'])}")
    result_path.write_text(json.dumps(results, indent=2) + "\n")
    if "rates" in results and "index" in results:
        rows = projection(results["rates"], results["index"])
        results["projection"] = rows
        result_path.write_text(json.dumps(results, indent=2) + "\n")
        print("\n| images | machines | encode on CPUs (P) | build-index (P) | construct-train (P) | store disk (P) | "
              "index disk, CodePQ (P) | index RAM per searching process (P) | FAiD training set disk (P) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['images'] / 1e6:g}M | {row['machines']} | {row['encode_h']:,.1f} h | "
                  f"{row['index_h']:,.1f} h | {row['construct_train_h']:,.1f} h | {row['store_gb']:,.0f} GB | "
                  f"{row['index_gb']:,.0f} GB | "
                  f"{row['index_ram_gb_per_searcher']:,.0f} GB | {row['trainset_gb']:,.0f} GB |")


if __name__ == "__main__":
    main()
