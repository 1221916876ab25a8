"""sample.py end to end on a tiny base with GPT-2's vocabulary, saved like a real one, and its adapters."""

import os
import re

import pytest
import torch

import sample
from conftest import ROOT
from lab import multi_adapter
from lora import LoRAConfig, apply_lora, lora_layers, save_adapter
from model import GPT, GPTConfig
from sample import main

tiktoken = pytest.importorskip("tiktoken")
if not os.environ.get("TIKTOKEN_CACHE_DIR"):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken")
try:
    tiktoken.get_encoding("gpt2")
except Exception:  # offline without the cached BPE files
    pytest.skip("tiktoken's gpt2 encoding is not available offline", allow_module_level=True)

BPE_TINY = GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)
GREEDY = ["--temperature", "0", "--max-new-tokens", "10", "--dtype", "float32"]  # equal texts: exact, so fp32


@pytest.fixture
def runs(tmp_path, monkeypatch) -> dict[str, str]:
    """A base folder and the output folders of two LoRA runs on it (adapters with random B)."""
    monkeypatch.chdir(tmp_path)  # so that no real ./out is picked up
    torch.manual_seed(0)
    base = GPT(BPE_TINY)
    with torch.no_grad():  # weights far larger than GPT-2's init, so that greedy text varies with its context
        for name, p in base.named_parameters():
            if "ln_" not in name and not name.endswith("bias"):
                p.normal_(0, 1.0)
    base.save_pretrained("base")
    model = apply_lora(GPT.from_pretrained("base"), LoRAConfig(rank=2, alpha=4))
    for name in ("a", "b"):
        with torch.no_grad():
            for layer in lora_layers(model):
                for B in layer.lora_B.values():
                    B.normal_(0, 1.0)
        os.makedirs(f"run_{name}")
        save_adapter(model, f"run_{name}/adapter.safetensors")
    return {"base": "base", "a": "run_a/adapter.safetensors", "b": "run_b/adapter.safetensors"}


def samples(capsys, argv: list[str], script=main) -> list[str]:
    """The texts sample.py (or lab/multi_adapter.py) prints, without their headers, after checking
    sample.py's tokens/s line."""
    script(argv)
    lines = capsys.readouterr().out.splitlines()
    if script is main:
        assert re.fullmatch(r"\d+ tokens in [\d.]+ s: [\d,.]+ tokens/s \(.*\)", lines.pop()), lines
    texts, current = [], None
    for line in lines:
        if line.startswith("--- ") and line.endswith(" ---"):
            current = len(texts)
            texts.append("")
        elif current is not None:
            texts[current] += line + "\n"
    return texts


def test_greedy_text_is_the_same_merged_or_not(runs, capsys):
    unmerged = samples(capsys, ["--run-dir", "run_a", "--prompt", "Hello there", *GREEDY])
    merged = samples(capsys, ["--run-dir", "run_a", "--prompt", "Hello there", "--merge", *GREEDY])
    base = samples(capsys, ["--base", runs["base"], "--prompt", "Hello there", *GREEDY])
    assert unmerged == merged and len(unmerged) == 1 and unmerged[0].startswith("Hello there")
    assert base != merged  # the adapter changes the text
    assert len(set(tiktoken.get_encoding("gpt2").encode(merged[0]))) > 4  # and it is not one token over and over


def test_one_batch_of_several_adapters_equals_each_adapter_alone(runs, capsys):
    with open("prompt.txt", "w") as f:
        f.write("a longer prompt, read from a file")
    alone_a = samples(capsys, ["--adapter", runs["a"], "--prompt", "To be", *GREEDY])
    alone_b = samples(capsys, ["--run-dir", "run_b", "--prompt", "FILE:prompt.txt", *GREEDY])
    adapters = [
        "--adapter",
        runs["a"],
        "--adapter",
        runs["b"],
        "--prompt",
        "To be",
        "--prompt",
        "a longer prompt, read from a file",
        "--max-new-tokens",
        "10",
        "--dtype",
        "float32",  # in bf16 the paths round differently: test_multi_adapter checks what holds there
    ]
    assert samples(capsys, adapters, multi_adapter.main) == alone_a + alone_b
    assert samples(capsys, [*adapters, "--merge"], multi_adapter.main) == alone_a + alone_b
    assert alone_b[0].startswith("a longer prompt, read from a file")
    with pytest.raises(SystemExit, match="multi_adapter: error: give one --prompt or one per --adapter: 3 for 2"):
        multi_adapter.main([*adapters, "--prompt", "3"])


def test_a_prompt_longer_than_the_context_is_cropped_with_a_note(runs, capsys):
    long_prompt = " ".join(str(i) for i in range(40))  # about 80 tokens, the context is 32
    main(["--run-dir", "run_a", "--prompt", long_prompt, *GREEDY])
    out = capsys.readouterr().out
    note = r"note: prompt 1 has \d+ tokens, more than the context \(32\); the model sees only its last 32"
    assert re.search(note, out)
    assert "38 39" in out and "0 1 2 3" not in out


def test_a_rank_0_run_is_the_model_itself(runs, capsys):
    GPT.from_pretrained("base").save_pretrained("run_full")  # what train.py --rank 0 writes
    assert samples(capsys, ["--run-dir", "run_full", *GREEDY]) == samples(capsys, ["--base", "base", *GREEDY])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--run-dir", "nowhere"], "--run-dir nowhere: no such folder"),
        ([], "--run-dir out (the default): no such folder"),
        (["--adapter", "run_a/adapter.safetensors", "--base", "other"], "another base"),
        (["--adapter", "missing.safetensors"], "No such file"),
        (["--adapter", "base/config.json"], "base/config.json is not a safetensors file"),
    ],
)
def test_bad_input_is_one_clear_error(runs, capsys, argv, message):
    GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).save_pretrained("other")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert str(exit_info.value).startswith("sample.py: error: ") and message in str(exit_info.value)


def test_16_bit_generation_runs_on_16_bit_weights(runs, capsys, monkeypatch):
    """--dtype bfloat16 casts the weights once, after merging, instead of autocasting fp32 weights every step."""
    seen = {}

    def generate_rows(model, *args, **kwargs):
        seen["dtypes"] = {p.dtype for p in model.parameters()}
        seen["merged"] = all(layer.merged for layer in lora_layers(model))
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return [[464]]

    monkeypatch.setattr(sample, "generate_rows", generate_rows)
    main(["--run-dir", "run_a", "--merge", "--dtype", "bfloat16", "--max-new-tokens", "1"])
    assert seen == {"dtypes": {torch.bfloat16}, "merged": True, "autocast": False}
    assert "tokens/s (merged, KV cache, cpu, bfloat16)" in capsys.readouterr().out
