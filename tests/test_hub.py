"""Hugging Face Hub ids where paths are expected: found offline in a (fake) Hub cache, a clear line otherwise."""

import shutil
import subprocess
import sys

from arrag.hub import is_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(root, repo, files):
    """The Hub cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    for f in files:
        shutil.copy(f, snap / f.name)


def _offline(cache, code):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home"),
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_hub_ids_resolve_offline_from_the_cache(tmp_path, tiny_janus_dir):
    cache = tmp_path / "hub"
    _fake_cache(cache, "arrag-test/tiny-janus", sorted(p for p in tiny_janus_dir.iterdir() if p.is_file()))
    from arrag.vq import VQModel

    VQModel("VQ-tiny-16").save(tmp_path / "vq.safetensors")
    _fake_cache(cache, "arrag-test/vq", [tmp_path / "vq.safetensors"])
    code = ("from arrag.janus import JanusPro\nfrom arrag.vq import load_vq\n"
            "m = JanusPro.from_pretrained('arrag-test/tiny-janus', device='cpu', quiet=True)\n"
            "v = load_vq('arrag-test/tiny-janus')\nw = load_vq('arrag-test/vq/vq.safetensors')\n"
            "assert m.vq.fingerprint() == v.fingerprint() and w.config.codebook_size == 1024\n"
            "print('ok', m.source_folder.name)\n")
    p = _offline(cache, code)
    assert p.returncode == 0 and p.stdout.startswith("ok " + COMMIT), p.stderr[-2000:]


def test_a_missing_hub_id_says_which_command_fetches_it(tmp_path):
    p = _offline(tmp_path / "hub", "import sys\nfrom arrag.cli import main\nsys.exit(main(['generate', '--model', "
                 "'deepseek-ai/Janus-Pro-1B', '--prompt', 'a cat', '--device', 'cpu']))\n")
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert "not in the Hugging Face cache" in err[0] and "hf download deepseek-ai/Janus-Pro-1B" in err[0]
    assert "(HF_HUB_OFFLINE is set)" in err[0]


def test_what_counts_as_a_hub_id(tmp_path):
    assert is_hub_id("deepseek-ai/Janus-Pro-1B") and is_hub_id("peizesun/llamagen_t2i/vq_ds16_t2i.pt")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("./a/b") and not is_hub_id("just-a-name")


def test_local_paths_are_never_hub_ids_and_fail_fast(tmp_path, monkeypatch, capsys):
    """result/ckpts/arrag_faid (its first part a local folder) is a path: a missing one is one line at once, with no
    network retries; a missing vq_ds16_t2i.pt names where the hub keeps it."""
    import time

    from arrag.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "result" / "ckpts").mkdir(parents=True)
    (tmp_path / "arrag" / "Janus" / "janus").mkdir(parents=True)
    assert not is_hub_id("result/ckpts/arrag_faid") and not is_hub_id("arrag/Janus/janus/vq_ds16_t2i.pt")
    assert not is_hub_id("result/x.safetensors") and is_hub_id("someone/model")
    t0 = time.time()
    assert main(["generate", "--model", "result/ckpts/arrag_faid", "--prompt", "a cat", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "arrag: error: model result/ckpts/arrag_faid: no such file or folder" and time.time() - t0 < 20
    assert main(["vq", "reconstruct", "x.png", "--vq", "arrag/Janus/janus/vq_ds16_t2i.pt", "--out", "o.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "vq_ds16_t2i.pt: no such file or folder; it is on the hub" in err
    assert "download peizesun/llamagen_t2i vq_ds16_t2i.pt" in err
