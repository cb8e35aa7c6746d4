"""`arrag build-index` and `arrag merge-index`: code store -> (key, value) entries -> FAISS index.

Key = the neighbours' normalised codebook vectors, concatenated (`--key-source code`), or their stored
pre-quantisation latents (`latent`, as the original project did). Value = the code at the target.

De-duplication (default with code keys, `--no-dedup` to keep every occurrence): each distinct (key, value)
is stored once with its count and the images it came from (retrieval.dedup); searches expand hits by
their counts, so results equal the full index's, while the index is smaller and its IVF lists balanced.
Without it, entry e is image e // P at valid position e % P.

One process: the seeded training sample trains the quantizer, entries are added in streaming chunks, and
the folder is written under a temporary name and renamed. Several processes or machines, two ways:
  torchrun / accelerate launch (a process group, arrag.distributed): rank 0 trains the quantizer into
      <out>/parts/ and broadcasts the plan; every rank reads 1/W of the store and sends each row to the rank
      its hash names (all_to_all), adds what it owns into <out>/parts/rank-i-of-n/, and after a monitored
      barrier rank 0 merges;
  a job array (`--shard i/n`, no group; nothing waits): `--train-only` first, then each rank adds its part
      (a de-duplicating rank reads the whole store to find its rows), then `arrag merge-index <out>`.
The merge joins the parts: IVF indexes into one index with on-disk inverted lists (FAISS's own merge, read by
memory map), other factories as index shards. An IVF index's nprobe is then tuned to --target-recall against
probing every list, unless --nprobe fixes it.
"""

from __future__ import annotations

import errno
import json
import mmap
import resource
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from arrag import fileops
from arrag.distributed import DEFAULT_TIMEOUT, Group, join
from arrag.errors import ArragError
from arrag.retrieval import index as faiss_index
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.dedup import dedup as dedup_rows
from arrag.retrieval.dedup import entry_rows, place
from arrag.retrieval.keys import KEY_SOURCES, grid_entries, row_keys, sample_distinct_rows, sample_entry_keys
from arrag.retrieval.neighborhood import get_neighborhood, keys_for_grid
from arrag.retrieval.retriever import manifest_digest

INDEX_FORMAT = "arrag-index/3"  # /3: the manifest records its own digest (manifest_sha256)
# Every file build-index writes into its folder: the only files `--overwrite` may remove.
INDEX_FILES = (r"manifest\.json", r"index\.faiss", r"values\.npy", r"counts\.npy", r"entry_codes\.npy",
               r"entry_image_offsets\.npy", r"entry_images\.npy", r"lists\.ivfdata", r"parts/.+", r"spill/.+")
ARRAYS = ("values.npy", "counts.npy", "entry_codes.npy", "entry_image_offsets.npy", "entry_images.npy")
SPILL_ROWS = 8_000_000  # rows per de-duplication bucket (~0.7 GB of work memory with the L neighbourhood)
ADD_ROWS = 1_000_000  # keys made and added at a time


def is_index_folder(folder: Path) -> bool:
    """True when `folder` holds an index or the parts of one that build-index made."""
    for manifest in (folder / "manifest.json", folder / "parts" / "plan.json"):
        try:
            if str(json.loads(manifest.read_text()).get("format", "")).startswith("arrag-index/"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def check_out_folder(store_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that would destroy the input store or anything build-index did not write."""
    if fileops.same_or_inside(store_dir, out):
        raise ArragError(f"--out {out} is or contains the code store {store_dir}; pass a folder outside the store")
    fileops.check_replaceable(out, what="index", is_ours=is_index_folder(out), owned=INDEX_FILES,
                              overwrite=overwrite)


@dataclass
class BuildPlan:
    """What every process of one build agrees on (parts/plan.json); written by whoever trains the quantizer."""

    format: str
    store: str
    vq_fingerprint: str
    shape: str
    key_source: str
    dedup: bool
    factory: str
    factory_reason: str
    dim: int
    grid: list[int]
    images: int
    entries_per_image: int
    occurrences: int
    estimated_entries: int
    nprobe: int | None  # given with --nprobe; None: tuned to target_recall once the index is built
    target_recall: float
    seed: int
    train_size: int
    memory_budget: int

    def check_same(self, other: BuildPlan) -> None:
        mine, theirs = asdict(self), asdict(other)
        # The budget only chose the factory, which the plan records (and "auto" reads each machine's memory).
        skip = {"factory_reason", "estimated_entries", "train_size", "memory_budget"} | (
            {"factory"} if other.factory == "auto" else set())
        diff = [k for k in mine if k not in skip and mine[k] != theirs[k]]
        if diff:
            raise ArragError(f"this process's settings differ from the build's plan ({', '.join(diff)}); every process "
                             "of a build takes the same flags")


def build_index(store_dir: str | Path, out: str | Path, *, shape: str = "L", key_source: str = "code",
                factory: str = "auto", memory_budget: str | int = "auto", nprobe: int | None = None,
                train_size: int | None = None, seed: int = 0, chunk_images: int = 1024, gpus=None,
                overwrite: bool = False, progress: bool = True, dedup: bool = True, shard: str | None = None,
                train_only: bool = False, target_recall: float = 0.95, dist_timeout: float = DEFAULT_TIMEOUT,
                hnsw_above: int | None = None) -> dict:
    """Build the patch index of a code store into folder `out` (see the module docstring).

    Returns the manifest (one process, and rank 0 of a process group), the plan (`train_only`) or this part's
    record (the other ranks).
    """
    t0 = time.time()
    store = CodeStore.open(store_dir)
    nb = get_neighborhood(shape)
    if key_source not in KEY_SOURCES:
        raise ArragError(f"--key-source {key_source!r}: choose code or latent")
    if key_source == "latent" and not store.has_latents:
        raise ArragError(f"--key-source latent needs latents in {store.folder}: encode with --save-latents")
    for flag, value, low in (("--seed", seed, 0), ("--chunk-images", chunk_images, 1), ("--nprobe", nprobe, 1),
                             ("--train-size", train_size, 1), ("--hnsw-above", hnsw_above, 1)):
        if value is not None and value < low:
            raise ArragError(f"{flag} must be >= {low}, got {value}")
    if not 0 < target_recall <= 1:
        raise ArragError(f"--target-recall must be in (0, 1], got {target_recall}")
    group, rank, world = (None, 0, 1) if train_only else join(shard, dist_timeout)
    out = Path(out)
    parallel = world > 1 or train_only
    if not parallel or rank == 0:
        # A rerun of a parallel build resumes it (its plan is checked against these settings below); with
        # --overwrite rank 0 (or --train-only) starts it over.
        if not (parallel and (out / "parts" / "plan.json").is_file() and not overwrite):
            check_out_folder(store.folder, out, overwrite)
            if parallel and out.exists():
                fileops.remove_owned_dir(out, what="index", owned=INDEX_FILES)
    h, w = store.grid
    p = len(nb.positions(h, w))
    if p == 0:
        raise ArragError(f"a {h}x{w} grid has no valid target for the {nb.name!r} neighbourhood")
    if store.num_images == 0:
        raise ArragError(f"code store {store.folder} holds no images")
    dedup = dedup and key_source == "code"  # latent keys are continuous: copies are not exact
    hnsw_given, hnsw_above = hnsw_above is not None, faiss_index.HNSW_ABOVE if hnsw_above is None else hnsw_above
    kmeans_device = _torch_kmeans_device(gpus)
    gpu_ids = [] if kmeans_device else faiss_index.parse_gpus(gpus)
    plan_args = dict(store=store, nb=nb, key_source=key_source, dedup=dedup, factory=factory,
                     memory_budget=memory_budget, nprobe=nprobe, target_recall=target_recall, train_size=train_size,
                     seed=seed, gpus=gpu_ids, kmeans_device=kmeans_device, hnsw_above=hnsw_above,
                     hnsw_given=hnsw_given, progress=progress)
    if not parallel:
        plan, index = _plan_and_train(**plan_args)
        return _build_single(store, out, plan, index, chunk_images, overwrite, progress, t0, gpu_ids)

    parts = out / "parts"
    if group is not None:
        return _build_in_group(group, store, out, plan_args, chunk_images, progress)
    if train_only:  # the first step of a job array: train the quantizer, write the plan, stop
        if not (parts / "plan.json").is_file():
            plan, index = _plan_and_train(**plan_args)
            _write_plan(parts, plan, index)
        return json.loads((parts / "plan.json").read_text())
    if not (parts / "plan.json").is_file():  # a job array's rank waits for nothing
        raise ArragError(f"no trained quantizer in {parts}: run `arrag build-index {store.folder} --out {out} "
                         "--train-only` first, then the ranks (--shard i/n), then `arrag merge-index`")
    plan = BuildPlan(**json.loads((parts / "plan.json").read_text()))
    plan.check_same(_plan_and_train(**plan_args, train=False)[0])
    return _build_rank(store, out, plan, rank, world, chunk_images, progress)


def _torch_kmeans_device(gpus) -> str | None:
    """'cuda' when GPUs are asked for (or 'auto') and CUDA is there but FAISS has no GPU support: the coarse
    k-means then runs in torch on the GPU (retrieval.kmeans) instead of on the CPU."""
    import torch

    from arrag.retrieval.torch_search import torch_devices

    if gpus in (None, "cpu", []) or faiss_index.has_gpu_faiss() or not torch.cuda.is_available():
        return None
    return torch_devices(gpus)[0]


def _write_plan(parts: Path, plan: BuildPlan, index) -> None:
    parts.mkdir(parents=True, exist_ok=True)
    faiss_index.write_index(index, parts / "trained.faiss")
    fileops.write_text(parts / "plan.json", json.dumps(asdict(plan), indent=2) + "\n")  # last: the plan is complete


def _build_in_group(group: Group, store: CodeStore, out: Path, plan_args: dict, chunk_images: int,
                    progress: bool) -> dict:
    """A build over a process group (torchrun, accelerate launch): rank 0 trains the quantizer and broadcasts the
    plan, every rank adds its part (rows exchanged with all_to_all when de-duplicating), the parts' records are
    gathered, and rank 0 merges them and writes the manifest."""
    parts, rank = out / "parts", group.rank
    plan_dict = error = None
    if rank == 0:
        try:
            if not (parts / "plan.json").is_file():
                plan, index = _plan_and_train(**plan_args)
                _write_plan(parts, plan, index)
            plan_dict = json.loads((parts / "plan.json").read_text())
        except ArragError as e:  # every rank stops with rank 0's one line, not after a timeout
            error = str(e)
    plan_dict, error = group.broadcast((plan_dict, error))
    if error is not None:
        raise ArragError(error if rank == 0 else f"rank 0 stopped the build: {error}")
    plan = BuildPlan(**plan_dict)
    plan.check_same(_plan_and_train(**plan_args, train=False)[0])
    if (out / "manifest.json").is_file():
        if progress and rank == 0:
            print(f"[build-index] {out} is already merged; nothing to do (--overwrite starts it over)")
        return json.loads((out / "manifest.json").read_text())
    # The exchange needs every rank: when any part is missing, every rank builds its part again.
    final = parts / _part_name(rank, group.world)
    if not all(group.all_gather((final / "part.json").is_file())):
        fileops.remove_owned_dir(final, what="index part", owned=(r".+",))
    record = _build_rank(store, out, plan, rank, group.world, chunk_images, progress, group)
    group.barrier("build-index: every rank's part")
    if rank != 0:
        return record
    return merge_index(out, progress)  # from the parts' records (part.json), the same as every rank's


def _plan_and_train(*, store: CodeStore, nb, key_source: str, dedup: bool, factory: str, memory_budget, nprobe,
                    target_recall: float,
                    train_size, seed: int, gpus, progress: bool, train: bool = True, kmeans_device: str | None = None,
                    hnsw_above: int = faiss_index.HNSW_ABOVE, hnsw_given: bool = False):
    """The plan of a build and (when `train`) the trained, empty index. Without `train` (a rank checking its
    flags against rank 0's plan) nothing is sampled, and an automatic factory is left for the plan to say.
    A flag the user gave that the chosen index does not use is said, with why (`hnsw_given`: --hnsw-above was)."""
    h, w = store.grid
    p = len(nb.positions(h, w))
    occurrences = store.num_images * p
    codebook = store.codebook()
    d = nb.key_dim(codebook.shape[1])
    budget = faiss_index.parse_bytes(memory_budget)
    estimated = occurrences
    if dedup and train:  # the distinct share of a seeded sample sizes the index
        estimated = max(1, int(occurrences * sample_distinct_rows(store, min(100_000, occurrences), seed, nb)[1]))
    reason = "given with --factory"
    if factory == "auto" and train:
        factory, reason = faiss_index.choose_factory(estimated, d, budget,
                                                     codebook.shape if key_source == "code" else None, hnsw_above,
                                                     dedup)
    index = None
    if factory != "auto":
        index = faiss_index.create_index(factory, d, codebook if key_source == "code" else None)
    n_train = 0
    nlist = faiss_index.nlist_of(index) if index is not None else None
    if nlist and train and estimated < nlist:
        raise ArragError(f"--factory {factory}: {nlist:,} inverted lists need at least {nlist:,} entries to train "
                         f"(FAISS recommends {39 * nlist:,}), but {store.folder} gives about {estimated:,}; use "
                         f"fewer lists (e.g. IVF{faiss_index.default_nlist(estimated)}) or --factory auto")
    if train:
        _check_search_memory(factory, estimated, occurrences, d, budget, memory_budget, dedup,
                             codebook.shape if key_source == "code" else None, progress)
        _say_unused_flags(factory, reason, index, hnsw_above if hnsw_given else None, nprobe, train_size, estimated)
    if train and not index.is_trained:
        n_train = train_size if train_size is not None else faiss_index.train_sample_size(index, estimated)
        n_train = min(max(n_train, 1), occurrences)
        if dedup:  # distinct keys: k-means cannot split copies of one point, so they would crowd a few lists
            sample = row_keys(sample_distinct_rows(store, n_train, seed, nb)[0], codebook)
        else:
            sample = sample_entry_keys(store, n_train, seed, nb, key_source)
        n_train = len(sample)
        if nlist and n_train < nlist:
            raise ArragError(f"--factory {factory}: {nlist:,} inverted lists need at least {nlist:,} training keys, "
                             f"got {n_train:,}; raise --train-size or use fewer lists")
        if progress:
            print(f"[build-index] {occurrences:,} entries ({store.num_images:,} images x {p} positions)"
                  + (f", about {estimated:,} distinct" if dedup else "") + f", d={d}: {factory} ({reason}); "
                  f"training on {n_train:,} sampled keys (seed {seed})" + (f" with GPUs {gpus}" if gpus else "")
                  + (f" with torch k-means on {kmeans_device}" if kmeans_device else ""))
        faiss_index.train(index, sample, gpus, kmeans_device, seed)
    elif train and progress:  # nothing to train (Flat, a trained index): the choice is still said
        print(f"[build-index] {occurrences:,} entries ({store.num_images:,} images x {p} positions)"
              + (f", about {estimated:,} distinct" if dedup else "") + f", d={d}: {factory} ({reason})")
    plan = BuildPlan(format=INDEX_FORMAT, store=str(store.folder.resolve()), vq_fingerprint=store.fingerprint,
                     shape=nb.name, key_source=key_source, dedup=dedup, factory=factory, factory_reason=reason, dim=d,
                     grid=[h, w], images=store.num_images, entries_per_image=p, occurrences=occurrences,
                     estimated_entries=estimated,
                     nprobe=nprobe, target_recall=target_recall,
                     seed=seed, train_size=int(n_train), memory_budget=budget)
    return plan, index


def _say_unused_flags(factory: str, reason: str, index, hnsw_above: int | None, nprobe: int | None,
                      train_size: int | None, estimated: int) -> None:
    """One warning line for each flag the user gave that this index does not use, and why."""
    given = reason == "given with --factory"
    why = f"--factory {factory} was given" if given else f"--factory auto chose {factory}: {reason}"
    if hnsw_above is not None and "HNSW" not in factory:
        if not given and estimated < hnsw_above:
            why = f"about {estimated:,} entries is below it, so --factory auto chose {factory}"
        warnings.warn(f"--hnsw-above {hnsw_above:,} did not apply: {why}", stacklevel=3)
    if nprobe is not None and faiss_index.nlist_of(index) is None:
        warnings.warn(f"--nprobe {nprobe} did not apply: {factory} has no inverted lists to probe ({why})",
                      stacklevel=3)
    if train_size is not None and index.is_trained:
        warnings.warn(f"--train-size {train_size:,} did not apply: {factory} needs no training ({why})", stacklevel=3)


def _check_search_memory(factory: str, entries: int, occurrences: int, d: int, budget: int, budget_flag, dedup: bool,
                         codebook_shape, progress: bool) -> None:
    """Print what searching the chosen index will need (RAM, disk, GPU) and refuse, before any training, a
    --memory-budget its RAM would exceed."""
    need = faiss_index.search_memory(factory, entries, d, codebook_shape, dedup, occurrences)
    gib = faiss_index.format_bytes
    if progress:
        print(f"[build-index] searching {factory} over ~{entries:,} entries will need ~{gib(need['ram'])} of RAM "
              f"(faiss-cpu), ~{gib(need['disk'])} on disk and ~{gib(need['gpu'])} of GPU memory "
              f"({need['gpu_backend']} backend, split over the GPUs given)")
    if need["ram"] > budget:
        raise ArragError(f"--memory-budget {budget_flag} ({gib(budget)}): searching {factory} over ~{entries:,} "
                         f"entries needs ~{gib(need['ram'])} of RAM; raise --memory-budget, or choose a smaller "
                         "index (--factory auto picks one under the budget)")


RANK_SHIFT = 40  # IVF parts of a parallel build add ids rank << 40 | local id; merge-index maps them to global ids


class _Adder:
    """Adds keys to one rank's index: plain ids (0, 1, ...) in one process and for non-IVF parts (index shards
    number their parts' ids successively), rank-tagged ids for the IVF parts of a parallel build."""

    def __init__(self, index, rank: int, world: int):
        self.index, self.added = index, 0
        self.tag = rank << RANK_SHIFT if world > 1 and faiss_index.nlist_of(index) is not None else None
        self.code_pq = faiss_index.is_code_pq(index)

    def add(self, keys: np.ndarray, codes: np.ndarray | None = None) -> None:
        """Add keys [n, d]; `codes` [n, M], the keys' neighbour codes, let a CodePQ index store them as they are."""
        ids = None if self.tag is None else self.tag + np.arange(self.added, self.added + len(keys), dtype=np.int64)
        if self.code_pq and codes is not None:
            faiss_index.add_code_pq(self.index, keys, codes, ids)
        elif ids is None:
            self.index.add(keys)
        else:
            self.index.add_with_ids(keys, ids)
        self.added += len(keys)


def _spill_rows(store: CodeStore, plan: BuildPlan, rank: int, world: int, chunk_images: int, spill: Path,
                progress: bool, group=None) -> tuple[int, int]:
    """Pass 1 of a de-duplicated build: this rank's rows and their images, appended to bucket files in `spill`
    (bucket = a hash of the row, so all copies of a row share one). Returns (buckets, store bytes read); each
    bucket is small enough to de-duplicate in memory, so memory does not grow with the store.

    Rows belong to the rank their hash names. With a process group, a rank reads only its 1/W of the store's
    images and sends every row to its owner (all_to_all, one chunk of images per round: memory stays at a chunk);
    without one (a job array's independent --shard), a rank reads the whole store and keeps its own rows."""
    nb = get_neighborhood(plan.shape)
    buckets = max(1, -(-plan.occurrences // world // SPILL_ROWS))
    spill.mkdir(parents=True, exist_ok=True)
    files = [(open(spill / f"{b:05d}.rows", "wb"), open(spill / f"{b:05d}.images", "wb")) for b in range(buckets)]
    read = 0

    def append(rows: np.ndarray, images: np.ndarray) -> None:
        bucket = place(rows, world, buckets)[1]
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
        for b in range(buckets):
            pick = order[bounds[b]:bounds[b + 1]]
            if len(pick):
                files[b][0].write(np.ascontiguousarray(rows[pick]).tobytes())
                files[b][1].write(images[pick].astype(np.uint32).tobytes())

    try:
        if group is None:
            lo, hi = 0, store.num_images
        else:
            lo, hi = store.num_images * rank // world, store.num_images * (rank + 1) // world
        bar = tqdm(total=hi - lo, desc=f"build-index rows [{rank}/{world}]", unit="img", disable=not progress)
        chunks = store.iter_chunks(chunk_images, start=lo, stop=hi)
        # With a group every rank takes part in every round: as many rounds as the most chunks any rank reads.
        rounds = max(_chunk_count(store, store.num_images * q // world, store.num_images * (q + 1) // world,
                                  chunk_images) for q in range(world)) if group is not None else None
        r = 0
        while True:
            i0, codes = next(chunks, (lo, None))
            if codes is None and (group is None or r >= rounds):
                break
            if codes is not None:
                read += codes.nbytes
                rows, images = entry_rows(codes, nb, i0)
                bar.update(len(codes))
            else:
                rows, images = np.zeros((0, nb.size + 1), np.uint16), np.zeros(0, np.int64)
            owner = place(rows, world, buckets)[0]
            if group is None:
                keep = owner == rank
                append(rows[keep], images[keep])
            else:  # rows and their image (as two uint16) to the rank that owns them
                packed = np.concatenate([rows, images.astype(np.uint32).view(np.uint16).reshape(-1, 2)], 1)
                got = np.concatenate(group.exchange([packed[owner == dest] for dest in range(world)]))
                append(got[:, :-2], got[:, -2:].copy().view(np.uint32).reshape(-1))
            r += 1
        bar.close()
    finally:
        for f_rows, f_images in files:
            f_rows.close()
            f_images.close()
    return buckets, read


def _chunk_count(store: CodeStore, lo: int, hi: int, chunk: int) -> int:
    """How many chunks store.iter_chunks(chunk, start=lo, stop=hi) yields (chunks never span shards)."""
    b = store.bounds
    first, last = np.maximum(b[:-1], lo), np.minimum(b[1:], hi)
    return int((-(-np.maximum(last - first, 0) // chunk)).sum())


def _add_dedup(folder: Path, index, store: CodeStore, plan: BuildPlan, rank: int, world: int, chunk_images: int,
               progress: bool, group=None) -> dict:
    """De-duplicate this rank's rows bucket by bucket, add the distinct keys, and write values, counts, entry
    codes and the entry -> images CSR by streaming (see retrieval.dedup)."""
    width = get_neighborhood(plan.shape).size + 1
    spill = folder / "spill"
    buckets, read = _spill_rows(store, plan, rank, world, chunk_images, spill, progress, group)
    codebook = store.codebook()
    adder = _Adder(index, rank, world)
    raw = {name: open(spill / name, "wb") for name in ("values", "counts", "entry_codes", "offsets", "entry_images")}
    entries = occurrences = 0
    # Counted in entries added (the distinct total is an estimate until the last bucket), not in buckets: a bucket
    # holds up to SPILL_ROWS rows, minutes of adding at billions of entries.
    bar = tqdm(total=max(1, plan.estimated_entries // world), desc=f"build-index add [{rank}/{world}]",
               unit="entry", unit_scale=True, disable=not progress)
    try:
        raw["offsets"].write(np.zeros(1, np.int64).tobytes())
        for b in range(buckets):
            rows = np.fromfile(spill / f"{b:05d}.rows", np.uint16).reshape(-1, width)
            images = np.fromfile(spill / f"{b:05d}.images", np.uint32)
            rows, counts, offsets, image_ids = dedup_rows(rows, images)
            for s in range(0, len(rows), ADD_ROWS):
                chunk = rows[s:s + ADD_ROWS]
                adder.add(row_keys(chunk, codebook), chunk[:, :-1])
                bar.update(len(chunk))
            raw["values"].write(np.ascontiguousarray(rows[:, -1]).tobytes())
            raw["counts"].write(counts.astype(np.uint32).tobytes())
            raw["entry_codes"].write(np.ascontiguousarray(rows[:, :-1]).tobytes())
            raw["offsets"].write((offsets[1:] + occurrences).tobytes())
            raw["entry_images"].write(image_ids.tobytes())
            entries += len(rows)
            occurrences += int(counts.sum())
            (spill / f"{b:05d}.rows").unlink()
            (spill / f"{b:05d}.images").unlink()
        bar.total = bar.n  # the estimate becomes the count
        bar.close()
    finally:
        for f in raw.values():
            f.close()
    for name, dtype, cols in (("values", np.uint16, None), ("counts", np.uint32, None),
                              ("entry_codes", np.uint16, width - 1), ("offsets", np.int64, None),
                              ("entry_images", np.uint32, None)):
        data = np.memmap(spill / name, dtype=dtype, mode="r") if (spill / name).stat().st_size else \
            np.zeros(0, dtype)
        target = "entry_image_offsets.npy" if name == "offsets" else f"{name}.npy"
        concat_npy(folder / target, [data.reshape(-1, cols) if cols else data])
        del data
        (spill / name).unlink()
    spill.rmdir()
    return {"entries": int(entries), "occurrences": int(occurrences), "store_bytes_read": int(read)}


def concat_npy(path: Path, arrays: list[np.ndarray], chunk_rows: int = 1 << 22) -> None:
    """Write the row-wise concatenation of `arrays` (memory maps welcome) to the .npy `path`, chunk by chunk
    under a temporary name: memory stays at one chunk whatever the total. The output is written, not mapped, and
    the pages of a mapped input are let go after each chunk: mapped pages count in this process's RSS, and at
    100M entries these tables are gigabytes."""
    rows = sum(len(a) for a in arrays)
    dtype, tail = np.dtype(arrays[0].dtype), tuple(arrays[0].shape[1:])
    with fileops.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                 "shape": (rows, *tail)})
        for a in arrays:
            for s in range(0, len(a), chunk_rows):
                f.write(np.ascontiguousarray(a[s:s + chunk_rows], dtype=dtype).tobytes())
                _drop_mapped_pages(a)


def _drop_mapped_pages(array) -> None:
    """Let go of the pages a memory-mapped array (or a view of one, or a _Shifted) has read: they stay in the page
    cache, not in this process's RSS, and are read again if touched."""
    a = getattr(array, "offsets", array)
    while a is not None:
        mm = getattr(a, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            mm.madvise(mmap.MADV_DONTNEED)
            return
        a = getattr(a, "base", None)


def _fill(folder: Path, index, store: CodeStore, plan: BuildPlan, rank: int, world: int, chunk_images: int,
          progress: bool, group=None) -> dict:
    """Add this rank's entries to `index` and write the index and its arrays into `folder`; return the record.
    With de-duplication this rank owns the rows that hash to it; without, a contiguous range of images."""
    if plan.dedup:
        record = _add_dedup(folder, index, store, plan, rank, world, chunk_images, progress, group)
    else:
        nb = get_neighborhood(plan.shape)
        codebook = store.codebook()
        p = plan.entries_per_image
        lo, hi = store.num_images * rank // world, store.num_images * (rank + 1) // world
        n = (hi - lo) * p
        values = np.lib.format.open_memmap(folder / "values.npy", mode="w+", dtype=np.uint16, shape=(n,))
        lat_iter = store.iter_chunks(chunk_images, "latents", lo, hi) if plan.key_source == "latent" else None
        adder = _Adder(index, rank, world)
        bar = tqdm(total=hi - lo, desc=f"build-index [{rank}/{world}]", unit="img", disable=not progress)
        read = 0
        for i0, codes in store.iter_chunks(chunk_images, "codes", lo, hi):
            latents = next(lat_iter)[1] if lat_iter is not None else None
            read += codes.nbytes + (latents.nbytes if latents is not None else 0)
            keys, vals = grid_entries(codes, latents, nb, codebook, plan.key_source)
            adder.add(keys, keys_for_grid(codes, nb)[1].reshape(len(keys), -1) if adder.code_pq else None)
            values[(i0 - lo) * p:(i0 - lo + len(codes)) * p] = vals
            bar.update(len(codes))
        bar.close()
        values.flush()
        del values
        record = {"entries": int(n), "occurrences": int(n), "images": [lo, hi], "store_bytes_read": int(read)}
    if index.ntotal != record["entries"]:
        raise RuntimeError(f"index holds {index.ntotal} entries, expected {record['entries']}")
    faiss_index.write_index(index, folder / "index.faiss")
    return record


TUNE_QUERIES = 200  # sampled stored keys that tune nprobe


def tuning_queries(store: CodeStore, plan: BuildPlan) -> np.ndarray:
    """Seeded queries for nprobe tuning [TUNE_QUERIES, d]: half are stored keys, half stored keys with one
    neighbour's block taken from another entry, a combination the database may not hold (as during
    generation, where stored keys alone would make probing look easier than it is)."""
    nb = get_neighborhood(plan.shape)
    a = sample_entry_keys(store, TUNE_QUERIES, plan.seed + 1, nb, plan.key_source)
    b = sample_entry_keys(store, TUNE_QUERIES, plan.seed + 2, nb, plan.key_source)
    rng = np.random.default_rng(plan.seed + 3)
    e = a.shape[1] // nb.size
    q = a.copy()
    for i in range(1, len(q), 2):
        j = int(rng.integers(nb.size))
        q[i, j * e:(j + 1) * e] = b[rng.integers(len(b)), j * e:(j + 1) * e]
    return q


def _nprobe_fields(plan: BuildPlan, index, store: CodeStore) -> dict:
    """The index's nprobe: --nprobe as given, else the smallest reaching --target-recall against a reference search
    (index.tune_nprobe on tuning_queries: every list, or each query's nearest lists at billions of entries)."""
    nlist = faiss_index.nlist_of(index)
    if nlist is None:
        return {"nprobe": None}
    if plan.nprobe is not None:
        return {"nprobe": min(plan.nprobe, nlist)}
    tuning = faiss_index.tune_nprobe(index, tuning_queries(store, plan), 10, plan.target_recall)
    if tuning is None:  # an empty index
        return {"nprobe": faiss_index.default_nprobe(nlist), "nprobe_tuning": "skipped: the index is empty"}
    return {"nprobe": tuning["nprobe"], "nprobe_tuning": tuning}


def _manifest(plan: BuildPlan, index, entries: int, occurrences: int, folder: Path, extra: dict,
              store: CodeStore) -> dict:
    nb = get_neighborhood(plan.shape)
    arrays = [a for a in ARRAYS if (folder / a).is_file()]
    manifest = {
        "format": INDEX_FORMAT,
        "neighborhood": {"shape": nb.name, "offsets": [list(o) for o in nb.offsets], "causal": nb.causal},
        "key_source": plan.key_source,
        "dim": plan.dim,
        "metric": "L2",
        "factory": plan.factory,
        "factory_reason": plan.factory_reason,
        "index_type": faiss_index.describe(index),
        "dedup": plan.dedup,
        "entries": int(entries),
        "occurrences": int(occurrences),
        "dedup_ratio": round(occurrences / max(1, entries), 4),
        "images": plan.images,
        "entries_per_image": plan.entries_per_image,
        "grid": plan.grid,
        "positions": get_neighborhood(plan.shape).positions(*plan.grid).tolist(),
        "nlist": faiss_index.nlist_of(index),
        **_nprobe_fields(plan, index, store),
        "values": "values.npy",
        "vq_fingerprint": plan.vq_fingerprint,
        "store": plan.store,
        **extra,
    }
    names = ["index.faiss", *arrays, *extra.get("shard_files", []), extra.get("lists")]  # every file search reads
    manifest["files"] = {name: fileops.file_digest(folder / name) for name in names
                         if name and (folder / name).is_file()}
    return manifest


def sealed(manifest: dict) -> dict:
    """The manifest with its digest, computed when nothing more will be added (retriever.manifest_digest)."""
    return {**manifest, "manifest_sha256": manifest_digest(manifest)}


def _build_single(store, out: Path, plan: BuildPlan, index, chunk_images: int, overwrite: bool, progress: bool,
                  t0: float, gpu_ids) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    fileops.sweep_stale_temps(out.parent)  # folders of runs that were killed
    tmp = fileops.temp_path(out)
    tmp.mkdir()
    try:
        t_fill = time.time()
        record = _fill(tmp, index, store, plan, 0, 1, chunk_images, progress)
        t_fill = time.time() - t_fill
        manifest = _manifest(plan, index, record["entries"], record["occurrences"], tmp, store=store, extra={
            "layout": "single",
            "build": {"seed": plan.seed, "train_size": plan.train_size, "memory_budget": plan.memory_budget,
                      "chunk_images": chunk_images, "gpus": gpu_ids, "processes": 1,
                      "store_bytes_read": record.get("store_bytes_read"),
                      "plan_and_train_seconds": round(time.time() - t0 - t_fill, 2),
                      "add_seconds": round(t_fill, 2),
                      "seconds": round(time.time() - t0, 2)}})
        manifest = sealed(manifest)
        fileops.write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        fileops.replace_owned_dir(tmp, out, what="index", is_ours=is_index_folder(out), owned=INDEX_FILES,
                                  overwrite=overwrite)
    except BaseException as e:
        fileops.remove_owned_dir(tmp, what="temporary index", owned=INDEX_FILES)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise fileops.no_space_error(out) from None
        raise
    if progress:
        print(f"[build-index] wrote {out} ({manifest['entries']:,} entries"
              + (f" from {manifest['occurrences']:,}, dedup ratio {manifest['dedup_ratio']}" if plan.dedup else "")
              + f", {manifest['build']['seconds']} s)" + _nprobe_note(manifest))
    return manifest


def _nprobe_note(manifest: dict) -> str:
    tuning = manifest.get("nprobe_tuning")
    if isinstance(tuning, dict):
        against = "" if tuning.get("reference", "all lists") == "all lists" else \
            f" against each query's nearest {tuning['reference_lists']:,} lists"
        return (f"; nprobe {tuning['nprobe']} of {manifest['nlist']} lists reaches recall@{tuning['k']} "
                f"{tuning['recall']} (target {tuning['target']}){against}")
    return f"; nprobe {manifest['nprobe']}" if manifest.get("nprobe") else ""


def _part_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}"


def _build_rank(store, out: Path, plan: BuildPlan, rank: int, world: int, chunk_images: int, progress: bool,
                group=None) -> dict:
    parts = out / "parts"
    final = parts / _part_name(rank, world)
    if (out / "manifest.json").is_file():
        if progress:
            print(f"[build-index] {out} is already merged; nothing to do (`arrag build-index ... --train-only "
                  "--overwrite` starts it over)")
        return json.loads((out / "manifest.json").read_text())
    if (final / "part.json").is_file():
        if progress:
            print(f"[build-index] part {final} is already built")
        return json.loads((final / "part.json").read_text())
    fileops.sweep_stale_temps(parts)
    tmp = fileops.temp_path(final)
    tmp.mkdir()
    try:
        index = faiss_index.read_index(parts / "trained.faiss")
        # which plan this part belongs to: merge-index refuses parts of different plans (another factory, or the
        # same factory trained anew)
        made_from = {"factory": plan.factory, "trained": fileops.file_digest(parts / "trained.faiss")["blake2b"]}
        record = {"rank": rank, "world": world, **made_from,
                  **_fill(tmp, index, store, plan, rank, world, chunk_images, progress, group)}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        record["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 2)  # this process's, threads included
        fileops.write_text(tmp / "part.json", json.dumps(record) + "\n")
        tmp.rename(final)
    except BaseException as e:
        fileops.remove_owned_dir(tmp, what="temporary index part", owned=(r".+",))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise fileops.no_space_error(final) from None
        raise
    if progress:
        print(f"[build-index] wrote part {rank + 1} of {world}: {record['entries']:,} entries -> {final}; when all "
              f"parts are built: arrag merge-index {out}")
    return record


def _check_same_plan(parts: Path, plan: BuildPlan, folders: list[Path], records: list[dict]) -> None:
    """Refuse, before anything is written, parts built from another plan than parts/plan.json (FAISS fails on lists
    or codes of another shape, and would merge lists of another quantizer training without a word). A part records
    its plan's factory and trained quantizer's hash; one of arrag < 0.3 recorded neither and is read for its index
    type instead."""
    trained = faiss_index.read_index(parts / "trained.faiss")
    expected = (plan.factory, fileops.file_digest(parts / "trained.faiss")["blake2b"])
    for folder, record in zip(folders, records, strict=True):
        if "trained" in record:
            same = (record.get("factory"), record["trained"]) == expected
            theirs = record.get("factory") if record.get("factory") != plan.factory else \
                f"{plan.factory} trained anew"
        else:
            theirs = faiss_index.describe(faiss_index.read_index(folder / "index.faiss", mmap=True))
            same = theirs == faiss_index.describe(trained)
        if not same:
            followers = [f.name for f, r in zip(folders, records, strict=True)
                         if (r.get("factory"), r.get("trained")) == expected]
            raise ArragError(f"{folder.name} was built from another plan ({theirs}) than {parts / 'plan.json'} "
                             f"({plan.factory}{', which ' + ', '.join(followers) + ' followed' if followers else ''}); "
                             f"rebuild {folder.name} with the plan's flags, or build again into a new --out (the parts "
                             "are left as they are)")


def merge_index(out: str | Path, progress: bool = True) -> dict:
    """Join the parts of a parallel build into the index in `out` (see the module docstring). It waits for nothing:
    a part still missing is refused with one line listing the missing ranks."""
    t0 = time.time()
    out = Path(out)
    parts = out / "parts"
    if not (parts / "plan.json").is_file():
        raise ArragError(f"{out} holds no parallel build (no parts/plan.json); build it with `arrag build-index "
                         "--shard i/n`")
    plan = BuildPlan(**json.loads((parts / "plan.json").read_text()))
    if (out / "manifest.json").is_file():  # a finished merge (its manifest is written last)
        if progress:
            print(f"[merge-index] {out} is already merged")
        return json.loads((out / "manifest.json").read_text())
    folders = sorted(p for p in parts.iterdir() if p.is_dir() and (p / "part.json").is_file())
    records = [json.loads((f / "part.json").read_text()) for f in folders]
    worlds = {r["world"] for r in records}
    if not worlds:
        raise ArragError(f"{parts} lacks every part: run the ranks (`arrag build-index ... --shard i/n`) first")
    if len(worlds) != 1:
        raise ArragError(f"{parts} holds parts of builds with different process counts ({sorted(worlds)})")
    world = worlds.pop()
    missing = sorted(set(range(world)) - {r["rank"] for r in records})
    if missing:
        raise ArragError(f"{parts} lacks part(s) {', '.join(map(str, missing))} of {world}; run those ranks "
                         "(`arrag build-index ... --shard i/n`) first")
    folders = [parts / _part_name(r, world) for r in range(world)]
    records = [json.loads((f / "part.json").read_text()) for f in folders]
    _check_same_plan(parts, plan, folders, records)
    trained = faiss_index.read_index(parts / "trained.faiss")
    ivf = faiss_index.nlist_of(trained) is not None
    if ivf:
        from faiss.contrib.ondisk import merge_ondisk

        # The inverted lists are written in place under their final name (the index file records it); the
        # manifest, written last, is what marks the merge complete, and a rerun starts the file over.
        # FAISS's own id shifting (shift_ids) offsets the parts wrongly in faiss 1.15, so the parts carry
        # rank-tagged ids and are mapped to global ids (parts in rank order) here.
        (out / "lists.ivfdata").unlink(missing_ok=True)
        merge_ondisk(trained, [str(f / "index.faiss") for f in folders], str(out / "lists.ivfdata"), shift_ids=False)
        _globalise_ids(trained, np.cumsum([0] + [r["entries"] for r in records])[:-1])
        faiss_index.write_index(trained, out / "index.faiss")
        extra = {"layout": "ondisk", "lists": "lists.ivfdata"}
    else:
        extra = {"layout": "shards", "shard_files": [str((f / "index.faiss").relative_to(out)) for f in folders]}
    _merge_arrays(out, folders, plan.dedup)
    entries = sum(r["entries"] for r in records)
    occurrences = sum(r["occurrences"] for r in records)
    index = faiss_index.read_index(out / "index.faiss", ondisk=True) if ivf else trained
    if ivf and index.ntotal != entries:
        raise RuntimeError(f"the merged index holds {index.ntotal} entries, its parts {entries}")
    extra["build"] = {"seed": plan.seed, "train_size": plan.train_size, "memory_budget": plan.memory_budget,
                      "processes": world, "merge_seconds": round(time.time() - t0, 2),
                      "store_bytes_read_per_rank": [r.get("store_bytes_read") for r in records],
                      "cpu_seconds_per_rank": [r.get("cpu_seconds") for r in records]}
    manifest = _manifest(plan, index, entries, occurrences, out, extra, CodeStore.open(plan.store))
    if ivf:  # the parts' lists now live in lists.ivfdata; keep only the plan
        for f in folders:
            fileops.remove_owned_dir(f, what="index part", owned=(r".+",))
    manifest = sealed(manifest)
    fileops.write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if progress:
        print(f"[merge-index] {world} parts -> {out} ({entries:,} entries, {extra['layout']} layout, "
              f"{extra['build']['merge_seconds']} s)" + _nprobe_note(manifest))
    return manifest


def _globalise_ids(index, bases: np.ndarray) -> None:
    """Rewrite the rank-tagged ids of a merged IVF index's inverted lists in place: rank << 40 | local ->
    bases[rank] + local (one list at a time, so memory stays at one list)."""
    invlists = faiss.extract_index_ivf(index).invlists
    total, mask = int(index.ntotal), (1 << RANK_SHIFT) - 1
    for lst in range(invlists.nlist):
        n = invlists.list_size(lst)
        if n:
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n)  # a view of the list's ids in lists.ivfdata
            new = bases[ids >> RANK_SHIFT] + (ids & mask)
            if new.min() < 0 or new.max() >= total:
                raise RuntimeError(f"inverted list {lst} holds ids outside the merged index")
            ids[:] = new


def _merge_arrays(out: Path, folders: list[Path], dedup: bool) -> None:
    """Concatenate the parts' arrays in rank order (entry ids are shifted the same way by the merge), streaming."""
    names = ["values.npy"] + (["counts.npy", "entry_codes.npy", "entry_images.npy"] if dedup else [])
    for name in names:
        concat_npy(out / name, [np.load(f / name, mmap_mode="r") for f in folders])
    if dedup:
        shifted, base = [np.zeros(1, np.int64)], 0
        for f in folders:
            offsets = np.load(f / "entry_image_offsets.npy", mmap_mode="r")
            shifted.append(_Shifted(offsets, base))
            base += int(offsets[-1])
        concat_npy(out / "entry_image_offsets.npy", shifted)


class _Shifted:
    """offsets[1:] + base, sliced lazily (a part's CSR offsets moved past the previous parts' occurrences)."""

    def __init__(self, offsets: np.ndarray, base: int):
        self.offsets, self.base = offsets, base
        self.dtype, self.shape = offsets.dtype, (len(offsets) - 1,)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: slice) -> np.ndarray:
        return np.asarray(self.offsets[1:][s]) + self.base
