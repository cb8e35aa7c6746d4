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
