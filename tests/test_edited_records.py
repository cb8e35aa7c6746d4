"""Hand-edited or mismatched records are refused in one line where they would give wrong results: a code store's
manifest against its shards, an index manifest against its files and its own digest, a store of another tokenizer,
parts of different plans, and build flags that did not apply are said."""

import json
import re
import shutil

import numpy as np
import pytest

from arrag.build_retriever.build_index import build_index, merge_index
from arrag.cli import main
from arrag.errors import ArragError
from arrag.retrieval import codestore
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.retriever import PatchRetriever


def _store(folder, n=40, grid=8, seed=0, k=16):
    rng = np.random.default_rng(seed)
    book = rng.normal(size=(k, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codestore.write_store(folder, rng.integers(0, k, (n, grid, grid)).astype(np.uint16), book, shard_size=20)
    return folder


def _edit(path, **changes):
    record = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    path.write_text(json.dumps(record))


def _cli_error(capsys, *args) -> str:
    rc = main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arrag: error")]
    assert rc == 2 and len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    store = _store(root / "store")
    build_index(store, root / "idx", progress=False)
    return root


def test_a_store_manifest_with_another_grid_is_refused_naming_both(tmp_path, built, capsys):
    shutil.copytree(built / "store", tmp_path / "s")
    _edit(tmp_path / "s" / "manifest.json", grid=[4, 4])
    for args in (("build-index", tmp_path / "s", "--out", tmp_path / "i"),
                 ("search-stats", built / "idx", "--store", tmp_path / "s", "--queries", 5)):
        err = _cli_error(capsys, *args)
        assert re.search(r"codes-00000\.npy holds codes of 8x8 cells, but \S+/s/manifest\.json says 4x4", err), err


def test_a_shard_record_whose_count_disagrees_is_refused(tmp_path, built, capsys):
    shutil.copytree(built / "store", tmp_path / "s")
    _edit(tmp_path / "s" / "shard-00001.json", count=10)  # its codes hold 20, as the manifest says
    err = _cli_error(capsys, "build-index", tmp_path / "s", "--out", tmp_path / "i")
    assert re.search(r"shard-00001\.json records 10 images, but \S+manifest\.json and \S+codes-00001\.npy hold 20",
                     err), err
    with pytest.raises(ArragError, match="records 10 images"):  # random access (training samples) checks it too
        CodeStore.open(tmp_path / "s").gather(np.array([25]))


def test_search_stats_refuses_a_store_of_another_tokenizer(tmp_path, built, capsys):
    other = _store(tmp_path / "other", seed=1)  # another codebook: another VQ fingerprint
    err = _cli_error(capsys, "search-stats", built / "idx", "--store", other, "--queries", 5)
    assert "were built with different tokenizers" in err and str(other) in err


@pytest.mark.parametrize("edit", [dict(dedup=False), dict(vq_fingerprint="0" * 16), dict(grid=[4, 4]),
                                  dict(entries=123)])
def test_an_edited_index_manifest_is_refused_by_its_digest(tmp_path, built, capsys, edit):
    shutil.copytree(built / "idx", tmp_path / "i")
    _edit(tmp_path / "i" / "manifest.json", **edit)
    for command in ("search-stats", "verify-index"):
        err = _cli_error(capsys, command, tmp_path / "i", *(("--queries", 5) if command == "search-stats" else ()))
        assert "manifest.json was edited after build-index wrote it" in err and "--no-verify-index" in err, err


@pytest.mark.parametrize("edit, says", [(dict(dedup=False), "dedup false, but the folder holds the counts.npy"),
                                        (dict(grid=[4, 4]), "grid [4, 4] does not give the 42 target positions"),
                                        (dict(entries=123), "entries 123, but index.faiss holds")])
def test_without_a_digest_the_manifests_figures_are_checked_against_the_files(tmp_path, built, edit, says):
    """An index of an earlier format (no digest): its figures are still cross-checked against the files."""
    shutil.copytree(built / "idx", tmp_path / "i")
    _edit(tmp_path / "i" / "manifest.json", format="arrag-index/2", manifest_sha256=None, **edit)
    with pytest.raises(ArragError, match=re.escape(says)) as e:
        PatchRetriever.load(tmp_path / "i")
    assert "\n" not in str(e.value)
    shutil.copytree(built / "idx", tmp_path / "ok")
    _edit(tmp_path / "ok" / "manifest.json", format="arrag-index/2", manifest_sha256=None)
    assert PatchRetriever.load(tmp_path / "ok").entries > 0  # an unedited older manifest still loads


def test_a_manifest_without_file_checksums_is_unverified(tmp_path, built, capsys):
    shutil.copytree(built / "idx", tmp_path / "i")
    _edit(tmp_path / "i" / "manifest.json", files=None)
    err = _cli_error(capsys, "search-stats", tmp_path / "i", "--queries", 5)
    assert "records no file checksums ('files'): an unverified index" in err and "--no-verify-index" in err
    with pytest.warns(UserWarning, match="unverified index; used unchecked"):
        assert PatchRetriever.load(tmp_path / "i", verify=False).entries > 0


def test_nprobe_and_the_store_path_may_be_edited_by_hand(tmp_path, built):
    shutil.copytree(built / "idx", tmp_path / "i")
    _edit(tmp_path / "i" / "manifest.json", nprobe=3, store="/moved/elsewhere")
    assert PatchRetriever.load(tmp_path / "i").manifest["nprobe"] == 3


def test_verify_index_says_what_it_verified(built, capsys):
    assert main(["verify-index", str(built / "idx")]) == 0
    out = capsys.readouterr().out
    assert "every checksum matches the manifest" in out and "the manifest's own digest matches its content" in out
    assert "its entries, dim, dedup, grid agree with the files" in out


def test_merge_refuses_parts_of_different_plans_and_keeps_them(tmp_path, built):
    store = built / "store"
    for out, factory in (("a", "IVF8,Flat"), ("b", "IVF4,Flat")):
        build_index(store, tmp_path / out, factory=factory, train_only=True, progress=False)
        for rank in (0, 1):
            build_index(store, tmp_path / out, factory=factory, shard=f"{rank}/2", progress=False)
    part = "rank-00001-of-00002"
    shutil.rmtree(tmp_path / "a" / "parts" / part)
    shutil.copytree(tmp_path / "b" / "parts" / part, tmp_path / "a" / "parts" / part)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "a").rglob("*"))
    with pytest.raises(ArragError) as e:
        merge_index(tmp_path / "a", progress=False)
    line = str(e.value)
    assert "\n" not in line and f"{part} was built from another plan (IVF4,Flat)" in line, line
    assert "(IVF8,Flat, which rank-00000-of-00002 followed)" in line, line
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "a").rglob("*")) == before


def test_build_flags_that_did_not_apply_are_said(tmp_path, built):
    with pytest.warns(UserWarning) as said:
        build_index(built / "store", tmp_path / "i", hnsw_above=100, nprobe=4, train_size=1000, progress=False)
    lines = [str(w.message) for w in said]
    assert any(line.startswith("--hnsw-above 100 did not apply: --factory auto chose Flat") for line in lines), lines
    assert any(line.startswith("--nprobe 4 did not apply: Flat has no inverted lists") for line in lines), lines
    assert any(line.startswith("--train-size 1,000 did not apply: Flat needs no training") for line in lines), lines
