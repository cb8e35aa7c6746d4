"""Does a database know what the model does not? The teacher-forced retrieval gain (`arrag eval retrieval-gain`).

On held-out images (a code store with captions), at every valid retrieval target t:
  p_model  the model's teacher-forced next-token distribution (CFG-combined when --cfg-weight != 1)
  p_ret    DAiD's retrieval distribution from the ground-truth neighbours' k-NN hits
  nats(lambda, tau) = mean -log((1 - lambda) p_model + lambda p_ret)[true code]
gain = nats(0) - nats(lambda). A positive gain at some lambda means the database holds information about the
next code that the model lacks: what DAiD mixes in and what FAiD's blenders could learn to use. None at any
lambda means neither can lower the loss on real images; DAiD can still change samples (it pulls a drifting
sample back towards real patches), but FAiD, trained by teacher forcing, has nothing to learn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from arrag.decoding.daid import DEFAULT_AGGREGATE, retrieval_distribution
from arrag.errors import ArragError
from arrag.retrieval.neighborhood import grid_key_vectors

DEFAULT_LAMBDAS = (0.0, 0.01, 0.03, 0.1, 0.3)
DEFAULT_TAUS = (1.0,)
DEFAULT_K = 256  # neighbours per query


def check_settings(images: int, k: int, batch_size: int, lambdas: Sequence[float], taus: Sequence[float]) -> None:
    """One-line errors for settings that cannot give a measurement (the CLI checks them before loading)."""
    for flag, value in (("--images", images), ("--k", k), ("--batch-size", batch_size)):
        if value < 1:
            raise ArragError(f"{flag} must be >= 1, got {value}")
    if any(not 0.0 <= lam <= 1.0 for lam in lambdas) or 0.0 not in lambdas:  # NaN fails every comparison
        raise ArragError(f"--lambdas must lie in [0, 1] and include 0 (the model alone), got {list(lambdas)}")
    if not taus or any(not (t > 0 and math.isfinite(t)) for t in taus):
        raise ArragError(f"--taus must be > 0 and finite, got {list(taus)}")


def _check_inputs(model, retriever, store) -> None:
    """One-line errors for a store that cannot give a fair measurement."""
    if not model.vq.matches(store.fingerprint):
        raise ArragError(f"code store {store.folder} was encoded with another tokenizer (VQ fingerprint "
                         f"{store.fingerprint}, model {model.vq.fingerprint()}); encode the images with this model")
    retriever.check_store(store)
    source = retriever.manifest.get("store")
    if source is not None and Path(source).resolve() == store.folder.resolve():
        raise ArragError(f"code store {store.folder} is the one {retriever.folder} was built from: its own entries "
                         "would answer every query; measure on held-out images (`arrag encode` another set)")
    if not store.has_captions:
        raise ArragError(f"code store {store.folder} has no captions; encode images with same-named .txt captions "
                         "(or a caption column)")


@torch.no_grad()
def retrieval_gain(model, prompter, retriever, store, images: int = 256, k: int = DEFAULT_K,
                   lambdas: Sequence[float] = DEFAULT_LAMBDAS, taus: Sequence[float] = DEFAULT_TAUS,
                   aggregate: str = DEFAULT_AGGREGATE, cfg_weight: float = 1.0, batch_size: int = 16,
                   progress: bool = True, groups: Sequence[str] | None = None) -> dict:
    """Teacher-forced nats per retrieval target for every (tau, lambda) on the first `images` of `store`.

    model: a JanusPro; prompter: its Prompter; retriever: a PatchRetriever checked against the model; store: a
    CodeStore of held-out images; groups: a name per image (e.g. TailWorld's frequency bucket), to report the
    same figures per group as well.
    Returns the table (rows of tau, lambda, nats, gain), the best row, and how often the true code is among the
    hits, is p_ret's most likely code and is the model's; with groups, 'by_group' holds each group's.
    """
    from arrag.janus.faid_layers import full_sequence_logits

    check_settings(images, k, batch_size, lambdas, taus)
    _check_inputs(model, retriever, store)
    n_total = min(images, store.num_images)
    captions = [store.caption(i) for i in range(n_total)]  # only the images measured
    if any(c is None for c in captions):
        raise ArragError(f"code store {store.folder}: some of the first {n_total} images have no caption")
    codebook = store.codebook()
    grid = store.grid
    names = ["all"]
    if groups is not None:
        if len(groups) < n_total:
            raise ArragError(f"groups: {len(groups)} names for {n_total} images")
        names += sorted(set(groups[:n_total]))
    nats = {g: np.zeros((len(taus), len(lambdas))) for g in names}
    counters = {g: {"targets": 0, "in_hits": 0, "ret_top1": 0, "model_top1": 0, "without_hits": 0} for g in names}
    bar = tqdm(range(0, n_total, batch_size), desc="retrieval gain", unit="batch", disable=not progress)
    for s in bar:
        idx = np.arange(s, min(s + batch_size, n_total))
        grids = store.gather(idx)  # [n, h, w]
        codes = torch.from_numpy(grids.reshape(len(idx), -1).astype(np.int64)).to(model.device)
        cond = [prompter.ids(c) for c in captions[s:s + len(idx)]]
        rows = [cond] if cfg_weight == 1.0 else [cond, [prompter.unconditional(c) for c in cond]]
        logits = []
        for r in rows:
            batch = prompter.left_pad(r, device=model.device)
            logits.append(full_sequence_logits(model, batch.input_ids, batch.attention_mask, codes, None, grid).float())
        lg = logits[0] if cfg_weight == 1.0 else logits[1] + cfg_weight * (logits[0] - logits[1])
        pos, keys = grid_key_vectors(grids, codebook, retriever.neighborhood)  # the index's own keys
        p_model = torch.softmax(lg[:, torch.from_numpy(pos).to(lg.device)], -1).reshape(-1, lg.shape[-1]).cpu()
        target = codes[:, torch.from_numpy(pos).to(codes.device)].reshape(-1).cpu()
        # as a tensor on the model's device: the retriever searches wherever it lives (CPU FAISS, GPU backends)
        queries = torch.from_numpy(np.ascontiguousarray(keys.reshape(-1, keys.shape[-1]))).to(model.device)
        dist, hit_codes, copies = (None if a is None else a.cpu() for a in retriever.search_counted(queries, k))
        missing = hit_codes[:, 0] < 0
        per_image = len(pos)
        owner = np.repeat(np.arange(len(idx)), per_image)  # the image of each target row
        rows_of = {"all": slice(None)}
        if groups is not None:
            names_here = np.asarray([groups[i] for i in idx])[owner]
            rows_of.update({g: torch.from_numpy(names_here == g) for g in names[1:]})
        p_true = p_model.gather(1, target[:, None]).squeeze(1).double()
        hit = (hit_codes == target[:, None]).any(1)
        model_right = p_model.argmax(1) == target
        p_rets = [retrieval_distribution(dist, hit_codes, p_model.shape[1], tau, aggregate, copies) for tau in taus]
        ret_right = (p_rets[0].argmax(1) == target) & ~missing
        for g, rows in rows_of.items():
            c = counters[g]
            c["targets"] += int(target[rows].numel())
            c["in_hits"] += int(hit[rows].sum())
            c["model_top1"] += int(model_right[rows].sum())
            c["without_hits"] += int(missing[rows].sum())
            c["ret_top1"] += int(ret_right[rows].sum())
            for i, p_ret in enumerate(p_rets):
                r_true = p_ret.gather(1, target[:, None]).squeeze(1).double()
                for j, lam in enumerate(lambdas):
                    # rows without hits keep the model's distribution, as DAiD decodes them
                    mix = torch.where(missing, p_true, (1 - lam) * p_true + lam * r_true)[rows]
                    nats[g][i, j] += float(-torch.log(mix.clamp_min(1e-300)).sum())

    def summary(g: str) -> dict:
        c = counters[g]
        n = max(c["targets"], 1)
        table_nats = nats[g] / n
        base = table_nats[0, list(lambdas).index(0.0)]
        table = [{"tau": float(t), "lambda": float(lam), "nats": float(table_nats[i, j]),
                  "gain": float(base - table_nats[i, j])} for i, t in enumerate(taus) for j, lam in enumerate(lambdas)]
        return {"targets": c["targets"], "model_nats": float(base), "table": table,
                "best": max(table, key=lambda row: row["gain"]), "true_code_in_hits": c["in_hits"] / n,
                "retrieval_top1": c["ret_top1"] / n, "model_top1": c["model_top1"] / n,
                "targets_without_hits": c["without_hits"]}

    out = {"images": int(n_total), "k": k, "aggregate": aggregate, "cfg_weight": cfg_weight, **summary("all")}
    if groups is not None:
        out["by_group"] = {g: {"images": int(sum(1 for x in groups[:n_total] if x == g)), **summary(g)}
                           for g in names[1:]}
    return out


def measure_folders(model_dir: str | Path, retriever_dir: str | Path, store, *, k: int = DEFAULT_K,
                    aggregate: str = DEFAULT_AGGREGATE, device: str = "auto", nprobe: int | None = None,
                    verify_index: bool = True, allow_unknown_vq: bool = False, trust_checkpoint: bool = False,
                    **settings) -> tuple[dict, dict]:
    """Load a model folder (fp32) and its retriever (checked against the model's tokenizer, placed as generation
    places it) and run retrieval_gain on `store` with k, aggregate and `settings` (images, lambdas, taus, ...).

    Returns (the result, the retriever's settings for the record)."""
    from arrag.decoding import Generator, MethodConfig
    from arrag.janus import Prompter

    method = MethodConfig("daid", daid_k=k, daid_aggregate=aggregate, allow_unknown_vq=allow_unknown_vq)
    generator = Generator.load(model_dir, method, retriever=retriever_dir, device=device, nprobe=nprobe,
                               verify_index=verify_index, dtype="fp32", trust_checkpoint=trust_checkpoint)
    result = retrieval_gain(generator.model, Prompter.from_folder(model_dir), generator.retriever, store, k=k,
                            aggregate=aggregate, **settings)
    return result, generator.retriever.settings()
