"""`arrag app`: the session behind the page, and the page itself driven in headless Chromium (Debian's system
browser through Selenium; skipped, with the reason, where no browser is installed)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from arrag.app.page import click_to_cell, mark_cell, strip
from arrag.app.session import AppSession, crop_cell
from arrag.demo.database import build_demo_retriever
from arrag.demo.pipeline import ASSETS
from arrag.errors import ArragError

SIZE = 64  # the demo models' image size: 16 x 16 cells of 4 pixels
SHOTS = Path(os.environ.get("ARRAG_SCREENSHOTS", "result/screenshots"))


@pytest.fixture(scope="module")
def small_demo_index(tmp_path_factory):
    """The demo retriever's recipe on 300 ShapesWorld images (the real render, encode and build-index)."""
    return build_demo_retriever(ASSETS / "base", tmp_path_factory.mktemp("app"), 300, SIZE, progress=False,
                                device="cpu")


@pytest.fixture(scope="module")
def session(small_demo_index):
    return AppSession.load(ASSETS / "base", ASSETS / "faid", small_demo_index, device="cpu", image_size=SIZE)


def test_every_method_from_one_seed_and_what_a_cell_retrieved(session):
    results = session.generate("a red circle", ["base", "daid", "faid"], samples=2, seed=3, daid_k=64)
    assert set(results) == {"base", "daid", "faid"} and results["base"].records is None
    again = session.generate("a red circle", ["daid"], samples=2, seed=3, daid_k=64)
    np.testing.assert_array_equal(again["daid"].images, results["daid"].images)  # seeded
    daid = results["daid"]
    line, patches = session.retrieved(daid, 1, 5, 7)
    a = daid.records[1].arrays
    step = int(np.flatnonzero(a["cells"] == 5 * 16 + 7)[0])
    assert f"sampled code {int(a['sampled'][step])}" in line and "p_ret's weight" in line
    assert "row 5, column 7" in line and f"the model's own probability {a['daid_model_prob'][step]:.3f}" in line
    alone = int(a["daid_model_choice"][step])
    assert ("retrieval did not change the token" in line) == (alone == int(a["sampled"][step]))
    assert 1 <= len(patches) <= 8 and patches[0].image.shape == (96, 96, 3)
    assert f"p_ret {a['daid_hit_p_ret'][step, 0]:.3f}" in patches[0].caption
    assert f"d {a['daid_hit_distances'][step, 0]:.3f}" in patches[0].caption
    # the crop is the database image decoded from its codes, around the hit's cell
    first = int(a["daid_hit_images"][a["daid_hit_image_offsets"][step * a["daid_hit_entries"].shape[1]]])
    assert f"db image {first} ({first:06d}.png)" in patches[0].caption
    line, tops = session.contributors(daid, 1)
    assert "retrieval mass" in line and f"of a possible {len(a['cells'])}" in line and len(tops) >= 1
    faid_line = session.retrieved(results["faid"], 0, 5, 7)[0]
    assert "gates ≈ 0" in faid_line or "mean gate" in faid_line
    assert session.retrieved(results["base"], 0, 5, 7) == ("base does not retrieve; click a DAiD or FAiD image", [])
    assert "had no retrieval" in session.retrieved(daid, 0, 0, 7)[0]
    assert "FAiD sample 1" in session.retrieved(results["faid"], 0, 5, 7)[0]


def test_bad_input_is_a_line_not_a_traceback(session, tmp_path):
    # an unknown word: said with the words the model knows, as the CLI says it, and the images are made
    out = session.generate("a red dragon", ["base"], samples=1)
    assert out["base"].images.shape[0] == 1
    assert len(session.notes) == 1 and "does not know 'dragon'" in session.notes[0]
    assert "it knows these" in session.notes[0] and " circle " in session.notes[0]
    with pytest.raises(ArragError, match="enter a prompt"):
        session.generate("  ", ["base"])
    with pytest.raises(ArragError, match="choose at least one method"):
        session.generate("a circle", [])
    from arrag.demo.presets import make_tiny_janus

    make_tiny_janus(tmp_path / "other", seed=4)  # another tokenizer than the index's
    other = AppSession.load(tmp_path / "other", None, session.retriever.folder, device="cpu", image_size=SIZE)
    with pytest.raises(ArragError, match="another tokenizer"):
        other.generate("a circle", ["daid"])


def test_clicks_map_to_cells_and_crops_outline_the_cell():
    images = np.zeros((3, SIZE, SIZE, 3), np.uint8)
    picture, factor = strip(images)
    assert factor == 4 and picture.shape == (256, 3 * 256, 3)
    assert click_to_cell(256 + 7 * 16 + 3, 5 * 16 + 1, SIZE, factor, (16, 16)) == (1, 5, 7)
    marked = mark_cell(picture, SIZE, factor, (16, 16), 1, 5, 7)
    changed = np.argwhere((marked != picture).any(-1))  # the outline lies on that cell's 16 x 16 pixels only
    assert changed.min(0).tolist() == [5 * 16, 256 + 7 * 16]
    assert changed.max(0).tolist() == [6 * 16 - 1, 256 + 8 * 16 - 1]
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    crop = crop_cell(pixels, (16, 16), 5 * 16 + 7)
    assert crop.shape == (96, 96, 3) and (crop[..., 0] == 255).any()  # the red outline


# -- the page in a real browser -----------------------------------------------------------------------------------

def _browser() -> tuple[str, str]:
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed (pip install -e '.[app,dev]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no system Chromium and chromedriver: apt-get install chromium chromium-driver (as .ci/run does)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"arrag app exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"arrag app did not answer on port {port} within {seconds} s")


def test_the_page_generates_and_shows_database_crops_in_chromium(small_demo_index, tmp_path):
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "SE_OFFLINE": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "arrag", "app", "--model", str(ASSETS / "base"),
                             "--faid-model", str(ASSETS / "faid"), "--retriever", str(small_demo_index),
                             "--image-size", str(SIZE), "--device", "cpu", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    driver = None
    try:
        _wait_for_port(port, proc, 120)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
        wait = WebDriverWait(driver, 120)
        driver.get(f"http://127.0.0.1:{port}/")
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        box.clear()
        box.send_keys("a red circle and a blue square")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        strip_img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#strip-daid img"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#strip-base img"))
        natural = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", strip_img)
        assert natural == [4 * 256, 256]  # 4 samples of 64 px, each enlarged 4x
        scale = strip_img.size["width"] / natural[0]
        x, y = (256 + 7.5 * 16) * scale, 5.5 * 16 * scale  # sample 2, cell (5, 7)
        ActionChains(driver).move_to_element_with_offset(
            strip_img, int(x - strip_img.size["width"] / 2), int(y - strip_img.size["height"] / 2)).click().perform()
        wait.until(lambda d: "row 5, column 7" in d.find_element(By.CSS_SELECTOR, "#cell-info").text)
        info = driver.find_element(By.CSS_SELECTOR, "#cell-info").text
        assert "the model's own probability" in info and "the token" in info  # changed or not, and why
        crops = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#crops img"))
        assert len(crops) >= 1
        assert "DAiD sample 2" in driver.find_element(By.CSS_SELECTOR, "#cell-info").text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#contributors img"))
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / "app.png"))
        # image completion through the page: a beginning image uploaded, 5 rows given, every method begins with it
        from arrag.demo.shapes import ShapesWorld
        from arrag.image_io import save_image

        begin = save_image(ShapesWorld("validation", size=SIZE).image(0), tmp_path / "begin.png")
        driver.find_element(By.CSS_SELECTOR, "#begin-image input[type=file]").send_keys(str(begin))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#begin-image img"))
        for control, value in (("#begin-rows", "5"), ("#samples", "1")):  # one sample a method: a faster check
            box_ = driver.find_element(By.CSS_SELECTOR, f"{control} input[type=number]")
            box_.send_keys(Keys.CONTROL, "a")
            box_.send_keys(value, Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "× 1 sample(s), the top 5 rows given from the beginning image" in
                   d.find_element(By.CSS_SELECTOR, "#status").text)
        # bad input becomes a line on the page
        box.clear()
        box.send_keys("a red dragon")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "does not know 'dragon'" in d.find_element(By.CSS_SELECTOR, "#status").text)
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("world", ["tail", "shapes"])
def test_the_app_builds_the_demo_retriever_the_demo_builds(world, monkeypatch):
    """The page's demo retriever has the neighbourhood of the world's recipe (TailWorld's is 2hop): with another,
    the app and `arrag demo` would rebuild the same folder in turn, each over the other's index."""
    import json

    import arrag.demo.database as database
    from arrag.app.session import AppSession
    from arrag.demo.worlds import get_world

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise StopIteration  # the arguments are what this test is about; building 3,000 images is not

    monkeypatch.setattr(database, "build_demo_retriever", record)
    with pytest.raises(StopIteration):
        AppSession.demo(world=world, progress=False)
    recipe = json.loads((get_world(world).assets / "recipe.json").read_text())["recipe"]
    assert seen["shape"] == recipe.get("shape", "L") and seen["world"] == world
    assert (world == "tail") == (seen["shape"] == "2hop")


@pytest.mark.parametrize("world", ["tail", "shapes"])
def test_the_page_starts_at_each_worlds_tuned_values_within_its_controls(world, session):
    """Every starting value lies inside its control: Gradio refuses a slider value below its minimum at Generate,
    so a τ slider starting at 0.05 turned the TailWorld page's first click (τ 0.03) into an error."""
    pytest.importorskip("gradio")
    import gradio as gr

    from arrag.app.page import build_page
    from arrag.cli.app import page_defaults

    defaults = page_defaults(world)
    page = build_page(session, defaults)
    by_label = {getattr(b, "label", None): b for b in page.blocks.values()}
    for b in page.blocks.values():
        if isinstance(b, gr.Slider):
            assert b.minimum <= b.value <= b.maximum, (b.label, b.value, b.minimum, b.maximum)
    assert by_label["DAiD τ"].value == defaults["daid_tau"] and by_label["DAiD λ"].value == defaults["daid_lambda"]
    aggregate = by_label["DAiD hits of one code"]
    assert aggregate.value == defaults.get("daid_aggregate", "nearest")
    assert aggregate.value in [c[1] for c in aggregate.choices]


def test_the_page_passes_daids_aggregate_through(session):
    """The page's DAiD weighs hits of one code as its aggregate says (TailWorld's tuned DAiD sums them)."""
    with pytest.raises(ArragError, match="daid-aggregate 'mean'"):
        session.generate("a red circle", ["daid"], samples=1, daid_aggregate="mean")
    for aggregate in ("sum", "nearest"):
        a = session.generate("a red circle", ["daid"], samples=1, seed=2, daid_k=16, daid_tau=0.3,
                             daid_aggregate=aggregate)["daid"].records[0].arrays
        assert a["daid_hit_codes"].shape[1] >= 16  # every hit recorded: p_ret can be recomputed from them
        for step in range(0, len(a["cells"]), 37):
            codes, d = a["daid_hit_codes"][step], a["daid_hit_distances"][step].astype(np.float64)
            ok = (codes >= 0) & (a["daid_hit_copies"][step] > 0)
            w = np.exp((d[ok].min() - d) / 0.3)
            if aggregate == "sum":
                w = w * a["daid_hit_copies"][step]
            per_code = {c: (w[ok & (codes == c)].sum() if aggregate == "sum" else w[ok & (codes == c)].max())
                        for c in set(codes[ok].tolist())}
            expected = per_code.get(int(a["sampled"][step]), 0.0) / sum(per_code.values())
            assert a["daid_weight"][step] == pytest.approx(expected, rel=1e-4, abs=1e-6), (aggregate, step)


def test_every_method_can_begin_from_an_images_top_rows(session):
    """With rows given, every method's images begin with the beginning image's VQ codes (the image resized to the
    session's size) and draw the rest; a cell of a given row says so. Bad requests are one line."""
    from arrag.demo.shapes import ShapesWorld
    from arrag.image_io import to_tensor

    image = ShapesWorld("validation", size=SIZE).image(0)
    with torch.no_grad():
        real = session.model.vq.encode_to_codes(to_tensor(image[None]))[0]  # [16, 16]
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)  # 128 px: resized back to 64 by the session
    results = session.generate("a red circle", ["base", "daid", "faid"], samples=2, seed=1, daid_k=16,
                               begin_image=big, begin_rows=5)
    for r in results.values():
        assert (r.codes[:, :5] == real[:5]).float().mean() > 0.95  # bicubic down from nearest-up: near-identical
        assert torch.equal(r.codes[0, :5], r.codes[1, :5]) and r.given_rows == 5
    exact = session.generate("a red circle", ["base"], samples=1, seed=1, begin_image=image, begin_rows=5)["base"]
    assert torch.equal(exact.codes[0, :5], real[:5])
    line, _ = session.retrieved(results["daid"], 0, 3, 5)
    assert "given: this row is the beginning image's" in line
    assert "given" not in session.retrieved(results["daid"], 0, 9, 5)[0]
    with pytest.raises(ArragError, match="needs a beginning image"):
        session.generate("a red circle", ["base"], samples=1, begin_rows=3)
    with pytest.raises(ArragError, match="17 rows given: an image of 64 px has 16 rows of codes; give 1 to 16"):
        session.generate("a red circle", ["base"], samples=1, begin_image=image, begin_rows=17)


def test_the_tail_pages_beginning_image_is_a_real_one_of_its_prompt():
    """The TailWorld page starts from a rendered image of its prompt, which the world's scorer reads as the prompt."""
    from arrag.cli.app import page_defaults
    from arrag.demo.tail import Frequencies
    from arrag.demo.tail_score import read_discs

    d = page_defaults("tail")
    assert Frequencies().bucket(d["prompt"].split()[-1]) == "tail"
    discs = read_discs(d["begin_image"])
    assert d["begin_rows"] == 5 and d["prompt"] == "a red twill" and d["begin_image"].shape == (SIZE, SIZE, 3)
    assert [f"a {disc.color} {disc.pattern}" for disc in discs] == [d["prompt"]]

