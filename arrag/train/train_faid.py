"""`arrag train-faid`: LoRA on the language model plus the FAiD blenders, trained through accelerate.

The base Janus-Pro gets new SmoothPatchBlenders (`--num-blender`, `--num-hop`) unless it already has them,
then peft LoRA on the language model's attention projections. Trainable: LoRA, the blenders (the convs of the
hops in use, conv_weights, the gate MLP), each blender layer's retrieval_layernorm, and gen_head; everything
else is frozen. The loss is cross-entropy on the image tokens, teacher-forced with the retrieved candidates of
`arrag construct-train` (`full_sequence_logits`, the same blender code that decoding runs).

One process on CPU, several GPUs or machines through `accelerate launch`, optionally DeepSpeed ZeRO-3
(`--deepspeed arrag/train/zero3.json`). Checkpoints (accelerate state) go to `<out>/checkpoints/step-NNNNNNN`
under a temporary name; `--resume` continues from the newest one, reproducing the uninterrupted run. At the
end LoRA is merged and `<out>` holds config.json + safetensors in the released key layout, the tokenizer
files and `settings.json`, ready for `arrag generate --method faid`.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from arrag import fileops
from arrag.errors import ArragError, one_line
from arrag.janus.blender import CONV_NAMES
from arrag.janus.config import FAID_CELLS, parse_hops
from arrag.janus.faid_layers import attach_blenders, full_sequence_logits
from arrag.janus.model import JanusPro
from arrag.janus.prompting import TOKENIZER_FILES, Prompter
from arrag.provenance import OUTPUT_FIELD, SettingsLock, made_by, write_json
from arrag.retrieval.codestore import CodeStore
from arrag.runtime import kill_with_parent
from arrag.train.construct import load_retrieved

# Settings a rerun may change without invalidating the checkpoints it resumes from.
RESUMABLE_CHANGES = ("max_steps", "resume", "overwrite", "save_every", "keep_checkpoints", "num_workers", "progress",
                     "log_every", "trust_checkpoint")
BLENDER_INITS = ("original", "zero")
# What <out>/checkpoints may hold: only step-NNNNNNN folders (train-faid's own names), and in those whatever
# accelerate or DeepSpeed saved.
CHECKPOINT_DIR_FILES = (r"step-\d{7}(\.tmp)?/.+",)
STEP_FILES = (r".+",)


@dataclass
class FaidTrainConfig:
    """Every setting of a FAiD training run; the defaults are the original `train_FAiD.sh` recipe."""

    base: str
    store: str
    retrieved: str | None = None        # folder of retrieved-*.npy (default: the store folder)
    out: str | None = None              # default result/ckpts/ckpts_FAiD_b{num_blender}_h{hops}
    num_blender: int = 2                # 0 trains plain LoRA (no blenders): the baseline of bench/train_speed.py
    num_hop: str = "1,2"                # written to the config as a list, [1, 2]
    faid_cells: str = "all"             # where blender output is added: every image cell (original) or valid
    blender_init: str = "original"      # original (Kaiming everywhere) or zero (blenders add 0 at step 0)
    retrieved_key_num: int = 10         # K retrieved codes per position (the original's name)
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,v_proj"
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4                 # per process
    grad_accum: int = 8
    epochs: int = 1
    max_steps: int | None = None        # optimizer steps; overrides epochs
    schedule: str = "constant"          # constant | cosine
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    cfg_drop: float = 0.0               # arrag's option; the original trains with no caption dropout
    token_weights: str | None = None    # arrag's option: .npy [N, h*w] loss weight per image token; None = plain mean
    max_text_len: int = 512
    seed: int = 42
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False             # delete this --out's checkpoints and start over
    deepspeed: str | None = None
    mixed_precision: str | None = None  # default bf16 on CUDA, no on CPU
    cpu: bool = False
    trust_checkpoint: bool = False      # unpickle a --base .bin that holds more than weights (the user trusts it)
    num_workers: int = 2
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        """Refuse impossible settings with one line naming the flag, before anything is loaded or written."""
        def need(ok: bool, flag: str, value, what: str) -> None:
            if not ok:
                raise ArragError(f"--{flag} {value}: {what}")

        need(self.num_blender >= 0, "num-blender", self.num_blender, "a count of blenders, >= 0")
        parse_hops(self.num_hop)  # one-line error for hops outside 1, 2, 3
        need(bool(parse_hops(self.num_hop)), "num-hop", repr(self.num_hop), "give hop sizes such as 1,2")
        need(self.faid_cells in FAID_CELLS, "faid-cells", self.faid_cells, f"choose {' or '.join(FAID_CELLS)}")
        need(self.blender_init in BLENDER_INITS, "blender-init", self.blender_init,
             f"choose {' or '.join(BLENDER_INITS)}")
        need(self.retrieved_key_num >= 1, "k", self.retrieved_key_num, "retrieved codes per position must be >= 1")
        need(self.lora_r >= 0, "lora-r", self.lora_r, "LoRA rank must be >= 0 (0 disables LoRA)")
        need(self.lora_alpha >= 1, "lora-alpha", self.lora_alpha, "LoRA alpha must be >= 1")
        for flag, value in (("lr", self.lr), ("weight-decay", self.weight_decay), ("lora-dropout", self.lora_dropout),
                            ("warmup-ratio", self.warmup_ratio), ("max-grad-norm", self.max_grad_norm),
                            ("cfg-drop", self.cfg_drop)):
            need(math.isfinite(value), flag, value, "must be a finite number")
        need(0 <= self.lora_dropout < 1, "lora-dropout", self.lora_dropout, "must be in [0, 1)")
        need(self.lr > 0, "lr", self.lr, "the learning rate must be > 0")
        need(self.weight_decay >= 0, "weight-decay", self.weight_decay, "must be >= 0")
        need(self.batch_size >= 1, "batch-size", self.batch_size, "samples per micro-step must be >= 1")
        need(self.grad_accum >= 1, "grad-accum", self.grad_accum, "accumulation steps must be >= 1")
        need(self.epochs >= 1, "epochs", self.epochs, "train at least one epoch (an untrained model is no result)")
        need(self.max_steps is None or self.max_steps >= 1, "max-steps", self.max_steps,
             "must be >= 1 (leave it out to train --epochs)")
        need(self.schedule in ("constant", "cosine"), "schedule", self.schedule, "choose constant or cosine")
        need(0 <= self.warmup_ratio < 1, "warmup-ratio", self.warmup_ratio, "must be in [0, 1)")
        need(self.max_grad_norm >= 0, "max-grad-norm", self.max_grad_norm, "must be >= 0 (0 disables clipping)")
        need(0 <= self.cfg_drop <= 1, "cfg-drop", self.cfg_drop, "must be in [0, 1]")
        need(self.max_text_len >= 8, "max-text-len", self.max_text_len, "must leave room for the prompt template")
        need(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2^32)")
        need(self.save_every >= 0, "save-every", self.save_every, "must be >= 0 (0: only at the end)")
        need(self.keep_checkpoints >= 1, "keep-checkpoints", self.keep_checkpoints,
             "keep at least 1 checkpoint, or --resume has nothing to resume from")
        need(self.num_workers >= 0, "num-workers", self.num_workers, "must be >= 0")

    def output_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("result/ckpts") / f"ckpts_FAiD_b{self.num_blender}_h{''.join(map(str, parse_hops(self.num_hop)))}"


# ----------------------------------------------------------------------------------------------------------
# Data


class FaidTrainSet(Dataset):
    """(caption, codes, retrieved candidates) per image of a captioned code store.

    Item indices encode the pass: i = epoch * N + image, so the candidate shuffle and the caption drop are
    fixed by (seed, epoch, image) whatever the worker, process count or resumption.
    """

    def __init__(self, store: CodeStore, retrieved, prompter, *, seed: int, cfg_drop: float,
                 max_text_len: int, weights: np.ndarray | None = None):
        # Nothing per image is held: codes, candidates (RetrievedCodes) and captions are read per item through the
        # store's memory maps, opened once in each worker process.
        self.store, self.retrieved, self.prompter, self.weights = store, retrieved, prompter, weights
        self.seed, self.cfg_drop, self.max_text_len = seed, cfg_drop, max_text_len
        self._ranks: np.ndarray | None = None

    def __len__(self) -> int:
        return self.store.num_images

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        epoch, image = divmod(int(i), n)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, image]))
        candidates = np.asarray(self.retrieved[image], dtype=np.int64)  # [T, K]
        # Shuffle each cell's K candidates, as the original did. The blender's output (a mean over K of
        # per-candidate features) does not depend on the order; the shuffle keeps no rank signal in the data.
        if self._ranks is None or self._ranks.shape != candidates.shape:  # 0..K-1 in every row, made once
            self._ranks = np.tile(np.arange(candidates.shape[1]), (len(candidates), 1))
        candidates = np.take_along_axis(candidates, rng.permuted(self._ranks, axis=1), 1)
        dropped = bool(rng.random() < self.cfg_drop)
        ids = self.prompter.ids(self.store.caption(image), self.max_text_len)
        if dropped:  # the unconditional prompt, so that the model keeps classifier-free guidance
            ids = self.prompter.unconditional(ids)
        codes = self.store.gather(np.array([image]))[0].reshape(-1).astype(np.int64)
        item = {"ids": ids, "codes": codes, "candidates": candidates, "dropped": dropped}
        if self.weights is not None:
            item["weights"] = np.asarray(self.weights[image], dtype=np.float32).reshape(-1)
        return item


class PassSampler(Sampler):
    """All epochs as one pass: epoch e yields e * N + a permutation of 0..N-1 seeded by (seed, e)."""

    def __init__(self, n: int, epochs: int, seed: int):
        self.n, self.epochs, self.seed = n, epochs, seed

    def __len__(self) -> int:
        return self.n * self.epochs

    def __iter__(self):
        for e in range(self.epochs):
            order = np.random.default_rng(np.random.SeedSequence([self.seed, e, 1 << 30])).permutation(self.n)
            yield from (e * self.n + order).tolist()


class Collate:
    """Items -> a batch: left-padded prompt rows and their mask, codes [B, T], candidates [B, T, K] (and the
    token loss weights [B, T] when the run has them)."""

    def __init__(self, prompter):
        self.prompter = prompter

    def __call__(self, items: list[dict]) -> dict:
        prompts = self.prompter.left_pad([it["ids"] for it in items])
        batch = {"input_ids": prompts.input_ids, "attention_mask": prompts.attention_mask,
                 "codes": torch.from_numpy(np.stack([it["codes"] for it in items])),
                 "candidates": torch.from_numpy(np.stack([it["candidates"] for it in items])),
                 "features": torch.tensor([not it["dropped"] for it in items])}
        if "weights" in items[0]:
            batch["weights"] = torch.from_numpy(np.stack([it["weights"] for it in items]))
        return batch


# ----------------------------------------------------------------------------------------------------------
# Model


class FaidObjective(nn.Module):
    """Cross-entropy over the image tokens of a batch (what accelerate wraps and differentiates): the mean, or
    with token weights [B, T] the weighted mean sum(w * ce) / sum(w)."""

    def __init__(self, janus, grid: tuple[int, int]):
        super().__init__()
        self.janus, self.grid = janus, grid

    def forward(self, input_ids, attention_mask, codes, candidates, features, weights=None) -> torch.Tensor:
        logits = full_sequence_logits(self.janus, input_ids, attention_mask, codes, candidates, self.grid,
                                      row_mask=features)
        if weights is None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1), reduction="none")
        w = weights.reshape(-1).to(ce.dtype)
        return (ce * w).sum() / w.sum().clamp_min(1e-12)


def add_blenders(janus, num_blender: int, num_hop, faid_cells: str = "all", init: str = "original") -> None:
    """Give a base Janus-Pro `num_blender` fresh blenders: the original initialisation, or with `init` "zero"
    blenders that add nothing at first (SmoothPatchBlender.zero_output_).

    num_blender is a count; the config stores the interval num_SmoothPatchBlender = num_layers // num_blender,
    as the original training script does, so the blenders sit in layers 0, n, 2n, ... (0 and 12 for two in
    Janus-Pro-1B's 24 layers).
    """
    lang = janus.config.language
    layers = lang.num_hidden_layers
    if num_blender < 1 or layers % num_blender:
        raise ArragError(f"--num-blender {num_blender}: a count of blenders that divides the model's {layers} "
                         f"layers (the config then stores the interval num_SmoothPatchBlender = {layers} // count)")
    lang.num_SmoothPatchBlender, lang.num_hop, lang.faid_cells = layers // num_blender, parse_hops(num_hop), faid_cells
    attach_blenders(janus)
    if init == "zero":
        for i in lang.blender_layers():
            janus.llm.layers[i].blender.zero_output_()
    janus.to(janus.device)


def build_model(cfg: FaidTrainConfig, device: str | torch.device = "cpu"):
    """Base Janus-Pro (fp32) + blenders + LoRA, with exactly the trainable parameters of the recipe."""
    from peft import LoraConfig, inject_adapter_in_model

    janus = JanusPro.from_pretrained(cfg.base, dtype=torch.float32, device=device, quiet=True,
                                     trust_checkpoint=cfg.trust_checkpoint)
    hops = parse_hops(cfg.num_hop)
    if janus.has_faid:
        lang = janus.config.language
        have = (len(lang.blender_layers()), lang.hops, lang.faid_cells)
        if cfg.num_blender and have != (cfg.num_blender, hops, cfg.faid_cells):
            raise ArragError(f"{cfg.base} already has {have[0]} blenders with hops {have[1]} (faid_cells {have[2]}); "
                             f"pass --num-blender {have[0]} --num-hop {','.join(map(str, have[1]))} --faid-cells "
                             f"{have[2]} to continue training them")
    elif cfg.num_blender:
        add_blenders(janus, cfg.num_blender, hops, cfg.faid_cells, cfg.blender_init)
    if janus.has_faid:  # the blenders learn from K candidates: decoding gives them at most K (the original's cap)
        janus.config.language.retrieved_key_num = cfg.retrieved_key_num
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    if cfg.lora_r > 0:
        pattern = rf"language_model\.model\.layers\.\d+\..*\b({'|'.join(targets)})"
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=pattern, bias="none")
        try:
            inject_adapter_in_model(lora, janus)
        except ValueError as e:
            raise ArragError(f"--lora-targets {cfg.lora_targets}: {one_line(e)}") from None
    janus.train()
    janus.gen_vision_model.eval()  # the VQ is frozen and only decodes
    idle = {n for h, names in CONV_NAMES.items() if h not in janus.config.language.hops for n in names}
    for name, p in janus.named_parameters():
        p.requires_grad_(is_trained(name, idle))
    return janus


def is_trained(name: str, idle_convs: set[str]) -> bool:
    """The recipe's trainable set: LoRA, gen_head, retrieval_layernorm, the blenders minus idle hop convs."""
    parts = name.split(".")
    if "lora_A" in parts or "lora_B" in parts or "retrieval_layernorm" in parts or parts[0] == "gen_head":
        return True
    return "blender" in parts and parts[parts.index("blender") + 1] not in idle_convs


def parameter_groups(janus) -> dict[str, int]:
    """Trainable parameter counts by kind, plus the total."""
    counts = {"lora": 0, "blenders": 0, "gen_head": 0, "frozen": 0}
    for name, p in janus.named_parameters():
        if not p.requires_grad:
            counts["frozen"] += p.numel()
        elif "lora_" in name:
            counts["lora"] += p.numel()
        elif name.startswith("gen_head."):
            counts["gen_head"] += p.numel()
        else:
            counts["blenders"] += p.numel()
    counts["trainable"] = counts["lora"] + counts["blenders"] + counts["gen_head"]
    return counts


def merge_lora(janus) -> None:
    """Fold every LoRA adapter into its base Linear and put the plain Linear back (original key names)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(janus.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(janus.get_submodule(parent_name), child, module.get_base_layer())


# ----------------------------------------------------------------------------------------------------------
# The run


def _checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints in `out`/checkpoints, oldest first."""
    folder = out / "checkpoints"
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d{7}", p.name)) \
        if folder.is_dir() else []


def _open_data(cfg: FaidTrainConfig, janus):
    store = CodeStore.open(cfg.store)
    if not store.has_captions:
        raise ArragError(f"code store {store.folder} has no captions: encode image-caption data for FAiD training")
    if not janus.vq.matches(store.fingerprint):
        raise ArragError(f"code store {store.folder} was encoded with another tokenizer (VQ {store.fingerprint}) "
                         f"than {cfg.base}'s (VQ {janus.vq.fingerprint()}); re-encode with this model's VQ")
    h, w = store.grid
    max_pos, size = janus.config.language.max_position_embeddings, janus.vq.config.image_size
    room = max_pos - h * w  # positions left for the prompt
    if room < 16:
        raise ArragError(f"code store {store.folder} holds {h}x{w} grids: {h * w} image tokens, but {cfg.base} has "
                         f"{max_pos} positions; encode the training images at the model's size (--image-size {size})")
    if (h * janus.vq.downsample, w * janus.vq.downsample) != (size, size):
        warnings.warn(f"code store {store.folder} was encoded at {h * janus.vq.downsample} px, the model generates "
                      f"at {size} px: it will learn that size", stacklevel=2)
    text_len = min(cfg.max_text_len, room)
    if text_len < cfg.max_text_len:
        print(f"arrag: captions are cut to {text_len} tokens: with {h * w} image tokens the model's {max_pos} "
              "positions leave no more", file=sys.stderr)
    retrieved = load_retrieved(cfg.retrieved or cfg.store, store, cfg.retrieved_key_num)
    missing = int(store.manifest.get("num_without_caption", 0))  # counted when the store was finished
    if missing:
        raise ArragError(f"{missing} of {store.num_images} images in {store.folder} have no caption; FAiD trains on "
                         "image-caption pairs: add the captions (same-named .txt files) and re-encode")
    prompter = Prompter.from_folder(janus.source_folder)
    weights = load_token_weights(cfg.token_weights, store) if cfg.token_weights else None
    return store, FaidTrainSet(store, retrieved, prompter, seed=cfg.seed, cfg_drop=cfg.cfg_drop,
                               max_text_len=text_len, weights=weights), Collate(prompter)


def load_token_weights(path: str | Path, store: CodeStore) -> np.ndarray:
    """--token-weights: float [N, h*w] (or [N, h, w]) for the store's N images in store order, >= 0 and finite,
    each image with some weight; memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise ArragError(f"--token-weights {path}: no such file (a .npy of shape [images, h*w])")
    try:
        w = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise ArragError(f"--token-weights {path}: not a .npy array ({one_line(e)})") from None
    n, (h, wd) = store.num_images, store.grid
    if w.shape not in ((n, h * wd), (n, h, wd)) or not np.issubdtype(w.dtype, np.floating):
        raise ArragError(f"--token-weights {path}: a float array of shape {w.dtype} {tuple(w.shape)}, but the store "
                         f"{store.folder} needs [{n}, {h * wd}] (one weight per image token, in store order)")
    flat = np.asarray(w).reshape(n, -1)
    if not np.isfinite(flat).all() or (flat < 0).any() or not (flat.sum(1) > 0).all():
        raise ArragError(f"--token-weights {path}: weights must be finite and >= 0, with some weight on every image")
    return flat


def _accelerator(cfg: FaidTrainConfig):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedDataParallelKwargs

    plugin = None
    if cfg.deepspeed:
        if not Path(cfg.deepspeed).is_file():
            raise ArragError(f"--deepspeed {cfg.deepspeed}: no such file (arrag/train/zero3.json is the shipped one)")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ArragError("--deepspeed needs the deepspeed package: pip install deepspeed (CUDA machines)") from None
        plugin = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed, gradient_accumulation_steps=cfg.grad_accum,
                                 gradient_clipping=cfg.max_grad_norm)
    mp = cfg.mixed_precision or ("bf16" if torch.cuda.is_available() and not cfg.cpu else "no")
    # Caption-dropped rows skip the blenders, so a batch may leave them unused: DDP must allow that.
    # Without CUDA, cpu=True is what makes accelerate run several CPU processes (gloo) instead of one each.
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp,
                       cpu=cfg.cpu or not torch.cuda.is_available(),
                       deepspeed_plugin=plugin,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def is_training_folder(out: Path) -> bool:
    """True when `out` holds a train-faid run: its settings lock or its finished checkpoint's record."""
    return made_by(out / "train.json", "train-faid", legacy=lambda r: "num_blender" in r and "lora_r" in r) or \
        made_by(out / "settings.json", "train-faid", legacy=lambda r: "loss_history" in r and "num_blender" in r)


def check_out(cfg: FaidTrainConfig, out: Path) -> None:
    """Refuse an --out that is, or lies inside, an input (the base model, the store, the retrieved codes, ...), and
    one that holds anything but a train-faid run of its own: the export writes config.json and weights there."""
    inputs = (("--base", cfg.base), ("--store", cfg.store), ("--retrieved", cfg.retrieved),
              ("--token-weights", cfg.token_weights), ("--deepspeed", cfg.deepspeed))
    for flag, value in inputs:
        if value is not None and Path(value).exists() and fileops.same_or_inside(out, value):
            raise ArragError(f"--out {out} is or lies inside {flag} {value}: the trained model would overwrite it; "
                             "pass another --out")
    fileops.check_out_dir(out, what="FAiD training folder", is_ours=is_training_folder(out))


def _load_training_state(accelerator, folder: Path) -> None:
    """accelerate's load_state of a checkpoint folder; a file that cannot be read, or whose pickle holds more than
    tensors and plain values (refused unread: unpickling it could run code), is one line naming it. The RNG state
    file is read first on its own: accelerate skips one it cannot load, which would resume without the run's
    random state, so not as the uninterrupted run."""
    import pickle

    from accelerate.utils import load as accelerate_load

    def refuse(path: Path, error: BaseException):
        why = ("it holds Python objects besides tensors and plain values, which could run code when unpickled: it "
               "was not read") if isinstance(error, pickle.UnpicklingError) else one_line(error, 160)
        return ArragError(f"cannot resume from {path}: {why}; start fresh with --overwrite instead of --resume (or "
                          f"move {folder.name} away to resume from the checkpoint before it)")

    rng = folder / f"random_states_{accelerator.process_index}.pkl"
    try:
        accelerate_load(rng, map_location="cpu")
        accelerator.load_state(str(folder))
        return
    except Exception as e:  # noqa: BLE001 - which file failed is found below
        error = e
    for f in [rng, *sorted(folder.iterdir())]:  # each pickled file read alone, as accelerate reads it
        if f.suffix in (".bin", ".pkl", ".pt"):
            try:
                accelerate_load(f, map_location="cpu")
            except Exception as e:  # noqa: BLE001
                raise refuse(f, e) from None
    raise refuse(folder, error) from None


def train_faid(cfg: FaidTrainConfig) -> Path:
    """Run the training described by `cfg`; returns the folder of the merged checkpoint."""
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    cfg.validate()
    out = cfg.output_dir()
    check_out(cfg, out)  # before anything is loaded
    accelerator = _accelerator(cfg)
    main = accelerator.is_main_process
    settings = asdict(cfg)
    lock = SettingsLock(out / "train.json", settings, what="a training run", ignore=RESUMABLE_CHANGES,
                        has_results=lambda: bool(_checkpoints(out)),
                        start_over=f"use another --out, or {fileops.overwrite_hint()} to start over", kind="train-faid")
    set_seed(cfg.seed)  # the same blender and LoRA initialisation in every process
    janus = build_model(cfg)
    store, dataset, collate = _open_data(cfg, janus)  # everything is checked before the folder is touched
    if _checkpoints(out) and not (cfg.resume or cfg.overwrite):
        raise ArragError(f"checkpoints exist in {out / 'checkpoints'}: pass --resume to continue that run, or "
                         f"{fileops.overwrite_hint()} to delete them and start over")
    if cfg.overwrite:
        accelerator.wait_for_everyone()  # every process has seen the old folder before rank 0 clears it
        if main:
            fileops.remove_owned_dir(out / "checkpoints", what="checkpoint folder", owned=CHECKPOINT_DIR_FILES)
            (out / "train.json").unlink(missing_ok=True)
    else:
        lock.check()
    accelerator.wait_for_everyone()
    counts = parameter_groups(janus)
    if main:
        print(f"arrag: trainable parameters {counts['trainable']:,} (LoRA {counts['lora']:,}, blenders + norms "
              f"{counts['blenders']:,}, gen_head {counts['gen_head']:,}); frozen {counts['frozen']:,}",
              file=sys.stderr)
    objective = FaidObjective(janus, store.grid)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=PassSampler(len(dataset), cfg.epochs, cfg.seed),
                        collate_fn=collate, num_workers=cfg.num_workers, drop_last=False,
                        worker_init_fn=kill_with_parent,
                        # its own generator: creating the iterator must not draw from the global RNG, which
                        # drives LoRA dropout and is restored on --resume
                        generator=torch.Generator().manual_seed(cfg.seed))
    params = [p for p in janus.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = math.ceil(len(loader) / accelerator.num_processes)
    total = cfg.max_steps or math.ceil(batches / cfg.grad_accum)
    warmup = int(cfg.warmup_ratio * total)
    # accelerate steps a prepared scheduler once per process per optimizer step: count in those units.
    n = accelerator.num_processes
    scheduler = (get_cosine_schedule_with_warmup(optimizer, warmup * n, total * n) if cfg.schedule == "cosine"
                 else get_constant_schedule_with_warmup(optimizer, warmup * n))
    objective, optimizer, loader, scheduler = accelerator.prepare(objective, optimizer, loader, scheduler)

    step, history = 0, []
    if cfg.resume:
        found = _checkpoints(out)
        if found:
            _load_training_state(accelerator, found[-1])
            state = json.loads((found[-1] / "trainer_state.json").read_text())
            step, history = state["step"], state["history"]
            if main:
                print(f"arrag: resuming from {found[-1]} (step {step})", file=sys.stderr)
        elif main:
            print(f"arrag: --resume: no checkpoint in {out / 'checkpoints'}, starting at step 0", file=sys.stderr)

    bar = tqdm(total=total, initial=step, desc="train-faid", unit="step", disable=not (main and cfg.progress))
    image_tokens = store.grid[0] * store.grid[1]
    t0, tokens, window = time.perf_counter(), 0, []
    data = accelerator.skip_first_batches(loader, step * cfg.grad_accum) if step else loader
    if step < total:
        for batch in data:
            with accelerator.accumulate(objective):
                loss = objective(**batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach())
            tokens += batch["codes"].shape[0] * image_tokens * n
            if not accelerator.sync_gradients:
                continue
            step += 1
            mean = accelerator.gather(torch.stack(window).mean()[None]).mean().item()
            window = []
            history.append([step, mean])
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{mean:.4f}", tok_s=f"{rate:,.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                _save_checkpoint(accelerator, out, step, history, cfg.keep_checkpoints, lock)
            if step >= total:
                break
    bar.close()
    saved = _checkpoints(out)
    if step and (not saved or saved[-1].name != f"step-{step:07d}"):
        _save_checkpoint(accelerator, out, step, history, cfg.keep_checkpoints, lock)
    state = accelerator.get_state_dict(objective)  # gathered in full under ZeRO-3
    if main:
        _export(cfg, state, out, {**settings, "steps": step, "loss_history": history, "parameters": counts})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


@torch.no_grad()
def candidate_gain(model_dir: str | Path, store_dir: str | Path, retrieved: str | Path | None = None,
                   retrieved_key_num: int = 10, images: int = 256, batch_size: int = 16,
                   device: str | torch.device = "cpu") -> dict:
    """Mean image-token cross-entropy of a trained FAiD model on the first `images` of a training store, with
    its retrieved candidates and with the blenders given none (every row unconditioned on retrieval), and the
    blenders' mean gate over the candidates they were given (at cells with retrieval).

    The difference is what the blenders learned to take from the candidates; near zero means FAiD
    ignores retrieval (and its gates are near zero). Captions are never dropped here.
    """
    janus = JanusPro.from_pretrained(model_dir, dtype=torch.float32, device=device, quiet=True).eval()
    if not janus.has_faid:
        raise ArragError(f"{model_dir} has no FAiD blenders: pass a model made by train-faid")
    cfg = FaidTrainConfig(base=str(model_dir), store=str(store_dir), retrieved_key_num=retrieved_key_num,
                          retrieved=None if retrieved is None else str(retrieved), cfg_drop=0.0)
    store, dataset, collate = _open_data(cfg, janus)  # the training run's own checks and prompts
    objective, n = FaidObjective(janus, store.grid), min(images, len(dataset))
    totals = {"with_candidates": 0.0, "without_candidates": 0.0}
    gate_sum, gate_n = 0.0, 0
    for s in range(0, n, batch_size):
        items = [dataset[i] for i in range(s, min(s + batch_size, n))]
        batch = {k: v.to(janus.device) for k, v in collate(items).items()}
        inputs = (batch["input_ids"], batch["attention_mask"], batch["codes"], batch["candidates"])
        totals["without_candidates"] += objective(*inputs, ~batch["features"]).item() * batch["codes"].numel()
        gates: list = []
        logits = full_sequence_logits(janus, *inputs, store.grid, row_mask=batch["features"], gates=gates)
        codes = batch["codes"]
        totals["with_candidates"] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1),
                                                     reduction="sum").item()
        given = batch["candidates"][batch["features"]] >= 0  # [S, T, K]: the candidates the blenders were given
        for g in gates:  # each blender's gates over every blended cell
            if g.shape == given.shape:
                gate_sum += float(g[given].sum())
                gate_n += int(given.sum())
    tokens = n * store.grid[0] * store.grid[1]
    out = {k: v / tokens for k, v in totals.items()}
    out.update(gain=out["without_candidates"] - out["with_candidates"], images=n,
               mean_gate=gate_sum / gate_n if gate_n else None)
    out["relative_gain"] = out["gain"] / out["without_candidates"]
    return out


def _save_checkpoint(accelerator, out: Path, step: int, history: list, keep: int, lock: SettingsLock) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) under a temporary name, renamed when complete."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")  # one name for every process: they all write into it
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        lock.record()  # the first checkpoint: from now on a rerun must match these settings
        fileops.remove_owned_dir(tmp, what="unfinished checkpoint", owned=STEP_FILES)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", {"step": step, "history": history})
        fileops.remove_owned_dir(final, what="checkpoint", owned=STEP_FILES)
        tmp.rename(final)
        for old in _checkpoints(out)[:-keep]:
            fileops.remove_owned_dir(old, what="checkpoint", owned=STEP_FILES)
    accelerator.wait_for_everyone()


def _export(cfg: FaidTrainConfig, state: dict, out: Path, sidecar: dict) -> None:
    """Rebuild the model on CPU, load the trained state, merge LoRA, save in the released layout."""
    cpu = build_model(cfg)
    state = {k.removeprefix("janus."): v.detach().to("cpu", torch.float32) for k, v in state.items()}
    cpu.load_state_dict(state, strict=True)
    merge_lora(cpu)
    cpu.eval()
    cpu.save_pretrained(out)
    for name in TOKENIZER_FILES:
        src = Path(cfg.base) / name if Path(cfg.base).is_dir() else Path(cfg.base).parent / name
        if src.is_file():
            shutil.copyfile(src, out / name)
    write_json(out / "settings.json", {OUTPUT_FIELD: "train-faid", **sidecar})
    loss = f" (final loss {sidecar['loss_history'][-1][1]:.4f})" if sidecar["loss_history"] else ""
    retrieved = Path(cfg.retrieved or cfg.store) / "retrieved.json"
    index = json.loads(retrieved.read_text()).get("retriever") if retrieved.is_file() else None
    print(f"FAiD checkpoint: {out}{loss}; generate with:\n  arrag generate --model {shlex.quote(str(out))} "
          f"--method faid --retriever {shlex.quote(index) if index else 'INDEX_FOLDER'} "
          "--prompt 'YOUR PROMPT'")
