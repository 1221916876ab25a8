"""GPT.generate and its KV cache: the same tokens as rerunning the model on the whole window."""

import pytest
import torch

from conftest import TINY
from model import GPT, GPTConfig, KVCache

SHORT = GPTConfig(block_size=8, vocab_size=101, n_layer=2, n_head=2, n_embd=16)  # a window to run past


def greedy_reference(model: GPT, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Generation as it is defined: the model on the last block_size tokens, the most likely next."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_cached_forward_gives_the_logits_of_the_full_forward(tiny_model):
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    full, _ = tiny_model(idx)
    caches = [KVCache(TINY.block_size) for _ in range(TINY.n_layer)]
    pieces = [tiny_model(idx[:, :7], kv_caches=caches)[0]]  # a prefill,
    pieces += [tiny_model(idx[:, t : t + 1], kv_caches=caches)[0] for t in range(7, 12)]  # single tokens,
    pieces += [tiny_model(idx[:, 12:], kv_caches=caches)[0]]  # and a chunk after a past (the shifted mask)
    assert caches[0].length == 20
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("config, prompt_length, max_new_tokens", [(TINY, 5, 12), (SHORT, 3, 20), (SHORT, 12, 6)])
def test_greedy_with_cache_equals_without_even_past_the_window(config, prompt_length, max_new_tokens):
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (3, prompt_length))
    expected = greedy_reference(model, idx, max_new_tokens)
    assert torch.equal(model.generate(idx, max_new_tokens, temperature=0), expected)
    assert torch.equal(model.generate(idx, max_new_tokens, temperature=0, use_cache=False), expected)


def test_prompts_of_different_lengths_give_what_each_gives_alone():
    torch.manual_seed(0)
    model = GPT(SHORT).eval()
    prompts = [torch.randint(0, SHORT.vocab_size, (n,)) for n in (2, 6, 4)]
    padded = torch.zeros(3, 6, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    out = model.generate(padded, 10, temperature=0, prompt_lengths=[2, 6, 4])
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 10, temperature=0)[0]
        assert torch.equal(out[row, : len(prompt) + 10], alone), row


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny_model):
    idx = torch.randint(0, TINY.vocab_size, (2, 4))
    torch.manual_seed(1)
    a = tiny_model.generate(idx, 10, temperature=1.0, top_k=20)
    torch.manual_seed(1)
    b = tiny_model.generate(idx, 10, temperature=1.0, top_k=20)
    assert torch.equal(a, b) and torch.equal(a[:, :4], idx)
    greedy = tiny_model.generate(idx, 10, temperature=0)
    assert not torch.equal(a, greedy)  # random weights: sampling at temperature 1 strays
    assert torch.equal(tiny_model.generate(idx, 10, temperature=1.0, top_k=1), greedy)


def test_empty_prompt_and_overfull_cache_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="at least one token"):
        tiny_model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    caches = [KVCache(TINY.block_size) for _ in range(TINY.n_layer)]
    tiny_model(torch.zeros(1, TINY.block_size, dtype=torch.long), kv_caches=caches)
    with pytest.raises(ValueError, match="longer than the context"):
        tiny_model(torch.zeros(1, 1, dtype=torch.long), kv_caches=caches)
