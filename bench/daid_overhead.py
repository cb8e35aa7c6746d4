"""DAiD overhead: time per image with DAiD against base, same model, seed and batch, side by side in one run.

    .venv/bin/python bench/daid_overhead.py          # needs bench/retrieval.py's 1.05M-entry index (built if missing)

Model: a tiny random Janus (hidden 256, 4 layers) whose VQ is the seeded VQ-tiny-8 that encoded the
database, so fingerprints match; 128-px images = 16x16 tokens, 210 retrieval steps per image. The index is
the auto-chosen IVF4096,Flat over 1.05M entries at its default nprobe. Prints the ratio at batch 1 and 16
for each k. Target on CPU: <= 1.15x (on the default model). --hidden / --layers time the same retrieval against a
heavier step: DAiD's cost per step is fixed, so its ratio falls as the model grows (Janus-Pro-1B: 2048 x 24).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arrag.decoding import MethodConfig, SamplingConfig, build_hooks, sample_codes  # noqa: E402
from arrag.decoding.daid import DAiD  # noqa: E402
from arrag.demo.presets import build_word_tokenizer, tiny_janus_config  # noqa: E402
from arrag.janus import JanusPro, Prompter  # noqa: E402
from arrag.retrieval.retriever import PatchRetriever  # noqa: E402
from arrag.vq import load_vq  # noqa: E402
from bench.retrieval import needs_build  # noqa: E402

PROMPTS = ["a red circle left of a blue square", "two green triangles", "a yellow diamond", "three purple circles"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="bench/out/retrieval", help="output folder of bench/retrieval.py")
    ap.add_argument("--k", default="2048,256", help="DAiD k values to time (default 2048 = the original, 256)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefetch", action="store_true",
                    help="also time DAiD with its search in a background thread overlapping the forward pass "
                         "(off by default on a CPU)")
    ap.add_argument("--hidden", type=int, default=256, help="model width (default 256: the target's model)")
    ap.add_argument("--layers", type=int, default=4, help="model depth (default 4: the target's model)")
    ap.add_argument("--out", default="bench/out/daid_overhead.json")
    args = ap.parse_args()
    data = ROOT / args.data
    if needs_build(data / "idx_auto", dedup=True):
        raise SystemExit(f"no current index at {data / 'idx_auto'} (missing, or built before build-time nprobe "
                         "tuning): run `.venv/bin/python bench/retrieval.py` first")

    tmp = Path(tempfile.mkdtemp())
    tok = build_word_tokenizer(tmp)
    torch.manual_seed(0)
    # MLP width ~2.7x hidden, rounded to 8 (688 at 256, as Llama sizes it); head dim 64.
    model = JanusPro(tiny_janus_config(len(tok), hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
                                       kv_heads=args.hidden // 64, intermediate=(args.hidden * 8 // 3 + 7) // 8 * 8,
                                       vq_preset="VQ-tiny-8")).eval()
    model.gen_vision_model.load_state_dict(load_vq(data / "vq.safetensors").state_dict())
    retriever = PatchRetriever.load(data / "idx_auto")
    retriever.check_compatible(model.vq)
    prompter = Prompter(tok)

    # Where the time goes inside the loop: the FAISS call, and the whole search (FAISS + id -> code lookups and
    # copy counts). Parts timed in isolation look 2-5x cheaper than inside the loop (cold caches).
    spent = {"faiss": 0.0, "search": 0.0, "calls": 0}

    def timed(fn, key: str):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            spent[key] += time.perf_counter() - t
            spent["calls"] += key == "search"
            return out
        return wrapper

    retriever.index.search = timed(retriever.index.search, "faiss")
    retriever.search_counted = timed(retriever.search_counted, "search")

    def run(batch: int, k: int | None, prefetch: bool = False) -> float:
        prompts = (PROMPTS * batch)[:batch]
        hooks = build_hooks(model, MethodConfig("daid", daid_k=k), retriever) if k else []
        for hook in hooks:
            if isinstance(hook, DAiD):
                hook.prefetch = prefetch
        spent.update(faiss=0.0, search=0.0, calls=0)
        t0 = time.perf_counter()
        sample_codes(model, prompts, SamplingConfig(seed=0, image_size=128), prompter=prompter, hooks=hooks,
                     progress=False)
        return (time.perf_counter() - t0) / batch

    factory = retriever.manifest["factory"]
    result = {"hidden": args.hidden, "layers": args.layers, "entries": retriever.entries, "factory": factory,
              "nprobe": retriever.nprobe, "threads": torch.get_num_threads(), "runs": []}
    print(f"DAiD overhead: random Janus (hidden {args.hidden}, {args.layers} layers), 16x16 tokens, {factory} over "
          f"{retriever.entries:,} entries, nprobe {retriever.nprobe}")
    for batch in (int(b) for b in args.batches.split(",")):
        for k in (int(x) for x in args.k.split(",")):
            run(batch, k)
            run(batch, None)  # warm-up
            base = daid = overlapped = float("inf")
            for _ in range(args.repeats):  # alternate, keep the best of each
                base = min(base, run(batch, None))
                if args.prefetch:
                    overlapped = min(overlapped, run(batch, k, prefetch=True))
                daid = min(daid, run(batch, k))
            ratio = daid / base
            # Per retrieval step, from the last DAiD run: FAISS, the rest of the search, the rest of the hook.
            n = max(spent["calls"], 1)
            parts = {"faiss_ms": spent["faiss"] / n * 1e3, "lookup_ms": (spent["search"] - spent["faiss"]) / n * 1e3,
                     "rest_of_hook_ms": ((daid - base) * batch - spent["search"]) / n * 1e3}
            result["runs"].append({"batch": batch, "k": k, "base_s_per_image": base, "daid_s_per_image": daid,
                                   "ratio": ratio, "per_retrieval_step": parts,
                                   **({"prefetch_ratio": overlapped / base} if args.prefetch else {})})
            print(f"  batch {batch:2}, k {k:5}: base {base * 1e3:8.1f} ms/image, DAiD {daid * 1e3:8.1f} ms/image, "
                  f"ratio {ratio:.2f}x (target <= 1.15x); per retrieval step: FAISS {parts['faiss_ms']:.3f} ms, "
                  f"lookups {parts['lookup_ms']:.3f} ms, rest of the hook {parts['rest_of_hook_ms']:.3f} ms"
                  + (f"; with the search overlapped (prefetch): {overlapped / base:.2f}x" if args.prefetch else ""))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
