"""`arrag eval retrieval-gain`: the teacher-forced mix against a brute-force computation, a database that knows
the next code, and the refusal of a store the index was built from."""

import json

import numpy as np
import pytest
import torch

from arrag.build_retriever.build_index import build_index
from arrag.cli import main
from arrag.eval.retrieval_gain import retrieval_gain
from arrag.janus import Prompter
from arrag.janus.faid_layers import full_sequence_logits
from arrag.retrieval import codestore
from arrag.retrieval.keys import grid_entries
from arrag.retrieval.retriever import PatchRetriever

CAPTIONS = ["a red circle", "two blue squares", "a green triangle"]


def _world(n: int, seed: int) -> np.ndarray:
    """4x4 grids over 40 codes where each valid L target is a function of its four neighbours."""
    g = np.random.default_rng(seed).integers(0, 40, (n, 4, 4))
    for r in range(1, 4):
        for c in range(1, 3):
            g[:, r, c] = (g[:, r - 1, c - 1] + 3 * g[:, r - 1, c] + 5 * g[:, r - 1, c + 1] + 7 * g[:, r, c - 1]) % 40
    return g.astype(np.uint16)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_janus):
    root = tmp_path_factory.mktemp("gain")
    db = _world(200, 0)
    codestore.write_store(root / "db", db, tiny_janus.vq)
    build_index(root / "db", root / "index", progress=False)
    held = codestore.write_store(root / "held", _world(6, 1), tiny_janus.vq,
                                 captions=[CAPTIONS[i % 3] for i in range(6)])
    return root, db, held


def _brute_force(model, prompter, db, held, tau, lam, aggregate, only=None):
    """Mean -log((1-lam) p_model + lam p_ret) at the valid targets of the held-out images (`only` those indices),
    p_ret from every database occurrence."""
    codebook = held.codebook()
    db_keys, db_values = grid_entries(db, None, "L", codebook, "code")
    images = np.arange(held.num_images) if only is None else np.asarray(only)
    grids = held.gather(images)
    keys, values = grid_entries(grids, None, "L", codebook, "code")
    batch = prompter.left_pad([prompter.ids(held.captions()[i]) for i in images])
    codes = torch.from_numpy(grids.reshape(len(grids), -1).astype(np.int64))
    with torch.no_grad():
        logits = full_sequence_logits(model, batch.input_ids, batch.attention_mask, codes, None, held.grid)
    pos = [5, 6, 9, 10, 13, 14]
    p_model = torch.softmax(logits[:, pos].double(), -1).reshape(-1, logits.shape[-1]).numpy()
    total = 0.0
    for q, (key, true) in enumerate(zip(keys, values, strict=True)):
        d = ((db_keys.astype(np.float64) - key) ** 2).sum(1)
        w = np.exp(-(d - d.min()) / tau)
        p_ret = np.zeros(p_model.shape[1])
        for code in np.unique(db_values):
            mine = w[db_values == code]
            p_ret[code] = mine.sum() if aggregate == "sum" else mine.max()
        p_ret /= p_ret.sum()
        total -= np.log((1 - lam) * p_model[q, true] + lam * p_ret[true])
    return total / len(values)


@pytest.mark.parametrize("aggregate", ["nearest", "sum"])
def test_numbers_match_a_brute_force_computation(world, tiny_janus, tiny_janus_dir, aggregate):
    root, db, held = world
    prompter = Prompter.from_folder(tiny_janus_dir)
    retriever = PatchRetriever.load(root / "index")
    out = retrieval_gain(tiny_janus, prompter, retriever, held, k=2048, lambdas=(0.0, 0.3), taus=(0.5,),
                         aggregate=aggregate, batch_size=4, progress=False)  # k covers every occurrence
    assert out["targets"] == 6 * 6 and out["images"] == 6
    for row in out["table"]:
        want = _brute_force(tiny_janus, prompter, db, held, 0.5, row["lambda"], aggregate)
        assert row["nats"] == pytest.approx(want, abs=1e-5)
    # every held-out neighbourhood's true code is known to the database; the random model knows nothing
    assert out["true_code_in_hits"] == 1.0
    assert out["best"]["lambda"] == 0.3 and out["best"]["gain"] > 0.5


def test_cli_writes_the_table_and_refuses_the_database_store(world, tiny_janus_dir, tmp_path, capsys):
    root, _, _ = world
    out = tmp_path / "gain.json"
    assert main(["eval", "retrieval-gain", "--model", str(tiny_janus_dir), "--retriever", str(root / "index"),
                 "--store", str(root / "held"), "--k", "64", "--lambdas", "0,0.1", "--taus", "0.5,1",
                 "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert [(r["tau"], r["lambda"]) for r in result["table"]] == [(0.5, 0.0), (0.5, 0.1), (1.0, 0.0), (1.0, 0.1)]
    assert result["settings"]["k"] == 64 and "best gain" in capsys.readouterr().out
    args = ["eval", "retrieval-gain", "--model", str(tiny_janus_dir), "--retriever", str(root / "index"),
            "--device", "cpu"]
    assert main([*args, "--store", str(root / "db")]) != 0
    err = capsys.readouterr().err
    assert "is the one" in err and "was built from" in err and err.count("\n") == 1
    assert main([*args, "--store", str(root / "held"), "--lambdas", "0.1"]) != 0
    assert "--lambdas must lie in [0, 1] and include 0" in capsys.readouterr().err
    assert main([*args, "--store", str(root / "held"), "--k", "0"]) != 0
    assert "--k 0: must be >= 1" in capsys.readouterr().err


def test_groups_give_each_groups_own_numbers(world, tiny_janus, tiny_janus_dir):
    """Per group (TailWorld's frequency buckets), the numbers of that group's images alone."""
    root, db, held = world
    prompter = Prompter.from_folder(tiny_janus_dir)
    retriever = PatchRetriever.load(root / "index")
    groups = ["tail", "head", "tail", "tail", "head", "head"]
    out = retrieval_gain(tiny_janus, prompter, retriever, held, k=2048, lambdas=(0.0, 0.3), taus=(0.5,),
                         batch_size=4, progress=False, groups=groups)
    assert set(out["by_group"]) == {"head", "tail"}
    for name, g in out["by_group"].items():
        only = [i for i, x in enumerate(groups) if x == name]
        assert g["images"] == 3 and g["targets"] == 3 * 6
        for row in g["table"]:
            want = _brute_force(tiny_janus, prompter, db, held, 0.5, row["lambda"], "nearest", only)
            assert row["nats"] == pytest.approx(want, abs=1e-5)
    whole = {r["lambda"]: r["nats"] for r in out["table"]}
    for lam in (0.0, 0.3):  # the groups' targets make up the whole
        parts = [g["targets"] * next(r["nats"] for r in g["table"] if r["lambda"] == lam)
                 for g in out["by_group"].values()]
        assert sum(parts) / out["targets"] == pytest.approx(whole[lam], abs=1e-9)
