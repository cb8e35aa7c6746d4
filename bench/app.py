"""`arrag app` and attribution: their costs on the demo, measured side by side in one run.

    .venv/bin/python bench/app.py        # the demo models and the demo retriever (built on first use)

1. Attribution overhead: generating with `--attribution` against without, same model, prompts, seed and
   batch (the demo's 4 samples of 4 prompts), for DAiD (k 256, the demo's) and FAiD (K 10). Target <= 1.2x.
2. Page round trip: the page served in this process, called as a browser does (gradio_client, over HTTP), for
   base + DAiD with 4 samples each: prompt in, both strips and their attribution out. Target <= 15 s on CPU.
Prints a JSON line per item; timings are the best of --repeats after a warm-up.
"""

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arrag.app.session import AppSession  # noqa: E402
from arrag.decoding import Generator, MethodConfig, SamplingConfig  # noqa: E402
from arrag.decoding.attribution import AttributionSettings  # noqa: E402
from arrag.demo.pipeline import DEMO_DAID, DEMO_FAID_K, DEMO_SAMPLING  # noqa: E402
from bench.timing import best_of  # noqa: E402

PROMPTS = ["a red circle left of a blue square", "two green triangles", "a yellow circle", "three blue squares"]


def attribution_overhead(session: AppSession, repeats: int) -> list[dict]:
    sampling = SamplingConfig(parallel_size=4, seed=0, image_size=session.image_size, **DEMO_SAMPLING)
    out = []
    for method, model, settings in (("daid", session.model, {**DEMO_DAID}),
                                    ("faid", session.faid_model, {"faid_k": DEMO_FAID_K})):
        plain = Generator(model, MethodConfig(method, **settings), session.retriever)
        recorded = Generator(model, MethodConfig(method, **settings), session.retriever,
                             attribution=AttributionSettings())

        def with_attr(g=recorded):
            g.sample_codes(PROMPTS, sampling, progress=False)
            g.take_attribution()

        t_plain = best_of(lambda g=plain: g.sample_codes(PROMPTS, sampling, progress=False), repeats)
        t_attr = best_of(with_attr, repeats)
        out.append({"item": "attribution overhead", "method": method, "images": len(PROMPTS) * 4,
                    "seconds_without": round(t_plain, 3), "seconds_with": round(t_attr, 3),
                    "ratio": round(t_attr / t_plain, 3), "target": "<= 1.2"})
    return out


def page_round_trip(session: AppSession, repeats: int) -> dict:
    from gradio_client import Client

    from arrag.app.page import build_page

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {**DEMO_DAID, **DEMO_SAMPLING, "faid_k": DEMO_FAID_K}
    page = build_page(session, defaults)
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        args = dict(prompt_="a red circle and a blue square", methods_=["base", "daid"], samples_=4, seed_=0,
                    cfg_=DEMO_SAMPLING["cfg_weight"], temp_=DEMO_SAMPLING["temperature"],
                    lam_=DEMO_DAID["daid_lambda"], tau_=DEMO_DAID["daid_tau"], k_=DEMO_DAID["daid_k"],
                    big_k_=DEMO_FAID_K)

        def call():
            result = client.predict(api_name="/generate", **args)
            assert "2 method(s)" in result[0], result[0]  # (the page state is not sent to clients)

        seconds = best_of(call, repeats)
    finally:
        page.close()
    return {"item": "page round trip", "methods": ["base", "daid"], "samples": 4, "seconds": round(seconds, 2),
            "threads": torch.get_num_threads(), "target": "<= 15 s on CPU"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    ap.add_argument("--only", choices=["attribution", "page"], default=None, help="run one item")
    args = ap.parse_args()
    t0 = time.time()
    session = AppSession.demo(device="cpu", progress=False)
    print(f"[bench] demo session ready in {time.time() - t0:.1f} s ({session.retriever.entries:,} entries)",
          file=sys.stderr)
    if args.only in (None, "attribution"):
        for row in attribution_overhead(session, args.repeats):
            print(json.dumps(row), flush=True)
    if args.only in (None, "page"):
        print(json.dumps(page_round_trip(session, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
