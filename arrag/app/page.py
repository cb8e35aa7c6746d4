"""The `arrag app` page (Gradio): generate with base, DAiD and FAiD side by side from one seed, click a cell of a
DAiD or FAiD image to see the database patches its retrieval step found, and see each image's top contributors.

Each method's samples are shown as one strip, enlarged so a cell can be clicked; a click's pixel maps back to
(sample, row, column). Errors become a line on the page, never a traceback.
"""

import os

import numpy as np
from PIL import Image, ImageDraw

from arrag.app.session import APP_METHODS, LABELS, AppSession, MethodResult
from arrag.decoding.daid import DEFAULT_AGGREGATE
from arrag.errors import ArragError

STRIP_MIN_PX = 256  # each sample is enlarged (nearest) to at least this many pixels a side
DEFAULT_PROMPT = "a red circle and a blue square"
TAU_RANGE = (0.01, 5.0)  # DAiD τ on the slider: TailWorld's tuned 0.03 sits near the bottom, ShapesWorld's 1.0 mid


def strip(images: np.ndarray) -> tuple[np.ndarray, int]:
    """Samples uint8 [S, H, W, 3] side by side, enlarged by an integer factor -> (strip, factor)."""
    factor = max(1, -(-STRIP_MIN_PX // images.shape[2]))
    row = np.concatenate(list(images), axis=1)
    big = Image.fromarray(row).resize((row.shape[1] * factor, row.shape[0] * factor), Image.NEAREST)
    return np.asarray(big), factor


def click_to_cell(x: int, y: int, image_px: int, factor: int, grid: tuple[int, int]) -> tuple[int, int, int]:
    """A click at pixel (x, y) of a strip -> (sample, row, column)."""
    side = image_px * factor
    sample, x_in = divmod(int(x), side)
    cell_px = side / grid[1]
    return sample, min(grid[0] - 1, int(int(y) // cell_px)), min(grid[1] - 1, int(x_in // cell_px))


def mark_cell(picture: np.ndarray, image_px: int, factor: int, grid: tuple[int, int], sample: int, row: int,
              col: int) -> np.ndarray:
    """A copy of a strip with cell (row, col) of `sample` outlined in red: where the user clicked."""
    cell = image_px * factor / grid[1]
    x0, y0 = sample * image_px * factor + col * cell, row * cell
    marked = Image.fromarray(picture)
    ImageDraw.Draw(marked).rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(255, 0, 0),
                                     width=max(1, int(cell) // 8))
    return np.asarray(marked)


def _message(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"**Error:** {text}"


def build_page(session: AppSession, defaults: dict | None = None):
    """The Gradio Blocks of the page for `session`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    d = {"samples": 4, "seed": 0, "cfg_weight": 5.0, "temperature": 1.0, "daid_lambda": 0.1, "daid_tau": 1.0,
         "daid_k": 256, "daid_aggregate": DEFAULT_AGGREGATE, "faid_k": 10, **(defaults or {})}
    available = session.methods
    with gr.Blocks(title="arrag: see what retrieval did", analytics_enabled=False) as page:
        gr.Markdown("## arrag — see what retrieval did\nGenerate with each method from the same seed. Click a cell "
                    "of a DAiD or FAiD image to see the database patches its retrieval step found.")
        with gr.Row():
            prompt = gr.Textbox(value=d.get("prompt", DEFAULT_PROMPT), label="prompt", scale=3, elem_id="prompt")
            methods = gr.CheckboxGroup([(LABELS[m], m) for m in available], value=list(available),
                                       label="methods", elem_id="methods")  # every method the session serves
        with gr.Row():
            samples = gr.Slider(1, 8, value=d["samples"], step=1, label="samples", elem_id="samples")
            seed = gr.Number(value=d["seed"], precision=0, label="seed", minimum=0)
            cfg = gr.Slider(0, 15, value=d["cfg_weight"], step=0.5, label="CFG")
            temperature = gr.Slider(0, 2, value=d["temperature"], step=0.05, label="temperature")
        with gr.Row():
            lam = gr.Slider(0, 1, value=d["daid_lambda"], step=0.01, label="DAiD λ",
                            info="weight of the retrieved distribution: p = (1 − λ) p_model + λ p_ret")
            tau = gr.Slider(TAU_RANGE[0], TAU_RANGE[1], value=d["daid_tau"], step=0.01, label="DAiD τ",
                            info="temperature of p_ret = softmax(−distance / τ): lower trusts the nearest hits more")
            k = gr.Number(value=d["daid_k"], precision=0, minimum=1, label="DAiD k",
                          info="database patches retrieved per step for DAiD")
            aggregate = gr.Radio(["nearest", "sum"], value=d["daid_aggregate"], label="DAiD hits of one code",
                                 info="nearest: a code weighs as its nearest hit (the original); sum: as all its "
                                      "hits together (kNN-LM)")
            big_k = gr.Number(value=d["faid_k"], precision=0, minimum=1, label="FAiD K",
                              info="retrieved codes FAiD's blenders take per step")
        with gr.Row():
            begin = gr.Image(value=d.get("begin_image"), label="beginning image (optional)", type="numpy",
                             format="png", sources=["upload", "clipboard"], height=160, elem_id="begin-image")
            begin_rows = gr.Slider(0, session.grid()[0], value=d.get("begin_rows", 0), step=1,
                                   label="rows given from the beginning image", elem_id="begin-rows",
                                   info="the top rows of codes come from the image (its VQ codes) and every "
                                        "method draws the rest: image completion. 0: text to image")
        go = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        state = gr.State({})
        shown = {m: gr.Image(label=LABELS[m], type="numpy", format="png", interactive=False, visible=False,
                             elem_id=f"strip-{m}", buttons=["download"]) for m in APP_METHODS}
        cell_info = gr.Markdown(elem_id="cell-info")
        crops = gr.Gallery(label="database patches retrieved for the clicked cell (nearest first)", columns=8,
                           height=190, format="png", elem_id="crops")
        crop_table = gr.Markdown(elem_id="crop-table")  # each crop's caption in full, a line each
        contrib_info = gr.Markdown(elem_id="contrib-info")
        contributors = gr.Gallery(label="database images that contributed most to this sample", columns=10,
                                  height=190, format="png", elem_id="contributors")

        def generate(prompt_, methods_, samples_, seed_, cfg_, temp_, lam_, tau_, k_, agg_, big_k_, begin_, rows_,
                     progress=gr.Progress(track_tqdm=True)):  # noqa: B008  (Gradio's way to show tqdm bars)
            outputs = {m: gr.update(value=None, visible=False) for m in APP_METHODS}
            try:
                results = session.generate(prompt_, list(methods_ or []), samples=int(samples_), seed=int(seed_ or 0),
                                           cfg_weight=float(cfg_), temperature=float(temp_), daid_lambda=float(lam_),
                                           daid_tau=float(tau_), daid_k=int(k_ or 1), faid_k=int(big_k_ or 1),
                                           daid_aggregate=agg_ or DEFAULT_AGGREGATE, begin_image=begin_,
                                           begin_rows=int(rows_ or 0), progress=True)
            except (ArragError, ValueError, RuntimeError) as e:
                return ({}, _message(e), *outputs.values(), "", [], "", "", [])
            kept = {}
            for m, r in results.items():
                picture, factor = strip(r.images)
                outputs[m] = gr.update(value=picture, visible=True)
                kept[m] = (r, picture, factor)
            given = (f"the top {int(rows_)} rows given from the beginning image (0 rows: text to image), "
                     if int(rows_ or 0) else "")
            line = (f"{len(results)} method(s) × {int(samples_)} sample(s), {given}seed {int(seed_ or 0)}. "
                    + ("Click a cell of a DAiD or FAiD image." if any(r.records for r in results.values()) else ""))
            line += "".join(f"\n\n**Warning:** {note}" for note in session.notes)
            return (kept, line, *outputs.values(), "", [], "", "", [])

        go.click(generate, [prompt, methods, samples, seed, cfg, temperature, lam, tau, k, aggregate, big_k, begin,
                            begin_rows],
                 [state, status, *shown.values(), cell_info, crops, crop_table, contrib_info, contributors])

        for method, image in shown.items():
            def on_select(kept, evt: gr.SelectData, method=method):
                if method not in kept:
                    return "generate first", [], "", "", [], gr.update()
                result, picture, factor = kept[method]
                x, y = evt.index
                px, grid = result.images.shape[2], session.grid()
                sample, row, col = click_to_cell(x, y, px, factor, grid)
                marked = mark_cell(picture, px, factor, grid, sample, row, col)
                try:
                    line, patches = session.retrieved(result, sample, row, col)
                    top_line, tops = session.contributors(result, sample)
                except ArragError as e:
                    return _message(e), [], "", "", [], marked
                table = "\n".join(f"{i + 1}. {p.caption}" for i, p in enumerate(patches))
                return (line, [(p.image, p.caption) for p in patches], table, top_line,
                        [(p.image, p.caption) for p in tops], marked)

            image.select(on_select, [state], [cell_info, crops, crop_table, contrib_info, contributors, image])
    return page


def launch(session: AppSession, host: str = "127.0.0.1", port: int = 7860, defaults: dict | None = None) -> None:
    """Serve the page until interrupted (127.0.0.1 unless the user asks for another address)."""
    page = build_page(session, defaults)
    print(f"arrag app: http://{host}:{port}", flush=True)
    page.queue().launch(server_name=host, server_port=port, share=False, ssr_mode=False, quiet=True,
                        footer_links=[])


__all__ = ["MethodResult", "build_page", "click_to_cell", "launch", "mark_cell", "strip"]
