"""Given a right beginning, does DAiD complete a tail pattern? TailWorld, with the first rows forced.

    .venv/bin/python bench/daid_prefix.py [--rows 0,3,5,7] [--per-pattern 4] [--seeds 0,1,2] [--faid]

DAiD completes what the model has begun; the shipped base begins tail patterns wrong (bench/daid_queries.py).
This gives every method the same right beginning: for each validation scene (4 a pattern, tail and head), the
first R rows of codes are those of the real image (its VQ encoding), forced through
decoding.beginning.GivenBeginning (as `arrag demo`'s completion table does on the test split, at one R); the
base, DAiD with the world's database and DAiD with the control database (no tail pattern) draw the rest at the
demo's settings, and the pixel scorer reads the result. Prints accuracy per bucket (mean ± SE over seeds) and
each DAiD minus the base on the tail, paired by seed. Needs both demo retrievers (`make demo` builds them). Writes
bench/out/daid_prefix.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from arrag.decoding import Generator, MethodConfig
from arrag.decoding.beginning import GivenBeginning, beginning_codes
from arrag.decoding.loop import SamplingConfig
from arrag.demo import TAIL_DAID, TAIL_FAID_K, TAIL_SAMPLING
from arrag.demo.tail import Frequencies, TailWorld
from arrag.demo.tail_score import accuracy
from arrag.demo.worlds import get_world
from arrag.retrieval.retriever import PatchRetriever

OUT = Path(__file__).resolve().parent / "out" / "daid_prefix.json"


def _mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="0,3,5,7", help="forced rows of codes, comma-separated (default 0,3,5,7)")
    ap.add_argument("--per-pattern", type=int, default=4, help="validation scenes per pattern (default 4)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    ap.add_argument("--retriever", default=None, help="the TailWorld demo retriever (default data/retriever/tail)")
    ap.add_argument("--faid", action="store_true",
                    help="also FAiD and FAiD's weights without retrieval, given the same beginnings")
    ap.add_argument("--out", default=str(OUT), help=f"the JSON record (default {OUT.relative_to(OUT.parents[2])})")
    args = ap.parse_args(argv)
    world = get_world("tail")
    folder = Path(args.retriever or world.retriever)
    model = Generator.load(world.assets / "base", MethodConfig("base"), device="cpu").model
    databases = {"world": PatchRetriever.load(folder / "index", device="cpu"),
                 "control": PatchRetriever.load(Path(f"{folder}_control") / "index", device="cpu")}
    freq, validation = Frequencies(), TailWorld("validation")
    n = len(freq.ranking)
    items = [i for i in range(n * args.per_pattern) if freq.bucket(validation.pattern_of(i)) in ("tail", "head")]
    scenes = [validation.scene(i) for i in items]
    side = model.vq.grid_size(64)  # a row of codes is `side` steps
    real = beginning_codes(model.vq, np.stack([validation.image(i) for i in items]), side, 64)  # [N, side * side]
    prompts = [s.caption for s in scenes]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = {"base": (model, MethodConfig("base"), None),
               "DAiD": (model, MethodConfig("daid", **TAIL_DAID), databases["world"]),
               "DAiD, control db": (model, MethodConfig("daid", **TAIL_DAID), databases["control"])}
    if args.faid:
        faid = Generator.load(world.assets / "faid", MethodConfig("base"), device="cpu").model
        methods["FAiD"] = (faid, MethodConfig("faid", faid_k=TAIL_FAID_K), databases["world"])
        methods["FAiD, no retrieval"] = (faid, MethodConfig("base"), None)
    results = {}
    for rows in (int(r) for r in args.rows.split(",")):
        per_method = {}
        for name, (net, method, retriever) in methods.items():
            per_seed = []
            for seed in seeds:
                gen = Generator(net, method, retriever, extra_hooks=[GivenBeginning(real[:, :rows * side])])
                sampling = SamplingConfig(parallel_size=1, seed=seed, image_size=64, **TAIL_SAMPLING)
                per_seed.append(accuracy(gen.images(gen.sample_codes(prompts, sampling)), scenes, freq)["by_bucket"])
            per_method[name] = per_seed
            (t, t_se), (h, h_se) = (_mean_se([s[b] for s in per_seed]) for b in ("tail", "head"))
            print(f"rows {rows:2d}  {name:17s} tail {t:.3f}±{t_se:.3f}  head {h:.3f}±{h_se:.3f}", flush=True)
        for name in [m for m in methods if m != "base"]:
            pairs = zip(per_method[name], per_method["base"], strict=True)
            d, d_se = _mean_se([a["tail"] - b["tail"] for a, b in pairs])
            print(f"rows {rows:2d}  {name} - base, tail: {d:+.3f}±{d_se:.3f}", flush=True)
        results[str(rows)] = per_method
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"daid": TAIL_DAID, "sampling": TAIL_SAMPLING, "seeds": seeds,
                               "per_pattern": args.per_pattern, "scenes": len(scenes), "by_rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
