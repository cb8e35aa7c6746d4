"""The `arrag` command line: one argparse parser, each subcommand a thin call into a module.

Errors the user can fix (a bad file or flag) print as one line `arrag: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from arrag.errors import ArragError


def _vq_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from arrag.image_io import center_crop_arr, load_rgb, make_grid, save_image, to_tensor, to_uint8
    from arrag.provenance import write_sidecar
    from arrag.runtime import resolve_device
    from arrag.vq import load_vq

    device = resolve_device(args.device)
    vq = load_vq(args.vq, preset=args.vq_preset, device=device)
    vq.grid_size(args.size)
    image = center_crop_arr(load_rgb(args.image), args.size)
    with torch.no_grad():
        codes = vq.encode_to_codes(to_tensor(image).to(device))
        rec = to_uint8(vq.decode_codes(codes))[0]
    original = np.asarray(image)
    out = save_image(make_grid(np.stack([original, rec]), ncol=2) if args.side_by_side else rec, args.out)
    psnr = 10 * np.log10(255.0**2 / max(float(((rec.astype(float) - original) ** 2).mean()), 1e-10))
    write_sidecar(out, {"image": args.image, "vq": args.vq, "vq_preset": args.vq_preset, "size": args.size,
                        "grid": list(codes.shape[1:]), "psnr_db": psnr, "fingerprint": vq.fingerprint()})
    print(f"{out}: {codes.shape[1]}x{codes.shape[2]} tokens, PSNR {psnr:.2f} dB, VQ fingerprint {vq.fingerprint()}")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from pathlib import Path

    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ArragError(f"--prompts {path}: file not found (one prompt per line)")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ArragError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from arrag.decoding.sampler import generate
    from arrag.image_io import make_grid, save_image
    from arrag.janus.model import JanusPro
    from arrag.provenance import write_sidecar
    from arrag.runtime import parse_dtype, resolve_device

    prompts = _read_prompts(args)
    device = resolve_device(args.device)
    model = JanusPro.from_pretrained(args.model, dtype=parse_dtype(args.dtype, device), device=device)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
    images = generate(model, prompts, method=args.method, parallel_size=args.parallel_size,
                      cfg_weight=args.cfg_weight, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=seed, image_size=args.image_size, batch_size=args.batch_size)
    out = Path(args.out)
    files = []
    for i, image in enumerate(images):
        j, s = divmod(i, args.parallel_size)
        files.append(save_image(image, out / f"{j:04d}_{s:02d}.{args.format}").name)
    if args.grid:
        save_image(make_grid(images, ncol=args.parallel_size), args.grid)
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "prompt", "prompts")}
    settings.update(seed=seed, prompts=prompts, prompts_file=args.prompts, files=files,
                    dtype=str(model.dtype), device=str(device), vq_fingerprint=model.vq.fingerprint())
    write_sidecar(out, settings)
    if args.grid:
        write_sidecar(args.grid, settings)
    print(f"wrote {len(images)} images to {out} (seed {seed})" + (f" and the grid {args.grid}" if args.grid else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from arrag.demo.pipeline import run_demo
    from arrag.runtime import resolve_device

    run_demo(args.out, steps=args.steps, image_size=args.image_size, seed=args.seed,
             device=resolve_device(args.device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrag",
        description="Patch-level autoregressive retrieval augmentation (AR-RAG) for Janus-Pro + LlamaGen VQ-16.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    vq = sub.add_parser("vq", help="tokenizer tools (LlamaGen VQ-VAE)", description="Tokenizer tools.")
    vq_sub = vq.add_subparsers(dest="vq_command", metavar="ACTION", required=True)
    rec = vq_sub.add_parser(
        "reconstruct", help="encode an image to codes and decode it back",
        description="Encode IMAGE to VQ codes and decode them back: a quick check that a tokenizer works. "
                    "Writes the reconstruction and a JSON sidecar (OUT.json) with the PSNR and VQ fingerprint.")
    rec.add_argument("image", help="input image file (jpg, png, webp)")
    rec.add_argument("--vq", required=True, help="tokenizer weights: LlamaGen vq_ds16_t2i.pt or a .safetensors")
    rec.add_argument("--out", required=True, help="output image (.png, .jpg or .webp)")
    rec.add_argument("--vq-preset", default=None,
                     help="architecture preset (VQ-16, VQ-8, VQ-tiny-16, VQ-tiny-8); default: from the file, "
                          "else VQ-16")
    rec.add_argument("--size", type=int, default=384, help="centre-crop size in pixels (default 384 = 24x24 tokens)")
    rec.add_argument("--side-by-side", action="store_true", help="write original and reconstruction side by side")
    rec.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    rec.set_defaults(func=_vq_reconstruct)

    gen = sub.add_parser(
        "generate", help="text-to-image generation with Janus-Pro (base sampler)",
        description="Generate images for every prompt x --parallel-size samples in one batch, with CFG. Writes "
                    "OUT/<prompt>_<sample>.png and OUT/settings.json with every setting and the seed.")
    gen.add_argument("--model", required=True, help="Janus-Pro checkpoint folder (config.json, weights, tokenizer)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts", help="text file with one prompt per line")
    gen.add_argument("--method", default="base", choices=["base"], help="decoding method (default base)")
    gen.add_argument("--parallel-size", type=int, default=1, help="samples per prompt (default 1)")
    gen.add_argument("--cfg-weight", type=float, default=5.0, help="classifier-free guidance weight (default 5)")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1)")
    gen.add_argument("--top-k", type=int, default=None, help="keep only the k most likely codes (default off)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default off)")
    gen.add_argument("--seed", type=int, default=0, help="seed; image i uses a generator seeded with (seed, i) "
                                                          "(default 0)")
    gen.add_argument("--image-size", type=int, default=384, help="pixels per side (default 384 = 24x24 tokens)")
    gen.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default all)")
    gen.add_argument("--out", default="result/generated_imgs", help="output folder (default result/generated_imgs)")
    gen.add_argument("--format", default="png", choices=["png", "jpg", "webp"], help="image format (default png)")
    gen.add_argument("--grid", default=None, help="also write all images as one grid to this file")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="weights dtype (default auto: bf16 on CUDA, fp32 on CPU)")
    gen.set_defaults(func=_generate)

    demo = sub.add_parser(
        "demo", help="run the main job on the embedded default (ShapesWorld)",
        description="Run the pipeline, as far as it exists, on ShapesWorld and write results to --out.")
    demo.add_argument("--out", default="result/demo", help="output folder (default result/demo)")
    demo.add_argument("--steps", type=int, default=120, help="tokenizer training steps (default 120)")
    demo.add_argument("--image-size", type=int, default=64, help="image size in pixels (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training (default 0)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ArragError as e:
        print(f"arrag: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("arrag: interrupted", file=sys.stderr)
        return 130

