"""Decode speed: our sampling loop (static KV cache) against a plain loop over transformers' Llama.

Same random weights, same batch (prompts x CFG rows), same heads and sampling; only the decoder and its
cache differ. The baseline is how the original project decodes: LlamaModel with its default dynamic
cache, one call per token. Both run side by side in one process, alternating, best of --repeats.
Target on CPU: ours >= 1.5x the baseline's steps/s.

    .venv/bin/python bench/decode_speed.py                 # mid config: hidden 512, 8 layers, 576 tokens
    .venv/bin/python bench/decode_speed.py --preset 1b     # Janus-Pro-1B-sized (for a GPU, bf16)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arrag.decoding import SamplingConfig, sample_codes  # noqa: E402
from arrag.demo.presets import build_word_tokenizer, tiny_janus_config  # noqa: E402
from arrag.janus import JanusPro, Prompter  # noqa: E402

PRESETS = {
    "mid": dict(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376),
    "1b": dict(hidden=2048, layers=24, heads=16, kv_heads=16, intermediate=5632),
}


def transformers_llama(model: JanusPro):
    """transformers' LlamaModel holding `model`'s language-model weights (the baseline), in eval mode."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaModel as HFLlamaModel
    from transformers.utils import logging as hf_logging

    # The baseline passes past_key_values (the long-standing name); newer transformers warn about it.
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    lang = model.config.language
    hf = HFLlamaModel(HFLlamaConfig(vocab_size=lang.vocab_size, hidden_size=lang.hidden_size,
                                    intermediate_size=lang.intermediate_size, num_hidden_layers=lang.num_hidden_layers,
                                    num_attention_heads=lang.num_attention_heads,
                                    num_key_value_heads=lang.num_key_value_heads, rms_norm_eps=lang.rms_norm_eps,
                                    max_position_embeddings=lang.max_position_embeddings))
    hf.load_state_dict({k[len("model."):]: v for k, v in model.language_model.state_dict().items()})
    return hf.to(device=model.device, dtype=model.dtype).eval()


def baseline_loop(model: JanusPro, hf_llm, prompter: Prompter, prompts: list[str], steps: int, cfg: float,
                  seed: int) -> torch.Tensor:
    """The original project's way: LlamaModel(inputs_embeds, past_key_values=dynamic cache) once per token."""
    torch.manual_seed(seed)
    batch = prompter.batch(prompts, model.device)
    out = hf_llm(inputs_embeds=model.text_embeddings(batch.input_ids), attention_mask=batch.attention_mask.long(),
                 use_cache=True)
    mask = batch.attention_mask.long()
    codes = []
    for t in range(steps):
        logits = model.image_logits(out.last_hidden_state[:, -1])
        logits = logits[1::2] + cfg * (logits[0::2] - logits[1::2])
        tok = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]
        codes.append(tok)
        if t == steps - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        emb = model.image_embeddings(tok.repeat_interleave(2))[:, None]
        out = hf_llm(inputs_embeds=emb, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(codes, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="mid")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per batch (x2 rows for CFG)")
    ap.add_argument("--image-size", type=int, default=384, help="384 = 576 tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/out/decode_speed.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp())
    tok = build_word_tokenizer(tmp)
    torch.manual_seed(0)
    cfg = tiny_janus_config(len(tok), vq_preset="VQ-16", **PRESETS[args.preset])
    model = JanusPro(cfg).to(device=device, dtype=dtype).eval()
    hf = transformers_llama(model)
    prompter = Prompter(tok)
    prompts = ["a red circle left of a blue square", "two green triangles", "a yellow diamond",
               "three purple circles"] * ((args.prompts + 3) // 4)
    prompts = prompts[:args.prompts]
    steps = model.vq.grid_size(args.image_size) ** 2

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_ours():
        sample_codes(model, prompts, SamplingConfig(seed=0, image_size=args.image_size), prompter=prompter,
                     progress=False)

    def run_base():
        with torch.no_grad():
            baseline_loop(model, hf, prompter, prompts, steps, 5.0, 0)

    best = {"ours": float("inf"), "transformers_dynamic_cache": float("inf")}
    # One warm-up run each, then alternate timed runs.
    run_ours()
    run_base()
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("transformers_dynamic_cache", run_base)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    rate = {k: steps / v for k, v in best.items()}
    ratio = rate["ours"] / rate["transformers_dynamic_cache"]
    result = {
        "preset": args.preset, "config": PRESETS[args.preset], "device": str(device), "dtype": str(dtype),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "prompts": args.prompts,
        "rows": 2 * args.prompts, "steps": steps, "seconds": best, "steps_per_s": rate, "ratio": ratio,
        "target": 1.5 if device.type == "cpu" else 3.0,
    }
    print(f"decode speed ({args.preset}, {device}, {dtype}, {2 * args.prompts} rows, {steps} tokens, "
          f"best of {args.repeats}):")
    print(f"  ours (static cache)             {rate['ours']:8.1f} steps/s  ({best['ours']:.2f} s)")
    print(f"  transformers (dynamic cache)    {rate['transformers_dynamic_cache']:8.1f} steps/s  "
          f"({best['transformers_dynamic_cache']:.2f} s)")
    print(f"  ratio ours / transformers       {ratio:8.2f}x   (target >= {result['target']}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
