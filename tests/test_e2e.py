"""lab/e2e.py end to end on a tiny base with GPT-2's vocabulary: decode, write, score."""

import json
import os
import shutil

import pytest
import torch

from conftest import ROOT
from lab import e2e
from lora import LoRAConfig, apply_lora, lora_layers, save_adapter
from model import GPT, GPTConfig

if not os.environ.get("TIKTOKEN_CACHE_DIR"):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken")
PAIRS = (
    "name : Alimentum | area : city centre||Alimentum is in the city centre.\n"
    "name : Alimentum | area : city centre||There is Alimentum in the city centre.\n"
    "name : Aromi | eatType : pub||Aromi is a pub.\n"
    "name : Bibimbap House||Bibimbap House.\n"
)


@pytest.fixture
def lora_run(tmp_path) -> str:
    torch.manual_seed(0)
    GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)).save_pretrained(
        str(tmp_path / "base")
    )
    model = apply_lora(GPT.from_pretrained(str(tmp_path / "base")), LoRAConfig(rank=2))
    with torch.no_grad():
        for layer in lora_layers(model):
            for B in layer.lora_B.values():
                B.normal_(0, 1.0)
    os.makedirs(tmp_path / "run")
    save_adapter(model, str(tmp_path / "run" / "adapter.safetensors"))
    (tmp_path / "test.txt").write_text(PAIRS)
    return str(tmp_path / "run")


def test_decodes_each_context_once_and_writes_what_the_official_script_reads(lora_run, tmp_path, capsys):
    if shutil.which("java") is None:
        pytest.skip("the METEOR, ROUGE-L and CIDEr scorers need Java")
    pytest.importorskip("pycocoevalcap")
    argv = [
        "--run-dir",
        lora_run,
        "--pairs",
        str(tmp_path / "test.txt"),
        "--limit",
        "2",
        "--num-beams",
        "3",
        "--max-new-tokens",
        "5",
        "--batch-size",
        "1",
        "--device",
        "cpu",
        "--dtype",
        "float32",  # exact values: the fp32 decode below
    ]
    scores = e2e.main(argv)
    out = os.path.join(lora_run, "e2e-test")
    predictions = open(os.path.join(out, "predictions.txt")).read().splitlines()
    references = open(os.path.join(out, "references.txt")).read()
    assert references == (
        "Alimentum is in the city centre.\nThere is Alimentum in the city centre.\n\nAromi is a pub.\n"
    )
    model, name = e2e.load_run(lora_run, None)  # the adapter merged: what the paper decodes with
    assert name.endswith("+ LoRA r=2 on q,v") and all(layer.merged for layer in lora_layers(model))
    expected = e2e.decode(
        model.eval(),
        ["name : Alimentum | area : city centre", "name : Aromi | eatType : pub"],
        batch_size=2,
        max_new_tokens=5,
        num_beams=3,
        length_penalty=0.9,
        no_repeat_ngram_size=4,
    )
    assert predictions == expected and len(predictions) == 2
    assert set(json.load(open(os.path.join(out, "scores.json")))) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert e2e.table_row(name, scores) in capsys.readouterr().out  # the Table-3 row, in the paper's units


def test_bad_input_is_one_line(lora_run, tmp_path):
    with pytest.raises(SystemExit, match="e2e: error: .*missing.txt"):
        e2e.main(["--run-dir", lora_run, "--pairs", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match="e2e: error: --run-dir .*nowhere: no such folder"):
        e2e.main(["--run-dir", str(tmp_path / "nowhere"), "--pairs", str(tmp_path / "test.txt")])


def test_contexts_batched_shortest_first_come_back_in_their_order(lora_run):
    model, _ = e2e.load_run(lora_run, None)
    contexts = ["name : Alimentum | area : city centre | near : Burger King", "name : Aromi", "name : Bibimbap House"]
    alone = [e2e.decode(model.eval(), [context], 1, 6, num_beams=3)[0] for context in contexts]
    assert len(set(alone)) == 3  # texts that differ: a wrong order would show
    assert e2e.decode(model, contexts, 2, 6, num_beams=3) == alone  # the longest given first, decoded last
