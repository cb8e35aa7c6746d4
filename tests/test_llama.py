"""Our Llama decoder against transformers' LlamaForCausalLM with the same weights."""

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from arrag.janus.config import LlamaConfig
from arrag.janus.llama import LlamaCausalLM


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=60, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ours = LlamaCausalLM(cfg).eval()
    for p in ours.parameters():  # RMSNorm weights start at 1; randomise them so the test sees them
        if p.ndim == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    hf_cfg = HFLlamaConfig(vocab_size=60, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    return ours, hf


def _logits(hf, hidden):
    return hf.lm_head(hidden)


def test_full_forward_matches_transformers(pair):
    ours, hf = pair
    ids = torch.randint(0, 60, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = _logits(hf, ours.model(ours.model.embed_tokens(ids)))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_static_cache_steps_match_transformers(pair):
    ours, hf = pair
    ids = torch.randint(0, 60, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        cache = ours.model.new_cache(2, 20)
        outs = [ours.model(ours.model.embed_tokens(ids[:, :8]), None, cache)]
        for t in range(8, 20):
            outs.append(ours.model(ours.model.embed_tokens(ids[:, t:t + 1]), None, cache))
        got = _logits(hf, torch.cat(outs, 1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert cache.length == 20 and cache.k.shape[3] == 20  # preallocated once, filled in place


def test_left_padding_equals_running_alone(pair):
    ours, hf = pair
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(0, 60, (1, 6), generator=g), torch.randint(0, 60, (1, 11), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = ids.new_ones(ids.shape, dtype=torch.bool)
    mask[0, :5] = False
    nxt = torch.randint(0, 60, (2, 4), generator=g)
    with torch.no_grad():
        cache = ours.model.new_cache(2, 15)
        pre = ours.model(ours.model.embed_tokens(ids), mask, cache)
        steps = [ours.model(ours.model.embed_tokens(nxt[:, t:t + 1]), None, cache) for t in range(4)]
        for row, alone_ids in ((0, short), (1, long)):
            seq = torch.cat([alone_ids, nxt[row:row + 1]], 1)
            ref = hf(input_ids=seq).logits[0]
            got = _logits(hf, torch.cat([pre[row, -alone_ids.shape[1]:], *[s[row] for s in steps]]))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_rotary_angles_cos_and_sin_are_correctly_rounded(pair):
    """The rotary tables are cos/sin of transformers' fp32 angles, correctly rounded to fp32: the same numbers
    whatever the thread count (torch.cos on CPUs is within an ulp, and its first multi-threaded call in a process
    was sometimes not: tests/test_api.py then saw other images for the same seed)."""
    import math

    ours, _ = pair
    rotary = ours.model.rotary
    positions = torch.tensor([[0, 1, 5, 127], [300, 4095, 2, 3]])
    cos, sin = rotary(positions, 4096, torch.float32)  # grows past max_position_embeddings when asked
    assert cos.shape == sin.shape == (2, 1, 4, 16)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    for b, row in enumerate(positions.tolist()):
        for t, pos in enumerate(row):
            angles = torch.cat([torch.tensor(float(pos)) * inv_freq] * 2).tolist()  # fp32 products
            assert cos[b, 0, t].tolist() == [float(torch.tensor(math.cos(a))) for a in angles]
            assert sin[b, 0, t].tolist() == [float(torch.tensor(math.sin(a))) for a in angles]
    assert rotary(positions, 64, torch.bfloat16)[0].dtype == torch.bfloat16
