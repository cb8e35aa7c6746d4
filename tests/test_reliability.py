"""Careless and hostile inputs: a store's codebook always matches its codes, arrag writes only where it may, numbers
are finite and in range, and every bad input is one line before any model loads."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from arrag.build_retriever import encode as enc
from arrag.build_retriever.build_index import build_index
from arrag.demo.shapes import ShapesWorld
from arrag.errors import ArragError
from arrag.image_io import save_image
from arrag.retrieval import codestore
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.neighborhood import key_vectors, keys_for_grid
from arrag.retrieval.retriever import PatchRetriever
from arrag.vq import VQModel


def run_cli(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "arrag", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return p.returncode, p.stderr.strip()


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("arrag: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    w = ShapesWorld("database", size=64)
    for i in range(6):
        save_image(w.image(i), root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def two_vqs(tmp_path_factory):
    """Two tiny tokenizers with different codebooks (A and B)."""
    folder = tmp_path_factory.mktemp("vqs")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(folder / f"vq{seed}.safetensors")
        VQModel("VQ-tiny-16").save(paths[-1])
    return paths


KW = dict(image_size=64, batch_size=4, shard_size=4, num_workers=0, progress=False, device="cpu")


# -- 2. a store whose codebook does not match its codes -------------------------------------------------------


def test_an_interrupted_encode_then_another_vq_gets_that_vqs_codebook(tmp_path, images, two_vqs, monkeypatch):
    from arrag.vq import load_vq

    a, b = two_vqs
    out = tmp_path / "store"

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(enc, "_flush", interrupted)
        with pytest.raises(KeyboardInterrupt):
            enc.encode(str(images), out, a, **KW)
    assert (out / "codebook.npy").is_file() and not list(out.glob("shard-*.json"))
    enc.encode(str(images), out, b, **KW)
    store = CodeStore.open(out)
    vq_b = load_vq(b)
    with torch.no_grad():
        book_b = vq_b.quantize.codebook().numpy()
    np.testing.assert_array_equal(store.codebook(), book_b)
    assert store.manifest["codebook_sha256"] == codestore.codebook_hash(store.codebook())
    # ... so queries made with B's codebook (as generation makes them) find the stored keys exactly.
    m = build_index(out, tmp_path / "idx", factory="Flat", progress=False, dedup=False)
    assert vq_b.matches(m["vq_fingerprint"])
    pos, nbr = keys_for_grid(store.gather(np.arange(store.num_images)), "L")
    queries = key_vectors(nbr, book_b).reshape(-1, 32)
    dist, _ = PatchRetriever.load(tmp_path / "idx").search(queries, 1)
    assert float(dist.max()) < 1e-5


def test_a_codebook_that_is_not_the_stores_is_refused(tmp_path, images, two_vqs):
    a, b = two_vqs
    enc.encode(str(images), tmp_path / "a", a, **KW)
    enc.encode(str(images), tmp_path / "b", b, **KW)
    (tmp_path / "a" / "codebook.npy").write_bytes((tmp_path / "b" / "codebook.npy").read_bytes())
    with pytest.raises(ArragError, match="not the codebook the store's codes were encoded with") as e:
        CodeStore.open(tmp_path / "a")
    assert "\n" not in str(e.value)
    one_line_error(*run_cli("build-index", tmp_path / "a", "--out", tmp_path / "idx", cwd=tmp_path),
                   "codebook.npy is not the codebook")
    # Encoding into a folder of shards made with another codebook is refused (the settings differ too).
    with pytest.raises(ArragError):
        enc.encode(str(images), tmp_path / "b", a, **KW)


def test_damaged_codebooks_and_foreign_codes_are_one_line(tmp_path):
    rng = np.random.default_rng(0)
    book = rng.normal(size=(16, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codes = rng.integers(0, 16, (5, 4, 4)).astype(np.uint16)
    with pytest.raises(ArragError, match="rows 3 hold NaN or inf"):
        bad = book.copy()
        bad[3, 1] = np.nan
        codestore.write_store(tmp_path / "nan", codes, bad)
    codestore.write_store(tmp_path / "s", codes, book, shard_size=2)
    np.save(tmp_path / "s" / "codebook.npy", book.astype(np.float64))
    with pytest.raises(ArragError, match="holds float64 .*not a float32 codebook"):
        CodeStore.open(tmp_path / "s")
    np.save(tmp_path / "s" / "codebook.npy", np.array([object()] * 4, dtype=object), allow_pickle=True)
    one_line_error(*run_cli("build-index", tmp_path / "s", "--out", tmp_path / "idx", cwd=tmp_path),
                   "cannot read", "codebook.npy")
    np.save(tmp_path / "s" / "codebook.npy", book)
    foreign = codes.copy()
    foreign[3, 2, 2] = 40  # a code the store's 16-code codebook does not have
    np.save(tmp_path / "s" / "codes-00001.npy", foreign[2:4])
    one_line_error(*run_cli("build-index", tmp_path / "s", "--out", tmp_path / "idx", cwd=tmp_path),
                   "codes-00001.npy holds code 40", "codebook has 16 codes")


# -- 3. never write over what this command did not make -------------------------------------------------------


def _main(capsys, *args):
    """Run the CLI in-process; (exit code, stderr)."""
    from arrag.cli import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def _gen(model, out, *extra):
    return ("generate", "--model", model, "--prompt", "a red circle", "--image-size", "64", "--out", out,
            "--device", "cpu", *extra)


def test_encode_refuses_a_folder_of_user_files_or_an_index(tmp_path, images, two_vqs, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    one_line_error(*_main(capsys, "encode", images, "--out", user, "--vq", two_vqs[0], "--workers", "0",
                          "--device", "cpu"), "is not an arrag code store")
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    codes = np.zeros((3, 4, 4), np.uint16)
    codestore.write_store(tmp_path / "s", codes, np.eye(8, dtype=np.float32))
    build_index(tmp_path / "s", tmp_path / "idx", factory="Flat", progress=False)
    before = (tmp_path / "idx" / "manifest.json").read_bytes()
    one_line_error(*_main(capsys, "encode", images, "--out", tmp_path / "idx", "--vq", two_vqs[0], "--workers", "0",
                          "--device", "cpu"), "is not an arrag code store")
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == before
    # A store of ours resumes as before.
    enc.encode(str(images), tmp_path / "store", two_vqs[0], **KW)
    assert enc.encode(str(images), tmp_path / "store", two_vqs[0], **KW).complete


def test_train_faid_refuses_an_out_that_is_or_lies_in_an_input(tmp_path, tiny_janus_dir, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_janus_dir, base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    store = tmp_path / "store"
    codestore.write_store(store, np.zeros((2, 4, 4), np.uint16), np.eye(8, dtype=np.float32), captions=["a", "b"])
    for out in (base, store / "faid"):
        one_line_error(*_main(capsys, "train-faid", "--base", base, "--store", store, "--out", out, "--cpu"),
                       "--out", "is or lies inside")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    one_line_error(*_main(capsys, "train-faid", "--base", base, "--store", store, "--out", mine, "--cpu"),
                   "is not an arrag FAiD training folder")
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert (mine / "config.json").read_text() == "{}"


def test_generate_writes_only_into_its_own_folders(tmp_path, tiny_janus_dir, capsys):
    from arrag.eval.batch_generate import Claims

    model = tiny_janus_dir
    user = tmp_path / "user"
    user.mkdir()
    (user / "settings.json").write_text('{"mine": true}')
    one_line_error(*_main(capsys, *_gen(model, user)), "is not an arrag generated images folder")
    one_line_error(*_main(capsys, *_gen(model, user, "--layout", "flat")), "is not an arrag --layout flat folder")
    assert (user / "settings.json").read_text() == '{"mine": true}'
    # A FAiD training record (settings.json with the loss history) in a model folder is not generate's either.
    faid = tmp_path / "faid"
    faid.mkdir()
    (faid / "settings.json").write_text(json.dumps({"arrag_output": "train-faid", "loss_history": [[1, 2.0]]}))
    one_line_error(*_main(capsys, *_gen(model, faid)), "is not an arrag generated images folder")
    # A user's image named like a finished prompt does not count as one.
    flat = tmp_path / "flat"
    flat.mkdir()
    save_image(np.zeros((8, 8, 3), np.uint8), flat / "00000.png")
    one_line_error(*_main(capsys, *_gen(model, flat, "--layout", "flat")), "is not an arrag --layout flat folder")
    # Two plain runs into one folder: the second is refused while the first holds the folder.
    out = tmp_path / "plain"
    claims = Claims(out)
    assert claims.take("folder")
    one_line_error(*_main(capsys, *_gen(model, out)), "another arrag generate is writing into")
    claims.release("folder")
    claims.tidy()
    assert _main(capsys, *_gen(model, out))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000_00.png", "settings.json"]
    # --overwrite replaces the files its own sidecar lists, never a user's file that merely looks like one.
    save_image(np.zeros((8, 8, 3), np.uint8), out / "2023_05.jpg")
    one_line_error(*_main(capsys, *_gen(model, out)), "holds 1 images of an earlier run", "--overwrite")
    assert _main(capsys, *_gen(model, out, "--overwrite"))[0] == 0
    assert (out / "2023_05.jpg").is_file()
    save_image(np.zeros((8, 8, 3), np.uint8), out / "0001_00.png")  # the user's, where a second prompt would go
    one_line_error(*_main(capsys, "generate", "--model", model, "--prompt", "a red circle", "--prompt", "a blue square",
                          "--image-size", "64", "--out", out, "--device", "cpu", "--overwrite"),
                   "0001_00.png exists and no earlier arrag run wrote it")


def test_vq_reconstruct_never_replaces_its_input_or_a_foreign_file(tmp_path, two_vqs, capsys):
    photo = save_image(ShapesWorld("database", size=64).image(0), tmp_path / "photo.png")
    before = photo.read_bytes()
    base = ("vq", "reconstruct", photo, "--vq", two_vqs[0], "--device", "cpu")
    one_line_error(*_main(capsys, *base, "--out", photo), "is the input")
    (tmp_path / "other.png").write_bytes(before)
    one_line_error(*_main(capsys, *base, "--out", tmp_path / "other.png"), "already exists and arrag did not write it")
    assert photo.read_bytes() == before
    assert _main(capsys, *base, "--out", tmp_path / "rec.png")[0] == 0
    assert _main(capsys, *base, "--out", tmp_path / "rec.png")[0] == 0  # its own earlier output is replaced


def test_other_writers_refuse_foreign_outputs(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("keep")
    codes = np.zeros((3, 4, 4), np.uint16)
    codestore.write_store(tmp_path / "s", codes, np.eye(8, dtype=np.float32), captions=["a"] * 3)
    build_index(tmp_path / "s", tmp_path / "idx", factory="Flat", progress=False)
    one_line_error(*_main(capsys, "construct-train", tmp_path / "s", "--retriever", tmp_path / "idx", "--out", user),
                   "is not an arrag FAiD training set folder")
    one_line_error(*_main(capsys, "demo", "--out", user, "--device", "cpu"), "is not an arrag demo folder")
    (tmp_path / "scores.json").write_text("{}")
    one_line_error(*_main(capsys, "eval", "shapes", tmp_path, "--out", tmp_path / "scores.json"),
                   "already exists and arrag did not write it")
    one_line_error(*_main(capsys, "eval", "shapes-prompts", "--out", user / "thesis.tex"),
                   "already exists and arrag did not write it")
    assert (user / "thesis.tex").read_text() == "keep" and (tmp_path / "scores.json").read_text() == "{}"


def test_a_failed_layout_run_leaves_no_claims_folder(tmp_path, tiny_janus):
    from arrag.decoding import Generator, SamplingConfig
    from arrag.eval.batch_generate import generate_into_layout
    from arrag.eval.layouts import make_layout
    from arrag.eval.prompts import PromptItem

    class Broken(Generator):
        def generate(self, *a, **k):
            raise RuntimeError("out of memory")

    layout = make_layout("geneval", tmp_path / "g", 1)
    with pytest.raises(RuntimeError):
        generate_into_layout(Broken(tiny_janus), [PromptItem(0, "a red circle", "00000")], layout,
                             SamplingConfig(image_size=64), progress=False)
    assert not (tmp_path / "g" / ".claims").exists()


# -- 4. silently wrong numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args, flag", [
    (("generate", "--model", "m", "--prompt", "a", "--cfg-weight", "nan"), "--cfg-weight nan"),
    (("generate", "--model", "m", "--prompt", "a", "--method", "daid", "--daid-tau", "inf"), "--daid-tau inf"),
    (("generate", "--model", "m", "--prompt", "a", "--temperature=-inf"), "--temperature -inf"),
    (("eval", "retrieval-gain", "--model", "m", "--retriever", "r", "--store", "s", "--taus", "nan"), "--taus"),
    (("eval", "retrieval-gain", "--model", "m", "--retriever", "r", "--store", "s", "--lambdas", "0,nan"),
     "--lambdas"),
    (("train-faid", "--base", "b", "--store", "s", "--lora-alpha", "-8"), "--lora-alpha -8"),
    (("train-faid", "--base", "b", "--store", "s", "--lr", "nan"), "--lr nan"),
    (("eval", "shapes-prompts", "--out", "p.jsonl", "--size", "0"), "--size 0"),
    (("encode", "src", "--out", "o", "--vq", "v", "--image-size", "100000"), "--image-size 100000"),
    (("demo", "--daid-lambda", "nan"), "--daid-lambda nan"),
    (("demo", "--samples", "0"), "--samples 0"),
    (("demo", "--seeds", "abc"), "--seeds"),
    (("demo", "--seeds", ""), "--seeds"),
    (("build-index", "s", "--out", "o", "--target-recall", "nan"), "--target-recall nan"),
])
def test_every_numeric_flag_is_finite_and_in_range(tmp_path, capsys, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    one_line_error(*_main(capsys, *args), flag)


def test_a_hand_edited_nprobe_is_refused(tmp_path, capsys):
    from arrag.retrieval.retriever import PatchRetriever

    rng = np.random.default_rng(0)
    codestore.write_store(tmp_path / "s", rng.integers(0, 16, (40, 6, 6)).astype(np.uint16),
                          np.eye(16, 8, dtype=np.float32))
    build_index(tmp_path / "s", tmp_path / "idx", factory="IVF4,Flat", progress=False)
    path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(path.read_text())
    for bad in (2.7, -5, 0, "abc"):
        path.write_text(json.dumps({**manifest, "nprobe": bad}))
        with pytest.raises(ArragError, match=rf"nprobe {re.escape(repr(bad))} is not a whole number >= 1") as e:
            PatchRetriever.load(tmp_path / "idx", verify=False)
        assert "\n" not in str(e.value)


def test_fid_reads_only_a_layouts_own_sample_files(tmp_path, tiny_janus_dir, capsys):
    from arrag.eval.fid import image_files

    out = tmp_path / "g"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    rc, _ = _main(capsys, "generate", "--model", tiny_janus_dir, "--prompts", prompts, "--layout", "geneval",
                  "--parallel-size", "2", "--prompt-grids", "--image-size", "64", "--out", out, "--device", "cpu")
    assert rc == 0
    assert (out / "00000" / "grid.png").is_file()
    assert [p.relative_to(out).as_posix() for p in image_files(out)] == [
        "00000/samples/0000.png", "00000/samples/0001.png", "00001/samples/0000.png", "00001/samples/0001.png"]


# -- 5. one line before any model loads ------------------------------------------------------------------------


def test_outputs_that_name_a_file_and_other_tracebacks_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    codestore.write_store(tmp_path / "s", np.random.default_rng(0).integers(0, 8, (300, 6, 6)).astype(np.uint16),
                          np.eye(8, dtype=np.float32), captions=["a"] * 300)
    build_index(tmp_path / "s", tmp_path / "idx", factory="Flat", progress=False)
    for args in (("generate", "--model", "no-model-loaded", "--prompt", "a", "--out", "file"),
                 ("generate", "--model", "no-model-loaded", "--prompt", "a", "--out", "file", "--layout", "flat"),
                 ("encode", tmp_path, "--out", "file", "--vq", "no-vq-loaded"),
                 ("construct-train", "s", "--retriever", "idx", "--out", "file"),
                 ("demo", "--out", "file")):
        one_line_error(*_main(capsys, *args), "file is a file")
    one_line_error(*_main(capsys, "build-index", "s", "--out", "i2", "--gpus", "zz"), "GPUs 'zz'")
    one_line_error(*_main(capsys, "build-index", "s", "--out", "i2", "--factory", "IVF1000000,Flat"),
                   "1,000,000 inverted lists need at least 1,000,000 entries")
    one_line_error(*_main(capsys, "search-stats", "idx", "--json", tmp_path), "is a folder")
    one_line_error(*_main(capsys, "generate", "--model", "no-model-loaded", "--prompt", "a", "--grid", "g.gif"),
                   "--grid", "use a .png, .jpg or .webp name")


def test_the_demo_render_is_removed_when_interrupted(tmp_path, monkeypatch):
    from arrag.demo import database
    from arrag.demo.pipeline import ASSETS

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(database, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        database.build_demo_retriever(ASSETS / "base", tmp_path / "demo_L", 3, 64, progress=False)
    assert list((tmp_path / "demo_L").iterdir()) == []


def test_a_demo_retriever_built_without_progress_draws_no_bars(tmp_path, capsys):
    """progress=False reaches every stage: the render of the database images drew its bar regardless."""
    from arrag.demo import database
    from arrag.demo.pipeline import ASSETS

    database.build_demo_retriever(ASSETS / "tail" / "base", tmp_path / "tail", 6, 64, progress=False, world="tail",
                                  shape="2hop")
    err = capsys.readouterr().err
    assert "render" not in err and "%|" not in err, err


def test_plain_generate_on_a_full_disk_promises_no_resume(tmp_path, tiny_janus_dir, capsys, monkeypatch):
    from arrag.eval import layouts
    from arrag.fileops import no_space_error

    def full(image, path):
        raise no_space_error(path)

    monkeypatch.setattr(layouts, "save_image", full)
    rc, err = _main(capsys, *_gen(tiny_janus_dir, tmp_path / "out"))
    err = err.splitlines()[-1]  # after the decoding progress bar
    one_line_error(rc, err, "no space left on device", "starts over")
    assert "resumes)" not in err.replace("--layout flat resumes)", "")


def test_trained_and_saved_weights_are_readable_by_others(tmp_path, tiny_janus):
    tiny_janus.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
