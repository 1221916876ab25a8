"""Shared fixtures: tiny GPT-2s, built by transformers (the reference) or by model.py."""

import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402
from lora import LoRALinear  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# The test models are tiny: one thread is fastest, and on a busy CPU (CI runners, shared machines)
# several threads spin-waiting for each other make the suite ten times slower.
torch.set_num_threads(1)

TINY = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16)

# On a CPU, --dtype auto is bfloat16 where its bf16 matmuls are the faster ones (utils.cpu_bf16_matmul), else
# float32. FAKE_CPU_BF16=AMX, AVX512-BF16 or none runs the suite as on such a CPU: the answer torch gives
# is faked in this process (scripts that a test runs as subprocesses see the real CPU).
FAKE_CPU_BF16 = os.environ.get("FAKE_CPU_BF16")
REAL_CPU_VENDOR = utils.cpu_vendor  # what the fake replaces, for the test of the real one


def pytest_configure(config):
    if FAKE_CPU_BF16 not in (None, "AMX", "AVX512-BF16", "none"):
        raise pytest.UsageError(f"FAKE_CPU_BF16={FAKE_CPU_BF16}: use AMX, AVX512-BF16 or none")


@pytest.fixture(autouse=True, scope="session")
def cpu_bf16_matmul_as_asked():
    if FAKE_CPU_BF16 is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: FAKE_CPU_BF16 == "AMX")
        patch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: FAKE_CPU_BF16 == "AVX512-BF16")
        patch.setattr(utils, "cpu_vendor", lambda: "AMD")  # where AVX512-BF16 alone makes auto bf16
        yield


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


@pytest.fixture
def hf_folder(tmp_path) -> str:
    """A random GPT-2 written by transformers' save_pretrained: the layout of the real checkpoints.
    Every parameter, biases and LayerNorms included, is random so that no part of the mapping can
    hide behind a zero or a one."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=TINY.vocab_size,
        n_positions=TINY.block_size,
        n_embd=TINY.n_embd,
        n_layer=TINY.n_layer,
        n_head=TINY.n_head,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    folder = str(tmp_path / "hf-tiny")
    hf.save_pretrained(folder)
    return folder


def load_hf(folder: str):
    import transformers

    return transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()


def keep_lora_only_on(model: GPT, kept: set[tuple[int, str]]) -> GPT:
    """A learner's "only some blocks": the plain nn.Linear (same weight) back on each (block, module) not kept."""
    for index, block in enumerate(model.transformer.h):
        for name, layer in list(block.named_modules()):
            if isinstance(layer, LoRALinear) and (index, name) not in kept:
                plain = torch.nn.Linear(layer.in_features, layer.out_features)
                plain.weight, plain.bias = layer.weight, layer.bias
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, plain)
    return model


def english_text(n_characters: int, seed: int = 0) -> str:
    """Plain English sentences from a small grammar, for tests that need some text: a tiny model learns its
    characters within a few dozen steps, and no file has to be there."""
    rng = random.Random(seed)
    people = ["the king", "a young woman", "my brother", "the old servant", "our friend", "the captain", "her mother"]
    people += ["a stranger", "the good doctor", "his daughter", "the queen", "every soldier", "no one", "the boy"]
    verbs = ["loves", "has seen", "will follow", "speaks of", "remembers", "waits for", "cannot forget", "sends"]
    verbs += ["fears", "was looking for", "gave away", "dreams of", "would never sell", "brought back", "hides"]
    things = ["the river", "a letter from home", "the house on the hill", "his sword", "the morning light", "bread"]
    things += ["an honest man", "the last of the wine", "a ship at sea", "the long winter", "this quiet town"]
    things += ["the golden crown", "a horse", "the keys of the gate", "forty pounds", "the white rose", "some news"]
    places = ["in the garden", "at dawn", "by the fire", "before the war", "on the road to London", "at night"]
    speakers = ["KING HENRY", "MARGARET", "FIRST CITIZEN", "GLOUCESTER", "NURSE", "ROMEO", "QUEEN ELIZABETH"]
    sentences, length = [], 0
    while length < n_characters:
        sentence = f"{rng.choice(people)} {rng.choice(verbs)} {rng.choice(things)}"
        if rng.random() < 0.4:
            sentence += f" {rng.choice(places)}"
        if rng.random() < 0.3:
            sentence += f", and {rng.choice(people)} {rng.choice(verbs)} {rng.choice(things)}"
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(".....!?")
        if rng.random() < 0.3:  # a new speaker, as in a play
            sentence = f"\n{rng.choice(speakers)}:\n{sentence}"
        sentences.append(sentence + ("\n" if rng.random() < 0.3 else " "))
        length += len(sentences[-1])
    return "".join(sentences)[:n_characters]


def loud_base(folder: str, config: GPTConfig, std: float) -> str:
    """A random base saved in `folder`, its matrices and embeddings drawn with `std` (GPT-2's init is 0.02): large
    enough that greedy text follows whatever an adapter or a method changes. Returns the folder."""
    torch.manual_seed(0)
    base = GPT(config)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "ln_" not in name and not name.endswith("bias"):
                p.normal_(0, std)
    base.save_pretrained(folder)
    return folder
