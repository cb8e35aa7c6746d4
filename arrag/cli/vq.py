"""Tokenizer tools: `arrag vq reconstruct`."""

from __future__ import annotations

import argparse

from arrag.cli.common import (
    _add_device,
    _add_trust,
    _int,
)
from arrag.image_io import MAX_IMAGE_SIZE, check_image_size


def _vq_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from arrag.fileops import check_out_file
    from arrag.image_io import image_format, load_rgb, make_grid, resize_crop, save_image, to_tensor, to_uint8
    from arrag.image_io import psnr as image_psnr
    from arrag.provenance import made_by, sidecar_path, write_sidecar
    from arrag.runtime import resolve_device
    from arrag.vq import load_vq

    image_format(args.out, "--out")
    check_out_file(args.out, what="reconstruction", inputs=[args.image],
                   is_ours=made_by(sidecar_path(args.out), "vq reconstruct", legacy=lambda r: "psnr_db" in r.get(
                       "settings", {})))
    if args.size is not None:
        check_image_size(args.size, "--size")
    device = resolve_device(args.device)
    vq = load_vq(args.vq, preset=args.vq_preset, device=device, trust_checkpoint=args.trust_checkpoint)
    args.size = args.size or vq.config.image_size
    vq.grid_size(args.size)
    image = resize_crop(load_rgb(args.image), args.size, args.resize)
    with torch.no_grad():
        codes = vq.encode_to_codes(to_tensor(image).to(device))
        rec = to_uint8(vq.decode_codes(codes))[0]
    original = np.asarray(image)
    out = save_image(make_grid(np.stack([original, rec]), ncol=2) if args.side_by_side else rec, args.out)
    psnr = float(image_psnr(rec, original)[0])
    write_sidecar(out, {"image": args.image, "vq": args.vq, "vq_preset": args.vq_preset, "size": args.size,
                        "resize": args.resize,
                        "grid": list(codes.shape[1:]), "psnr_db": psnr, "fingerprint": vq.fingerprint()},
                  kind="vq reconstruct")
    print(f"{out}: {codes.shape[1]}x{codes.shape[2]} tokens, PSNR {psnr:.2f} dB, VQ fingerprint {vq.fingerprint()}")
    return 0


def add_parsers(sub) -> None:
    """Add this group's subcommands to the CLI's subparsers."""

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
                     help="architecture preset (VQ-16, VQ-8, VQ-tiny-16, VQ-tiny-8, VQ-tiny-4); default: from "
                          "the file, else VQ-16")
    rec.add_argument("--size", type=_int(1, MAX_IMAGE_SIZE), default=None,
                     help="crop size in pixels (default: the tokenizer's, 384 = 24x24 tokens for VQ-16)")
    rec.add_argument("--side-by-side", action="store_true", help="write original and reconstruction side by side")
    rec.add_argument("--resize", default="original", choices=["original", "adm"],
                     help="original: Resize + CenterCrop as AR-RAG (default); adm: LlamaGen's crop")
    _add_trust(rec)
    _add_device(rec)
    rec.set_defaults(func=_vq_reconstruct)
