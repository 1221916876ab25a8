"""lab.beam_search: token for token what transformers' beam search gives on the same weights."""

import pytest
import torch

from conftest import load_hf
from lab.beam_search import beam_search, in_place
from model import GPT

transformers = pytest.importorskip("transformers")

V, EOS, N = 211, 7, 20  # vocab, end-of-text id, max_new_tokens

SETTINGS = [
    {"num_beams": 10, "length_penalty": 0.9, "no_repeat_ngram_size": 4},  # the paper's E2E decoding (Table 11)
    {"num_beams": 10, "length_penalty": 0.8, "no_repeat_ngram_size": 2, "early_stopping": True},
    {"num_beams": 3, "length_penalty": 1.0, "no_repeat_ngram_size": 0},
    {"num_beams": 3, "length_penalty": 0.8, "no_repeat_ngram_size": 4, "early_stopping": True},
    {"num_beams": 5, "length_penalty": 0.9, "no_repeat_ngram_size": 2, "eos_token_id": [EOS, 11]},  # two end ids
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Random GPT-2s written by transformers, each as (transformers' model, ours): "late", whose
    hypotheses mostly run to max_new_tokens, and "early", whose EOS logit is raised by 15 (through
    ln_f's bias) so that many end at EOS. Large weights make the logits peaked: no near-ties for
    float rounding to flip, so equal tokens is a fair test."""
    pairs = {}
    for name, boost in (("late", 0.0), ("early", 15.0)):
        config = transformers.GPT2Config(
            vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS, eos_token_id=EOS
        )
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(config)
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.3)
            hf.transformer.ln_f.weight.mul_(10)
            wte = hf.transformer.wte.weight
            hf.transformer.ln_f.bias += boost * wte[EOS] / wte[EOS].norm() ** 2
        folder = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(folder)
        pairs[name] = load_hf(folder), GPT.from_pretrained(folder).eval()
    return pairs


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def hf_beam_search(hf, prompts: list[list[int]], use_cache: bool = True, **settings) -> list[list[int]]:
    """transformers' beam search on prompts of one length, each continuation cut before its first EOS."""
    idx = torch.tensor(prompts)
    out = hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=N,
        do_sample=False,
        pad_token_id=EOS,
        use_cache=use_cache,
        **settings,
    )
    eos = settings["eos_token_id"] if isinstance(settings["eos_token_id"], list) else [settings["eos_token_id"]]
    continuations = []
    for row in out[:, idx.size(1) :].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        continuations.append(row[: ends[0]] if ends else row)
    return continuations


@pytest.mark.parametrize("name", ["late", "early"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_a_batch_of_equal_lengths_matches_transformers(models, name, settings):
    hf, ours = models[name]
    settings = {"eos_token_id": EOS, **settings}
    prompts = random_prompts([6, 6, 6, 6])
    assert beam_search(ours, prompts, N, **settings) == hf_beam_search(hf, prompts, **settings)


@pytest.mark.parametrize("name", ["late", "early"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_prompts_of_different_lengths_match_transformers_on_each_alone(models, name, settings):
    hf, ours = models[name]
    settings = {"eos_token_id": EOS, **settings}
    prompts = random_prompts([3, 9, 1, 12, 5])
    assert beam_search(ours, prompts, N, **settings) == [hf_beam_search(hf, [p], **settings)[0] for p in prompts]


def test_a_batch_gives_what_each_prompt_gives_alone(models):
    ours = models["early"][1]
    prompts = random_prompts([4, 11, 2, 7], seed=2)
    settings = {"num_beams": 4, "length_penalty": 0.9, "no_repeat_ngram_size": 3, "eos_token_id": EOS}
    assert beam_search(ours, prompts, N, **settings) == [beam_search(ours, [p], N, **settings)[0] for p in prompts]


def test_the_kv_cache_gives_what_recomputing_every_step_gives(models):
    hf, ours = models["late"]
    prompts = random_prompts([5, 5], seed=3)
    settings = {"num_beams": 4, "length_penalty": 0.9, "no_repeat_ngram_size": 4, "eos_token_id": EOS}
    assert beam_search(ours, prompts, N, **settings) == hf_beam_search(hf, prompts, use_cache=False, **settings)


def test_the_test_models_reach_eos_and_max_length_and_ban_ngrams(models):
    """The cases above are not vacuous: EOS ends hypotheses early in one model, max_new_tokens ends
    them in the other, and the n-gram ban changes what is generated."""
    prompts = random_prompts([3, 9, 1, 12, 5])
    early = beam_search(models["early"][1], prompts, N, eos_token_id=EOS)
    assert any(len(c) < N for c in early)
    late = beam_search(models["late"][1], prompts, N, eos_token_id=EOS)
    assert all(len(c) == N for c in late)
    assert beam_search(models["late"][1], prompts, N, no_repeat_ngram_size=0, eos_token_id=EOS) != late


def test_one_beam_without_eos_is_greedy(models):
    ours = models["late"][1]
    prompts = random_prompts([6, 6, 6])
    greedy = ours.generate(torch.tensor(prompts), N, temperature=0)[:, 6:].tolist()
    assert beam_search(ours, prompts, N, num_beams=1, no_repeat_ngram_size=0, eos_token_id=[]) == greedy


def test_bad_arguments_are_clear_errors(models):
    ours = models["late"][1]
    with pytest.raises(ValueError, match="longer than the context"):
        beam_search(ours, [[1] * 50], 15)
    with pytest.raises(ValueError, match="at least one token"):
        beam_search(ours, [[1], []], 5)


def test_kept_beams_stay_in_their_parents_slots_where_they_can():
    # kept beams, best first, and their parents' slots: beam 0 and beam 2 keep theirs (0 and 2), beam 3 takes
    # its parent's slot 1, beam 1 (a second child of 0) the slot no beam claimed (3)
    assert in_place(torch.tensor([[0, 0, 2, 1], [3, 2, 1, 0], [1, 1, 1, 1]])).tolist() == [
        [0, 3, 2, 1],
        [3, 2, 1, 0],
        [1, 0, 2, 3],
    ]
