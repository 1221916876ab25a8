"""Shared fixtures: tiny GPT-2s, built by transformers (the reference) or by model.py."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import GPT, GPTConfig  # noqa: E402

# The test models are tiny: one thread is fastest, and on a busy CPU (CI runners, shared machines)
# several threads spin-waiting for each other make the suite ten times slower.
torch.set_num_threads(1)

TINY = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16)


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
