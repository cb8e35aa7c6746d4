"""LlamaGen VQ-VAE (the image tokenizer of LlamaGen and Janus-Pro): encode, decode, codebook lookup.

Key names and shapes follow LlamaGen's `vq_model.py` exactly, so the released `vq_ds16_t2i.pt` and the
`gen_vision_model.*` part of a Janus-Pro checkpoint load strictly. Presets: `VQ-16` (the released
tokenizer), `VQ-8`, and tiny ones of the same classes for tests and the embedded demo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from arrag.errors import ArragError, one_line


@dataclass
class VQConfig:
    """Hyperparameters of the VQ-VAE (LlamaGen's ModelArgs plus the GroupNorm group count)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2
    norm_groups: int = 32
    dropout: float = 0.0
    # The image size the tokenizer's generators work at (384 px = 24x24 tokens for Janus-Pro and AR-RAG): the
    # default of --image-size everywhere (encode, generate, train), so that stores, indexes and models agree.
    image_size: int = 384

    @property
    def downsample(self) -> int:
        """Image pixels per token along one side (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)


VQ_PRESETS: dict[str, VQConfig] = {
    "VQ-16": VQConfig(),
    "VQ-8": VQConfig(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4], image_size=256),
    # Same classes, a fraction of the width: for tests and the ShapesWorld demo.
    "VQ-tiny-16": VQConfig(codebook_size=1024, encoder_ch_mult=[1, 1, 2, 2, 2], decoder_ch_mult=[1, 1, 2, 2, 2],
                           z_channels=32, ch=32, num_res_blocks=1, norm_groups=8, image_size=64),
    "VQ-tiny-8": VQConfig(codebook_size=1024, encoder_ch_mult=[1, 2, 2, 2], decoder_ch_mult=[1, 2, 2, 2],
                          z_channels=32, ch=32, num_res_blocks=1, norm_groups=8, image_size=64),
    # ShapesWorld's tokenizer: downsampling 4, so a 64-px image is 16x16 tokens (CPU-sized convolutions). 256
    # codes: flat shapes need no more, and a smaller, lower-entropy code makes a CPU-trained AR model's job easier.
    "VQ-tiny-4": VQConfig(codebook_size=256, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2],
                          z_channels=32, ch=32, num_res_blocks=1, norm_groups=8, image_size=64),
}


def vq_config(preset: str | VQConfig | Mapping) -> VQConfig:
    """A VQConfig from a preset name, a dict of fields, or a VQConfig (copied)."""
    if isinstance(preset, VQConfig):
        return dataclasses.replace(preset)
    if isinstance(preset, Mapping):
        known = {f.name for f in dataclasses.fields(VQConfig)}
        return VQConfig(**{k: v for k, v in preset.items() if k in known})
    if preset not in VQ_PRESETS:
        raise ArragError(f"unknown VQ preset {preset!r}; choose one of {', '.join(VQ_PRESETS)}")
    return dataclasses.replace(VQ_PRESETS[preset])


# ----------------------------------------------------------------------------------------------------------
# Blocks


def vq_config_from_janus(config: Mapping, source: str = "config.json") -> tuple[str, VQConfig]:
    """(preset name, VQConfig) from a Janus-Pro config.json's gen_vision_config ("cls" names the preset; arrag's
    tiny presets also carry their full config as params.arrag_vq_config)."""
    vision = config.get("gen_vision_config")
    if not isinstance(vision, Mapping):
        raise ArragError(f"{source} has no 'gen_vision_config': is this a Janus-Pro checkpoint (deepseek-ai layout)?")
    name = vision.get("cls", "VQ-16")
    params = vision.get("params", {})
    if "arrag_vq_config" in params:
        cfg = vq_config(params["arrag_vq_config"])
    elif name in VQ_PRESETS:
        cfg = vq_config(name)
    else:
        raise ArragError(f"{source}: gen_vision_config.cls={name!r} is not a known VQ ({', '.join(VQ_PRESETS)})")
    cfg.codebook_size = params.get("image_token_size", cfg.codebook_size)
    cfg.codebook_embed_dim = params.get("n_embed", cfg.codebook_embed_dim)
    return name, cfg


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(n), self.k(n), self.v(n)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only, as LlamaGen does


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest upsampling in fp32, back to the input dtype (Janus hard-codes bf16 here; we keep the dtype).
        up = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        return self.conv(up)


class _Level(nn.Module):
    """One resolution level: `res`, `attn` (maybe empty) and an optional `downsample`/`upsample`."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                h = getattr(self, name)(h)
        return h


def _mid(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups, dropout), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, groups, dropout)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, mult = cfg.norm_groups, cfg.encoder_ch_mult
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        levels, cin = [], cfg.ch
        for i, m in enumerate(mult):
            cout = cfg.ch * m
            res = []
            for _ in range(cfg.num_res_blocks):
                res.append(ResnetBlock(cin, cout, g, cfg.dropout))
                cin = cout
            attn = [AttnBlock(cin, g) for _ in range(cfg.num_res_blocks)] if i == len(mult) - 1 else []
            level = _Level(res, attn)
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
            levels.append(level)
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _mid(cin, g, cfg.dropout)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, mult = cfg.norm_groups, cfg.decoder_ch_mult
        cin = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, g, cfg.dropout)
        levels = []
        for i, m in enumerate(reversed(mult)):
            cout = cfg.ch * m
            res = []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(cin, cout, g, cfg.dropout))
                cin = cout
            attn = [AttnBlock(cin, g) for _ in range(cfg.num_res_blocks + 1)] if i == 0 else []
            level = _Level(res, attn)
            if i != len(mult) - 1:
                level.upsample = Upsample(cin)
            levels.append(level)
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------
# Quantizer


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor            # [B, C, h, w] straight-through quantised latents
    codes: torch.Tensor          # Long [B, h, w]
    vq_loss: torch.Tensor        # codebook loss (moves codebook rows toward the encoder output)
    commit_loss: torch.Tensor    # beta * commitment loss (moves the encoder output toward its code)
    entropy_loss: torch.Tensor   # entropy_loss_ratio * (sample entropy - batch entropy); 0 when the ratio is 0


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser over an (optionally L2-normalised) codebook: the one codebook lookup.

    The codebook stays fp32 whatever dtype the model is cast to: it is tiny, and the nearest-code search
    and the fingerprint must not depend on the compute dtype.
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.codebook_l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if cfg.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        weight = self.embedding.weight.data
        out = super()._apply(fn, recurse)
        moved = self.embedding.weight.data
        if moved.dtype != torch.float32 and weight.dtype == torch.float32:
            self.embedding.weight.data = weight.to(device=moved.device)
        return out

    def codebook(self) -> torch.Tensor:
        """[codebook_size, e_dim] fp32 rows as used for lookup (L2-normalised when the config says so).

        Without autograd through the codebook (decoding, encoding, a frozen VQ) the normalised rows are cached
        until the weights change: decoding looks codes up at every step, and normalising the whole codebook
        each time was most of a retrieval query's cost on a CPU."""
        w = self.embedding.weight
        if torch.is_grad_enabled() and w.requires_grad:  # training the codebook: a fresh graph every call
            return self._normalised(w)
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if getattr(self, "_codebook_key", None) != key:
            self._codebook, self._codebook_key = self._normalised(w.detach()), key
        return self._codebook

    def _normalised(self, w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        return F.normalize(w, dim=-1) if self.cfg.codebook_l2_norm else w

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook rows for integer codes of any shape: [...] -> [..., e_dim] fp32."""
        return F.embedding(codes.long(), self.codebook())

    def nearest(self, z: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Index of the nearest codebook row (squared L2) for each row of z [N, e_dim] -> Long [N]."""
        book = self.codebook()
        half_sq = 0.5 * (book * book).sum(-1)
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        for s in range(0, z.shape[0], chunk):
            zc = z[s:s + chunk].float()
            # argmin ||z - e||^2 = argmax (z.e - ||e||^2 / 2); chunked so [N, codebook] never gets large.
            out[s:s + chunk] = (zc @ book.T - half_sq).argmax(-1)
        return out

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
        if self.cfg.codebook_l2_norm:
            flat = F.normalize(flat, dim=-1)
        codes = self.nearest(flat.detach())
        zq = self.lookup(codes)
        zero = flat.new_zeros(())
        vq_loss = commit_loss = entropy_loss = zero
        if self.training:
            vq_loss = F.mse_loss(zq, flat.detach())
            commit_loss = self.cfg.commit_loss_beta * F.mse_loss(zq.detach(), flat)
            if self.cfg.entropy_loss_ratio > 0:
                entropy_loss = self.cfg.entropy_loss_ratio * _entropy_loss(flat @ self.codebook().T)
            if hasattr(self, "codebook_used"):
                n = min(codes.numel(), self.codebook_used.numel())
                self.codebook_used.copy_(torch.cat([self.codebook_used[n:], codes[-n:].to(self.codebook_used)]))
        zq = flat + (zq - flat).detach()  # straight-through estimator
        zq = zq.reshape(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)
        return QuantizerOutput(zq, codes.reshape(b, h, w), vq_loss, commit_loss, entropy_loss)

    def usage(self) -> float:
        """Fraction of the codebook seen among the last 65536 training codes (0 before training)."""
        if not hasattr(self, "codebook_used"):
            return float("nan")
        return torch.unique(self.codebook_used.long()).numel() / self.cfg.codebook_size


def _entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Mean per-sample entropy minus entropy of the mean assignment (encourages confident, diverse codes)."""
    probs = F.softmax(affinity / temperature, dim=-1)
    log_probs = F.log_softmax(affinity / temperature + 1e-5, dim=-1)
    avg = probs.mean(0)
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    return sample_entropy - avg_entropy


# ----------------------------------------------------------------------------------------------------------
# The model


class VQOutput(NamedTuple):
    reconstruction: torch.Tensor  # [B, 3, H, W], about [-1, 1]
    codes: torch.Tensor           # Long [B, h, w]
    vq_loss: torch.Tensor
    commit_loss: torch.Tensor
    entropy_loss: torch.Tensor


class VQModel(nn.Module):
    """LlamaGen VQ-VAE. Images are float BCHW in [-1, 1]; codes are Long [B, h, w] in raster order."""

    def __init__(self, cfg: VQConfig | str = "VQ-16"):
        super().__init__()
        self.config = vq_config(cfg)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = VectorQuantizer(self.config)
        self.quant_conv = nn.Conv2d(self.config.z_channels, self.config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.config.codebook_embed_dim, self.config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def grid_size(self, image_size: int) -> int:
        """Tokens per side for a square image; a clear error when the size does not divide."""
        if image_size <= 0 or image_size % self.downsample:
            near = max(1, round(image_size / self.downsample)) * self.downsample
            raise ArragError(f"image size {image_size} is not a positive multiple of the VQ downsample factor "
                             f"{self.downsample}; use e.g. {near}")
        return image_size // self.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ArragError(f"images must be [B, 3, H, W]; got {tuple(images.shape)}")
        for side in images.shape[2:]:
            self.grid_size(int(side))

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents, L2-normalised when the codebook is: [B,3,H,W] -> float [B, h, w, e_dim]."""
        self._check_images(images)
        z = self.quant_conv(self.encoder(images.to(self.dtype))).permute(0, 2, 3, 1).float()
        return F.normalize(z, dim=-1) if self.config.codebook_l2_norm else z

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor, return_latents: bool = False):
        """Nearest codebook index per patch: float [B,3,H,W] in [-1,1] -> Long [B, H/ds, W/ds].

        With return_latents, also the latents that were quantised (see encode_latents).
        """
        lat = self.encode_latents(images)
        codes = self.quantize.nearest(lat.reshape(-1, lat.shape[-1])).reshape(lat.shape[:3])
        return (codes, lat) if return_latents else codes

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised codebook rows for codes of any shape: [...] -> float [..., e_dim]."""
        return self.quantize.lookup(codes)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Long [B, h, w] -> float [B, 3, h*ds, w*ds], about [-1, 1] (not clamped)."""
        if codes.ndim != 3:
            raise ArragError(f"codes must be [B, h, w]; got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            lo, hi = int(codes.min()), int(codes.max())
            raise ArragError(f"codes must lie in [0, {self.codebook_size}); got [{lo}, {hi}]")
        zq = self.code_embeddings(codes).permute(0, 3, 1, 2).to(self.dtype)
        return self.decoder(self.post_quant_conv(zq))

    @torch.no_grad()
    def round_trip(self, images, convention: str = "llamagen", batch: int | None = None):
        """uint8 images [N, H, W, 3] (NumPy) -> decode(encode(images)) as uint8 [N, H, W, 3]; `convention` is
        image_io.to_uint8's. `batch` images at a time (None: all at once); batching can move a rare pixel by a
        level (float rounding), so figures to be compared use the same batching."""
        import numpy as np

        from arrag.image_io import to_tensor, to_uint8

        batch = batch or max(1, len(images))
        return np.concatenate([to_uint8(self.decode_codes(self.encode_to_codes(to_tensor(images[s:s + batch])
                                                                                .to(self.device))), convention)
                               for s in range(0, len(images), batch)])

    def forward(self, images: torch.Tensor) -> VQOutput:
        """Training pass: reconstruction plus the codebook, commitment and entropy losses."""
        self._check_images(images)
        z = self.quant_conv(self.encoder(images.to(self.dtype)))
        q = self.quantize(z)
        rec = self.decoder(self.post_quant_conv(q.z_q))
        return VQOutput(rec, q.codes, q.vq_loss, q.commit_loss, q.entropy_loss)

    def fingerprint(self) -> str:
        """16 hex digits identifying the tokenizer: a hash of the codebook weights as stored (fp32, on the CPU)
        and its L2 flag. Whatever device or dtype the model runs in, the same weights give the same value, so
        a database built on one machine is recognised on another. Indexes and models must share it."""
        return codebook_fingerprint(self.quantize.embedding.weight, l2_norm=self.config.codebook_l2_norm)

    def legacy_fingerprint(self) -> str:
        """The fingerprint arrag recorded before 0.2: the codebook normalised on the CPU, then hashed. Stores and
        indexes built then on a CPU carry it; a GPU-built one may differ in the last bits and needs a rebuild."""
        return codebook_fingerprint(self.quantize.codebook().detach().cpu(), l2_norm=None)

    def matches(self, fingerprint: str | None) -> bool:
        """True when a recorded fingerprint names this tokenizer (current or legacy definition)."""
        return fingerprint is not None and fingerprint in (self.fingerprint(), self.legacy_fingerprint())

    def save(self, path: str | Path) -> None:
        """Write safetensors with the LlamaGen key names and the config in the metadata."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": "pt", "arrag_vq_config": json.dumps(dataclasses.asdict(self.config))}
        from arrag.fileops import atomic_path

        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)


def codebook_fingerprint(book, l2_norm: bool | None = True) -> str:
    """16 hex digits of sha256 over codebook weights [K, e] (little-endian fp32, row-major), their shape and,
    unless None, the L2 flag. Tensors are moved to the CPU first: moving and upcasting never change bits, so
    the value does not depend on the device or the dtype the model runs in. (l2_norm=None gives the
    pre-0.2 hash of a normalised codebook.)
    """
    import numpy as np

    arr = book.detach().to("cpu", torch.float32).numpy() if isinstance(book, torch.Tensor) else np.asarray(book)
    arr = np.ascontiguousarray(arr, dtype="<f4")
    head = f"{tuple(arr.shape)}" if l2_norm is None else f"arrag-vq/2 {tuple(arr.shape)} l2={bool(l2_norm)}"
    h = hashlib.sha256(head.encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Loading


def _read_checkpoint(path: Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Raw state dict (and an embedded config, if any) from a LlamaGen .pt or a safetensors file. A .pt is read
    without running code from it (weight_files.load_pickled; `trust`: the user's --trust-checkpoint)."""
    if not path.exists():
        from arrag.hub import missing_path_error

        raise missing_path_error(path, "VQ checkpoint")
    if path.is_dir():
        raise ArragError(f"VQ checkpoint {path} is a folder; pass the .pt or .safetensors file inside it")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ArragError(f"cannot read VQ checkpoint {path}: {one_line(e)}") from None
        cfg = json.loads(meta["arrag_vq_config"]) if "arrag_vq_config" in meta else None
        return state, cfg
    from arrag.weight_files import load_pickled

    obj = load_pickled(path, trust=trust, what="VQ checkpoint")
    if isinstance(obj, Mapping):
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                return dict(obj[key]), None
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj), None
    raise ArragError(f"VQ checkpoint {path} has no weights under 'ema', 'model' or 'state_dict'; "
                     "expected LlamaGen's vq_ds16_t2i.pt layout")


def _short(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """load_state_dict(strict=True) whose failure is one ArragError line naming the first bad keys.

    assign=True adopts the given tensors (for modules built on the meta device).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise ArragError(f"{what} does not match the model: {'; '.join(parts)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ArragError(f"{what}: key {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}; "
                             "is this the right preset/config?")
    module.load_state_dict(state, strict=True, assign=assign)


def check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or inf (a damaged or diverged checkpoint would decode flat images silently)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ArragError(f"{what}: {key} holds {bad:,} NaN or infinite values; the checkpoint is damaged or its "
                             "training diverged: use another checkpoint")


def load_vq(path: str | Path, preset: str | VQConfig | Mapping | None = None,
            device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            trust_checkpoint: bool = False) -> VQModel:
    """Load a VQ-VAE from LlamaGen's .pt (weights under 'ema', 'model' or 'state_dict') or safetensors.

    The config comes from `preset`, else from the file's metadata (arrag safetensors), else VQ-16.
    A Janus-Pro checkpoint is accepted too, as its folder or one of its weight files: the VQ config comes
    from the folder's config.json and the `gen_vision_model.` weights are taken. A Hub id (a repository, or
    a repository and a file) is looked up in the Hugging Face cache or downloaded.
    Loads strictly; any mismatch is one ArragError line naming the file and the first bad keys. A pickled file
    (.pt, .bin) is never allowed to run code: one holding Python objects besides weights and LlamaGen's
    argparse args is refused unless `trust_checkpoint` (--trust-checkpoint). Non-finite weights are refused.
    """
    from arrag import hub
    from arrag.weight_files import iter_tensors, weight_files

    path = hub.resolve(path, "VQ checkpoint")  # e.g. peizesun/llamagen_t2i/vq_ds16_t2i.pt or a model repository
    folder = path if path.is_dir() else path.parent
    file_cfg = None
    if (folder / "config.json").is_file() and (path.is_dir() or path.name.startswith(("model", "pytorch_model"))):
        try:
            janus_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ArragError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
        if "gen_vision_config" in janus_config:  # a Janus-Pro checkpoint: its own VQ config and weights
            file_cfg = vq_config_from_janus(janus_config, str(folder / "config.json"))[1]
            state = dict(iter_tensors(weight_files(folder), "gen_vision_model.", trust=trust_checkpoint))
    if file_cfg is None:
        if path.is_dir():
            raise ArragError(f"VQ checkpoint {path} is a folder without a Janus-Pro config.json; pass the .pt or "
                             ".safetensors file, or the model folder")
        state, file_cfg = _read_checkpoint(path, trust_checkpoint)
    prefix = "gen_vision_model."
    if not any(k.startswith("encoder.") for k in state) and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    cfg = vq_config(preset if preset is not None else (file_cfg if file_cfg is not None else "VQ-16"))
    model = VQModel(cfg)
    named = preset if isinstance(preset, str) else ("the file's own config" if file_cfg is not None else "VQ-16")
    load_state_strict(model, state, f"VQ checkpoint {path} (as {named}; --vq-preset chooses another)")
    check_finite(state, f"VQ checkpoint {path}")
    model.eval().to(device)
    if dtype is not None:
        model.to(dtype)
    return model
