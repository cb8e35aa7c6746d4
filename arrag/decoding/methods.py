"""The generation methods and the one place that assembles a ready generator.

  base        the model alone
  daid        retrieval reshapes the next-token distribution (training-free)
  faid        a FAiD checkpoint's blenders are fed retrieved patches
  faid+daid   both
A Generator holds a model, its retriever (checked against the model's tokenizer) and the method's hooks,
and writes the record of all of it. The CLI, `generate()`, the benchmark runner and the demo all build
generators here; none of them assembles hooks itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from arrag.decoding.attribution import AttributionRecorder, AttributionSettings, ImageAttribution
from arrag.decoding.daid import DEFAULT_AGGREGATE, DEFAULT_K, DEFAULT_LAMBDA, DEFAULT_TAU, DAiD
from arrag.decoding.faid import DEFAULT_FAID_K, FAiD
from arrag.decoding.hooks import DecodingHook
from arrag.decoding.loop import SamplingConfig, decode_images, sample_codes
from arrag.errors import ArragError

METHODS = ("base", "daid", "faid", "faid+daid")


@dataclass
class MethodConfig:
    """Which method, and its settings. Every default here is the CLI's default too."""

    method: str = "base"
    daid_lambda: float = DEFAULT_LAMBDA      # DAiD mixing weight (the paper's tuned value is not published)
    daid_tau: float = DEFAULT_TAU            # temperature of softmax(-d / tau)
    daid_k: int = DEFAULT_K                  # neighbours fetched per DAiD step (the original's 2048)
    daid_aggregate: str = DEFAULT_AGGREGATE  # duplicate codes: nearest hit (original) or sum (kNN-LM)
    faid_k: int = DEFAULT_FAID_K             # candidates retrieved per FAiD step (the released 10)
    allow_unknown_vq: bool = False           # accept an index without a tokenizer fingerprint

    @property
    def uses_retrieval(self) -> bool:
        return self.method != "base"

    def validate(self) -> None:
        """One-line errors for impossible settings, before any model or index is loaded."""
        if self.method not in METHODS:
            raise ArragError(f"--method {self.method!r} is not available; choose one of {', '.join(METHODS)}")
        if self.method.endswith("daid"):
            DAiD.check_settings(self.daid_lambda, self.daid_tau, self.daid_k, self.daid_aggregate)
        if self.method.startswith("faid") and self.faid_k < 1:
            raise ArragError(f"--faid-k must be >= 1, got {self.faid_k}")

    def settings(self) -> dict:
        """The method's settings that apply (DAiD's only with DAiD, FAiD's only with FAiD)."""
        d = {"method": self.method}
        if self.method.endswith("daid"):
            d.update({k: v for k, v in asdict(self).items() if k.startswith("daid_")})
        if self.method.startswith("faid"):
            d["faid_k"] = self.faid_k
        return d


def build_hooks(model, method: MethodConfig, retriever=None) -> list[DecodingHook]:
    """The hooks a method needs, after checking the retriever against the model's tokenizer."""
    method.validate()
    if method.method == "base":
        if retriever is not None:
            raise ArragError("a retriever was given, but --method base does not use one")
        return []
    if retriever is None:
        raise ArragError(f"--method {method.method} needs a retriever (--retriever DIR, built by `arrag build-index`)")
    if method.method.startswith("faid") and not model.has_faid:
        raise ArragError(f"--method {method.method}: the model {model.source_folder or ''} has no FAiD blenders (its "
                         "config lacks num_SmoothPatchBlender/num_hop); pass a FAiD checkpoint")
    retriever.check_compatible(model.vq, allow_unknown=method.allow_unknown_vq)
    hooks: list[DecodingHook] = []
    if method.method.startswith("faid"):
        hooks.append(FAiD(retriever, k=method.faid_k))
    if method.method.endswith("daid"):
        hooks.append(DAiD(retriever, lam=method.daid_lambda, tau=method.daid_tau, k=method.daid_k,
                          aggregate=method.daid_aggregate))
    return hooks


def check_attribution(method: MethodConfig, step_mode: str) -> None:
    """One-line errors for attribution where there is nothing to record, or where it cannot be read back."""
    if not method.uses_retrieval:
        raise ArragError("--attribution records what retrieval did: use it with --method daid, faid or faid+daid")
    if step_mode == "graph":
        raise ArragError("--attribution reads the blenders' gates back every step, which a CUDA graph cannot: use "
                         "--decode-step auto, eager or static")


class Generator:
    """A ready text-to-image generator: model + retriever + the method's hooks, and the record of them.

    attribution: record what every retrieval step found and weighed (decoding.attribution); after a run,
    `take_attribution()` returns one ImageAttribution per image. Recording needs eager decode steps (the blenders'
    gates are read back each step), so step_mode 'auto' decodes eagerly and 'graph' is refused.
    """

    def __init__(self, model, method: MethodConfig | None = None, retriever=None,
                 extra_hooks: Sequence[DecodingHook] = (), prompter=None, step_mode: str = "auto",
                 attribution: AttributionSettings | None = None):
        self.model, self.method, self.retriever = model, method or MethodConfig(), retriever
        self.hooks = [*build_hooks(model, self.method, retriever), *extra_hooks]
        self.prompter, self.step_mode = prompter, step_mode
        self.recorder = None
        if attribution is not None:
            check_attribution(self.method, step_mode)
            self.recorder = AttributionRecorder(retriever, attribution)
            for hook in self.hooks:
                if isinstance(hook, (DAiD, FAiD)):
                    hook.recorder = self.recorder
            self.hooks.append(self.recorder)
            self.step_mode = "eager" if step_mode == "auto" else step_mode

    def take_attribution(self) -> list[ImageAttribution]:
        """One ImageAttribution per image generated since the last call, in image order (attribution on)."""
        if self.recorder is None:
            raise ArragError("this generator was made without attribution (pass attribution=AttributionSettings())")
        return self.recorder.take()

    @classmethod
    def load(cls, model_path: str | Path, method: MethodConfig | str | None = None, *,
             retriever: str | Path | None = None, device: str = "auto", dtype: str = "auto",
             retriever_device: str | None = None, nprobe: int | None = None, verify_index: bool = True,
             local_rank: int | None = None, step_mode: str = "auto", trust_checkpoint: bool = False,
             attribution: AttributionSettings | None = None, **method_settings) -> Generator:
        """Load a Janus-Pro folder and, for retrieval methods, its index; everything is checked before loading.

        `method` is a MethodConfig, or a method name ("base", "daid", "faid", "faid+daid") with its settings as
        keywords (daid_lambda=0.1, faid_k=10, ...).

        device 'auto' is CUDA when present (GPU `local_rank` when several processes share a machine). With the
        model on CUDA the index goes to the GPU too (faiss-gpu, or the torch backend for Flat and IVF-Flat
        indexes), staying on the CPU with a notice when neither applies; retriever_device overrides. nprobe
        overrides the index's. trust_checkpoint: the user's --trust-checkpoint (a pickled .bin holding more than
        weights is refused without it).
        """
        from arrag.janus.model import JanusPro
        from arrag.runtime import parse_dtype, resolve_device

        if method is None or isinstance(method, str):
            method = MethodConfig(method=method or "base", **method_settings)
        elif method_settings:
            raise ArragError(f"pass method settings in the MethodConfig, not as keywords: {', '.join(method_settings)}")
        method.validate()
        if attribution is not None:
            check_attribution(method, step_mode)
        if nprobe is not None and nprobe < 1:
            raise ArragError(f"--nprobe must be >= 1, got {nprobe}")
        if method.uses_retrieval and not retriever:
            raise ArragError(f"--method {method.method} needs --retriever DIR (built by `arrag build-index`)")
        if retriever and not method.uses_retrieval:
            raise ArragError("--retriever is only used with --method daid, faid or faid+daid")
        dev = resolve_device(device)
        if local_rank is not None and dev.type == "cuda" and device == "auto":
            dev = resolve_device(f"cuda:{local_rank % torch.cuda.device_count()}")
        index = None
        if retriever:  # the index first: a bad one fails before minutes of model loading
            from arrag.retrieval.retriever import PatchRetriever

            where = retriever_device or (str(dev) if dev.type == "cuda" else "cpu")
            index = PatchRetriever.load(retriever, device=where, nprobe=nprobe, verify=verify_index,
                                        gpu_fallback=retriever_device is None)
        model = JanusPro.from_pretrained(model_path, dtype=parse_dtype(dtype, dev), device=dev,
                                         trust_checkpoint=trust_checkpoint)
        return cls(model, method, index, step_mode=step_mode, attribution=attribution)

    # -- generating -----------------------------------------------------------------------------------------
    def sample_codes(self, prompts: Sequence[str], sampling: SamplingConfig, *,
                     image_indices: Sequence[int] | None = None, progress: bool = False) -> torch.Tensor:
        """Code grids Long [len(prompts) * parallel_size, h, w] (see loop.sample_codes); `progress`: a bar over the
        decoding steps (the CLI's; the Python API is quiet unless asked)."""
        return sample_codes(self.model, prompts, sampling, hooks=self.hooks, prompter=self.prompter,
                            image_indices=image_indices, progress=progress, step_mode=self.step_mode)

    def images(self, codes: torch.Tensor) -> np.ndarray:
        """Code grids -> uint8 images [N, H, W, 3]."""
        return decode_images(self.model, codes)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, **kw) -> np.ndarray:
        """uint8 images [len(prompts) * parallel_size, H, W, 3]; image j*parallel_size+s = prompt j, sample s."""
        return self.images(self.sample_codes(prompts, sampling, **kw))

    def __call__(self, prompts: str | Sequence[str], progress: bool = False, **sampling) -> np.ndarray:
        """Generate with SamplingConfig's settings as keywords (parallel_size, cfg_weight, temperature, seed, ...):
        uint8 images [len(prompts) * parallel_size, H, W, 3]. A model loaded once generates many times."""
        config = SamplingConfig(**sampling)
        config.validate()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.generate(prompts, config.for_model(self.model), progress=progress)

    # -- the record -----------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """Model, method, hooks and index settings for a JSON sidecar (not the sampling settings)."""
        model = self.model
        d = {"model": str(Path(model.source_folder).resolve()) if model.source_folder else None,
             "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
             "decode_step": self.step_mode,
             "vq_fingerprint": model.vq.fingerprint(), **self.method.settings()}
        for hook in self.hooks:
            d.update(hook.settings())
        if self.retriever is not None:
            m = self.retriever.manifest
            d["index"] = {k: m.get(k) for k in ("factory", "entries", "images", "key_source", "vq_fingerprint")}
            d["index"].update(folder=str(Path(self.retriever.folder).resolve()), nprobe=self.retriever.nprobe,
                              neighborhood=m.get("neighborhood", {}).get("shape"))
        return d

    def stats(self) -> dict:
        """What the hooks did during the runs so far (steps and rows augmented, rows without hits)."""
        out: dict = {}
        for hook in self.hooks:
            out.update(getattr(hook, "stats", {}))
        return out


def generate(model, prompts: Sequence[str], *, method: str = "base", retriever=None,
             parallel_size: int = SamplingConfig.parallel_size, cfg_weight: float = SamplingConfig.cfg_weight,
             temperature: float = SamplingConfig.temperature, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, image_size: int | None = None,
             daid_lambda: float | None = None, daid_tau: float | None = None, daid_k: int | None = None,
             daid_aggregate: str = DEFAULT_AGGREGATE, faid_k: int = DEFAULT_FAID_K, allow_unknown_vq: bool = False,
             hooks: Sequence[DecodingHook] = (), prompter=None, batch_size: int | None = None,
             image_index_offset: int = 0, progress: bool = False) -> np.ndarray:
    """Generate uint8 images [len(prompts) * parallel_size, H, W, 3] (image j*parallel_size+s = prompt j, sample s).
    Quiet unless `progress=True` (a bar over the decoding steps).

    method: base, daid, faid or faid+daid (the last three need `retriever`: an index folder, or a PatchRetriever,
    built with this model's VQ; faid needs a FAiD checkpoint). daid_* left None take MethodConfig's defaults.
    seed=None draws a fresh seed, printed to stderr (callers that record settings should pick the seed
    themselves). Extra `hooks` run after the method's own, in the given order.
    """
    cfg = MethodConfig(method=method, daid_aggregate=daid_aggregate, faid_k=faid_k, allow_unknown_vq=allow_unknown_vq)
    for name, value in (("daid_lambda", daid_lambda), ("daid_tau", daid_tau), ("daid_k", daid_k)):
        if value is not None:
            setattr(cfg, name, value)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
        print(f"arrag: seed {seed}", file=sys.stderr)
    sampling = SamplingConfig(parallel_size=parallel_size, cfg_weight=cfg_weight, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, image_size=image_size, batch_size=batch_size)
    if isinstance(retriever, (str, Path)):  # an index folder, loaded where the model runs (see Generator.load)
        from arrag.retrieval.retriever import PatchRetriever

        where = str(model.device) if model.device.type == "cuda" else "cpu"
        retriever = PatchRetriever.load(retriever, device=where, gpu_fallback=True)
    elif retriever is not None and not hasattr(retriever, "check_compatible"):
        raise ArragError(f"retriever: expected an index folder or a PatchRetriever, got {type(retriever).__name__}")
    gen = Generator(model, cfg, retriever, extra_hooks=hooks, prompter=prompter)
    n = len(prompts) * parallel_size
    return gen.generate(prompts, sampling, image_indices=range(image_index_offset, image_index_offset + n),
                        progress=progress)
