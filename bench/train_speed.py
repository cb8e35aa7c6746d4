"""FAiD training speed and memory against plain LoRA (no blenders), side by side in one run.

    .venv/bin/python bench/train_speed.py [--configs tiny,mid] [--steps 6]

One training step = forward, backward and AdamW on the recipe's trainable set (LoRA r 16 on q_proj/v_proj,
gen_head; FAiD adds 2 blenders with hops 1,2 and K = 10 candidates). Synthetic captions, codes and
candidates. Each (config, method) runs in its own subprocess, alternating, twice; the best tokens/s is
kept. Memory: peak CUDA allocation on a GPU; on CPU the growth of the process's peak RSS during the steps
(the model already loaded), which is what training adds on top of the weights.
  tiny: hidden 64, 2 layers, 8x8 image tokens, batch 4      mid: hidden 512, 8 layers, 24x24 tokens, batch 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, grid=8, batch=4),
    "mid": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, grid=24, batch=2),
}


def one_run(config: str, method: str, steps: int) -> dict:
    """Build the model, train `steps` steps on one synthetic batch, report tokens/s and memory."""
    from arrag.demo.presets import make_tiny_janus
    from arrag.janus import Prompter
    from arrag.train.train_faid import FaidObjective, FaidTrainConfig, build_model

    c = CONFIGS[config]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_janus(tmp, seed=0, hidden=c["hidden"], layers=c["layers"], heads=c["heads"],
                        kv_heads=c["kv_heads"], intermediate=c["intermediate"])
        cfg = FaidTrainConfig(base=tmp, store="", num_blender=2 if method == "faid" else 0, lora_r=16,
                              lora_alpha=32)
        torch.manual_seed(0)
        janus = build_model(cfg, device=device)
        prompter = Prompter.from_folder(tmp)
    g = torch.Generator().manual_seed(0)
    b, t = c["batch"], c["grid"] ** 2
    prompts = prompter.left_pad([prompter.ids("red circle left of a blue square")] * b, device)
    codes = torch.randint(0, janus.config.image_token_size, (b, t), generator=g).to(device)
    candidates = torch.randint(0, janus.config.image_token_size, (b, t, 10), generator=g).to(device)
    objective = FaidObjective(janus, (c["grid"], c["grid"]))
    params = [p for p in janus.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = objective(prompts.input_ids, prompts.attention_mask, codes, candidates, torch.ones(b, dtype=bool,
                                                                                                        device=device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (and optimizer state allocation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    memory = (torch.cuda.max_memory_allocated() if device == "cuda"
              else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    trainable = sum(p.numel() for p in params)
    return {"config": config, "method": method, "device": device, "tokens_per_s": b * t / seconds,
            "step_s": seconds, "memory_bytes": memory, "memory_kind": "cuda peak" if device == "cuda" else
            "peak RSS growth", "trainable": trainable}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.steps)))
        return
    results: dict = {}
    for config in args.configs.split(","):
        for _ in range(args.rounds):
            for method in ("lora", "faid"):  # alternate, so drift in machine load hits both
                run = subprocess.run([sys.executable, __file__, "--one", config, method, "--steps", str(args.steps)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(run.stdout.strip().splitlines()[-1])
                best = results.get((config, method))
                if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                    r["memory_bytes"] = max(r["memory_bytes"], best["memory_bytes"] if best else 0)
                    results[(config, method)] = r
    print(f"{'config':6} {'method':6} {'tokens/s':>10} {'step s':>8} {'memory MiB':>11} {'trainable':>11}")
    for (config, method), r in results.items():
        print(f"{config:6} {method:6} {r['tokens_per_s']:10.0f} {r['step_s']:8.3f} {r['memory_bytes'] / 2**20:11.1f} "
              f"{r['trainable']:11,}")
    summary = {}
    for config in args.configs.split(","):
        lora, faid = results[(config, "lora")], results[(config, "faid")]
        summary[config] = {"slowdown": lora["tokens_per_s"] / faid["tokens_per_s"],
                           "memory_ratio": faid["memory_bytes"] / max(lora["memory_bytes"], 1)}
        print(f"{config}: FAiD step time {summary[config]['slowdown']:.2f}x plain LoRA, memory "
              f"{summary[config]['memory_ratio']:.2f}x ({lora['memory_kind']})")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps({"runs": list(results.values()), "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
