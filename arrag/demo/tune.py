"""Tune DAiD's lambda, tau and K (and FAiD's K) on a demo world's validation prompts.

    python -m arrag.demo.tune [--world tail] [--out result/demo_tune] [--seeds 0] [--samples 2]

First the sampling (CFG weight x temperature) for the base; then, at that sampling, a coarse DAiD grid: lambda x
tau at K 256, then K at the best (lambda, tau); FAiD's K over a few values.
Each point generates the validation prompts (4 per category x --samples, per seed) and is scored by overall
accuracy (realism FID breaks ties). A point replaces the current demo setting only when it beats it by more
than two standard errors of the difference (48 images a point differ by ~0.1 by chance, and a dozen points
against one make a one-SE win likely by luck alone; more --seeds or --samples narrow the band), so a rerun
does not move the demo's settings on noise. Results go to <out>/tune.json; the chosen values are what
arrag/demo/__init__.py holds (DEMO_SAMPLING, DEMO_DAID, DEMO_FAID_K; TAIL_... for TailWorld) and docs/demo.md
reports.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
from pathlib import Path

from arrag.demo import DEMO_DAID, DEMO_FAID_K, DEMO_SAMPLING, TAIL_DAID, TAIL_FAID_K, TAIL_SAMPLING
from arrag.demo.pipeline import run_demo
from arrag.demo.tail_demo import run_tail_demo
from arrag.provenance import write_json

LAMBDAS = (0.1, 0.3, 0.6, 1.0)
TAUS = (0.3, 1.0)
TAIL_LAMBDAS = (0.1, 0.3, 0.6)  # TailWorld's kNN-LM-style p_ret is sharp: lower temperatures, no lambda 1
TAIL_TAUS = (0.01, 0.03, 0.1)
DAID_KS = (64, 256, 2048)
FAID_KS = (4, 10, 20)
CFG_WEIGHTS = (3.0, 5.0, 7.5, 10.0)
TEMPERATURES = (1.0, 0.8, 0.6)


def _point(out: Path, seeds: tuple[int, ...], samples: int, world: str = "shapes", **kw) -> dict:
    """One setting on the validation prompts: overall accuracy (TailWorld: over every pattern, each bucket too)."""
    if world == "tail":
        s = run_tail_demo(out, seeds=seeds, split="validation", samples=samples, progress=False, overwrite=True, **kw)
        m = next(iter(s["methods"].values()))["by_bucket"]
        return {"overall": m["overall"]["accuracy"]["mean"], "realism_fid": m["overall"]["fid"],
                "images": s["prompts"] * s["samples_per_prompt"] * len(s["seeds"]),
                "per_bucket": {b: v["accuracy"]["mean"] for b, v in m.items()}}
    s = run_demo(out, seeds=seeds, split="validation", samples=samples, progress=False, **kw)
    m = next(iter(s["methods"].values()))
    return {"overall": m["overall"]["mean"], "realism_fid": m["realism_fid"]["mean"],
            "images": s["prompts"] * s["samples_per_prompt"] * len(s["seeds"]),
            "per_category": {c: v["mean"] for c, v in m["per_category"].items()}}


def _rank(r: dict) -> tuple[float, float]:
    return r["overall"], -r["realism_fid"]


def choose(points: list[dict], current: dict) -> dict:
    """The best point (accuracy, then realism FID), unless the point with the `current` settings scores within
    two standard errors of the difference of it: then the current one (a rerun does not chase noise).

    Each point holds 'overall' (a share of 'images' scored correct) and 'realism_fid'."""
    best = max(points, key=_rank)
    here = next((r for r in points if all(r.get(k) == v for k, v in current.items())), None)
    if here is None or here is best:
        return best
    var = lambda r: r["overall"] * (1 - r["overall"]) / r["images"]  # noqa: E731  (binomial, per point)
    return here if best["overall"] - here["overall"] <= 2 * math.sqrt(var(best) + var(here)) else best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="result/demo_tune")
    ap.add_argument("--seeds", default="0", help="comma-separated; more seeds narrow the noise band (default 0)")
    ap.add_argument("--samples", type=int, default=2, help="samples per validation prompt (default 2)")
    ap.add_argument("--assets", default=None, help="demo models to tune (default: the shipped ones)")
    ap.add_argument("--retriever-dir", default=None, help="their demo retriever (default data/retriever/demo_L)")
    ap.add_argument("--world", default="shapes", choices=["shapes", "tail"], help="the demo world (default shapes)")
    ap.add_argument("--skip-sampling", action="store_true", help="keep the current CFG weight and temperature")
    args = ap.parse_args(argv)
    models = {k: v for k, v in (("assets", args.assets), ("retriever_dir", args.retriever_dir)) if v}
    # the current settings of the world, which a point must clearly beat to replace
    cur_daid, cur_faid_k, cur_sampling = (TAIL_DAID, TAIL_FAID_K, TAIL_SAMPLING) if args.world == "tail" else \
        (DEMO_DAID, DEMO_FAID_K, DEMO_SAMPLING)
    out, seeds = Path(args.out), tuple(int(s) for s in args.seeds.split(","))
    point = functools.partial(_point, out / "run", seeds, args.samples, world=args.world, **models)
    sampling = []
    grid = [(cur_sampling["cfg_weight"], cur_sampling["temperature"])] if args.skip_sampling else \
        itertools.product(CFG_WEIGHTS, TEMPERATURES)
    for cfg, temp in grid:
        r = {"cfg_weight": cfg, "temperature": temp,
             **point(methods=("base",), sampling={"cfg_weight": cfg, "temperature": temp})}
        sampling.append(r)
        print(f"base cfg {cfg} temperature {temp}: {r['overall']:.3f} (FID {r['realism_fid']:.2f})")
    best_sampling = choose(sampling, cur_sampling)
    chosen_sampling = {"cfg_weight": best_sampling["cfg_weight"], "temperature": best_sampling["temperature"]}
    point = functools.partial(point, sampling=chosen_sampling)  # every later point samples the same way
    runs = {"base": best_sampling}
    daid = []
    lambdas, taus = (TAIL_LAMBDAS, TAIL_TAUS) if args.world == "tail" else (LAMBDAS, TAUS)
    agg = {"daid_aggregate": cur_daid["daid_aggregate"]} if "daid_aggregate" in cur_daid else {}
    for lam, tau in itertools.product(lambdas, taus):
        d = {"daid_lambda": lam, "daid_tau": tau, "daid_k": 256, **agg}
        r = {**d, **point(methods=("daid",), daid=d)}
        daid.append(r)
        print(f"daid lambda {lam} tau {tau} k 256: {r['overall']:.3f} (FID {r['realism_fid']:.2f})"
              + (f" {r['per_bucket']}" if "per_bucket" in r else ""), flush=True)
    best = choose(daid, {"daid_lambda": cur_daid["daid_lambda"], "daid_tau": cur_daid["daid_tau"]})
    for k in DAID_KS:
        if k == 256:
            continue
        d = {"daid_lambda": best["daid_lambda"], "daid_tau": best["daid_tau"], "daid_k": k, **agg}
        r = {**d, **point(methods=("daid",), daid=d)}
        daid.append(r)
        print(f"daid lambda {d['daid_lambda']} tau {d['daid_tau']} k {k}: {r['overall']:.3f} "
              f"(FID {r['realism_fid']:.2f})")
    faid = []
    for k in FAID_KS:
        r = {"faid_k": k, **point(methods=("faid",), faid_k=k)}
        faid.append(r)
        print(f"faid k {k}: {r['overall']:.3f} (FID {r['realism_fid']:.2f})"
              + (f" {r['per_bucket']}" if "per_bucket" in r else ""), flush=True)
    chosen = {"sampling": chosen_sampling,
              "daid": {k: v for k, v in choose(daid, cur_daid).items() if k.startswith("daid_")},
              "faid_k": choose(faid, {"faid_k": cur_faid_k})["faid_k"]}
    write_json(out / "tune.json", {"seeds": seeds, "samples": args.samples, "sampling": sampling, "base": runs["base"],
                                   "daid": daid, "faid": faid, "chosen": chosen})
    print(f"chosen: {chosen}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
