"""Training of the ShapesWorld tiny models: the recipe behind arrag/demo/assets/.

    python -m arrag.demo.train_demo [--workdir data/demo_train] [--assets arrag/demo/assets]

Stages, in order, each skipped when its output exists (a rerun resumes; the AR and FAiD trainers also
resume from their last checkpoint):
  1. the VQ tokenizer (VQ-tiny-4: 64-px images -> 16x16 tokens) on rendered training images;
  2. the base AR model (a small Janus of the real classes, word-level tokenizer) on (caption, codes) of the
     training split, teacher-forced cross-entropy (the cells on and around the shapes weighted --shape-weight)
     with caption dropout for CFG; then its loss on training against held-out images (what it memorised);
  3. FAiD from that base: the demo retriever over the database split (`arrag encode` + `build-index`),
     `construct-train` on a slice of the training split, then `train-faid`;
  4. export: bf16 safetensors of base and FAiD (each holding its VQ) + tokenizer + recipe.json.
Seeded throughout; losses and timings go to recipe.json.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from arrag import fileops
from arrag.demo.database import DEMO_RETRIEVER, build_demo_retriever, render_split
from arrag.demo.worlds import get_world
from arrag.image_io import psnr, to_tensor
from arrag.vq import VQModel, load_vq
from arrag.weight_files import load_pickled


@dataclass
class VQTrainResult:
    model: VQModel
    losses: list[float]
    seconds: float


def reconstruction_psnr(model: VQModel, images: np.ndarray, batch: int = 16) -> float:
    """Mean PSNR (dB) of decode(encode(x)) against uint8 images [N, H, W, 3], on the [0, 255] scale."""
    return float(np.mean(psnr(model.eval().round_trip(images, batch=batch), images)))


def round_trip_accuracy(model: VQModel, split, count: int) -> dict:
    """The world's scorer on decode(encode(x)) of a split's first `count` images: the tokenizer's ceiling (what a
    perfect AR model over these codes could score). `split`: a world split (ShapesWorld, TailWorld)."""
    from arrag.demo.scorers import scorer_for

    scenes = [split.scene(i) for i in range(count)]
    out = scorer_for(split).accuracy(model.round_trip(split.images(0, count), "janus"), scenes)
    out.pop("correct", None)  # each image's verdict: not for the record
    return out


def shape_weighted_mse(rec: torch.Tensor, x: torch.Tensor, weight: float = 10.0, margin: int = 2) -> torch.Tensor:
    """MSE with shape pixels and the background `margin` px around them weighted `weight` times.

    Shapes cover a few % of a ShapesWorld image, so a plain MSE spends a short run on the background.
    The weight reaches past the shape's edge on purpose: weighting only the shape's own (saturated) pixels
    makes colour bleeding outward cheap, and the decoder then bloats shapes (diamonds come back as circles,
    nearby squares merge); with the margin, ShapesWorld's round trip accuracy went from 0.37 to 0.53 after
    500 steps. x, rec: [B, 3, H, W] in [-1, 1]."""
    hi, lo = x.max(1).values, x.min(1).values
    saturation = (hi - lo) / (hi + 1.0).clamp_min(1e-3)  # (max - min) / max on the [0, 2] scale
    shape = (saturation > 0.4).float()[:, None]
    if margin:
        shape = torch.nn.functional.max_pool2d(shape, 2 * margin + 1, stride=1, padding=margin)
    w = 1.0 + (weight - 1.0) * shape
    return (w * (rec - x) ** 2).mean() / w.mean()


def train_vq(preset: str = "VQ-tiny-8", image_size: int = 64, steps: int = 100, batch: int = 8,
             lr: float = 2e-3, seed: int = 0, device: str | torch.device = "cpu", restart_every: int = 20,
             progress: bool = True, world=None) -> VQTrainResult:
    """Train a VQ-VAE on a demo world's training images (`world`: a split; default ShapesWorld's train split):
    MSE reconstruction + codebook + commitment losses.

    Every `restart_every` steps, codes unused since the last restart are moved onto random encoder outputs
    of the current batch (dead-code restart): without it a short CPU run collapses onto a few dozen codes
    and cannot tell ShapesWorld's colours apart. Seeded: the same arguments give the same weights.
    """
    torch.manual_seed(seed)
    model = VQModel(preset).to(device).train()
    world = world or get_world("shapes").split("train", seed=seed, size=image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, t0 = [], time.time()
    counts = torch.zeros(model.quantize.cfg.codebook_size, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="train VQ", unit="step", disable=not progress)
    for step in bar:
        x = to_tensor(world.images(step * batch, batch)).to(device)
        out = model(x)
        loss = shape_weighted_mse(out.reconstruction, x) + out.vq_loss + out.commit_loss + out.entropy_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        counts += torch.bincount(out.codes.reshape(-1).cpu(), minlength=len(counts))
        if restart_every and (step + 1) % restart_every == 0 and step + 1 < 0.8 * steps:
            dead = (counts == 0).nonzero().squeeze(1)
            if len(dead):
                with torch.no_grad():
                    dim = model.quantize.cfg.codebook_embed_dim
                    z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, dim)
                    pick = torch.randint(0, len(z), (len(dead),), generator=gen).to(z.device)
                    noise = torch.randn(len(dead), z.shape[1], generator=gen).to(z.device)  # CPU draws: seeded alike
                    new = z[pick].float() + 0.01 * noise
                    model.quantize.embedding.weight[dead.to(device)] = torch.nn.functional.normalize(new, dim=-1)
            counts.zero_()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", usage=f"{model.quantize.usage():.2f}")
    return VQTrainResult(model.eval(), losses, time.time() - t0)


# ----------------------------------------------------------------------------------------------------------
# The full recipe (stages 1-4)

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class DemoRecipe:
    """Every setting of the demo models. The shipped assets: these defaults, then the same run continued with
    base_steps 9000, 12000 and 15000 (see assets/README.md)."""

    world: str = "shapes"
    seed: int = 0
    image_size: int = 64
    vq_preset: str = "VQ-tiny-4"
    vq_steps: int = 1500
    vq_batch: int = 16
    vq_lr: float = 2e-3
    train_images: int = 96000
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    base_steps: int = 6000
    base_batch: int = 24
    base_lr: float = 1.5e-3
    base_warmup: int = 100
    # Weight of the image tokens on and around the shapes in the base's loss (1 = plain cross-entropy): the
    # per-context optimum is unchanged, a small model only spends more of itself on the shapes than on background.
    shape_weight: float = 4.0
    cfg_drop: float = 0.1
    database_images: int = 4800
    faid_images: int = 2000
    faid_steps: int = 500
    faid_batch: int = 8
    faid_lr: float = 1e-3
    num_blender: int = 2
    num_hop: str = "1,2"
    faid_blender_init: str = "zero"  # FAiD starts at the base's loss (the original init raises it; README)
    k: int = 10
    lora_r: int = 16
    lora_alpha: int = 32
    zipf_s: float = 2.0  # TailWorld only: training frequency of the pattern of rank k is proportional to k^-zipf_s
    shape: str = "L"  # the demo retriever's neighbourhood (L, as the original; 2hop: 12 neighbours)
    faid_start: int = 0  # the first train-split item of FAiD's images (past train_images: images the base never saw)
    faid_split: str = "train"  # the split FAiD's images come from (TailWorld: database, every pattern evenly)

    @property
    def faid_images_tag(self) -> str:
        """What names FAiD's images in the workdir (its code store, its token weights): their split unless train,
        and their first item unless 0, e.g. '_database_from3000'."""
        return (f"_{self.faid_split}" if self.faid_split != "train" else "") + \
            (f"_from{self.faid_start}" if self.faid_start else "")

    def split(self, name: str):
        """This recipe's world's split `name` (seeded, at the recipe's image size)."""
        return get_world(self.world).split(name, seed=self.seed, size=self.image_size, zipf_s=self.zipf_s)


# What each DemoRecipe field sets (the recipe's --help).
RECIPE_HELP = {
    "world": "the demo world: shapes (ShapesWorld) or tail (TailWorld, the long tail)",
    "zipf_s": "TailWorld: Zipf exponent of the patterns' training frequencies (rank k drawn with weight k^-s)",
    "shape": "the demo retriever's neighbourhood: L (the original's 4 neighbours) or 2hop (12)",
    "faid_start": "first item of FAiD's images in --faid-split (past the images the base or the database holds)",
    "faid_split": "the world split FAiD's images come from: train (the base's distribution) or database (TailWorld: "
                  "every pattern evenly, past the demo database's own images)",
    "seed": "seed of every random choice (scenes, initialisation, batches)",
    "image_size": "image side in pixels (64 = 16x16 tokens with VQ-tiny-4)",
    "vq_preset": "VQ architecture preset (arrag.vq presets)",
    "vq_steps": "VQ training steps", "vq_batch": "VQ images per step", "vq_lr": "VQ learning rate",
    "train_images": "rendered training images for the base (its batches sample them with replacement)",
    "hidden": "base hidden size", "layers": "base decoder layers", "heads": "base attention heads",
    "kv_heads": "base key/value heads (grouped-query attention)", "intermediate": "base MLP width",
    "base_steps": "base training steps (a larger value continues a finished run from its checkpoint)",
    "base_batch": "base images per step", "base_lr": "base peak learning rate (cosine to 10%%)",
    "base_warmup": "base warm-up steps",
    "shape_weight": "loss weight of the tokens on and around the shapes, for the base and FAiD (1 = plain "
                    "cross-entropy)",
    "cfg_drop": "probability of replacing a caption by the unconditional prompt (for CFG)",
    "database_images": "images in the demo retrieval database",
    "faid_images": "FAiD training images (steps x batch of them = one epoch)",
    "faid_steps": "FAiD training steps", "faid_batch": "FAiD images per step", "faid_lr": "FAiD learning rate",
    "num_blender": "FAiD blenders", "num_hop": "FAiD blender hops, e.g. 1,2",
    "faid_blender_init": "FAiD blender initialisation: zero (adds nothing at step 0) or original",
    "k": "FAiD candidates per cell", "lora_r": "FAiD LoRA rank", "lora_alpha": "FAiD LoRA alpha",
}


def encode_split(workdir: Path, name: str, split: str, count: int, vq_path: Path, recipe: DemoRecipe,
                 device: str = "auto", start: int = 0) -> Path:
    """Render + `arrag encode` items start..start+count-1 of a split into a code store with captions (resumable)."""
    from arrag.build_retriever.encode import encode
    from arrag.retrieval.codestore import CodeStore

    store = workdir / f"{name}_codes"
    if (store / "manifest.json").exists():
        return store
    images = render_split(workdir / f"{name}_images", split, count, recipe.image_size, recipe.seed, recipe.world,
                          start=start, zipf_s=recipe.zipf_s)
    encode(images, store, vq_path, image_size=recipe.image_size, batch_size=64, num_workers=0, min_size=8,
           shard_size=4096, device=device, progress=True)
    CodeStore.open(store)
    return store


def train_base(out: Path, store_dir: Path, vq_path: Path, recipe: DemoRecipe, progress: bool = True,
               device: str | torch.device = "cpu") -> dict:
    """Stage 2: a small Janus trained from scratch on (caption, codes); checkpoints every 250 steps.

    On CUDA the forward pass runs under bf16 autocast (weights and optimizer state stay fp32)."""
    from arrag.demo.presets import build_word_tokenizer, tiny_janus_config
    from arrag.janus import JanusPro, Prompter
    from arrag.janus.faid_layers import full_sequence_logits
    from arrag.retrieval.codestore import CodeStore
    from arrag.vq import load_vq

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(out, get_world(recipe.world).vocabulary())
    torch.manual_seed(recipe.seed)
    config = tiny_janus_config(len(tokenizer), hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads,
                               kv_heads=recipe.kv_heads, intermediate=recipe.intermediate,
                               vq_preset=recipe.vq_preset, max_positions=512)
    device = torch.device(device)
    model = JanusPro(config)
    model.gen_vision_model.load_state_dict(load_vq(vq_path, recipe.vq_preset).state_dict())
    model.to(device)
    model.gen_vision_model.requires_grad_(False)
    store = CodeStore.open(store_dir)
    codes = torch.from_numpy(np.concatenate([c for _, c in store.iter_chunks(4096)]).astype(np.int64))
    codes = codes.reshape(len(codes), -1)
    prompter = Prompter(tokenizer)
    captions = store.captions()
    cond = [prompter.ids(c) for c in captions]
    if recipe.shape_weight <= 0:
        raise SystemExit(f"error: --shape-weight must be > 0 (1 = plain cross-entropy), got {recipe.shape_weight}")
    weights = None  # 1 everywhere: the plain mean, without needing the scenes behind the store
    if recipe.shape_weight != 1.0:
        weights = object_cell_weights(captions, recipe, store.grid[0]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.base_lr, betas=(0.9, 0.95), weight_decay=0.01)
    steps, warm = recipe.base_steps, recipe.base_warmup
    lr_at = lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ckpt = out / "checkpoint.pt"
    start, losses = 0, []
    if ckpt.exists():
        state = load_pickled(ckpt, map_location=device)  # tensors, numbers and lists only
        if state["step"] > steps:
            raise SystemExit(f"error: {ckpt} is at step {state['step']}, past --base-steps {steps}; "
                             "raise --base-steps or use a new --workdir")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        # A larger --base-steps than the checkpoint was made with extends the run: the cosine is recomputed
        # over the new length, so training continues from the checkpoint at that schedule's learning rate.
        sched.load_state_dict(state["scheduler"])
        start, losses = state["step"], state["losses"]
        print(f"[train-demo] base: resuming at step {start} of {steps}", file=sys.stderr)
    model.train()
    model.gen_vision_model.eval()
    grid = store.grid
    t0 = time.time()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train base AR", unit="step",
               disable=not progress)
    for step in bar:
        rng = np.random.default_rng([recipe.seed, 7, step])  # the batch of a step depends only on the step
        pick = rng.integers(0, len(codes), recipe.base_batch)
        drop = rng.random(recipe.base_batch) < recipe.cfg_drop
        rows = [prompter.unconditional(cond[i]) if d else cond[i] for i, d in zip(pick, drop, strict=True)]
        batch = prompter.left_pad(rows)
        target = codes[pick].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = full_sequence_logits(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                          target, None, grid)
        ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               reduction="none")
        loss = ce.mean()  # what is logged: the plain cross-entropy, comparable across weightings
        w = None if weights is None else weights[torch.from_numpy(pick).to(device)].reshape(-1)
        opt.zero_grad(set_to_none=True)
        (loss if w is None else (ce * w).sum() / w.sum()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            with fileops.atomic_path(ckpt) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "step": step + 1, "losses": losses}, tmp)
    model.cpu().eval().save_pretrained(out)
    return {"steps": steps, "losses": losses[::25], "final_loss": float(np.mean(losses[-100:])),
            "seconds_this_run": round(time.time() - t0, 1)}


def object_cell_weights(captions: list[str | None], recipe: DemoRecipe, grid: int, start: int = 0,
                        split: str = "train") -> torch.Tensor:
    """float [N, T]: recipe.shape_weight on the cells of row i's objects (the world's `split` item start + i), 1
    elsewhere. The store must hold items start..start+N-1 in order; their captions are checked against the
    scenes."""
    world = recipe.split(split)
    out = np.ones((len(captions), grid * grid), dtype=np.float32)
    for i, caption in enumerate(captions):
        scene = world.scene(start + i)
        if caption != scene.caption:
            raise SystemExit(f"error: training store row {i} has caption {caption!r}, not the world's {split} item "
                             f"{start + i}'s {scene.caption!r}; --shape-weight needs the store train_demo rendered")
        out[i, scene.object_cells(grid).reshape(-1)] = recipe.shape_weight
    return torch.from_numpy(out)


def faid_token_weights_path(workdir: Path, recipe: DemoRecipe) -> Path | None:
    """Where FAiD's token weights for this recipe live; None when the recipe weighs nothing (shape weight 1)."""
    tag = f"{recipe.shape_weight:g}{recipe.faid_images_tag}"
    return None if recipe.shape_weight == 1.0 else workdir / f"faid_token_weights_{tag}.npy"


def faid_token_weights(workdir: Path, faid_store: Path, recipe: DemoRecipe) -> Path | None:
    """FAiD's `--token-weights`: the base's shape weighting on the FAiD training images (None when it is 1), so
    that fine-tuning keeps the objective the base was trained with instead of drifting to the background."""
    from arrag.retrieval.codestore import CodeStore

    path = faid_token_weights_path(workdir, recipe)
    if path is not None and not path.exists():
        store = CodeStore.open(faid_store)
        fileops.save_npy(path, object_cell_weights(store.captions(), recipe, store.grid[0], recipe.faid_start,
                                                  recipe.faid_split).numpy())
    return path


@torch.no_grad()
def held_out_loss(model_dir: Path, recipe: DemoRecipe, count: int = 384, batch: int = 32,
                  device: str | torch.device = "cpu") -> dict:
    """Plain teacher-forced cross-entropy (nats per token) of a trained base on its first `count` training items
    (at most recipe.train_images), on as many training-split items it never saw (`unseen`: from train_images on)
    and on as many validation items, overall and split into the objects' cells and the background.

    unseen minus train is what the base memorised of its training images rather than learnt of the world (on the
    object cells, the part that matters for the scorer). Validation can differ for another reason too: TailWorld's
    holds every pattern evenly, its training split mostly the head, so validation minus train mixes both."""
    from arrag.janus import JanusPro, Prompter
    from arrag.janus.faid_layers import full_sequence_logits
    from arrag.janus.prompting import load_tokenizer

    model = JanusPro.from_pretrained(model_dir, dtype=torch.float32, device=device, quiet=True).eval()
    prompter = Prompter(load_tokenizer(model_dir))
    count = min(count, recipe.train_images)  # training items beyond train_images were never trained on
    out = {}
    for name, split, first in (("train", "train", 0), ("unseen", "train", recipe.train_images),
                               ("validation", "validation", 0)):
        world = recipe.split(split)
        sums = np.zeros(3)
        counts = np.zeros(3)
        for start in range(first, first + count, batch):
            n = min(batch, first + count - start)
            scenes = [world.scene(i) for i in range(start, start + n)]
            grid = model.vq.encode_to_codes(to_tensor(world.images(start, n)).to(model.device))  # [n, h, w]
            codes = grid.reshape(n, -1)
            rows = prompter.left_pad([prompter.ids(sc.caption) for sc in scenes])
            logits = full_sequence_logits(model, rows.input_ids.to(model.device), rows.attention_mask.to(model.device),
                                          codes, None, tuple(grid.shape[1:]))
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1),
                                                   reduction="none").reshape(n, -1).cpu().numpy()
            cells = np.stack([sc.object_cells(grid.shape[1]).reshape(-1) for sc in scenes])
            for j, m in enumerate((np.ones_like(cells), cells, ~cells)):
                sums[j] += ce[m].sum()
                counts[j] += m.sum()
        out[name] = dict(zip(("all", "object_cells", "background"), (sums / counts).round(4).tolist(), strict=True))
    out["images"] = count
    return out


def base_retrieval_gain(base_dir: Path, index: Path, workdir: Path, vq_path: Path, recipe: DemoRecipe,
                        device: torch.device, images: int = 256, control_index: Path | None = None) -> dict:
    """`arrag eval retrieval-gain` of the base against the demo database on held-out (validation) images, at the
    demo's DAiD k: whether the database knows anything about the next code that the base does not. TailWorld:
    per frequency bucket, and again against the control database (no tail pattern), whose gain is what any
    database of similar images gives."""
    from arrag.eval.retrieval_gain import measure_folders
    from arrag.retrieval.codestore import CodeStore

    store = CodeStore.open(encode_split(workdir, "validation", "validation", images, vq_path, recipe, str(device)))
    settings = dict(device=str(device), images=images, lambdas=(0.0, 0.01, 0.03, 0.1, 0.3), taus=(0.3, 1.0))
    if recipe.world != "tail":
        from arrag.demo import DEMO_DAID

        out, _ = measure_folders(base_dir, index, store, k=DEMO_DAID["daid_k"], **settings)
        out["split"] = "validation"
        return out
    from arrag.demo import TAIL_DAID
    from arrag.demo.tail import bucket_of_caption

    groups = [bucket_of_caption(store.caption(i), recipe.seed) for i in range(min(images, store.num_images))]
    settings.update(lambdas=(0.0, 0.03, 0.1, 0.3, 0.6), taus=(0.01, 0.03, 0.1, 0.3, 1.0))
    out = {"split": "validation", "aggregate": TAIL_DAID.get("daid_aggregate", "nearest")}
    for name, folder in (("world_database", index), ("control_database", control_index)):
        if folder is not None:
            out[name], _ = measure_folders(base_dir, folder, store, k=TAIL_DAID["daid_k"], groups=groups,
                                           aggregate=out["aggregate"], **settings)
    return out


def train_counts(recipe: DemoRecipe) -> dict[str, int] | None:
    """TailWorld: how many of the base's training images show each pattern (the x axis of the demo's plot)."""
    if recipe.world != "tail":
        return None
    split = recipe.split("train")
    names = [split.pattern_of(i) for i in range(recipe.train_images)]
    return {p: names.count(p) for p in split.frequencies.ranking}


def _device_label(dev: torch.device) -> str:
    """'cpu (2 threads)' or the CUDA device's name, for recipe.json."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def export_assets(src: Path, dst: Path) -> None:
    """A trained Janus folder -> bf16 safetensors + config + tokenizer under `dst` (the shipped layout)."""
    from arrag.janus import JanusPro
    from arrag.janus.model import CHECKPOINT_FILES
    from arrag.janus.prompting import TOKENIZER_FILES

    model = JanusPro.from_pretrained(src, dtype=torch.float32, device="cpu", quiet=True)
    tmp = fileops.temp_path(dst)
    fileops.remove_owned_dir(tmp, what="temporary checkpoint", owned=CHECKPOINT_FILES)
    model.save_pretrained(tmp, dtype=torch.bfloat16)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    fileops.replace_owned_dir(tmp, dst, what="model checkpoint", is_ours=(dst / "config.json").is_file(),
                              owned=CHECKPOINT_FILES, overwrite=True)


def _faid_stage(workdir: Path, index: Path, vq_path: Path, recipe: DemoRecipe, report: dict, dev,
                progress: bool) -> Path:
    """Stage 3: encode FAiD's images, construct their candidates, fine-tune FAiD and measure its candidate gain;
    records it all in `report` (written to <workdir>/report.json) and returns FAiD's folder."""
    from arrag.provenance import write_json
    from arrag.train.construct import construct_train
    from arrag.train.train_faid import FaidTrainConfig, candidate_gain, train_faid

    report_path, where, t0 = workdir / "report.json", _device_label(dev), time.time()
    faid_store = encode_split(workdir, f"faid{recipe.faid_images_tag}", recipe.faid_split, recipe.faid_images,
                              vq_path, recipe, str(dev), start=recipe.faid_start)
    construct_train(faid_store, index, retrieved_key_num=recipe.k, progress=progress)
    faid_dir = workdir / "faid"
    faid_base = report.get("faid", {}).get("base_steps")
    weights_path = faid_token_weights_path(workdir, recipe)
    weights_name = None if weights_path is None else weights_path.name
    earlier_base = faid_base != report["base"]["steps"]
    other_loss = report.get("faid", {}).get("token_weights") != weights_name
    if (faid_dir / "settings.json").exists() and (earlier_base or other_loss):
        # That FAiD was fine-tuned from an earlier (shorter) base, or with another loss weighting (FAiDs from
        # before the recipe weighted its loss record none): keep it aside and train a new one.
        aside, n = workdir / f"faid.base{faid_base or 'earlier'}", 1
        while aside.exists():  # never overwrite an earlier one
            aside, n = workdir / f"faid.base{faid_base or 'earlier'}.{n}", n + 1
        faid_dir.rename(aside)
        report.pop("faid", None)
        why = "from an earlier base" if earlier_base else "with another loss weighting"
        print(f"[train-demo] FAiD was trained {why}; moved to {aside}", file=sys.stderr)
    if not (faid_dir / "settings.json").exists():
        weights = faid_token_weights(workdir, faid_store, recipe)
        train_faid(FaidTrainConfig(base=str(workdir / "base"), store=str(faid_store), out=str(faid_dir),
                                   token_weights=None if weights is None else str(weights),
                                   num_blender=recipe.num_blender, num_hop=recipe.num_hop, retrieved_key_num=recipe.k,
                                   blender_init=recipe.faid_blender_init,
                                   lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lr=recipe.faid_lr,
                                   batch_size=recipe.faid_batch, grad_accum=1, max_steps=recipe.faid_steps,
                                   schedule="cosine", warmup_ratio=0.05, cfg_drop=recipe.cfg_drop, seed=recipe.seed,
                                   save_every=100, num_workers=0, cpu=dev.type == "cpu", resume=True,
                                   progress=progress))
        history = json.loads((faid_dir / "settings.json").read_text())["loss_history"]
        report["faid"] = {"final_loss": float(np.mean([v for _, v in history[-50:]])),
                          "losses": [v for _, v in history[::10]], "seconds": round(time.time() - t0),
                          "device": where, "base_steps": report["base"]["steps"],
                          # what the losses are: the plain mean, or weighted like the base's (--token-weights)
                          "token_weights": weights_name}
        write_json(report_path, report)
    if "candidate_gain" not in report["faid"]:
        # What FAiD takes from retrieval: its training loss with its candidates against without them.
        report["faid"]["candidate_gain"] = candidate_gain(faid_dir, faid_store, retrieved_key_num=recipe.k,
                                                          images=min(256, recipe.faid_images), device=dev)
        write_json(report_path, report)
    gain = report["faid"]["candidate_gain"]
    print(f"[train-demo] 3/4 FAiD: final loss {report['faid']['final_loss']:.3f}; on its training images "
          f"{gain['with_candidates']:.3f} with candidates, {gain['without_candidates']:.3f} without",
          file=sys.stderr)
    return faid_dir


def run_recipe(workdir: str | Path = "data/demo_train", assets: str | Path = ASSETS,
               retriever_dir: str | Path = DEMO_RETRIEVER, recipe: DemoRecipe | None = None,
               progress: bool = True, device: str = "auto", stop_after: str | None = None) -> dict:
    """Stages 1-4 (see the module docstring); returns the report also written to <assets>/recipe.json.

    `device` ('auto', 'cpu', 'cuda', 'cuda:1') runs every stage there; each stage records the device it ran
    on and its time, so a recipe.json says how its weights were made. `stop_after` ('vq', 'base'): stop once that
    stage is done (a long recipe in steps that fit a session; the next run resumes from there)."""
    from arrag.provenance import environment, write_json
    from arrag.runtime import resolve_device

    recipe = recipe or DemoRecipe()
    dev = resolve_device(device)
    where = _device_label(dev)
    workdir, assets = Path(workdir), Path(assets)
    workdir.mkdir(parents=True, exist_ok=True)
    report_path = workdir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["recipe"] = asdict(recipe)
    t_all = time.time()

    vq_path = workdir / "vq.safetensors"
    if not vq_path.exists():
        t0 = time.time()
        result = train_vq(recipe.vq_preset, recipe.image_size, recipe.vq_steps, recipe.vq_batch, recipe.vq_lr,
                          recipe.seed, device=dev, progress=progress, world=recipe.split("train"))
        result.model.save(vq_path)
        report["vq"] = {"final_loss": float(np.mean(result.losses[-50:])), "losses": result.losses[::20],
                        "codebook_usage": float(result.model.quantize.usage()), "seconds": round(time.time() - t0),
                        "device": where}
        write_json(report_path, report)
    if "validation_round_trip" not in report.get("vq", {}):  # measured apart, so a rerun completes the record
        vq = load_vq(vq_path, recipe.vq_preset).eval()
        val = recipe.split("validation")
        report.setdefault("vq", {})
        report["vq"]["validation_psnr"] = reconstruction_psnr(vq, val.images(0, 64))
        report["vq"]["validation_round_trip"] = round_trip_accuracy(vq, val, 240)
        write_json(report_path, report)
    vq_report = report.get("vq", {})
    print(f"[train-demo] 1/4 VQ: {vq_report.get('validation_psnr', 0):.2f} dB PSNR, round trip accuracy "
          f"{vq_report.get('validation_round_trip', {}).get('overall', float('nan')):.2f} on validation",
          file=sys.stderr)
    if stop_after == "vq":
        return report

    train_store = encode_split(workdir, "train", "train", recipe.train_images, vq_path, recipe, str(dev))
    base_dir = workdir / "base"
    done_steps = report.get("base", {}).get("steps")
    if not (base_dir / "model.safetensors").exists() or done_steps != recipe.base_steps:
        # Missing, or a finished run asked to go on for more steps (resumes from its checkpoint).
        t0 = time.time()
        earlier = report.get("base", {}).get("seconds", 0) if done_steps else 0
        report["base"] = train_base(base_dir, train_store, vq_path, recipe, progress, dev)
        report["base"]["seconds"] = earlier + round(time.time() - t0)
        report["base"]["device"] = where
        write_json(report_path, report)
    if "held_out" not in report["base"]:
        report["base"]["held_out"] = held_out_loss(base_dir, recipe, device=dev)
        write_json(report_path, report)
    held = report["base"]["held_out"]
    print(f"[train-demo] 2/4 base AR: final loss {report['base']['final_loss']:.3f}; on the objects' cells "
          f"{held['train']['object_cells']:.3f} on training images, "
          + (f"{held['unseen']['object_cells']:.3f} on unseen ones, " if "unseen" in held else "")
          + f"{held['validation']['object_cells']:.3f} on validation", file=sys.stderr)
    if stop_after == "base":
        return report

    t0 = time.time()
    index = build_demo_retriever(base_dir, Path(retriever_dir), recipe.database_images, recipe.image_size,
                                 recipe.seed, device=str(dev), world=recipe.world, shape=recipe.shape,
                                 zipf_s=recipe.zipf_s)
    control = None
    if recipe.world == "tail":  # the control database: the same number of images, no tail pattern
        control = build_demo_retriever(base_dir, Path(retriever_dir).with_name(Path(retriever_dir).name + "_control"),
                                       recipe.database_images, recipe.image_size, recipe.seed, device=str(dev),
                                       world="tail", split="control_database", shape=recipe.shape,
                                       zipf_s=recipe.zipf_s)
        if "train_counts" not in report:
            report["train_counts"] = train_counts(recipe)
    if "retrieval_gain" not in report["base"]:
        report["base"]["retrieval_gain"] = base_retrieval_gain(base_dir, index, workdir, vq_path, recipe, dev,
                                                               images=384 if recipe.world == "tail" else 256,
                                                               control_index=control)
        write_json(report_path, report)
    gain = report["base"]["retrieval_gain"]
    if recipe.world == "tail":
        for name in ("world_database", "control_database"):
            parts = ", ".join(f"{b} {g['best']['gain']:+.4f}" for b, g in gain[name]["by_group"].items())
            print(f"[train-demo] the {name.replace('_', ' ')} on held-out images, best gain per bucket (nats per "
                  f"target): {parts}", file=sys.stderr)
    else:
        gains = ", ".join(f"{r['gain']:+.4f} at lambda {r['lambda']:g}" for r in gain["table"]
                          if r["tau"] == 1.0 and r["lambda"] > 0)
        print(f"[train-demo] the database on held-out images: mixing its distribution into the base's changes the "
              f"teacher-forced loss by {gains} nats (tau 1)", file=sys.stderr)
    faid_dir = _faid_stage(workdir, index, vq_path, recipe, report, dev, progress)

    assets.mkdir(parents=True, exist_ok=True)
    export_assets(base_dir, assets / "base")
    export_assets(faid_dir, assets / "faid")
    report["environment"] = environment()  # of this (last) run: versions and the command line
    report["assets_bytes"] = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    write_json(report_path, report)
    write_json(assets / "recipe.json", report)
    print(f"[train-demo] 4/4 assets: {report['assets_bytes'] / 2**20:.1f} MiB in {assets} "
          f"({time.time() - t_all:.0f} s this run)", file=sys.stderr)
    return report


# TailWorld's recipe: what differs from the ShapesWorld defaults above (every other field is shared).
TAIL_RECIPE = {"world": "tail", "vq_steps": 2000, "train_images": 48000, "base_steps": 10000,
               "database_images": 3000, "faid_images": 4000, "faid_steps": 500,
               "faid_split": "database", "faid_start": 3000, "shape": "2hop"}
# Where each world's run keeps its intermediate files, exports its weights and builds its demo retriever.
WORLD_PATHS = {"shapes": ("data/demo_train", ASSETS, DEMO_RETRIEVER),
               "tail": ("data/tail_train", ASSETS / "tail", Path("data/retriever/tail"))}


def recipe_for(world: str, **changes) -> DemoRecipe:
    """The recipe of a world (TailWorld's fields over the defaults), with `changes` applied."""
    base = asdict(DemoRecipe())
    if world == "tail":
        base.update(TAIL_RECIPE)
    return DemoRecipe(**{**base, **changes, "world": world})


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Train a demo world's models (VQ, base AR, FAiD) and export them: "
                                             "ShapesWorld (the default) or TailWorld (--world tail).")
    ap.add_argument("--workdir", default=None, help="intermediate files and checkpoints (default data/demo_train; "
                                                    "data/tail_train for --world tail)")
    ap.add_argument("--assets", default=None, help="where the exported weights go (default: the shipped folder of "
                                                   "the world)")
    ap.add_argument("--retriever-dir", default=None, help="the demo retriever (built if missing; default "
                                                          "data/retriever/demo_L, or data/retriever/tail)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--stop-after", default=None, choices=["vq", "base"],
                    help="stop once that stage is done (the next run resumes from there)")
    tail = recipe_for("tail")
    for f in DemoRecipe.__dataclass_fields__.values():
        other = getattr(tail, f.name)
        tail_value = f" (--world tail: {other})" if other != f.default and f.name != "world" else ""
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                        help=f"{RECIPE_HELP[f.name]} (default {f.default}){tail_value}")
    args = ap.parse_args(argv)
    world = args.world or "shapes"
    if world not in WORLD_PATHS:
        raise SystemExit(f"error: --world {world!r}: choose shapes or tail")
    given = {k: getattr(args, k) for k in DemoRecipe.__dataclass_fields__
             if getattr(args, k) is not None and k != "world"}
    recipe = recipe_for(world, **given)
    workdir, assets, retriever = WORLD_PATHS[world]
    run_recipe(args.workdir or workdir, args.assets or assets, args.retriever_dir or retriever, recipe,
               device=args.device, stop_after=args.stop_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
