"""What `arrag app` computes, without the page: the models and retriever it serves, generation of every method from
one seed with attribution, and the pictures of what retrieval did (database crops, top contributors).

Database images are decoded by the model's VQ from the index's code store, so the page needs no original files.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from arrag.decoding.attribution import AttributionSettings, ImageAttribution
from arrag.decoding.beginning import GivenBeginning, beginning_codes
from arrag.decoding.daid import DEFAULT_AGGREGATE
from arrag.decoding.loop import SamplingConfig, decode_images
from arrag.decoding.methods import Generator, MethodConfig
from arrag.errors import ArragError

APP_METHODS = ("base", "daid", "faid")
LABELS = {"base": "base", "daid": "DAiD", "faid": "FAiD"}
CROP_PX, THUMB_PX = 96, 96  # sides of the crops and thumbnails shown on the page


@dataclass
class MethodResult:
    """One method's samples: codes Long [S, h, w], images uint8 [S, H, W, 3], one attribution per sample (None
    for base)."""

    method: str
    codes: torch.Tensor
    images: np.ndarray
    records: list[ImageAttribution] | None
    given_rows: int = 0  # the top rows of codes came from the beginning image, not from the method


@dataclass
class Patch:
    """A picture for the page with its caption."""

    image: np.ndarray
    caption: str


class AppSession:
    """The models and retriever behind the page; generation and the pictures of attribution."""

    def __init__(self, model, faid_model=None, retriever=None, store=None, image_size: int | None = None):
        self.model, self.faid_model, self.retriever, self.store = model, faid_model, retriever, store
        self.image_size = image_size or model.vq.config.image_size
        self._decoded: OrderedDict[int, tuple] = OrderedDict()  # (codes, pixels) of database images decoded lately
        self.notes: list[str] = []  # the last generate's warnings (unknown words), shown on the page

    @classmethod
    def load(cls, model: str | Path, faid_model: str | Path | None = None, retriever: str | Path | None = None,
             device: str = "cpu", store: str | Path | None = None, image_size: int | None = None) -> AppSession:
        """Load the checkpoints and the index (its code store from the manifest, or `store`)."""
        from arrag.janus.model import JanusPro
        from arrag.retrieval.codestore import CodeStore
        from arrag.retrieval.retriever import PatchRetriever
        from arrag.runtime import resolve_device

        dev = resolve_device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        base = JanusPro.from_pretrained(model, dtype=dtype, device=dev, quiet=True)
        faid = JanusPro.from_pretrained(faid_model, dtype=dtype, device=dev, quiet=True) if faid_model else None
        index = code_store = None
        if retriever:
            index = PatchRetriever.load(retriever, device=str(dev) if dev.type == "cuda" else "cpu",
                                        gpu_fallback=True)
            where = store or index.manifest.get("store")
            if where and Path(where).is_dir():
                code_store = CodeStore.open(where)
            else:
                warnings.warn(f"the code store of {retriever} ({where}) is not there: the page shows hits without "
                              "database crops (pass --store)", stacklevel=2)
        return cls(base, faid, index, code_store, image_size)

    @classmethod
    def demo(cls, device: str = "cpu", progress: bool = True, world: str = "tail") -> AppSession:
        """A demo world's shipped models and its demo retriever (built on first use, as `make demo` does)."""
        from arrag.demo.database import build_demo_retriever
        from arrag.demo.worlds import assets_report, get_world, recipe_settings

        w = get_world(world)
        recipe = recipe_settings(assets_report(w.assets))
        index = build_demo_retriever(w.assets / "base", w.retriever, recipe["database_images"],
                                     recipe["image_size"], progress=progress, world=world,
                                     zipf_s=recipe["zipf_s"], shape=recipe["shape"])
        return cls.load(w.assets / "base", w.assets / "faid", index, device=device, image_size=recipe["image_size"])

    @property
    def methods(self) -> list[str]:
        """The methods this session can run."""
        return [m for m in APP_METHODS if m == "base" or (self.retriever is not None and
                                                          (m == "daid" or self.faid_model is not None))]

    # -- generating ---------------------------------------------------------------------------------------------
    def generate(self, prompt: str, methods: list[str], samples: int = 4, seed: int = 0, cfg_weight: float = 5.0,
                 temperature: float = 1.0, daid_lambda: float = 0.1, daid_tau: float = 1.0, daid_k: int = 256,
                 faid_k: int = 10, progress: bool = False, daid_aggregate: str = DEFAULT_AGGREGATE,
                 begin_image: np.ndarray | None = None, begin_rows: int = 0) -> dict[str, MethodResult]:
        """Every method's `samples` images from the same seed (sample s of every method draws the same uniforms);
        `daid_aggregate` is how DAiD weighs hits that share a code (nearest, the original's; or sum). With
        `begin_rows`, every image begins with the top rows of codes of `begin_image` (uint8 [H, W, 3]; its VQ
        codes) and the methods draw the rest: image completion, where DAiD's neighbourhoods start out real."""
        prompt = (prompt or "").strip()
        self.notes = []  # warnings of this call, for the page to show
        if not prompt:
            raise ArragError("enter a prompt")
        if not methods:
            raise ArragError("choose at least one method")
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise ArragError(f"{', '.join(unknown)} needs " + ("a FAiD checkpoint (--faid-model)" if self.retriever
                                                                 else "a retriever (--retriever)"))
        sampling = SamplingConfig(parallel_size=int(samples), cfg_weight=cfg_weight, temperature=temperature,
                                  seed=int(seed), image_size=self.image_size)
        sampling.validate()
        given = self.beginning(begin_image, int(begin_rows or 0))
        hooks = [] if given is None else [GivenBeginning(given)]  # one row: every sample's beginning
        out = {}
        for method in methods:
            model = self.faid_model if method == "faid" else self.model
            config = MethodConfig(method, daid_lambda=daid_lambda, daid_tau=daid_tau, daid_k=int(daid_k),
                                  daid_aggregate=daid_aggregate, faid_k=int(faid_k))
            retrieves = config.uses_retrieval
            gen = Generator(model, config, self.retriever if retrieves else None, extra_hooks=hooks,
                            attribution=AttributionSettings() if retrieves else None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                codes = gen.sample_codes([prompt], sampling, progress=progress)
            for w in caught:  # a word outside the tokenizer: said, as the CLI says it, and generation goes on
                if "does not know" in str(w.message) and str(w.message) not in self.notes:
                    self.notes.append(str(w.message))
            out[method] = MethodResult(method, codes, gen.images(codes), gen.take_attribution() if retrieves else None,
                                       int(begin_rows or 0))
        return out

    def beginning(self, image: np.ndarray | None, rows: int) -> torch.Tensor | None:
        """The VQ codes of an image's top `rows` rows, Long [1, rows * w] (None for 0 rows): the image is taken
        as RGB and resized to the session's image size."""
        if rows <= 0:
            return None
        return beginning_codes(self.model.vq, image, rows, self.image_size, what="a beginning image")

    # -- what retrieval did -------------------------------------------------------------------------------------
    def grid(self) -> tuple[int, int]:
        side = self.model.vq.grid_size(self.image_size)
        return side, side

    def step_at(self, result: MethodResult, sample: int, row: int, col: int) -> tuple[int | None, str]:
        """The record row of the retrieval step at cell (row, col) of a sample, or None with the reason."""
        if result.records is None:
            return None, f"{LABELS[result.method]} does not retrieve; click a DAiD or FAiD image"
        cell = row * self.grid()[1] + col
        hit = np.flatnonzero(result.records[sample].arrays["cells"] == cell)
        if len(hit) == 0:
            return None, (f"cell ({row}, {col}) had no retrieval: its neighbourhood is not all inside the image "
                          "(the first row and the edge columns)")
        return int(hit[0]), ""

    def retrieved(self, result: MethodResult, sample: int, row: int, col: int, limit: int = 8
                  ) -> tuple[str, list[Patch]]:
        """A line about the step at (row, col) and its hits as crops of their database images, nearest first."""
        step, why = self.step_at(result, sample, row, col)
        if step is None:
            return why, []
        a = result.records[sample].arrays
        m = result.method
        sampled = int(a["sampled"][step])
        line = f"{LABELS[m]} sample {sample + 1}, row {row}, column {col}: sampled code {sampled}"
        if row < result.given_rows:
            line += " (given: this row is the beginning image's; what retrieval proposed was not drawn)"
        if m == "daid":
            line += f", p_ret's weight on it {float(a['daid_weight'][step]):.3f}"
            if "daid_model_prob" in a:
                line += (f"; the model's own probability {float(a['daid_model_prob'][step]):.3f}, mixed "
                         f"{float(a['daid_mixed_prob'][step]):.3f}")
            if "daid_model_choice" in a:
                alone = int(a["daid_model_choice"][step])
                line += ("; retrieval did not change the token (the model alone drew it too, with the same draw)"
                         if alone == sampled else
                         f"; retrieval changed the token: the model alone would have drawn code {alone}")
        else:
            gates = a["faid_hit_gates"][step]
            mean = float(np.mean(gates)) if len(gates) else 0.0
            line += (f"; gates ≈ 0 (mean {mean:.2g}): FAiD ignored its candidates here" if mean < 0.01 else
                     f"; mean gate {mean:.3f} over its {len(gates)} candidates")
        if self.retriever.image_map == "none":
            return line + "; the original prebuilt database records no images for its entries", []
        offsets, images = a[f"{m}_hit_image_offsets"], a[f"{m}_hit_images"]
        hits = a[f"{m}_hit_entries"].shape[1]
        shown = []  # (hit, entry, its first database image)
        for j in range(min(limit, hits)):
            entry = int(a[f"{m}_hit_entries"][step, j])
            if entry < 0:
                break
            row_ = step * hits + j
            if offsets[row_ + 1] > offsets[row_]:
                shown.append((j, entry, int(images[offsets[row_]])))
        sources = self._sources([image for _, _, image in shown])
        patches = []
        for (j, entry, image), source in zip(shown, sources, strict=True):
            weight = (f"p_ret {float(a['daid_hit_p_ret'][step, j]):.3f}" if m == "daid"
                      else f"gate {float(a['faid_hit_gates'][step, j]):.3g}")
            distance = float(a[f"{m}_hit_distances"][step, j])
            caption = f"d {distance:.3f} · {weight} · db image {image}{source}"
            occurrences = int(a[f"{m}_hit_occurrences"][step, j])
            if occurrences > 1:
                caption += f" (+{occurrences - 1} more)"
            patches.append(Patch(self._crop(entry, image), caption))
        if not patches and self.store is None:
            line += "; no database crops: the index's code store is not there (--store)"
        return line, patches

    def contributors(self, result: MethodResult, sample: int) -> tuple[str, list[Patch]]:
        """A line about the sample's attribution and thumbnails of its top contributing database images."""
        if result.records is None:
            return "", []
        record = result.records[sample].summary
        summary = record.get(result.method, {})
        top = summary.get("top")
        if top is None:
            return record.get("note", "no database images recorded"), []
        steps = len(result.records[sample].arrays["cells"])
        line = (f"{LABELS[result.method]} sample {sample + 1}: retrieval mass {summary['mass']:.3f} of a possible "
                f"{steps} (one per retrieval step: "
                + ("p_ret's weight on the sampled code" if result.method == "daid" else "the mean gate")
                + f"), {summary.get('diffuse_mass', 0):.3f} of it on common patterns; the images it came from:")
        pics = [Patch(self._thumb(t["image"]), f"db image {t['image']}" + (f" ({t['source']})" if t["source"] else "")
                      + f" · {100 * t['share']:.1f}%") for t in top if self.store is not None]
        return line, pics

    # -- pictures -----------------------------------------------------------------------------------------------
    def _sources(self, images: list[int]) -> list[str]:
        """' (<source id>)' for each database image, from one read of the store's shard records ('' without)."""
        if self.store is None or not images:
            return [""] * len(images)
        return [f" ({src})" if src else "" for src in self.store.source_ids(np.array(images))]

    def database_image(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """Database image `image`: its codes [h, w] from the store and the VQ's decoding of them, uint8 [H, W, 3]
        (the last 64 kept)."""
        if self.store is None:
            raise ArragError("the index's code store is not there: pass --store")
        if image not in self._decoded:
            codes = self.store.gather(np.array([image]))[0]
            pixels = decode_images(self.model, torch.from_numpy(codes[None].astype(np.int64)).to(self.model.device))
            self._decoded[image] = (codes, pixels[0])
            if len(self._decoded) > 64:
                self._decoded.popitem(last=False)
        self._decoded.move_to_end(image)
        return self._decoded[image]

    def _crop(self, entry: int, image: int) -> np.ndarray:
        """The patch of `entry` in database image `image`: its cell and two cells around it, outlined, enlarged."""
        if self.store is None:
            return np.full((CROP_PX, CROP_PX, 3), 200, np.uint8)
        codes, pixels = self.database_image(image)
        cells = self.retriever.entry_cells(entry, image, codes)
        return crop_cell(pixels, codes.shape, int(cells[0]) if len(cells) else None)

    def _thumb(self, image: int) -> np.ndarray:
        pixels = self.database_image(image)[1]
        return np.asarray(Image.fromarray(pixels).resize((THUMB_PX, THUMB_PX), Image.NEAREST))


def crop_cell(pixels: np.ndarray, grid: tuple[int, int], cell: int | None, margin: int = 2,
              size: int = CROP_PX) -> np.ndarray:
    """uint8 [size, size, 3]: the cells within `margin` of `cell` (clipped at the edges) with the cell outlined in
    red; the whole image when the cell is unknown."""
    h, w = grid
    ph, pw = pixels.shape[0] // h, pixels.shape[1] // w
    if cell is None:
        return np.asarray(Image.fromarray(pixels).resize((size, size), Image.NEAREST))
    r, c = divmod(cell, w)
    r0, r1 = max(0, r - margin), min(h, r + margin + 1)
    c0, c1 = max(0, c - margin), min(w, c + margin + 1)
    crop = Image.fromarray(pixels[r0 * ph:r1 * ph, c0 * pw:c1 * pw])
    scale = size / max(crop.width, crop.height)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.NEAREST)
    box = [(c - c0) * pw * scale, (r - r0) * ph * scale, (c - c0 + 1) * pw * scale - 1, (r - r0 + 1) * ph * scale - 1]
    ImageDraw.Draw(crop).rectangle(box, outline=(255, 0, 0), width=2)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    return np.asarray(canvas)
