"""lab.miniature: the data it builds (delexicalised, the pre-training text free of the test split), the copy
test, and --quick end to end: tables written, a second run reads every row, an interrupted row resumes."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import prepare_data
from lab import miniature
from model import GPT, GPTConfig

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
LOCAL = ["--shakespeare", os.path.join(SHARED, "tinyshakespeare.txt"), "--e2e", os.path.join(SHARED, "e2e")]
LOCAL += ["--webnlg", os.path.join(SHARED, "webnlg", "dev.json")]
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "e2e")), reason="no local E2E copy")


def test_delexicalise_and_back():
    mr = "name : The Wrestlers | Type : pub | near : Café Sicilia"
    context, target = miniature.delexicalise(mr, "The Wrestlers is a pub near Café Sicilia .")
    assert context == "name : X-name | Type : pub | near : X-near"
    assert target == "X-name is a pub near X-near ."
    assert miniature.relexicalise(target, mr) == "The Wrestlers is a pub near Café Sicilia ."
    assert miniature.parse_mr(mr) == {"name": "The Wrestlers", "Type": "pub", "near": "Café Sicilia"}
    assert miniature.relexicalise("X-name is near X-near", "name : Aromi") == "Aromi is near X-near"  # no near slot


def test_every_tenth_mr_is_held_out_with_all_its_references():
    lines = [f"name : N{i} | food : F||text {i} {j}" for i in range(25) for j in range(3)]
    train, held = miniature.split_pairs("\n".join(lines))
    held_mrs = {line.split("||")[0] for line in held}
    assert held_mrs == {"name : N9 | food : F", "name : N19 | food : F"}
    assert len(held) == 6 and len(train) == 69
    assert not held_mrs & {line.split("||")[0] for line in train}


def test_leaks_finds_a_test_reference_or_mr_as_it_is_or_delexicalised():
    test = ["name : Aromi | area : riverside||Aromi is by the riverside ."]
    assert miniature.leaks("A text. X-name is by the riverside . More.", test) == ["X-name is by the riverside ."]
    assert miniature.leaks("name : Aromi | area : riverside", test) == ["name : Aromi | area : riverside"]
    assert miniature.leaks("Aromi is a pub .", test) == []


@needs_data
def test_the_pretraining_text_holds_the_domain_but_never_the_task_nor_the_test_split():
    sources = miniature.read_sources(*LOCAL[1::2])
    train_lines, held_lines = miniature.split_pairs(sources["valid"])
    text = miniature.pretraining_text(sources, train_lines, held_lines)
    assert miniature.leaks(text, miniature.e2e_test_lines(sources)) == []  # no test MR or reference
    slots = "name|Type|area|food|near|price|customer rating|family friendly"
    assert "||" not in text and not re.search(rf"({slots}) : [^|\n]* \| ", text)  # no MR, so none before a text
    documents = text.split("<|endoftext|>")
    assert documents[-1] == ""  # every document ends with GPT-2's end-of-text
    held = {t for _, t in (line.split("||", 1) for line in miniature.delexicalised_lines(held_lines))}
    assert not held & set(documents)  # the held-out sentences, on which the base's loss is taken, are unseen
    assert sum("X-name" in d for d in documents) > 3000  # the training MRs' sentences
    assert "The leader of Aarhus is Jacob Bundsgaard." in documents  # WebNLG
    assert sum(d.startswith("MENENIUS:") for d in documents) > 10  # Shakespeare's paragraphs


def test_copy_test_sees_a_model_that_copies():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=1, n_head=1, n_embd=8))
    first, repeat = miniature.copy_test(model, n=4, length=20)
    assert abs(first - repeat) < 0.3 and 3 < first < 5  # random weights: about ln(50) = 3.9 on both

    class Copier(torch.nn.Module):  # a perfect induction head: from the repeat on, predicts the token 20 back
        config, transformer = model.config, model.transformer

        def forward(self, x):
            logits = torch.zeros(*x.shape, 50)  # uniform on the first occurrence: ln(50)
            for t in range(19, x.size(1)):  # position t predicts x[t + 1], which is x[t + 1 - 20] in the repeat
                logits[:, t] = -30.0
                logits[:, t].scatter_(1, x[:, t - 19, None], 0.0)
            return logits, None

    first, repeat = miniature.copy_test(Copier(), n=4, length=20)
    assert first == pytest.approx(3.912, abs=1e-3) and repeat < 1e-9


def test_end_of_text_reads_a_sentence_as_a_document_and_a_pair_as_prepare_data_stores_it():
    encoding, seen = prepare_data.load_encoding(), []

    class Ender(torch.nn.Module):  # logit 10 on <|endoftext|>, 0 elsewhere: -log p = log(1 + 50256 / e^10)
        config, transformer = GPTConfig(), GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4)).transformer
        name_or_path = "scratch"  # GPT-2's BPE

        def hidden_states(self, x):
            seen.append(x[0].tolist())
            return torch.zeros(*x.shape, 4)

        def lm_head(self, h):
            logits = torch.zeros(*h.shape[:-1], 50257)
            logits[..., 50256] = 10.0
            return logits

    loss = miniature.end_of_text(Ender(), ["X-name is a pub .", "name : X-name || X-name is a pub ."])
    assert loss == pytest.approx(math.log(1 + 50256 * math.exp(-10)), abs=1e-4)  # fp32 over 50,257 logits
    sentence = encoding.encode_ordinary("X-name is a pub .")
    pair = encoding.encode_ordinary("name : X-name ||") + encoding.encode_ordinary(" X-name is a pub .")
    assert seen == [[50256, *sentence], pair]  # the sentence after an <|endoftext|>; the pair as it trains


def tables(doc: str) -> list[str]:
    """A report's tables (Table 7's too), every cell that times something (`12 s`, `+3.1%`) blanked."""
    lines, in_table7 = [], False
    for line in doc.splitlines():
        in_table7 = line == "```" if line.startswith("```") else in_table7  # the commands are in a ```bash block
        if line.startswith("|") or (in_table7 and line != "```"):
            lines.append(re.sub(r"(?<=\| )[+-]?[\d.]+ ?(s|%)(?= \|)", r"\1", line))  # times and latencies blanked
    return lines


def test_a_learning_rate_beyond_the_grid_is_tried_where_the_best_is_at_its_end():
    grid = (1e-3, 2e-3, 4e-3)
    assert miniature.beyond_the_edge({1e-3: 1.5, 2e-3: 1.4, 4e-3: 1.45}, grid, 2) is None  # the best is inside
    assert miniature.beyond_the_edge({1e-3: 1.5, 2e-3: 1.4, 4e-3: 1.3}, grid, 2) == 8e-3
    assert miniature.beyond_the_edge({1e-3: 1.2, 2e-3: 1.4, 4e-3: 1.5}, grid, 2) == 5e-4
    still_falling = {1e-3: 1.5, 2e-3: 1.4, 4e-3: 1.3, 8e-3: 1.2, 1.6e-2: 1.1}
    assert miniature.beyond_the_edge(still_falling, grid, 2) is None  # two were added on that side already
    assert miniature.beyond_the_edge(still_falling, grid, 3) == 3.2e-2
    assert miniature.beyond_the_edge({1e-3: 1.5, 2e-3: 1.4, 4e-3: 1.3, 8e-3: 1.35}, grid, 2) is None  # inside now
    assert miniature.beyond_the_edge({1e-3: 1.0}, (1e-3,), 2) is None  # one candidate: no range to leave


def test_quick_sweep_writes_the_tables_again_from_the_seed_reads_complete_rows_and_resumes_one(tmp_path, capsys):
    out = str(tmp_path / "mini")
    argv = ["--quick", "--out", out, "--doc", str(tmp_path / "docs" / "miniature.md"), *LOCAL, "--seed", "5", "--gap"]
    argv += ["--dtype", "bfloat16"]  # where attention is written out to train: choices that change numbers
    report = miniature.main(argv)
    printed = capsys.readouterr().out
    # base; Table 3: FT, FT^Top2, 2 Adapter^L, Adapter^H, PreLayer at 1 lr each, the two LoRA at 2 lrs each, and
    # each of the 8 at a second seed; Table 5's Wq (Wq, Wv is Table 3's); Table 6's r = 8 and 64 (4 is Table 3's);
    # Fig. 2's one size not in Table 3 (PreLayer of 2)
    # --gap: a base of 4 steps and one of 1 block; FT and LoRA q,v longer, LoRA r=8 on every projection, α = 64,
    # FT and LoRA q,v on each base
    n_runs = 1 + 6 + 2 + 2 + 8 + 1 + 2 + 1 + (2 + 2 + 1 + 1 + 4)
    assert f"[{n_runs}/{n_runs}]" in printed and f"[{n_runs + 1}/" not in printed
    doc = (tmp_path / "docs" / "miniature.md").read_text()
    headings = ("## The base", "## Table 3", "## Table 5", "## Table 6", "## What closes", "## Fig. 3", "## Commands")
    for heading in headings:
        assert heading in doc
    assert doc.count("python train.py ") == n_runs
    assert all(
        (tmp_path / "docs" / f"miniature-{n}.png").stat().st_size > 1000 for n in ("phi", "rank", "loss", "fig2")
    )
    assert [row["trainable"] for row in report["fig2"]["PreLayer"]] == [2 * 2 * 2 * 32]  # 2 blocks, 2 positions
    t3 = report["table3"]
    assert t3["LoRA r=4 q,v"]["trainable"] == 2 * 2 * 4 * (32 + 32)  # 2 blocks × (q, v) × r × (d_in + d_rows)
    assert t3["LoRA r=4 q,v"]["lr"] in (4e-3, 8e-3) and t3["fine-tuning"]["lr"] == 1e-3
    tuned = report["tuning"]["LoRA r=4 q,v"]
    assert t3["LoRA r=4 q,v"]["val_loss"] == min(tuned.values())  # the lower held-out loss won
    assert t3["fine-tuning"]["beam"]["mrs"] == 4 and 0 <= t3["fine-tuning"]["beam"]["name_realised"] <= 1
    for row in t3.values():  # every method decoded at each of its seeds, on both splits
        assert [r["seed"] for r in [row, *row["more_seeds"]]] == [5, 6]
        assert all(r["beam"]["mrs"] == r["held_out"]["mrs"] == 4 for r in [row, *row["more_seeds"]])
    lora_row = f"| LoRA r=4 q,v | {t3['LoRA r=4 q,v']['trainable']:,} ("
    spread = next(line for line in doc.splitlines() if line.startswith(lora_row))
    assert spread.count(" ± ") == 4  # held-out loss and BLEU, test BLEU and NIST (no Java for the rest in --quick)
    beside = next(line for line in doc.splitlines() if line.startswith("| LoRA r=4 q,v | 0.35M | 70.4 ± .1 | +2.2 | "))
    assert beside.count(" (beyond) |") + beside.count(" (within) |") == 3  # test BLEU, held-out BLEU and loss
    gap = report["gap"]
    assert gap["LoRA r=8 q,k,v,o,mlp"]["trainable"] == 2 * 8 * (4 * (32 + 32) + (32 + 128) + (128 + 32))
    assert {row["lr"] for name, row in gap.items() if row["of"] == "fine-tuning"} == {t3["fine-tuning"]["lr"]}
    longer = gap["LoRA r=4 q,v, 0.02 epochs"]  # 11 steps of 8 pairs; half an epoch, 261 steps, is past its end
    assert [step for step, _ in longer["curve"]] == [0, 11] and "alpha 64" in gap["LoRA r=4 q,v, α = 64"]["command"]
    assert "--base " + os.path.join(out, "base-4 ") in gap["fine-tuning, 4-step base"]["command"]
    assert "--base " + os.path.join(out, "base-1blocks") in gap["LoRA r=4 q,v, 1-block base"]["command"]
    assert gap["LoRA r=4 q,v, 1-block base"]["trainable"] == t3["LoRA r=4 q,v"]["trainable"] // 2  # 1 block of 2
    assert "--n-layer 1 " in report["gap_bases"]["1-block"]["command"]
    per_block = {"FT^Top2": 12 * 32 * 32 + 13 * 32, "Adapter^L (small)": 2 * 32 + 2 * 32 * 6 + 6 + 32}
    per_block |= {"Adapter^H": 2 * (2 * 32 * 128 + 128 + 32), "PreLayer": 2 * 8 * 32}  # keys and values, 8 positions
    assert all(t3[name]["trainable"] == 2 * count for name, count in per_block.items())  # 2 blocks
    assert report["table5"]["Wq, Wv"]["folder"] == t3["LoRA r=4 q,v"]["folder"]  # one run, two tables
    rows = [row for table in ("table3", "table5", "table6") for row in report[table].values()]
    assert {row["seed"] for row in rows} == {report["base"]["seed"]} == {5}  # the report records each row's seed
    assert all(f"| {row['lr']:g} | 5 | {row['val_loss']:.3f} |" in doc for row in rows)

    # same seed, same result: another sweep into another folder writes the same tables
    again = str(tmp_path / "again")
    miniature.main(["--quick", "--out", again, *LOCAL, "--seed", "5", "--dtype", "bfloat16", "--gap"])
    with open(os.path.join(again, "miniature.md"), encoding="utf-8") as f:
        assert len(tables(doc)) > 30 and tables(f.read()) == tables(doc)

    # a complete sweep is read, not rerun; a row whose done.json is gone resumes from its checkpoint
    row = report["table6"]["r = 8"]["folder"]
    os.remove(os.path.join(row, "done.json"))
    stamp = os.path.getmtime(os.path.join(t3["fine-tuning"]["folder"], "model.safetensors"))
    miniature.main(argv)
    assert os.path.getmtime(os.path.join(t3["fine-tuning"]["folder"], "model.safetensors")) == stamp
    with open(os.path.join(row, "done.json")) as f:
        record = json.load(f)
    assert record["resumed"] is True

    # a row of another sweep (another command) in the same --out is refused, not mixed into the tables
    with open(os.path.join(row, "done.json"), "w") as f:
        json.dump(record | {"command": record["command"] + " --seed 7"}, f)
    with pytest.raises(SystemExit) as error:
        miniature.main(argv)
    assert "was trained by another command" in str(error.value) and "\n" not in str(error.value)


def test_a_missing_local_copy_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        miniature.main(["--quick", "--out", str(tmp_path), "--e2e", str(tmp_path / "nowhere"), *LOCAL[:2]])
    assert str(error.value).startswith("lab.miniature: error: --e2e ") and "no such file" in str(error.value)
