"""`arrag demo`: the main job on the embedded default (ShapesWorld), as far as the pipeline exists today.

1. Train the tiny VQ on rendered ShapesWorld images; measure reconstruction PSNR on validation images.
2. Build the demo retriever: render database images, `encode` them with that VQ, `build-index`.
3. Generate test prompts with base and DAiD from the same seeds. The language model is a randomly
   initialised tiny Janus (no trained demo weights ship yet), so base images are noise; the figure that
   shows what retrieval does is the *database code rate*: the share of generated codes that occur
   anywhere in the database, measured on the images of this run.
Every printed number is measured in this run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from arrag.demo.shapes import ShapesWorld
from arrag.demo.train_demo import reconstruction_psnr, train_vq
from arrag.image_io import make_grid, save_image, to_tensor, to_uint8
from arrag.provenance import write_json, write_sidecar
from arrag.vq import VQModel


def build_demo_retriever(vq_path: Path, folder: Path, images: int, image_size: int, seed: int) -> Path:
    """Render `images` database images, encode them and index them under `folder` (reused when up to date)."""
    from arrag.build_retriever.build_index import build_index
    from arrag.build_retriever.encode import encode
    from arrag.vq import load_vq

    fingerprint = load_vq(vq_path).fingerprint()
    index = folder / "index"
    if (index / "manifest.json").exists():
        man = json.loads((index / "manifest.json").read_text())
        if man.get("vq_fingerprint") == fingerprint and man.get("images") == images:
            print(f"[demo] reusing the demo retriever {index}")
            return index
    world = ShapesWorld("database", seed=seed, size=image_size)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(images):
            save_image(world.image(i), Path(tmp) / f"{i:06d}.png")
        store = folder / "codes"
        if store.exists():
            import shutil

            shutil.rmtree(store)
        encode(tmp, store, vq_path, image_size=image_size, batch_size=64, num_workers=0, min_size=8, progress=False)
    build_index(store, index, overwrite=True, progress=False)
    return index


def database_code_rate(codes: torch.Tensor, database_codes: np.ndarray) -> float:
    """Share of the codes of generated grids [N, h, w] that occur anywhere in the database."""
    return float(np.isin(codes.numpy(), database_codes).mean())


def run_demo(out_dir: str | Path = "result/demo", steps: int = 120, image_size: int = 64, batch: int = 8,
             n_eval: int = 16, seed: int = 0, device: str | torch.device = "cpu", database_images: int = 600,
             retriever_dir: str | Path = "data/retriever/demo_L") -> dict:
    """Run the demo stages and write result/demo/{grid.png, vq_reconstruction.png, scores.json}."""
    from arrag.decoding.sampler import method_hooks, sample_codes
    from arrag.demo.presets import build_word_tokenizer, tiny_janus_config
    from arrag.janus import JanusPro, Prompter
    from arrag.retrieval.codestore import CodeStore
    from arrag.retrieval.retriever import PatchRetriever

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val = ShapesWorld("validation", seed=seed, size=image_size).images(0, n_eval)

    # 1. Tokenizer.
    torch.manual_seed(seed)
    psnr_before = reconstruction_psnr(VQModel("VQ-tiny-8").to(device).eval(), val)
    print(f"[demo] 1/3 tokenizer: training VQ-tiny-8 on ShapesWorld for {steps} steps at {image_size}px")
    result = train_vq("VQ-tiny-8", image_size=image_size, steps=steps, batch=batch, seed=seed, device=device)
    vq = result.model
    psnr_after = reconstruction_psnr(vq, val)
    with torch.no_grad():
        rec = to_uint8(vq.decode_codes(vq.encode_to_codes(to_tensor(val[:8]).to(device))))
    save_image(make_grid(np.concatenate([val[:8], rec]), ncol=8), out / "vq_reconstruction.png")
    weights = out / "vq_tiny.safetensors"
    vq.save(weights)

    # 2. Retriever.
    print(f"[demo] 2/3 retriever: encoding {database_images} database images and building the index")
    index_dir = build_demo_retriever(weights, Path(retriever_dir), database_images, image_size, seed)
    retriever = PatchRetriever.load(index_dir)
    store = CodeStore.open(Path(retriever_dir) / "codes")
    database_codes = np.unique(np.concatenate([c.reshape(-1) for _, c in store.iter_chunks(1024)]))

    # 3. Generation: base vs DAiD, same seeds.
    print("[demo] 3/3 generation: base vs DAiD (random tiny Janus with the trained VQ)")
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_word_tokenizer(tmp)
    torch.manual_seed(seed)
    model = JanusPro(tiny_janus_config(len(tok), vq_preset="VQ-tiny-8")).eval()
    model.gen_vision_model.load_state_dict(vq.state_dict())
    model.to(device)
    prompter = Prompter(tok)
    prompts = [ShapesWorld("test", seed=seed).scene(i).caption for i in range(4)]
    methods = {"base": [], "daid (lambda 0.1)": method_hooks(model, "daid", retriever, daid_lambda=0.1, daid_k=256),
               "daid (lambda 1.0)": method_hooks(model, "daid", retriever, daid_lambda=1.0, daid_k=256)}
    rows, scores = [], {}
    for name, hooks in methods.items():
        codes = sample_codes(model, prompts, parallel_size=2, seed=seed, image_size=image_size, hooks=hooks,
                             prompter=prompter, progress=False)
        with torch.no_grad():
            rows.append(to_uint8(model.vq.decode_codes(codes.to(device))))
        scores[name] = {"database_code_rate": database_code_rate(codes.cpu(), database_codes)}
    grid = save_image(make_grid(np.concatenate(rows), ncol=2 * len(prompts)), out / "grid.png")

    summary = {
        "tokenizer": {"vq_preset": "VQ-tiny-8", "image_size": image_size, "train_steps": steps,
                      "train_seconds": round(result.seconds, 1), "first_loss": result.losses[0],
                      "last_loss": result.losses[-1], "val_images": n_eval, "val_psnr_untrained_db": psnr_before,
                      "val_psnr_trained_db": psnr_after, "codebook_usage": vq.quantize.usage(),
                      "fingerprint": vq.fingerprint()},
        "retriever": {"folder": str(index_dir), "images": database_images, "entries": retriever.entries,
                      "factory": retriever.manifest["factory"], "distinct_codes": len(database_codes)},
        "generation": {"prompts": prompts, "samples_per_prompt": 2, "seed": seed,
                       "language_model": "random tiny Janus (untrained)", "methods": scores},
    }
    write_json(out / "scores.json", summary)
    settings = dict(steps=steps, image_size=image_size, batch=batch, n_eval=n_eval, seed=seed, device=str(device),
                    database_images=database_images)
    for path in (grid, out / "vq_reconstruction.png", weights):
        write_sidecar(path, settings)
    print(f"{'':28}{'untrained':>12}{'trained':>12}")
    print(f"{'VQ val PSNR (dB)':28}{psnr_before:12.2f}{psnr_after:12.2f}")
    print(f"retriever: {retriever.entries:,} entries from {database_images} images ({retriever.manifest['factory']})")
    print(f"{'method':28}{'database code rate':>20}   (share of generated codes that occur in the database)")
    for name, s in scores.items():
        print(f"{name:28}{s['database_code_rate']:20.3f}")
    print(f"[demo] wrote {grid} (rows: {', '.join(methods)}), {out / 'vq_reconstruction.png'}, {out / 'scores.json'}")
    print("[demo] the language model is untrained: trained ShapesWorld weights (base and FAiD) do not ship yet")
    return summary
