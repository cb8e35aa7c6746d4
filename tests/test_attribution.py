"""Attribution: the recorded hits are what a fresh search of the recorded queries finds, the database images behind
them hold those patches, the weights are DAiD's p_ret and FAiD's gates, and nothing about the images changes."""

import json

import faiss
import numpy as np
import pytest
import torch

from arrag.build_retriever.build_index import build_index
from arrag.cli import main
from arrag.decoding import Generator, MethodConfig, SamplingConfig
from arrag.decoding.attribution import AttributionSettings, ImageAttribution
from arrag.decoding.daid import retrieval_distribution
from arrag.errors import ArragError
from arrag.retrieval import codestore
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.neighborhood import get_neighborhood
from arrag.retrieval.retriever import PatchRetriever

SAMPLING = SamplingConfig(parallel_size=2, image_size=64, seed=11)  # 4x4 tokens: 6 retrieval steps per image
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def db(tmp_path_factory, tiny_janus):
    """A store of 300 random 4x4 grids over 4 codes (so patches repeat across images) and two indexes of it:
    de-duplicated (the image map is CSR) and full (--no-dedup: entry e came from image e // P)."""
    root = tmp_path_factory.mktemp("attr")
    codes = np.random.default_rng(0).integers(0, 4, (300, 4, 4)).astype(np.uint16)
    codestore.write_store(root / "store", codes, tiny_janus.vq)
    build_index(root / "store", root / "dedup", progress=False)
    build_index(root / "store", root / "full", dedup=False, progress=False)
    return root


def _run(model, retriever, method="daid", settings=None, **method_kw):
    gen = Generator(model, MethodConfig(method, **{"daid_k": 64, "daid_lambda": 0.5, **method_kw}), retriever,
                    attribution=settings or AttributionSettings(hits=8, diffuse_above=10**6, top=10**6))
    codes = gen.sample_codes(PROMPTS, SAMPLING, progress=False)
    return gen, codes, gen.take_attribution()


@pytest.mark.parametrize("kind", ["dedup", "full"])
def test_daid_hits_are_a_fresh_search_and_their_images_hold_the_patches(tiny_janus, db, kind):
    r = PatchRetriever.load(db / kind)
    _, codes, records = _run(tiny_janus, r)
    assert len(records) == 4
    store = CodeStore.open(db / "store")
    nb = get_neighborhood("L")
    book = store.codebook()  # the normalised codebook the index keys were made from
    positions = nb.positions(4, 4)
    for i, rec in enumerate(records):
        a = rec.arrays
        grid = codes[i].reshape(-1).numpy()
        np.testing.assert_array_equal(a["cells"], positions)  # every valid target retrieved once
        np.testing.assert_array_equal(a["sampled"], grid[positions])
        # the query: the sampled neighbours' codebook vectors, computed here from the image's codes
        want_q = book[grid[nb.neighbour_index(4, 4)]].reshape(len(positions), -1)
        np.testing.assert_allclose(a["queries"], want_q, rtol=1e-6)
        d, c, copies, ids = r.search_counted(a["queries"], 64, with_ids=True)
        np.testing.assert_array_equal(a["daid_hit_entries"], ids[:, :8])
        np.testing.assert_array_equal(a["daid_hit_codes"], c[:, :8])
        np.testing.assert_allclose(a["daid_hit_distances"], d[:, :8], rtol=1e-6)
        # p_ret's weight on the sampled code, from the full search and the one p_ret definition
        p_ret = retrieval_distribution(*map(torch.from_numpy, (d, c)), tiny_janus.vq.config.codebook_size, 1.0,
                                       copies=None if copies is None else torch.from_numpy(copies))
        np.testing.assert_allclose(a["daid_weight"], p_ret[torch.arange(len(positions)), a["sampled"]], rtol=1e-5)
        np.testing.assert_allclose(a["daid_hit_p_ret"], np.take_along_axis(p_ret.numpy(), c[:, :8], 1), rtol=1e-5)
        # every recorded image of every hit holds the hit's patch: its neighbours and its code at some cell
        offsets, images = a["daid_hit_image_offsets"], a["daid_hit_images"]
        assert len(images) > 0
        for s in range(len(positions)):
            for j in range(8):
                entry = a["daid_hit_entries"][s, j]
                behind = images[offsets[s * 8 + j]:offsets[s * 8 + j + 1]]
                assert len(behind) >= 1
                for image in behind:
                    image_codes = store.gather(np.array([image]))[0]
                    cells = r.entry_cells(int(entry), int(image), image_codes)
                    assert len(cells) >= 1
                    flat = image_codes.reshape(-1).astype(np.int64)
                    for cell in cells:  # the patch there proposes the hit's code, from a key at the hit's distance
                        assert flat[cell] == a["daid_hit_codes"][s, j]
                        key = book[grid_neighbours(flat, cell, nb)].reshape(-1)
                        assert ((key - a["queries"][s]) ** 2).sum() == pytest.approx(
                            a["daid_hit_distances"][s, j], rel=1e-4, abs=1e-5)


def grid_neighbours(flat, cell, nb, w=4):
    """The codes at a cell's L neighbours, computed from the offsets (independently of neighbour_index)."""
    r, c = divmod(int(cell), w)
    return np.array([flat[(r + dr) * w + c + dc] for dr, dc in nb.offsets])


def test_contributions_add_up_and_the_top_images_come_from_the_hits(tiny_janus, db):
    r = PatchRetriever.load(db / "dedup")
    _, _, records = _run(tiny_janus, r)
    for rec in records:
        a, top = rec.arrays, rec.summary["daid"]
        # with no cap and no diffuse patterns, all of p_ret's mass on the sampled codes reaches some image
        assert top["mass"] == pytest.approx(float(a["daid_weight"].sum()), rel=1e-5)
        assert top["diffuse_mass"] == 0
        assert sum(t["mass"] for t in top["top"]) == pytest.approx(top["mass"], rel=1e-4)
        assert list(a["daid_top_mass"]) == sorted(a["daid_top_mass"], reverse=True)
        # source ids are the store's ids of those images (write_store names them by index)
        assert [t["source"] for t in top["top"]] == [str(t["image"]) for t in top["top"]]


def test_a_common_pattern_counts_as_diffuse_and_the_top_list_is_cut(tiny_janus, db):
    r = PatchRetriever.load(db / "dedup")
    _, _, records = _run(tiny_janus, r, settings=AttributionSettings(hits=4, top=2, diffuse_above=1))
    for rec in records:
        s = rec.summary["daid"]
        assert len(s["top"]) <= 2 and rec.arrays["daid_hit_entries"].shape[1] == 4
        assert s["diffuse_mass"] + sum(t["mass"] for t in s["top"]) <= s["mass"] + 1e-6
    assert any(rec.summary["daid"]["diffuse_mass"] > 0 for rec in records)


def test_attribution_does_not_change_the_images(tiny_janus, db):
    r = PatchRetriever.load(db / "dedup")
    _, with_attr, _ = _run(tiny_janus, r)
    plain = Generator(tiny_janus, MethodConfig("daid", daid_k=64, daid_lambda=0.5), r).sample_codes(
        PROMPTS, SAMPLING, progress=False)
    torch.testing.assert_close(with_attr, plain, rtol=0, atol=0)


def test_faid_records_its_candidates_and_their_gates(db, tmp_path_factory):
    from arrag.demo.presets import make_tiny_janus
    from arrag.janus import JanusPro

    folder = tmp_path_factory.mktemp("faid_attr")
    make_tiny_janus(folder, seed=1, num_SmoothPatchBlender=1, num_hop="1,2")
    model = JanusPro.from_pretrained(folder, device="cpu", quiet=True)
    codes = CodeStore.open(db / "store").gather(np.arange(300))
    codestore.write_store(folder / "store", codes, model.vq)  # the same database, keyed with this model's VQ
    build_index(folder / "store", folder / "index", progress=False)
    r = PatchRetriever.load(folder / "index")
    plain = Generator(model, MethodConfig("faid", faid_k=5), r).sample_codes(PROMPTS, SAMPLING, progress=False)
    _, _, records = _run(model, r, method="faid+daid", faid_k=5)
    for rec in records:
        a = rec.arrays
        d, c, ids = r.search(a["queries"], 5, with_ids=True)
        np.testing.assert_array_equal(a["faid_hit_entries"], ids)
        np.testing.assert_array_equal(a["faid_hit_codes"], c)
        gates = a["faid_hit_gates"]
        assert gates.shape == (6, 5) and ((gates > 0) & (gates < 1)).all()
        s = rec.summary["faid"]
        assert s["mass"] == pytest.approx(float(gates.sum() / 5), rel=1e-4)  # each candidate's gate / K
        assert "daid" in rec.summary and "daid_weight" in a
    # FAiD alone, with attribution, decodes the same images as without it
    gen = Generator(model, MethodConfig("faid", faid_k=5), r, attribution=AttributionSettings())
    torch.testing.assert_close(gen.sample_codes(PROMPTS, SAMPLING, progress=False), plain, rtol=0, atol=0)


def test_the_original_database_has_no_image_map_and_says_so(tiny_janus, tmp_path):
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(500, 32)).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(32), 32, 4)
    index.train(keys)
    index.add(keys)
    faiss.write_index(index, str(tmp_path / "faiss_ivf_pq_opq.index"))
    np.save(tmp_path / "next_codes.npy", rng.integers(0, 12, 500))
    with pytest.warns(UserWarning):
        r = PatchRetriever.load(tmp_path)
    with pytest.warns(UserWarning, match="records no images for its entries"):
        _, _, records = _run(tiny_janus, r, allow_unknown_vq=True)
    assert records[0].summary["image_map"] == "none" and "records no images" in records[0].summary["note"]
    assert "daid_hit_images" not in records[0].arrays and len(records[0].arrays["daid_hit_entries"]) == 6
    with pytest.raises(ArragError, match="records no database images"):
        r.images_of(np.array([0]), 4)


def test_cli_writes_attribution_beside_each_image(tmp_path, tiny_janus_dir, db):
    out = tmp_path / "out"
    args = ["generate", "--model", str(tiny_janus_dir), "--prompt", "a red circle", "--parallel-size", "2",
            "--image-size", "64", "--method", "daid", "--retriever", str(db / "dedup"), "--daid-k", "32",
            "--out", str(out), "--attribution", "--attribution-top", "3"]
    assert main(args) == 0
    record = json.loads((out / "0000_01.attribution.json").read_text())
    assert record["prompt"] == "a red circle" and record["sample"] == 1 and record["image"] == "0000_01.png"
    assert len(record["daid"]["top"]) <= 3 and "daid_hit_entries" in record["fields"]
    loaded = ImageAttribution.load(out / "0000_01.png")
    assert loaded.arrays["daid_hit_entries"].shape == (6, 32)
    files = json.loads((out / "settings.json").read_text())["settings"]["files"]
    assert "0000_01.attribution.npz" in files  # listed, so --overwrite replaces them with the images
    assert main(args + ["--overwrite"]) == 0
    assert main(["generate", "--model", str(tiny_janus_dir), "--prompt", "a", "--out", str(tmp_path / "b"),
                 "--attribution"]) == 2  # base has nothing to attribute: a one-line error


def test_bad_attribution_settings_are_refused(tiny_janus, db):
    r = PatchRetriever.load(db / "dedup")
    with pytest.raises(ArragError, match="--attribution-hits must be >= 1"):
        Generator(tiny_janus, MethodConfig("daid"), r, attribution=AttributionSettings(hits=0))
    with pytest.raises(ArragError, match="CUDA graph"):
        Generator(tiny_janus, MethodConfig("daid"), r, step_mode="graph", attribution=AttributionSettings())
    with pytest.raises(ArragError, match="use it with --method daid"):
        Generator(tiny_janus, MethodConfig("base"), attribution=AttributionSettings())


def test_daid_records_the_models_own_probability_and_what_retrieval_changed(tiny_janus, db):
    """model_prob is the base's p of the sampled code (a base run with the same seed draws the same uniforms),
    mixed_prob is DAiD's mix of it and p_ret's weight, and model_choice is what the model alone would have drawn
    with the same uniform: every step at a vanishing lambda, and a plain base decode of the same prefix, agree."""
    r = PatchRetriever.load(db / "dedup")
    for lam in (1e-9, 0.9):
        _, codes, records = _run(tiny_janus, r, daid_lambda=lam)
        for rec in records:
            a = rec.arrays
            assert a["daid_model_prob"].shape == a["daid_weight"].shape == a["daid_model_choice"].shape
            assert np.all((a["daid_model_prob"] >= 0) & (a["daid_model_prob"] <= 1))
            np.testing.assert_allclose(a["daid_mixed_prob"], (1 - lam) * a["daid_model_prob"] + lam * a["daid_weight"],
                                       rtol=1e-4, atol=1e-6)
            if lam < 1e-6:  # (almost) nothing mixed in: the model's own draw is the sampled code at every step
                np.testing.assert_array_equal(a["daid_model_choice"], a["sampled"])
        changed = sum(int((rec.arrays["daid_model_choice"] != rec.arrays["sampled"]).sum()) for rec in records)
        if lam == 0.9:
            assert changed > 0  # a strong mix changes some tokens
    # The first retrieval step of each image: the model alone, from the same seed, draws model_choice there.
    base = Generator(tiny_janus).sample_codes(PROMPTS, SAMPLING, progress=False)
    first = int(records[0].arrays["cells"][0])
    for i, rec in enumerate(records):  # before the first DAiD step the images are the base's, token for token
        assert np.array_equal(codes[i].reshape(-1)[:first].numpy(), base[i].reshape(-1)[:first].numpy())
        assert rec.arrays["daid_model_choice"][0] == int(base[i].reshape(-1)[first])
