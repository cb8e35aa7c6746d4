"""The GPU figures in one run (about 5 minutes on one H200): bandwidth bound, decode step eager vs CUDA graph,
ours vs transformers, DAiD / FAiD / FAiD+DAiD per-image cost against base, peak memory, CUDA-vs-CPU agreement,
and DAiD with its search inline, in a thread, and in a thread on a side stream (section daid_search).

Everything is measured side by side in this process on random Janus-Pro-1B-sized weights (bf16, 24 layers of
2048, 16 images = 32 rows with CFG, 576 tokens) and a >= 1M-entry IVF-Flat index built here from random codes
(nprobe 32), searched on the GPU by the torch backend (no faiss-gpu needed; faiss-cpu builds the index):

    pip install faiss_cpu-*.whl            # where FAISS is missing (the wheel travels with the repository)
    python bench/gpu_suite.py              # -> bench/out/gpu_suite.json
    python bench/gpu_suite.py --device cpu --small   # the same code paths at toy sizes (no graph capture)

Each section's figures go to the JSON as soon as they exist; a failing section is recorded and the rest run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arrag.decoding import Generator, MethodConfig, SamplingConfig  # noqa: E402
from arrag.decoding.daid import DAiD  # noqa: E402
from arrag.demo.presets import build_word_tokenizer, tiny_janus_config  # noqa: E402
from arrag.janus import JanusPro, Prompter  # noqa: E402

SIZES = {
    "full": dict(model=dict(hidden=2048, layers=24, heads=16, kv_heads=16, intermediate=5632), images=16,
                 image_size=384, hf_image_size=192, entries=1_050_000),
    "small": dict(model=dict(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=256), images=4,
                  image_size=128, hf_image_size=96, entries=60_000),
}
NPROBE = 32  # the suite index's nprobe (see Suite.retriever)
# Where DAiD's search runs -> (prefetch, side_stream): in the loop after the forward pass, in a thread during it
# on the same CUDA stream (host work overlaps), or in a thread on a stream of its own (kernels may overlap too).
DAID_SEARCH = {"inline": (False, False), "thread": (True, False), "side_stream": (True, True)}
PROMPTS = ["a red circle left of a blue square", "two green triangles", "a yellow diamond", "three purple circles"]


class Suite:
    def __init__(self, args):
        self.args, self.size = args, SIZES["small" if args.small else "full"]
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.out = Path(args.out)
        self.results: dict = {"device": str(self.device), "dtype": str(self.dtype), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                              "sizes": self.size, "errors": {}}
        self.tmp = Path(tempfile.mkdtemp(prefix="arrag_gpu_suite_"))

    # -- plumbing ---------------------------------------------------------------------------------------
    def section(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        print(f"[gpu-suite] {name} ...", flush=True)
        try:
            self.results[name] = fn()
        except Exception as e:  # record it and go on: one broken section must not cost the others
            self.results["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    # -- models -----------------------------------------------------------------------------------------
    def models(self):
        if not hasattr(self, "_models"):
            tok = build_word_tokenizer(self.tmp / "tok")
            self.prompter = Prompter(tok)
            torch.manual_seed(0)
            base = JanusPro(tiny_janus_config(len(tok), vq_preset="VQ-16", max_positions=4096, **self.size["model"]))
            layers = self.size["model"]["layers"]
            faid_cfg = tiny_janus_config(len(tok), vq_preset="VQ-16", max_positions=4096,
                                         num_SmoothPatchBlender=layers // 2, num_hop=[1, 2], **self.size["model"])
            faid = JanusPro(faid_cfg)
            faid.load_state_dict(base.state_dict(), strict=False)  # the same weights plus two blenders
            self._models = {n: m.to(device=self.device, dtype=self.dtype).eval() for n, m in
                            (("base", base), ("faid", faid))}
        return self._models

    def prompts(self, n: int) -> list[str]:
        return (PROMPTS * n)[:n]

    def sample(self, model, method="base", retriever=None, step_mode=None, image_size=None, images=None,
               daid_search: str | None = None, **method_kw) -> torch.Tensor:
        """Codes of the suite's prompts; daid_search: where DAiD searches (one of DAID_SEARCH; None: DAiD's
        default, a thread on a side stream on CUDA, inline on the CPU)."""
        # On CUDA the graph explicitly: 'auto' would go on uncaptured if the capture failed, timing the wrong step.
        step_mode = step_mode or ("graph" if self.device.type == "cuda" else "auto")
        gen = Generator(model, MethodConfig(method, **method_kw), retriever, prompter=self.prompter,
                        step_mode=step_mode)
        for hook in gen.hooks:
            if daid_search and isinstance(hook, DAiD):
                hook.prefetch, hook.side_stream = DAID_SEARCH[daid_search]
        cfg = SamplingConfig(seed=0, image_size=image_size or self.size["image_size"])
        return gen.sample_codes(self.prompts(images or self.size["images"]), cfg, progress=False)

    # -- sections ---------------------------------------------------------------------------------------
    def bandwidth(self) -> dict:
        n = (1 << 30) // 2 if self.device.type == "cuda" else (1 << 26) // 4
        x = torch.empty(n, dtype=self.dtype, device=self.device).uniform_()
        x.sum()
        best = min(self.timed(lambda: x.sum()) for _ in range(10))
        read_bw = x.numel() * x.element_size() / best
        model = self.models()["base"]
        weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                      if not name.startswith(("gen_vision_model.", "language_model.model.embed_tokens")))
        lang, rows = model.config.language, 2 * self.size["images"]
        steps = model.vq.grid_size(self.size["image_size"]) ** 2
        prompt = 24  # about the Janus-Pro template plus a short caption
        kv_per_slot = rows * lang.num_hidden_layers * 2 * lang.num_key_value_heads * lang.head_dim * x.element_size()
        kv_mean = kv_per_slot * (prompt + steps / 2)
        # The fixed-shape step (what the graph replays) attends over every slot of the cache, written or not.
        kv_full = kv_per_slot * (prompt + steps)
        return {"read_gb_per_s": read_bw / 1e9, "weights_gb": weights / 1e9,
                "kv_cache_gb_mean_per_step": kv_mean / 1e9, "kv_cache_gb_full": kv_full / 1e9,
                "bound_ms_weights": 1e3 * weights / read_bw,
                "bound_ms_weights_and_kv": 1e3 * (weights + kv_mean) / read_bw,
                "bound_ms_weights_and_full_kv": 1e3 * (weights + kv_full) / read_bw}

    def decode_step(self) -> dict:
        model = self.models()["base"]
        steps = model.vq.grid_size(self.size["image_size"]) ** 2
        modes = ["eager", "graph"] if self.device.type == "cuda" else ["eager", "static"]
        out, codes = {}, {}
        for mode in modes:
            codes[mode] = self.sample(model, step_mode=mode)  # warm-up (and the tokens to compare)
            out[f"{mode}_ms_per_step"] = 1e3 * min(self.timed(lambda m=mode: self.sample(model, step_mode=m))
                                                   for _ in range(2)) / steps
        out["same_tokens"] = bool(torch.equal(codes[modes[0]], codes[modes[1]]))
        out["speedup"] = out[f"{modes[0]}_ms_per_step"] / out[f"{modes[1]}_ms_per_step"]
        return out

    def versus_transformers(self, images: int | None = None) -> dict:
        """Ours against a loop over transformers' Llama (dynamic cache), same weights, `images` prompts (default:
        the suite's batch); the target holds at every batch size, so the suite also runs one image."""
        from bench.decode_speed import baseline_loop, transformers_llama

        model = self.models()["base"]
        if not hasattr(self, "_hf"):
            self._hf = transformers_llama(model)
        hf = self._hf
        size = self.size["hf_image_size"]
        steps = model.vq.grid_size(size) ** 2
        images = images or self.size["images"]
        prompts = self.prompts(images)

        @torch.no_grad()
        def transformers_loop():
            baseline_loop(model, hf, self.prompter, prompts, steps, 5.0, 0)

        transformers_loop()
        ours = lambda: self.sample(model, image_size=size, images=images)  # noqa: E731
        ours()
        t_hf = min(self.timed(transformers_loop) for _ in range(2))
        t_ours = min(self.timed(ours) for _ in range(2))
        return {"images": images, "steps": steps, "transformers_ms_per_step": 1e3 * t_hf / steps,
                "ours_ms_per_step": 1e3 * t_ours / steps, "ratio": t_hf / t_ours, "target": 3.0}

    def retriever(self):
        if not hasattr(self, "_retriever"):
            from arrag.build_retriever.build_index import build_index
            from arrag.retrieval import codestore
            from arrag.retrieval.retriever import PatchRetriever
            from arrag.retrieval.torch_search import TorchIndex

            vq = self.models()["base"].vq
            grid = vq.grid_size(self.size["image_size"])
            per_image = (grid - 1) * (grid - 2)
            images = -(-self.size["entries"] // per_image)
            codes = np.random.default_rng(0).integers(0, vq.codebook_size, (images, grid, grid)).astype(np.uint16)
            t0 = time.perf_counter()
            codestore.write_store(self.tmp / "store", codes, vq)
            # nprobe pinned at 32 (sqrt(nlist)/2 for IVF4096), the setting of the faiss-cpu measurement:
            # uniformly random codes have no cluster structure and would tune to 512 of 4,096 lists (131k
            # candidates a query), a worst case that real image codes do not reach (ShapesWorld tunes to 4).
            manifest = build_index(self.tmp / "store", self.tmp / "index", nprobe=NPROBE, progress=False)
            self.results["index"] = {"entries": manifest["entries"], "factory": manifest["factory"],
                                     "nprobe": manifest["nprobe"], "build_seconds": time.perf_counter() - t0}
            self._retriever = PatchRetriever.load(self.tmp / "index", device=str(self.device)
                                                  if self.device.type == "cuda" else "cpu", backend="auto")
            self.results["index"]["backend"] = self._retriever.backend
            index = self._retriever.index
            if isinstance(index, TorchIndex) and index.nlist:  # its IVF scan: padded (no host sync) or exact
                self.results["index"].update(scan="padded" if index.padded else "exact (reads counts back)",
                                             longest_list=index.longest, mean_list=index.ntotal / index.nlist)
        return self._retriever

    def methods(self) -> dict:
        models, r = self.models(), self.retriever()
        runs = {"base": lambda: self.sample(models["base"]),
                "daid": lambda: self.sample(models["base"], "daid", r, daid_k=2048, daid_lambda=0.1),
                "faid": lambda: self.sample(models["faid"], "faid", r, faid_k=10),
                "faid+daid": lambda: self.sample(models["faid"], "faid+daid", r, faid_k=10, daid_k=2048,
                                                 daid_lambda=0.1)}
        for fn in runs.values():
            fn()  # warm-up: kernels, graph capture paths, the index's tensors
        best = {name: float("inf") for name in runs}
        for _ in range(2):  # alternate, keep the best of each
            for name, fn in runs.items():
                best[name] = min(best[name], self.timed(fn))
        n = self.size["images"]
        out = {f"{name}_s_per_image": t / n for name, t in best.items()}
        out.update({f"{name}_vs_base": best[name] / best["base"] for name in runs if name != "base"})
        out["targets"] = {"daid_vs_base": 1.05, "faid_vs_base": 1.3}
        return out

    def daid_search(self) -> dict:
        """DAiD's cost against base with its search inline, in a thread, and in a thread on a side stream."""
        models, r = self.models(), self.retriever()
        runs = {"base": lambda: self.sample(models["base"])}
        for where in DAID_SEARCH:
            runs[where] = lambda w=where: self.sample(models["base"], "daid", r, daid_k=2048, daid_lambda=0.1,
                                                      daid_search=w)
        # No warm-up: the methods section ran these kernels; the variants differ only in threads and streams.
        codes, best = {}, {name: float("inf") for name in runs}

        def run_and_keep(name: str) -> None:
            codes[name] = runs[name]()

        for _ in range(2):
            for name in runs:
                best[name] = min(best[name], self.timed(lambda n=name: run_and_keep(n)))
        out = {f"{where}_vs_base": best[where] / best["base"] for where in DAID_SEARCH}
        out["same_images"] = all(torch.equal(codes[w], codes["inline"]) for w in DAID_SEARCH)
        return out

    def peak_memory(self) -> dict:
        if self.device.type != "cuda":
            return {"note": "CUDA only"}
        return {"max_allocated_gb": torch.cuda.max_memory_allocated(self.device) / 1e9,
                "max_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 1e9}

    def demo_agreement(self) -> dict:
        """The shipped ShapesWorld models, same seed, on this device and on the CPU: share of equal codes."""
        if self.device.type != "cuda":
            return {"note": "compares CUDA with the CPU; nothing to compare on the CPU"}
        from arrag.demo.database import build_demo_retriever
        from arrag.demo.pipeline import ASSETS
        from arrag.retrieval.retriever import PatchRetriever

        index_dir = build_demo_retriever(ASSETS / "base", self.tmp / "demo_L", self.args.demo_images, 64,
                                         progress=False)
        r_cpu = PatchRetriever.load(index_dir)
        r_gpu = PatchRetriever.load(index_dir, device=str(self.device), gpu_fallback=True)
        prompts = ["a red circle", "two blue squares", "a green triangle left of a yellow diamond",
                   "three purple circles"]
        out = {"retriever_backend": r_gpu.backend}
        for method in ("base", "daid", "faid"):
            codes = {}
            for where, retriever in (("cpu", r_cpu), (str(self.device), r_gpu)):
                model = JanusPro.from_pretrained(ASSETS / ("faid" if method == "faid" else "base"),
                                                 dtype=torch.float32, device=where, quiet=True)
                gen = Generator(model, MethodConfig(method, daid_lambda=0.3, daid_k=256),
                                None if method == "base" else retriever)
                codes[where] = gen.sample_codes(prompts, SamplingConfig(parallel_size=4, seed=0, image_size=64),
                                                progress=False).cpu()
            a, b = codes.values()
            out[f"{method}_equal_codes"] = float((a == b).float().mean())
        return out

    def run(self) -> None:
        self.section("bandwidth", self.bandwidth)
        self.section("decode_step", self.decode_step)
        self.section("versus_transformers", self.versus_transformers)
        self.section("methods", self.methods)
        if not self.args.skip_demo:
            self.section("demo_agreement", self.demo_agreement)
        self.section("peak_memory", self.peak_memory)
        self.section("daid_search", self.daid_search)
        self.section("versus_transformers_batch1", lambda: self.versus_transformers(images=1))  # last: extra
        self.report()

    def report(self) -> None:
        r = self.results
        g = lambda sec, key, fmt="{:.2f}": fmt.format(r[sec][key]) if key in r.get(sec, {}) else "-"  # noqa: E731
        print(f"\ngpu suite on {r['gpu'] or r['device']} ({r['dtype']}):")
        print(f"  read bandwidth           {g('bandwidth', 'read_gb_per_s', '{:.0f}')} GB/s; bound per step "
              f"{g('bandwidth', 'bound_ms_weights')} ms (weights), {g('bandwidth', 'bound_ms_weights_and_kv')} ms "
              f"(weights + mean KV cache), {g('bandwidth', 'bound_ms_weights_and_full_kv')} ms (weights + whole KV "
              "cache, what the fixed-shape step reads)")
        d = r.get("decode_step", {})
        for k, v in d.items():
            print(f"  decode step {k:24} {v:.3f}" if isinstance(v, float) else f"  decode step {k:24} {v}")
        print(f"  ours vs transformers     {g('versus_transformers', 'ratio')}x (target >= 3); one image: "
              f"{g('versus_transformers_batch1', 'ratio')}x")
        for k, v in r.get("methods", {}).items():
            if k.endswith("_vs_base"):
                print(f"  {k:24} {v:.3f}x")
        for k, v in r.get("daid_search", {}).items():
            print(f"  daid search {k:18} {v:.3f}x" if isinstance(v, float) else f"  daid search {k:18} {v}")
        for k, v in r.get("demo_agreement", {}).items():
            print(f"  demo {k:19} {v}")
        print(f"  peak memory              {r.get('peak_memory', {})}")
        if r["errors"]:
            print(f"  errors: {r['errors']}")
        print(f"  -> {self.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="toy sizes (a CPU check of the code paths)")
    ap.add_argument("--demo-images", type=int, default=1200, help="database images of the demo comparison")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/out/gpu_suite.json"))
    Suite(ap.parse_args()).run()


if __name__ == "__main__":
    main()
