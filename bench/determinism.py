"""Same seed, same images: across fresh processes, and what changes with the thread count.

    .venv/bin/python bench/determinism.py [--processes 20] [--threads 1,2]

Each process imports what the README's API lines import, then generates 4 samples of one prompt at seed 0 with
the shipped ShapesWorld base (its first generation in that process, where the old failure struck) and hashes the
images. It also records whether torch.cos, called once on a tensor the size of that first prefill's rotary
angles, was correctly computed on every row: the MKL behaviour arrag no longer depends on (its rotary tables
are computed with NumPy; arrag/janus/llama.py RotaryTable). Prints, per thread count, how many processes gave
images other than the first process's, and how many saw a wrong first torch.cos; then whether the images of
different thread counts agree. Writes bench/out/determinism.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, sys
import numpy as np, torch
from arrag.decoding import Generator   # what the README's lines import: the whole decoding and retrieval stack
import arrag.demo.pipeline             # noqa: F401  (faiss, transformers, the demo)
angles = torch.arange(14).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, 48, 2).float() / 48))
angles = torch.cat([angles, angles], 1).repeat(8, 1, 1)[:, None].contiguous()   # [8, 1, 14, 48], the prefill's
err = (torch.cos(angles).double() - torch.cos(angles.double())).abs().reshape(8, -1).amax(1)
base = Generator.load("arrag/demo/assets/base", method="base", device="cpu")
images = base(["a red circle left of a blue square"], parallel_size=4, seed=0, progress=False)
print(json.dumps({"images": hashlib.sha256(images.tobytes()).hexdigest()[:16],
                  "first_cos_wrong": bool((err > 1e-6).any()), "threads": torch.get_num_threads()}))
"""


def run(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if p.returncode:
        raise SystemExit(f"child failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=20, help="fresh processes per thread count (default 20)")
    ap.add_argument("--threads", default="1,2", help="thread counts to compare (default 1,2)")
    args = ap.parse_args()
    result: dict = {"processes": args.processes, "by_threads": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        runs = [run(threads) for _ in range(args.processes)]
        hashes = [r["images"] for r in runs]
        row = {"distinct_images": sorted(set(hashes)), "differ_from_first": sum(h != hashes[0] for h in hashes),
               "first_torch_cos_wrong": sum(r["first_cos_wrong"] for r in runs)}
        result["by_threads"][threads] = row
        print(f"{threads} thread(s): {row['differ_from_first']} of {args.processes} processes gave other images than "
              f"the first; torch.cos's first call was wrong in {row['first_torch_cos_wrong']} of them "
              f"(arrag does not use it)")
    firsts = {t: r["distinct_images"][0] for t, r in result["by_threads"].items()}
    result["same_across_thread_counts"] = len(set(firsts.values())) == 1
    print("images across thread counts: " + ("identical" if result["same_across_thread_counts"] else
                                             f"differ ({firsts})"))
    out = ROOT / "bench" / "out" / "determinism.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
