"""How far are the neighbourhoods DAiD queries with from the database's? TailWorld, real against generated.

    .venv/bin/python bench/daid_queries.py [--images 96] [--retriever data/retriever/tail]

`eval retrieval-gain` feeds the index real held-out images (teacher forcing); generation feeds it what the base
drew. This puts the two side by side for each bucket: validation images rendered and encoded by the world's VQ,
and the shipped base's (and DAiD's) own samples of the same bucket's prompts at the demo's sampling. For every
valid target it searches the demo index (k 256, the demo's DAiD) and reports the nearest hit's squared L2
distance (median and quartiles), how often the next code is among the hits, and how often the nearest hit
proposes it; and how each row's codes differ from those of as many other real validation images (histogram
distance, rarely used codes, adjacent pairs never seen there): the real row gives the level real images show.
The ratio printed last is generated over real median distance. Needs the demo retriever (`make demo` builds
it). Writes bench/out/daid_queries.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from arrag.decoding import Generator, MethodConfig
from arrag.decoding.loop import SamplingConfig
from arrag.demo import TAIL_DAID, TAIL_SAMPLING
from arrag.demo.tail import COLORS, Frequencies, TailWorld, caption_for
from arrag.demo.worlds import get_world
from arrag.image_io import to_tensor
from arrag.retrieval.neighborhood import grid_key_vectors

OUT = Path(__file__).resolve().parent / "out" / "daid_queries.json"


def query_stats(grids: np.ndarray, retriever, codebook: np.ndarray, k: int) -> dict:
    """Nearest-hit distance and hit agreement for every valid target of grids [N, h, w] (codes as drawn)."""
    pos, keys = grid_key_vectors(grids, codebook, retriever.neighborhood)
    queries = torch.from_numpy(np.ascontiguousarray(keys.reshape(-1, keys.shape[-1])))
    dist, codes, _ = retriever.search_counted(queries, k)
    target = torch.from_numpy(grids.reshape(len(grids), -1)[:, pos].reshape(-1).astype(np.int64))
    d0 = dist[:, 0].numpy()
    return {"images": len(grids), "targets": len(d0), "nearest_median": float(np.median(d0)),
            "nearest_q25": float(np.quantile(d0, 0.25)), "nearest_q75": float(np.quantile(d0, 0.75)),
            "next_code_in_hits": float((codes == target[:, None]).any(1).float().mean()),
            "nearest_proposes_it": float((codes[:, 0] == target).float().mean())}


def code_usage(grids: np.ndarray, real: np.ndarray, vocab: int) -> dict:
    """How far the codes drawn in grids [N, h, w] are from those real images [M, h, w] use: total variation of the
    code histograms, the share of drawn codes that real images use under 0.1% of the time, and the share of
    horizontally adjacent code pairs never seen in the real images."""
    hr = np.bincount(real.ravel(), minlength=vocab) / real.size
    hg = np.bincount(grids.ravel(), minlength=vocab) / grids.size
    pairs = lambda g: g[:, :, :-1].astype(np.int64).ravel() * vocab + g[:, :, 1:].ravel()  # noqa: E731
    return {"code_tv": float(0.5 * np.abs(hr - hg).sum()), "rare_code_share": float(hg[hr < 1e-3].sum()),
            "unseen_pair_share": float((~np.isin(pairs(grids), pairs(real))).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96, help="images per bucket and source (default 96)")
    ap.add_argument("--retriever", default=None, help="the TailWorld demo retriever (default data/retriever/tail)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=None,
                    help=f"sampling temperature (default the demo's, {TAIL_SAMPLING['temperature']})")
    args = ap.parse_args(argv)
    world = get_world("tail")
    retriever_dir = Path(args.retriever or world.retriever) / "index"
    k = TAIL_DAID["daid_k"]
    daid = Generator.load(world.assets / "base", MethodConfig("daid", **TAIL_DAID), retriever=retriever_dir,
                          device="cpu")
    base = Generator(daid.model, MethodConfig("base"))
    vq, retriever = daid.model.vq, daid.retriever
    codebook = vq.code_embeddings(torch.arange(vq.codebook_size)).detach().float().numpy()
    freq = Frequencies(seed=args.seed)
    validation = TailWorld("validation", seed=args.seed)
    n_patterns = len(freq.ranking)
    results = {}
    for bucket in ("head", "tail"):
        # validation item i shows pattern i mod n: take the items of this bucket's patterns
        items = [i for i in range(2 * args.images * n_patterns) if freq.bucket(validation.pattern_of(i)) == bucket]
        with torch.no_grad():  # the measured real images, and as many others to compare every row's codes with
            real, reference = (vq.encode_to_codes(to_tensor(np.stack([validation.image(i) for i in part]))).numpy()
                               for part in (items[:args.images], items[args.images:2 * args.images]))
        prompts = [caption_for(p, c, 1) for p in freq.patterns(bucket) for c in COLORS]
        per_prompt = max(1, -(-args.images // len(prompts)))
        sampling = SamplingConfig(parallel_size=per_prompt, seed=args.seed, image_size=64, **{
            **TAIL_SAMPLING, **({"temperature": args.temperature} if args.temperature is not None else {})})
        rows = {"real (teacher-forced)": real}
        for name, gen in (("base samples", base), ("DAiD samples", daid)):
            codes = gen.sample_codes(prompts, sampling, progress=False)[: args.images]
            rows[name] = codes.reshape(len(codes), *real.shape[1:]).numpy()
        results[bucket] = {name: {**query_stats(g, retriever, codebook, k),
                                  **code_usage(g, reference, vq.codebook_size)} for name, g in rows.items()}
        for name, r in results[bucket].items():
            print(f"{bucket:4s} {name:22s} nearest d median {r['nearest_median']:.3f} "
                  f"[{r['nearest_q25']:.3f}, {r['nearest_q75']:.3f}]  next code in {k} hits "
                  f"{r['next_code_in_hits']:.3f}  nearest proposes it {r['nearest_proposes_it']:.3f}  "
                  f"codes: TV to real {r['code_tv']:.2f}, rare {r['rare_code_share']:.2f}, "
                  f"unseen pairs {r['unseen_pair_share']:.2f}", flush=True)
        real_d = results[bucket]["real (teacher-forced)"]["nearest_median"]
        for name in ("base samples", "DAiD samples"):
            ratio = results[bucket][name]["nearest_median"] / max(real_d, 1e-12)
            results[bucket][name]["median_ratio_to_real"] = ratio
            print(f"{bucket:4s} {name} / real nearest-distance median: {ratio:.1f}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    temperature = TAIL_SAMPLING["temperature"] if args.temperature is None else args.temperature
    OUT.write_text(json.dumps({"k": k, "daid": TAIL_DAID, "images": args.images,
                               "sampling": {**TAIL_SAMPLING, "temperature": temperature},
                               "retriever": str(retriever_dir), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
