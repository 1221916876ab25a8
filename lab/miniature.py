"""The paper's GPT-2 results in miniature, on a CPU: a small base that knows the language, then Tables 3, 5, 6
and Figs. 2 and 3 on E2E NLG, from one command.

    python -m lab.miniature                  # the whole sweep; writes docs/miniature.md and its plots
    python -m lab.miniature --quick          # the same plumbing on tiny shapes, in a minute or two
    python -m lab.miniature --gap            # then what closes LoRA's gap to fine-tuning on the held-out MRs

1. **Data.** Tiny Shakespeare, E2E (valid, test) and WebNLG 2017's dev texts are downloaded (or read from
   local copies: --shakespeare, --e2e, --webnlg). E2E's train split is not used: its valid split is the
   training set, less a held-out tenth of its meaning representations (MRs) on which every learning rate
   is chosen; the test split is only ever scored. `name` and `near` are delexicalised, as the challenge's
   baseline TGen did (Dušek and Jurčíček, 2016): "X-name" and "X-near" in MRs and texts, the real names
   put back after decoding. A base this small has no copying circuit (see `copy_test`), and a name
   seen once in an MR is what only copying can write.
2. **The base** (`train.py --base scratch --rank 0`): unlabeled English that has the domain's words and
   sentences but never the task (no MR ever precedes a sentence) and nothing of the test split: tiny
   Shakespeare's paragraphs, the delexicalised target sentences of the training MRs, WebNLG's texts,
   shuffled together. Its held-out loss is taken on the held-out MRs' sentences, which it never saw.
3. **The rows.** Each is one `train.py` run on the E2E pairs (LoRA, a method of lab/methods.py, or
   --rank 0), its run folder under --out; a complete folder is skipped, an interrupted one resumed, so a
   killed sweep goes on where it stopped. Table 3 compares LoRA with fine-tuning and the methods it replaces
   (§5.1), each at its best learning rate on the held-out MRs, over several seeds, on the held-out MRs and
   the test MRs (the paper's beam search); Tables 5 and 6 and Fig. 2 (quality against trainable parameters)
   are decoded greedily. Every decoding is scored with the challenge's metrics (lab.e2e_metrics).
4. **The analysis** (§7): φ between the r=8 and r=64 adapters (Fig. 3), ΔW against W (Table 7).
5. **The gap** (--gap, after the sweep and timed apart): where LoRA trails fine-tuning on the held-out MRs,
   Table 3's rows trained longer, LoRA at other ranks, targets and α, and both on a base of less pre-training
   and on one of fewer blocks.

Output: --out/miniature.md (and its plots), copied to --doc (docs/miniature.md for the full sweep).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

import prepare_data
import sample
import train
from bench import describe_device, timed
from lab import command_line
from lab.analysis import amplification_tables, format_table, plot_similarity, similarity
from lab.e2e import decode, load_run
from lab.e2e_metrics import METRICS, group_pairs, score
from model import GPT
from utils import (
    add_hardware_flags,
    atomic_path,
    autocast,
    describe_dtype,
    for_inference,
    read_text,
    resolve_device,
    resolve_dtype,
)

WEBNLG_URL = "https://raw.githubusercontent.com/microsoft/LoRA/main/examples/NLG/data/webnlg_challenge_2017/dev.json"
PLACEHOLDERS = {"name": "X-name", "near": "X-near"}  # TGen's spelling
HELD_OUT_EVERY = 10  # every 10th MR of the valid split is held out for choosing learning rates


# ---- 1. data ---------------------------------------------------------------------------------------------


def read_sources(shakespeare: str | None, e2e: str | None, webnlg: str | None) -> dict[str, str]:
    """The four texts the sweep needs, each from a local copy when given, else downloaded."""

    def get(path: str | None, url: str, what: str, flag: str) -> str:
        return read_text(path, flag) if path else prepare_data.download(url, what)

    e2e_path = {split: e2e and os.path.join(e2e, f"{split}.txt") for split in ("valid", "test")}
    return {
        "shakespeare": get(shakespeare, prepare_data.SHAKESPEARE_URL, "tiny Shakespeare", "--shakespeare "),
        **{
            split: get(e2e_path[split], prepare_data.E2E_URL.format(split=split), f"E2E's {split}.txt", "--e2e ")
            for split in ("valid", "test")
        },
        "webnlg": get(webnlg, WEBNLG_URL, "WebNLG 2017's dev.json", "--webnlg "),
    }


def parse_mr(context: str) -> dict[str, str]:
    """'name : Alimentum | area : city centre' -> {'name': 'Alimentum', 'area': 'city centre'}."""
    slots = {}
    for field in context.split("|"):
        slot, _, value = field.partition(":")
        slots[slot.strip()] = value.strip()
    return slots


def delexicalise(context: str, target: str = "") -> tuple[str, str]:
    """The MR and text with the values of `name` and `near` replaced by X-name and X-near."""
    slots = parse_mr(context)
    for slot, placeholder in PLACEHOLDERS.items():
        if slot in slots:
            context = context.replace(f"{slot} : {slots[slot]}", f"{slot} : {placeholder}")
            target = target.replace(slots[slot], placeholder)
    return context, target


def relexicalise(text: str, context: str) -> str:
    """A decoded text with X-name and X-near replaced by the values of the (original) MR."""
    slots = parse_mr(context)
    for slot, placeholder in PLACEHOLDERS.items():
        text = text.replace(placeholder, slots.get(slot, placeholder))
    return text


def split_pairs(valid: str) -> tuple[list[str], list[str]]:
    """E2E valid's `context||target` lines as (training lines, held-out lines): every HELD_OUT_EVERY-th
    MR, with all its references, is held out."""
    contexts = list(dict.fromkeys(line.split("||", 1)[0] for line in valid.splitlines() if line.strip()))
    held_out = set(contexts[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY])
    train, held = [], []
    for line in valid.splitlines():
        if line.strip():
            (held if line.split("||", 1)[0] in held_out else train).append(line)
    return train, held


def delexicalised_lines(lines: list[str]) -> list[str]:
    return ["||".join(delexicalise(*(part.strip() for part in line.split("||", 1)))) for line in lines]


def webnlg_texts(dev_json: str) -> list[str]:
    """The English texts of WebNLG's dev.json (its `lexicalisations`)."""
    try:
        entries = json.loads(dev_json)["entries"]
        return [lex["lex"] for entry in entries for item in entry.values() for lex in item["lexicalisations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"WebNLG's dev.json does not hold entries with lexicalisations ({e!r})") from None


def e2e_test_lines(sources: dict[str, str]) -> list[str]:
    """E2E test's `context||target` lines, as they are."""
    return [line for line in sources["test"].splitlines() if line.strip()]


SLOTS_THAT_DIFFER = ("Type", "near", "customer rating")  # between E2E's valid and test MRs


def slot_shares(path: str) -> dict[str, float]:
    """The share of the distinct MRs of a `context||target` file that have each slot of SLOTS_THAT_DIFFER."""
    contexts, _ = group_pairs(path)
    return {slot: sum(slot in parse_mr(c) for c in contexts) / len(contexts) for slot in SLOTS_THAT_DIFFER}


def pretraining_text(sources: dict[str, str], train_lines: list[str], held_lines: list[str], seed: int = 0) -> str:
    """Tiny Shakespeare's paragraphs, the training MRs' sentences (delexicalised, without their MRs) and
    WebNLG's texts, shuffled into one text, each document ended by <|endoftext|> as in GPT-2's
    pre-training: a base that never saw it cannot end a text (see `end_of_text`). A sentence that is
    also a reference of a held-out or a test MR (short ones recur: "X-name is a pub .") is left out,
    and so is a document that holds a test MR or reference."""
    unseen = {
        target
        for _, target in (line.split("||", 1) for line in delexicalised_lines(held_lines + e2e_test_lines(sources)))
    }
    sentences = [target for _, target in (line.split("||", 1) for line in delexicalised_lines(train_lines))]
    documents = [p.strip() for p in sources["shakespeare"].split("\n\n") if p.strip()]
    documents += [s for s in dict.fromkeys(sentences) if s not in unseen] + webnlg_texts(sources["webnlg"])
    leaked = leaks("\n\n".join(documents), e2e_test_lines(sources))  # a test reference inside a longer sentence
    documents = [d for d in documents if not any(s in d for s in leaked)]
    random.Random(seed).shuffle(documents)
    return "".join(d + prepare_data.END_OF_TEXT for d in documents)


def leaks(text: str, test: list[str]) -> list[str]:
    """The test MRs and references (as they are and delexicalised) that occur in `text`; [] when none."""
    found = []
    for line in test + delexicalised_lines(test):
        context, target = (part.strip() for part in line.split("||", 1))
        found += [s for s in (context, target) if s in text]
    return list(dict.fromkeys(found))


def example_length(line: str, encoding) -> int:
    """The tokens of a delexicalised `context||target` line as prepare_data.py stores it."""
    context, target = delexicalise(*(part.strip() for part in line.split("||", 1)))
    return len(encoding.encode_ordinary(context + prepare_data.PAIR_SEPARATOR + " " + target)) + 1


def write_data(sources: dict[str, str], folder: str, block_size: int) -> None:
    """The sweep's two data folders under `folder` (pretrain/, e2e/), its test MRs and the training MRs' names.
    A training pair longer than the base's context (`block_size` + 1 tokens: a row holds all
    but the last) is left out. Raises if the pre-training text holds anything of the test split."""
    train_lines, held_lines = split_pairs(sources["valid"])
    gpt2 = prepare_data.load_encoding()
    fits = [line for line in train_lines if example_length(line, gpt2) <= block_size + 1]
    print(f"{len(train_lines) - len(fits)} of the {len(train_lines)} training pairs are longer than the context")
    train_lines = fits
    text = pretraining_text(sources, train_lines, held_lines)
    leaked = leaks(text, e2e_test_lines(sources))
    if leaked:
        raise ValueError(f"the pre-training text holds {len(leaked)} test MRs or references, e.g. {leaked[0]!r}")
    files = {
        "pretrain.txt": text,
        "held-out-sentences.txt": "".join(
            line.split("||", 1)[1].strip() + prepare_data.END_OF_TEXT for line in delexicalised_lines(held_lines)
        ),
        "train-pairs.txt": "\n".join(delexicalised_lines(train_lines)),
        "held-out-pairs.txt": "\n".join(delexicalised_lines(held_lines)),
        "test.txt": "\n".join(e2e_test_lines(sources)),  # as it is: scored against the real references
        "train-names.txt": "\n".join(sorted({parse_mr(line.split("||", 1)[0])["name"] for line in train_lines})),
    }
    # the base's vocabulary: GPT-2's BPE trimmed to the tokens of the pre-training text and of the training
    # split's pairs, split as prepare_data.py splits them (prepare_data.trim_encoding); nothing of the test split
    pairs = [line.split("||", 1) for line in delexicalised_lines(train_lines + held_lines)]
    parts = [prepare_data.PAIR_SEPARATOR] + [p for context, target in pairs for p in (context, " " + target)]
    tokenizer = prepare_data.trim_encoding([files["pretrain.txt"], files["held-out-sentences.txt"], *parts])
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        with atomic_path(os.path.join(folder, name)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(content.rstrip("\n") + "\n")
    path = {name: os.path.join(folder, name) for name in files}
    held_out = path["held-out-sentences.txt"]
    prepare_data.prepare(path["pretrain.txt"], "pretrain", out_dir=folder, val_path=held_out, tokenizer=tokenizer)
    held_out = path["held-out-pairs.txt"]
    prepare_data.prepare(
        path["train-pairs.txt"], "e2e", "pairs", out_dir=folder, val_path=held_out, tokenizer=tokenizer
    )


# ---- 2. the base -----------------------------------------------------------------------------------------


@torch.no_grad()
def copy_test(model, n: int = 8, length: int = 30, seed: int = 0) -> tuple[float, float]:
    """Mean loss (nats) on `n` random token sequences of `length`, on their first occurrence and on their
    repeat right after it. A model that can copy (induction heads, Olsson et al. 2022) predicts the repeat:
    its loss there falls to a fraction of the first; a model that cannot scores both the same."""
    generator = torch.Generator().manual_seed(seed)
    sequence = torch.randint(model.config.vocab_size, (n, length), generator=generator)
    x = torch.cat([sequence, sequence], dim=1).to(model.transformer.wte.weight.device)
    model.eval()
    logits, _ = model(x[:, :-1])
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")
    return float(losses[:, : length - 1].mean()), float(losses[:, length - 1 :].mean())


@torch.no_grad()
def end_of_text(model, texts: list[str]) -> float:
    """Mean -log p(<|endoftext|>) right after each text: a sentence read as a document of its own (after
    an <|endoftext|>), or a `context||target` pair read as prepare_data.py stores it. GPT-2 ends a text by
    predicting it (its pre-training put it between documents); a base that never saw it gives it next to
    no probability, and fine-tuning must then teach a target's end from nothing."""
    encoding = sample.model_encoding(model)
    eot, separator = encoding.eot_token, encoding.encode_ordinary(prepare_data.PAIR_SEPARATOR)
    device, losses = model.transformer.wte.weight.device, []
    model.eval()
    for text in texts:
        context, is_pair, target = (part.strip() for part in text.partition("||"))
        if is_pair:
            tokens = encoding.encode_ordinary(context) + separator + encoding.encode_ordinary(" " + target)
        else:
            tokens = [eot] + encoding.encode_ordinary(context)
        last = model.hidden_states(torch.tensor([tokens], device=device))[0, -1]  # logits of the last position alone
        losses.append(-float(torch.log_softmax(model.lm_head(last).float(), dim=-1)[eot]))
    return sum(losses) / len(losses)


# ---- 3. the rows -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """The sizes of a sweep: the base's shape and pre-training, the fine-tuning recipe, the decoding."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 128  # every delexicalised E2E example fits
    base_iters: int = 800
    base_batch: int = 16
    base_lr: float = 2e-3
    epochs: float = 1.0  # passes over the 4,179 training pairs
    batch_size: int = 8
    eval_iters: int | None = None  # held-out batches per evaluation; None: every held-out pair
    curve_points: int = 4  # held-out losses logged per Table 3 run, for the loss curves
    # The candidates for each method's learning rate, chosen on the held-out MRs. Each grid holds inside its ends
    # the rate of lowest held-out loss in earlier sweeps, so that no candidate past an end (beyond_the_edge) is
    # needed: FT^Top2's 0.002 and PreLayer's 0.3 were at their grids' upper ends once, a candidate more each
    full_lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3)
    ft_top_lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    lora_lrs: tuple[float, ...] = (2e-3, 4e-3, 1e-2)
    adapter_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # Adapter^H and Adapter^L
    # PreLayer, trained directly (no reparametrisation): its keys and values are activations (rms 0.2 to 0.7 in
    # the first block), which move by more than their own size (rms 1.1 to 1.9 at lr 0.12 to 0.25), while Adam
    # moves each element by about lr a step: it wants rates 10 to 100 times the other methods'
    prefix_lrs: tuple[float, ...] = (1e-1, 3e-1, 6e-1)
    lr_growth: int = 1  # candidates that may be added beyond either end of a grid, where the best one is (--lr-growth)
    seeds: int = 3  # Table 3: each method trained this many times at its learning rate (--seed, --seed + 1, ...)
    fig2_sizes: tuple[tuple[int, ...], ...] = ((8, 32, 128), (6, 32, 256), (2, 8, 32))  # FIG2's, in its order
    table5_rows: tuple[str, ...] | None = None  # TABLE5's rows to train; None: all
    table6_ranks: tuple[int, ...] = (1, 2, 4, 8, 64)  # 8 and 64 for Fig. 3
    gap_epochs: float = 3.0  # what closes the gap: Table 3's rows trained this long, the held-out loss every half epoch
    gap_ranks: tuple[int, ...] = (64,)  # ... LoRA on every projection at these ranks
    gap_alphas: tuple[int, ...] = (128,)  # ... LoRA r=4 q,v at these α (Table 3's: ALPHA)
    gap_base_iters: int = 400  # ... on a base pre-trained this many steps (Table 3's: base_iters)
    gap_base_layers: int = 2  # ... on a base of this many blocks, pre-trained as Table 3's (Table 3's: n_layer)
    overhead_trials: int = 20  # Table 3's latency column: forward passes of 1 × 128 timed per method
    test_mrs: int | None = None  # decode the first N test MRs; None: all 630
    num_beams: int = 10
    max_new_tokens: int = 64  # the authors' E2E decoding limit
    java: bool = True  # METEOR, ROUGE-L and CIDEr (they run on Java); False: BLEU and NIST only


QUICK = Scale(
    n_layer=2, n_head=2, n_embd=32, base_iters=8, base_batch=4, epochs=0.01, eval_iters=2, curve_points=2,
    full_lrs=(1e-3,), ft_top_lrs=(1e-3,), lora_lrs=(4e-3, 8e-3), adapter_lrs=(2e-3,), prefix_lrs=(1e-2,), seeds=2,
    overhead_trials=2,
    gap_epochs=0.02, gap_ranks=(8,), gap_alphas=(64,), gap_base_iters=4, gap_base_layers=1,
    fig2_sizes=((128,), (6,), (2,)), table5_rows=("Wq", "Wq, Wv"), table6_ranks=(4, 8, 64), test_mrs=4,
    num_beams=2, max_new_tokens=12, java=False, lr_growth=0,
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    """What one row trains: LoRA of `rank` on `targets`, a method of lab/methods.py, or (neither) every weight."""

    rank: int = 0
    targets: str = ""
    method: str = ""  # train.py --method, NAME=SIZE

    @property
    def kind(self) -> str:
        """'full', 'lora', or the method's name ('adapter-h', ...): which learning rates it is tried at."""
        return "lora" if self.rank else self.method.partition("=")[0] or "full"


ALPHA, LORA_DROPOUT = 32, 0.1  # the paper's E2E setting (Table 11)
# Table 3 (§5.1's baselines at the paper's sizes where the miniature allows: LoRA q,v r=4 is 16,384 parameters, 0.2%
# of the base's 7.3M (the paper's 0.35M is 0.1% of 355M; r=4 at d = 256 cannot be less); the small Adapter^L and
# PreLayer at about that budget, the large adapters at 7% of the base (the paper's 11.09M is 3%); FT^Top2, the last
# 2 of 4 blocks)
TABLE3 = {
    "fine-tuning": Row(),
    "FT^Top2": Row(method="ft-top=2"),
    "Adapter^L (small)": Row(method="adapter-l=6"),
    "Adapter^L (large)": Row(method="adapter-l=256"),
    "Adapter^H": Row(method="adapter-h=128"),
    "PreLayer": Row(method="prefix=8"),
    "LoRA r=4 q,v": Row(4, "q,v"),
    "LoRA r=4 q,k,v,o,mlp": Row(4, "q,k,v,o,mlp"),
}
# Table 5: one budget of trainable parameters (r·(number of matrices) = 8), spread over other weights
TABLE5 = {"Wq": Row(8, "q"), "Wk": Row(8, "k"), "Wv": Row(8, "v"), "Wo": Row(8, "o"), "Wq, Wk": Row(4, "q,k")}
TABLE5 |= {"Wq, Wv": Row(4, "q,v"), "Wq, Wk, Wv, Wo": Row(2, "q,k,v,o")}
# Fig. 2: quality against trainable parameters; LoRA's points are Table 6's ranks, these the other methods' sizes,
# each at its Table 3 learning rate (the Table 3 size is among them, trained once)
FIG2 = {"Adapter^H": "adapter-h", "Adapter^L": "adapter-l", "PreLayer": "prefix"}
# What closes the held-out gap (--gap, see gap_rows): the methods trained longer, and those trained on a base of less
# pre-training or fewer blocks
GAP_METHODS = ("fine-tuning", "LoRA r=4 q,v")


def learning_rates(scale: Scale, row: Row) -> tuple[float, ...]:
    """The candidates for a row's learning rate."""
    return {
        "full": scale.full_lrs,
        "ft-top": scale.ft_top_lrs,
        "lora": scale.lora_lrs,
        "adapter-h": scale.adapter_lrs,
        "adapter-l": scale.adapter_lrs,
        "prefix": scale.prefix_lrs,
    }[row.kind]


def beyond_the_edge(losses: dict[float, float], grid: tuple[float, ...], growth: int) -> float | None:
    """The learning rate to try next when the lowest held-out loss of `losses` (lr -> loss: the grid's candidates
    and those added to it) is at an end of the range tried: twice the largest, or half the smallest, unless
    `growth` were added beyond the grid on that side already. None when the best is inside the range (or the grid
    has one candidate)."""
    lrs = sorted(losses)
    best = min(lrs, key=lambda lr: losses[lr])
    if len(grid) < 2 or best not in (lrs[0], lrs[-1]):
        return None
    if best == lrs[-1]:
        added, lr = sum(lr > max(grid) for lr in lrs), 2 * best
    else:
        added, lr = sum(lr < min(grid) for lr in lrs), best / 2
    return lr if added < growth else None


def folder_name(row: Row, lr: float, seed: int = 0) -> str:
    """'lora-r4-q,v-lr0.004', 'adapter-h128-lr0.002' or 'full-lr0.0005' (and '-seed+1' for the sweep's seed + 1):
    one folder per run, whatever table shows it."""
    what = f"lora-r{row.rank}-{row.targets}" if row.rank else row.method.replace("=", "") or "full"
    return f"{what}-lr{lr:g}" + (f"-seed+{seed}" if seed else "")


def as_argv(flags: dict) -> list[str]:
    """{'n_layer': 4, 'lr': 0.001} -> ['--n-layer', '4', '--lr', '0.001']."""
    argv = []
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return argv


def finetune_argv(
    scale: Scale,
    out: str,
    meta: dict,
    row: Row,
    lr: float,
    curve: bool,
    seed: int,
    again: int = 0,
    varied: tuple[str, dict] = ("", {}),
) -> list[str]:
    """train.py's arguments for one row: the paper's E2E recipe (Table 11) at this scale, seeded `seed + again`.
    `meta` is the pairs' meta.json (how many training and held-out pairs); `varied`, a suffix of the run's
    folder and the train.py flags that differ from the recipe (see gap_rows)."""
    steps = math.ceil(scale.epochs * meta["train_examples"] / scale.batch_size)
    folder = os.path.join(out, folder_name(row, lr, again) + varied[0])
    flags = dict(base=os.path.join(out, "base"), data=os.path.join(out, "data", "e2e"), seed=seed + again)
    flags |= dict(run_dir=folder, batching="padded", epochs=scale.epochs)
    flags |= dict(batch_size=scale.batch_size, grad_accum=1, block_size=scale.block_size, schedule="linear")
    flags |= dict(warmup_iters=max(1, steps // 20), weight_decay=0.01, label_smoothing=0.1, lr=lr)
    flags |= dict(eval_iters=scale.eval_iters or math.ceil(meta["val_examples"] / scale.batch_size))
    flags |= dict(eval_interval=max(1, steps // scale.curve_points) if curve else steps, rank=row.rank)
    if row.rank:
        flags |= dict(alpha=ALPHA, targets=row.targets, lora_dropout=LORA_DROPOUT)
    if row.method:
        flags |= dict(method=row.method)
    return as_argv(flags | varied[1])


def base_argv(
    scale: Scale, out: str, seed: int, iters: int | None = None, n_layer: int | None = None, folder: str = "base"
) -> list[str]:
    """train.py's arguments for the base: from scratch (random weights), every weight trained, for `iters` steps,
    `n_layer` blocks (default: the scale's)."""
    iters, n_layer = iters or scale.base_iters, n_layer or scale.n_layer
    flags = dict(base="scratch", rank=0, n_layer=n_layer, n_head=scale.n_head, n_embd=scale.n_embd, seed=seed)
    flags |= dict(block_size=scale.block_size, batch_size=scale.base_batch, grad_accum=1, max_iters=iters)
    flags |= dict(lr=scale.base_lr, warmup_iters=max(1, iters // 12), eval_interval=max(1, iters // 6))
    flags |= dict(eval_iters=20, data=os.path.join(out, "data", "pretrain"), run_dir=os.path.join(out, folder))
    return as_argv(flags)


def gap_bases(scale: Scale) -> dict[str, tuple[str, dict]]:
    """The bases --gap also fine-tunes on, each Table 3's base with one setting changed: what it is -> (its
    folder, base_argv's changes)."""
    return {
        f"{scale.gap_base_iters}-step": (f"base-{scale.gap_base_iters}", dict(iters=scale.gap_base_iters)),
        f"{scale.gap_base_layers}-block": (f"base-{scale.gap_base_layers}blocks", dict(n_layer=scale.gap_base_layers)),
    }


def gap_rows(scale: Scale, out: str, meta: dict) -> dict[str, tuple[str, Row, tuple[str, dict]]]:
    """What might close LoRA's gap to fine-tuning on the held-out MRs, one setting at a time: name -> (the Table 3
    method it varies, trained at that method's learning rate; its row; finetune_argv's `varied`)."""
    epoch = math.ceil(meta["train_examples"] / scale.batch_size)  # steps
    longer = ("-epochs" + f"{scale.gap_epochs:g}", dict(epochs=scale.gap_epochs, eval_interval=max(1, epoch // 2)))
    rows = {f"{method}, {scale.gap_epochs:g} epochs": (method, TABLE3[method], longer) for method in GAP_METHODS}
    rows |= {
        f"LoRA r={r} q,k,v,o,mlp": ("LoRA r=4 q,k,v,o,mlp", Row(r, "q,k,v,o,mlp"), ("", {})) for r in scale.gap_ranks
    }
    rows |= {
        f"LoRA r=4 q,v, α = {alpha}": ("LoRA r=4 q,v", TABLE3["LoRA r=4 q,v"], (f"-alpha{alpha}", dict(alpha=alpha)))
        for alpha in scale.gap_alphas
    }
    rows |= {
        f"{method}, {name} base": (
            method,
            TABLE3[method],
            ("-" + folder.replace("-", ""), dict(base=os.path.join(out, folder))),
        )
        for name, (folder, _) in gap_bases(scale).items()
        for method in GAP_METHODS
    }
    return rows


def train_row(argv: list[str]) -> dict:
    """One train.py run, or what it left when it completed before (done.json): its command, train time,
    trainable parameters and held-out losses. An interrupted run is resumed from its checkpoint."""
    folder, command = argv[argv.index("--run-dir") + 1], "python train.py " + shlex.join(argv)
    done = os.path.join(folder, "done.json")
    if os.path.isfile(done):
        with open(done) as f:
            record = json.load(f)
        if record["command"] != command:  # another sweep's row: never mix two in one table
            raise ValueError(f"{folder} was trained by another command ({record['command']}): use another --out")
        return record
    resume = os.path.isfile(os.path.join(folder, "train_state.pt"))
    for stale in os.listdir(folder) if os.path.isdir(folder) else []:  # an earlier model's decodings go with it
        if stale.startswith("predictions-") or stale.endswith(("-beam.json", "-greedy.json")):
            os.remove(os.path.join(folder, stale))
    started = time.time()
    model = train.main(argv + ["--resume" if resume else "--overwrite"])
    with open(os.path.join(folder, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    record = {
        "command": command,
        "train_s": round(time.time() - started, 1),
        "resumed": resume,
        "seed": train.parse_args(argv).seed,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "curve": [(r["step"], r["val_loss"]) for r in log],
        "val_loss": log[-1]["val_loss"],
    }
    with atomic_path(done) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    return record


@torch.no_grad()
def inference_overhead(models: dict[str, GPT], base: GPT, trials: int, seed: int = 0) -> dict[str, float]:
    """Each model's latency over the base's, one forward pass of 1 × 128 tokens, as bench.py measures Table 1: the
    median of `trials` passes taken round-robin over the models (a slow spell of the machine hits them alike).
    LoRA runs merged (§4.1), so it is the base's own computation; an adapter adds layers; a prefix, keys."""
    models = {"base": base.eval()} | {name: model.eval() for name, model in models.items()}
    x = torch.randint(base.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(seed))
    x = x.to(base.lm_head.weight.device)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for trial in range(trials + 1):  # the first round warms up
        for name, model in models.items():
            took = timed(lambda: model(x), str(x.device))
            if trial:
                seconds[name].append(took)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {name: median[name] / median["base"] - 1 for name in models if name != "base"}


def score_row(folder: str, test: str, scale: Scale, beam: bool, device: str, dtype: str, seen: set[str]) -> dict:
    """Decode the MRs of `test` (E2E's test split, or the held-out pairs) with a row's model (delexicalised
    prompts, names put back) and score them: the five metrics and the share of MRs whose name the text
    realises. Cached in the row's folder, by the split's file name and the decoding."""
    kind = "beam" if beam else "greedy"
    split = os.path.splitext(os.path.basename(test))[0]
    path = os.path.join(folder, f"{split}-{kind}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    contexts, references = group_pairs(test)
    contexts, references = contexts[: scale.test_mrs], references[: scale.test_mrs]
    model, _ = load_run(folder, None)
    model.to(device).eval()
    started = time.time()
    settings = dict(num_beams=scale.num_beams, length_penalty=0.9) if beam else dict(num_beams=1)
    with autocast(device, resolve_dtype(device, dtype)):
        texts = decode(
            model, [delexicalise(c)[0] for c in contexts], 16 if beam else 128, scale.max_new_tokens, **settings
        )
    seconds = time.time() - started
    predictions = [relexicalise(text, context) for text, context in zip(texts, contexts)]
    names = [parse_mr(c)["name"] for c in contexts]
    realised = [name in prediction for name, prediction in zip(names, predictions)]
    record = {
        "decoding": f"beam {scale.num_beams}, length penalty 0.9" if beam else "greedy",
        "decode_s": round(seconds, 1),
        "mrs": len(contexts),
        "name_realised": sum(realised) / len(realised),
        "name_realised_unseen": [
            sum(r for r, n in zip(realised, names) if n not in seen),
            sum(n not in seen for n in names),
        ],
        **score(predictions, references, java=scale.java),
        "examples": [[c, p] for c, p in zip(contexts[:3], predictions[:3])],
    }
    name = f"predictions-{kind}.txt" if split == "test" else f"predictions-{split}-{kind}.txt"
    with atomic_path(os.path.join(folder, name)) as tmp, open(tmp, "w") as f:
        f.writelines(p + "\n" for p in predictions)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    return record


# ---- 4. the sweep, and what it writes --------------------------------------------------------------------


def sweep(args: argparse.Namespace) -> dict:
    """Data, base, then the rows of Tables 3, 5 and 6 (each trained unless complete, then decoded unless
    decoded); returns what the report shows."""
    scale, out, started = QUICK if args.quick else Scale(), args.out, time.time()
    scale = scale if args.lr_growth is None else replace(scale, lr_growth=args.lr_growth)
    device = resolve_device(args.device)
    resolve_dtype(device, args.dtype)  # a bad --dtype fails before any work
    hardware = [] if (args.device, args.dtype) == ("auto", "auto") else ["--device", args.device, "--dtype", args.dtype]
    data = os.path.join(out, "data")
    if not all(os.path.isfile(os.path.join(data, d, "meta.json")) for d in ("pretrain", "e2e")):
        print("preparing the data")
        write_data(read_sources(args.shakespeare, args.e2e, args.webnlg), data, scale.block_size)
    with open(os.path.join(data, "e2e", "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(data, "train-names.txt"), encoding="utf-8") as f:
        seen = set(f.read().splitlines())
    table5 = {name: row for name, row in TABLE5.items() if name in (scale.table5_rows or TABLE5)}
    table6 = {f"r = {r}": Row(r, "q,v") for r in scale.table6_ranks}
    fig2 = {
        name: [Row(method=f"{kind}={size}") for size in sizes]
        for (name, kind), sizes in zip(FIG2.items(), scale.fig2_sizes)
    }
    later = {folder_name(row, 0) for row in [*table5.values(), *table6.values()]} - {folder_name(Row(4, "q,v"), 0)}
    later |= {folder_name(row, 0) for rows in fig2.values() for row in rows} - {
        folder_name(r, 0) for r in TABLE3.values()
    }
    total = 1 + sum(len(learning_rates(scale, row)) + scale.seeds - 1 for row in TABLE3.values()) + len(later)
    total += (len(gap_bases(scale)) + len(gap_rows(scale, out, meta))) if args.gap else 0
    report, trained = {"scale": scale, "out": out, "runs": {}, "tuning": {}, "table3": {}}, []
    report["epoch_steps"] = math.ceil(meta["train_examples"] / scale.batch_size)

    def run(argv: list[str]) -> dict:
        """A train.py row (read if complete), with a progress line the first time the sweep meets it."""
        folder = argv[argv.index("--run-dir") + 1]
        if not os.path.isfile(os.path.join(folder, "done.json")):
            trained.append(folder)
        record = train_row(argv + hardware)
        if folder not in report["runs"]:
            report["runs"][folder] = record
            print(
                f"[{len(report['runs'])}/{total}] {folder}: trained in {record['train_s']:.0f} s, held-out loss "
                f"{record['val_loss']:.3f} ({(time.time() - started) / 60:.1f} minutes into this run)",
                flush=True,
            )
        return record | {"folder": folder}

    def decoded(row: dict, beam: bool) -> dict:
        return score_row(row["folder"], os.path.join(data, "test.txt"), scale, beam, device, args.dtype, seen)

    def run_decoded(row: Row, lr: float) -> dict:
        """A row of Tables 5 and 6 or Fig. 2: one seed, no curve, decoded greedily."""
        record = run(finetune_argv(scale, out, meta, row, lr, False, args.seed))
        return record | dict(lr=lr, greedy=decoded(record, False))

    report["base"] = run(base_argv(scale, out, args.seed))
    base = GPT.from_pretrained(os.path.join(out, "base"))
    with open(os.path.join(data, "held-out-sentences.txt"), encoding="utf-8") as f:
        held_out = [s for s in f.read().split(prepare_data.END_OF_TEXT) if s.strip()]
    report["copy_test"], report["end_of_text"] = copy_test(base), end_of_text(base, held_out)
    for method, table_row in TABLE3.items():  # each method at its learning rate of lowest held-out loss
        grid = learning_rates(scale, table_row)
        candidates = {lr: run(finetune_argv(scale, out, meta, table_row, lr, True, args.seed)) for lr in grid}
        while (
            lr := beyond_the_edge({c: r["val_loss"] for c, r in candidates.items()}, grid, scale.lr_growth)
        ) is not None:
            total += 1  # a candidate beyond the grid's end, where the best one is
            candidates[lr] = run(finetune_argv(scale, out, meta, table_row, lr, True, args.seed))
        lr = min(candidates, key=lambda lr: candidates[lr]["val_loss"])  # the held-out MRs, never the test split
        report["tuning"][method] = {lr: row["val_loss"] for lr, row in sorted(candidates.items())}
        report.setdefault("table3_runs", []).extend(row["folder"] for row in candidates.values())
        best = candidates[lr]
        report["table3"][method] = best | dict(lr=lr, beam=decoded(best, True), greedy=decoded(best, False))
        # the further seeds log no curve: the plot shows the first seed's (evaluating every quarter epoch costs time)
        again = [
            run(finetune_argv(scale, out, meta, table_row, lr, False, args.seed, i)) for i in range(1, scale.seeds)
        ]
        report["table3"][method]["more_seeds"] = [r | dict(beam=decoded(r, True)) for r in again]
        report["table3_runs"].extend(r["folder"] for r in again)
    held_out = os.path.join(data, "held-out-pairs.txt")
    with open(held_out, encoding="utf-8") as f:
        held_pairs = [line for line in f.read().splitlines() if line.strip()]
    for row in report["table3"].values():  # where a text ends; the held-out MRs, of the training split's kind
        row["end_of_text"] = end_of_text(load_run(row["folder"], None)[0].to(device), held_pairs)
        for seeded in [row, *row["more_seeds"]]:
            seeded["held_out"] = score_row(seeded["folder"], held_out, scale, False, device, args.dtype, seen)
    served = {name: load_run(row["folder"], None)[0] for name, row in report["table3"].items()}  # LoRA merged
    dtype = resolve_dtype(device, args.dtype)
    served = {name: for_inference(model, device, dtype) for name, model in served.items()}
    overhead = inference_overhead(served, for_inference(copy.deepcopy(base), device, dtype), scale.overhead_trials)
    for name, row in report["table3"].items():
        row["overhead"] = overhead[name]
    report["slots"] = {split: slot_shares(os.path.join(data, f"{split}.txt")) for split in ("train-pairs", "test")}
    lr = report["table3"]["LoRA r=4 q,v"]["lr"]  # Tables 5 and 6 at LoRA's learning rate, decoded greedily
    for table, rows in (("table5", table5), ("table6", table6)):
        report[table] = {}
        for name, table_row in rows.items():
            if table_row == TABLE3["LoRA r=4 q,v"]:  # Table 3's row, trained once
                report[table][name] = report["table3"]["LoRA r=4 q,v"]
                continue
            report[table][name] = run_decoded(table_row, lr)
    report["fig2"] = {}  # each method's sizes at its Table 3 learning rate (Adapter^L: the small one's), greedily
    in_table3 = {row: name for name, row in TABLE3.items()}  # a size Table 3 trains is its run
    for name, rows in fig2.items():
        lr = report["table3"][next(n for n, r in TABLE3.items() if r.kind == FIG2[name])]["lr"]
        report["fig2"][name] = [
            report["table3"][in_table3[row]] if row in in_table3 else run_decoded(row, lr) for row in rows
        ]
    invocation = dict(date=time.strftime("%Y-%m-%d %H:%M"), wall_s=time.time() - started, trained=len(trained))
    if args.gap:  # what closes the gap: after the sweep, timed apart from it
        gap_started, swept = time.time(), len(trained)
        report["gap_bases"] = {
            name: run(base_argv(scale, out, args.seed, folder=folder, **changes))
            for name, (folder, changes) in gap_bases(scale).items()
        }
        report["gap"] = {}
        for name, (method, row, varied) in gap_rows(scale, out, meta).items():
            lr = report["table3"][method]["lr"]
            record = run(finetune_argv(scale, out, meta, row, lr, True, args.seed, varied=varied))
            score = score_row(record["folder"], held_out, scale, False, device, args.dtype, seen)
            report["gap"][name] = record | dict(of=method, lr=lr, held_out=score)
        gap = dict(date=time.strftime("%Y-%m-%d %H:%M"), wall_s=time.time() - gap_started, trained=len(trained) - swept)
    with open(os.path.join(out, "invocations.jsonl"), "a") as f:  # how long each run of the sweep took
        f.writelines(
            json.dumps(record) + "\n" for record in [invocation] + ([gap | dict(gap=True)] if args.gap else [])
        )
    with open(os.path.join(out, "invocations.jsonl")) as f:
        report["invocations"] = [json.loads(line) for line in f if line.strip()]
    return report


def analyse(report: dict, figures: str) -> None:
    """§7 on Table 6's adapters: φ between r=8 and r=64 (Fig. 3, the heatmap of the last block), ΔW against
    W for r=4 and r=64 (Table 7, Wq of the last block)."""
    r8, r64, r4 = (os.path.join(report["table6"][f"r = {r}"]["folder"], "adapter.safetensors") for r in (8, 64, 4))
    records, _ = similarity(r8, r64, "A", "all", "q,v")
    last = max(r["layer"] for r in records)
    plot_similarity(
        [r for r in records if r["layer"] == last], ("r = 8", "r = 64"), "A", os.path.join(figures, "miniature-phi.png")
    )
    report["phi"] = [
        dict(
            layer=r["layer"],
            matrix=r["matrix"],
            dim=r["dim"],
            phi11=float(r["phi"][0, 0]),
            phi44=float(r["phi"][3, 3]),
        )
        for r in records
    ]
    report["table7"] = format_table(amplification_tables([r4, r64], None, "-1", "q", 0))


def plot(report: dict, figures: str) -> None:
    """The held-out loss of the Table 3 runs against the step, BLEU against the rank (Table 6), and Fig. 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    for method, row in report["table3"].items():
        steps, losses = zip(*row["curve"])
        ax.plot(steps, losses, marker="o", label=f"{method} (lr {row['lr']:g})")
    ax.set(xlabel="step (batch 8)", ylabel="held-out loss (nats)", title="E2E fine-tuning of the miniature base")
    ax.legend()
    fig.savefig(os.path.join(figures, "miniature-loss.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    ranks = [int(name.split()[-1]) for name in report["table6"]]
    ax.plot(
        ranks, [100 * row["greedy"]["BLEU"] for row in report["table6"].values()], marker="o", label="LoRA on Wq, Wv"
    )
    ax.axhline(100 * report["table3"]["fine-tuning"]["greedy"]["BLEU"], color="gray", ls="--", label="fine-tuning")
    ax.set(xscale="log", xlabel="rank r", ylabel="BLEU (greedy)", title="Table 6 in miniature")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.legend()
    fig.savefig(os.path.join(figures, "miniature-rank.png"), dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")  # Fig. 2 in miniature
    series = {"LoRA on Wq, Wv (r = 1 to 64)": list(report["table6"].values())} | report["fig2"]
    full = report["table3"]["fine-tuning"]
    for ax, (label, value) in zip(axes, (("held-out loss (nats)", "val_loss"), ("test BLEU (greedy)", "BLEU"))):

        def y(row: dict) -> float:
            return row["val_loss"] if value == "val_loss" else 100 * row["greedy"]["BLEU"]

        for name, rows in series.items():
            rows = sorted(rows, key=lambda row: row["trainable"])
            ax.plot([row["trainable"] for row in rows], [y(row) for row in rows], marker="o", label=name)
        ax.plot([full["trainable"]], [y(full)], marker="*", markersize=12, ls="", color="black", label="fine-tuning")
        ax.set(xscale="log", xlabel="trainable parameters", ylabel=label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fig. 2 in miniature: quality against trainable parameters")
    fig.savefig(os.path.join(figures, "miniature-fig2.png"), dpi=120)
    plt.close("all")


def metric_cells(row: dict) -> str:
    """BLEU, NIST, METEOR, ROUGE-L, CIDEr in the paper's units (BLEU, METEOR, ROUGE-L in %); '–' when not run."""
    percent = {"BLEU", "METEOR", "ROUGE_L"}
    return " | ".join(
        "–" if m not in row else f"{100 * row[m]:.1f}" if m in percent else f"{row[m]:.2f}" for m in METRICS
    )


def seeded(row: dict) -> list[dict]:
    """A Table 3 row's runs, one a seed: the one its learning rate was chosen with, then the others."""
    return [row, *row.get("more_seeds", [])]


# Table 3 over seeds: each column's value in a run, and how it is printed (factor, digits)
SEED_COLUMNS = {
    "held-out loss": (lambda r: r["val_loss"], 1, 3),
    "held-out BLEU": (lambda r: r["held_out"]["BLEU"], 100, 1),
    "test BLEU": (lambda r: r["beam"]["BLEU"], 100, 1),
    "NIST": (lambda r: r["beam"]["NIST"], 1, 2),
    "METEOR": (lambda r: r["beam"].get("METEOR", math.nan), 100, 1),
    "ROUGE-L": (lambda r: r["beam"].get("ROUGE_L", math.nan), 100, 1),
    "CIDEr": (lambda r: r["beam"].get("CIDEr", math.nan), 1, 2),
}


def spread(row: dict, column: str) -> tuple[float, float]:
    """Mean and sample standard deviation of a column over a row's seeds (nan with one seed)."""
    values = [SEED_COLUMNS[column][0](r) for r in seeded(row)]
    if any(math.isnan(v) for v in values):  # a metric not run (METEOR, ROUGE-L, CIDEr without Java)
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def spread_cell(row: dict, column: str) -> str:
    mean, std = spread(row, column)
    _, factor, digits = SEED_COLUMNS[column]
    return "–" if math.isnan(mean) else f"{factor * mean:.{digits}f} ± {factor * std:.{digits}f}"


def seeds_table(t3: dict[str, dict]) -> list[str]:
    """Table 3 over seeds, the held-out MRs (greedy) beside the test MRs (beam), and each method's
    differences from fine-tuning that exceed the spread of the seeds."""
    full = t3["fine-tuning"]
    head = "| | trainable | latency 1×128 | seeds | " + " | ".join(SEED_COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * (3 + len(SEED_COLUMNS))]
    lines += [
        f"| {name} | {row['trainable']:,} ({100 * row['trainable'] / full['trainable']:.3g}%) | "
        f"{100 * row['overhead']:+.1f}% | {len(seeded(row))} | "
        + " | ".join(spread_cell(row, column) for column in SEED_COLUMNS)
        + " |"
        for name, row in t3.items()
    ]
    return lines


def versus(row: dict, full: dict, column: str) -> str:
    """A row's mean minus fine-tuning's in a column, and whether it exceeds the sum of their seeds' standard
    deviations ('beyond' the spread, or 'within' it)."""
    (mean, std), (mean_full, std_full) = spread(row, column), spread(full, column)
    factor, digits = SEED_COLUMNS[column][1:]
    if math.isnan(std + std_full):
        beyond = "one seed"
    else:  # rounding's last bits are no difference
        beyond = "beyond" if abs(mean - mean_full) > max(std + std_full, 1e-9) else "within"
    return f"{factor * (mean - mean_full):+.{digits}f} ({beyond})"


# The paper's Table 3, GPT-2 M on E2E: trainable parameters, then BLEU, NIST, METEOR, ROUGE-L and CIDEr (± the
# spread over seeds where the paper gives one; the rows without it are other papers' figures, as it notes)
PAPER_TABLE3 = {
    "fine-tuning": ("354.92M", "68.2", "8.62", "46.2", "71.0", "2.47"),
    "FT^Top2": ("25.19M", "68.1", "8.59", "46.0", "70.8", "2.41"),
    "Adapter^L (small)": ("0.37M", "66.3", "8.41", "45.0", "69.8", "2.40"),
    "Adapter^L (large)": ("11.09M", "68.9", "8.71", "46.1", "71.3", "2.47"),
    "Adapter^H": ("11.09M", "67.3 ± .6", "8.50 ± .07", "46.0 ± .2", "70.7 ± .2", "2.44 ± .01"),
    "PreLayer": ("0.35M", "69.7", "8.81", "46.1", "71.4", "2.49"),
    "LoRA r=4 q,v": ("0.35M", "70.4 ± .1", "8.85 ± .02", "46.8 ± .2", "71.8 ± .1", "2.53 ± .02"),
}


def beside_the_paper(t3: dict[str, dict]) -> list[str]:
    """Each Table 3 method against fine-tuning, the paper's (BLEU) beside ours (test BLEU, held-out BLEU and loss,
    with whether each difference exceeds the seeds' spread), then the two orders of the methods."""
    full, paper_full = t3["fine-tuning"], float(PAPER_TABLE3["fine-tuning"][1])
    lines = [
        "| | the paper: trainable | BLEU | against FT | ours: trainable | test BLEU against FT | held-out BLEU "
        "against FT | held-out loss against FT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in t3.items():
        paper = PAPER_TABLE3.get(name)
        cells = [paper[0], paper[1], f"{float(paper[1].split()[0]) - paper_full:+.1f}"] if paper else ["–"] * 3
        cells.append(f"{100 * row['trainable'] / full['trainable']:.3g}%")
        cells += ["" if row is full else versus(row, full, c) for c in ("test BLEU", "held-out BLEU", "held-out loss")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def order(key) -> str:
        return " > ".join(sorted(t3, key=key))

    paper_bleu = {name: float(cells[1].split()[0]) for name, cells in PAPER_TABLE3.items()}
    return lines + [
        "",
        "Best first: the paper by BLEU, "
        + " > ".join(sorted(paper_bleu, key=lambda name: -paper_bleu[name]))
        + "; ours by mean test BLEU, "
        + order(lambda name: -spread(t3[name], "test BLEU")[0])
        + "; ours by mean held-out loss, "
        + order(lambda name: spread(t3[name], "held-out loss")[0])
        + ".",
    ]


def ratio(a: float, b: float) -> str:
    return f" ({100 * a / b:.0f}% of it)" if b > 0 else ""


def names_cell(row: dict) -> str:
    unseen, n_unseen = row["name_realised_unseen"]
    return f"{100 * row['name_realised']:.0f}% ({unseen}/{n_unseen} unseen)"


def decoded_texts(folder: str, kind: str) -> list[str]:
    """A row's decoded test texts (predictions-beam.txt or -greedy.txt), one per test MR."""
    with open(os.path.join(folder, f"predictions-{kind}.txt"), encoding="utf-8") as f:
        return f.read().splitlines()


def mean_words(folder: str, kind: str) -> float:
    """The mean length in words of a row's decoded test texts."""
    texts = decoded_texts(folder, kind)
    return sum(len(t.split()) for t in texts) / len(texts)


def unasked_rating(folder: str, kind: str, test: str) -> tuple[float, int]:
    """The share of a row's decoded test texts that state a rating, among the test MRs that have none; and
    how many such MRs there are. A slot the training MRs nearly always have, said where it was not asked."""
    contexts, _ = group_pairs(test)
    unasked = [t for c, t in zip(contexts, decoded_texts(folder, kind)) if "customer rating" not in parse_mr(c)]
    return sum("rating" in t for t in unasked) / max(len(unasked), 1), len(unasked)


def minutes(report: dict, decodes: dict[tuple[str, str], float]) -> list[str]:
    """The budget (Table 3 in at most 60 minutes once the learning rates are chosen, the sweep in 120), and where
    the minutes go."""
    t3, runs = report["table3"], report["runs"]
    chosen = {r["folder"] for row in t3.values() for r in seeded(row)}  # each method at its lr, every seed
    gap = {row["folder"] for rows in ("gap", "gap_bases") for row in report.get(rows, {}).values()}
    sweep_runs = {folder: run for folder, run in runs.items() if folder not in gap}
    sweep_decodes = {key: s for key, s in decodes.items() if key[0] not in gap}
    table3 = sum(runs[f]["train_s"] for f in chosen) + sum(s for (f, _), s in sweep_decodes.items() if f in chosen)
    wall = sum(i["wall_s"] for i in report["invocations"] if i["trained"] and not i.get("gap"))
    more = {r["folder"] for row in t3.values() for r in row["more_seeds"]}
    parts = {
        "the base": report["base"]["train_s"],
        "Table 3's learning-rate candidates": sum(runs[f]["train_s"] for f in report["table3_runs"] if f not in more),
        "Table 3's further seeds": sum(runs[f]["train_s"] for f in more),
        "Tables 5, 6 and Fig. 2": sum(
            run["train_s"]
            for f, run in sweep_runs.items()
            if f not in report["table3_runs"] and f != report["base"]["folder"]
        ),
        "beam search": sum(s for (_, kind), s in sweep_decodes.items() if kind == "beam"),
        "greedy decoding": sum(s for (_, kind), s in sweep_decodes.items() if kind != "beam"),
    }
    parts["the rest (data, scoring, the analysis, latency)"] = max(0.0, wall - sum(parts.values()))
    return [
        f"- **Time** (goals: Table 3 in at most 60 minutes once the learning rates are chosen, the whole sweep in "
        f"120): Table 3, each method at its learning rate with {report['scale'].seeds} seeds (training, beam search "
        f"on the test MRs, greedy decoding of the held-out and test MRs), took {table3 / 60:.1f} minutes "
        f"({'met' if table3 <= 3600 else 'missed'}); the whole sweep {wall / 60:.1f} minutes of wall time "
        f"({'met' if wall <= 7200 else 'missed'}). Where they went: "
        + ", ".join(f"{what} {s / 60:.1f}" for what, s in parts.items())
        + " minutes.",
    ]


def steadily_falling(rows: list[dict]) -> bool:
    """Whether the held-out loss falls from each run to the next."""
    return all(a["val_loss"] > b["val_loss"] for a, b in zip(rows, rows[1:]))


def findings(report: dict, decodes: dict[tuple[str, str], float]) -> list[str]:
    """The goals of the miniature, each with the numbers that meet or miss it."""
    t3, t6 = report["table3"], report["table6"]
    full, lora, every = t3["fine-tuning"], t3["LoRA r=4 q,v"], t3["LoRA r=4 q,k,v,o,mlp"]
    share = spread(lora, "test BLEU")[0] / max(spread(full, "test BLEU")[0], 1e-9)
    params = lora["trainable"] / full["trainable"]

    def edge(method: str) -> str:
        lrs = list(report["tuning"][method])  # in order
        where = {lrs[0]: "the smallest", lrs[-1]: "the largest"}.get(t3[method]["lr"], "inside the range")
        further = "" if where == "inside the range" else ": the best may lie beyond (`--lr-growth`)"
        return f"{where} of the candidates ({', '.join(f'{lr:g}' for lr in lrs)}){further}"

    greedy = {name: 100 * row["greedy"]["BLEU"] for name, row in t6.items()}
    test = os.path.join(report["out"], "data", "test.txt")
    unasked, unasked_lora = (unasked_rating(row["folder"], "beam", test) for row in (full, lora))
    by_bleu = sorted(t3, key=lambda name: -spread(t3[name], "test BLEU")[0])
    by_loss = sorted(t3, key=lambda name: spread(t3[name], "held-out loss")[0])
    return [
        f"- **LoRA r=4 on Wq, Wv against fine-tuning** (goal: within 5% of its test BLEU with at most 1% of its "
        f"trainable parameters): over {len(seeded(lora))} seeds, test BLEU {spread_cell(lora, 'test BLEU')} against "
        f"{spread_cell(full, 'test BLEU')}, {100 * share:.0f}% with {100 * params:.2f}% of the parameters: goal "
        f"{'met' if share >= 0.95 and params <= 0.01 else 'missed'}; the difference, "
        f"{versus(lora, full, 'test BLEU')}, against the seeds' spread. The beam's texts (seed {lora['seed']}) "
        f"average {mean_words(lora['folder'], 'beam'):.1f} words with LoRA, {mean_words(full['folder'], 'beam'):.1f} "
        "fine-tuned.",
        "- **In distribution and on test.** On the held-out MRs (the training split's kind of MR, delexicalised, "
        f"decoded greedily) BLEU is {spread_cell(full, 'held-out BLEU')} fine-tuned, "
        f"{spread_cell(lora, 'held-out BLEU')} with LoRA r=4 q,v ({versus(lora, full, 'held-out BLEU')}), "
        f"{spread_cell(every, 'held-out BLEU')} with LoRA on every projection; the held-out loss "
        f"{spread_cell(full, 'held-out loss')}, {spread_cell(lora, 'held-out loss')} "
        f"({versus(lora, full, 'held-out loss')}) and {spread_cell(every, 'held-out loss')}. The test split's MRs "
        "are of another mix (a type, a `near`, a customer rating in "
        + ", ".join(f"{100 * report['slots']['test'][slot]:.0f}%" for slot in SLOTS_THAT_DIFFER)
        + " of them; "
        + ", ".join(f"{100 * report['slots']['train-pairs'][slot]:.0f}%" for slot in SLOTS_THAT_DIFFER)
        + " of the training MRs), and the methods' order by test BLEU "
        + ("is" if by_bleu == by_loss else "is not")
        + " their order by held-out loss. Of the "
        f"{unasked[1]} test MRs without a customer rating, fine-tuning's beam texts state one in "
        f"{100 * unasked[0]:.0f}%, LoRA r=4 q,v's in {100 * unasked_lora[0]:.0f}%: fine-tuning writes the "
        "training MRs' usual slots more, asked or not.",
        f"- **Texts that realise their MRs** (goal: the name in at least 90% of the test texts): "
        f"fine-tuning {100 * full['beam']['name_realised']:.0f}%, LoRA r=4 q,v {100 * lora['beam']['name_realised']:.0f}%.",
        f"- **More weights, more rank**: LoRA on every projection reaches BLEU {100 * every['beam']['BLEU']:.1f} "
        f"with beam search and {100 * every['greedy']['BLEU']:.1f} greedily ({every['trainable']:,} parameters, "
        f"{100 * every['trainable'] / full['trainable']:.2f}% of fine-tuning's); on Wq, Wv greedily, r = 1 to 64 give "
        + ", ".join(f"{v:.1f}" for v in greedy.values())
        + f", fine-tuning {100 * full['greedy']['BLEU']:.1f}.",
        "- **What the methods cost at inference** (§3, Table 1): one forward pass of 1 × 128 tokens against the "
        "base's, "
        + ", ".join(f"{name} {100 * row['overhead']:+.0f}%" for name, row in t3.items())
        + " (LoRA merged is the base's own computation; an adapter adds layers, a prefix keys and values).",
        "- **Quality against size** (Fig. 2; the paper, on GPT-3: prefix tuning's quality does not grow steadily "
        "with its length): the held-out loss of "
        + "; ".join(
            f"{name} at {', '.join(map(str, sizes))}: "
            + ", ".join(f"{row['val_loss']:.3f}" for row in rows)
            + (" (falls with every size)" if steadily_falling(rows) else " (not falling with every size)")
            for (name, rows), sizes in zip(report["fig2"].items(), report["scale"].fig2_sizes)
        )
        + "; LoRA on Wq, Wv at r = "
        + ", ".join(name.split()[-1] for name in t6)
        + ": "
        + ", ".join(f"{row['val_loss']:.3f}" for row in t6.values())
        + (" (falls with every rank)." if steadily_falling(list(t6.values())) else " (not falling with every rank)."),
        "- **Learning rates**: each method's lowest held-out loss is at "
        + "; ".join(f"{method}: lr {t3[method]['lr']:g}, {edge(method)}" for method in report["tuning"])
        + ".",
        *minutes(report, decodes),
        "- **What LoRA needs from the base.** LoRA changes a few projections of the base by a low-rank ΔW, "
        "which amplifies directions W already has (§7.3); what the base cannot do at all, LoRA has to learn in "
        f"{lora['trainable']:,} parameters. Ending a text is such an ability: this base was pre-trained with "
        "<|endoftext|> after each document, as GPT-2 was, and after the held-out references -log p(<|endoftext|>) "
        f"is {lora['end_of_text']:.2f} nats with LoRA r=4 q,v, {full['end_of_text']:.2f} fine-tuned. The first base "
        "of this page never saw the token, and there LoRA reached 76% of fine-tuning's BLEU ([below](#the-design)). "
        "Copying is another, which this base still lacks (the copy test): the names are delexicalised for it.",
    ]


def gap_section(report: dict) -> list[str]:
    """What closes LoRA's gap to fine-tuning on the held-out MRs (--gap): each variation of a Table 3 row beside
    that row, the held-out loss of the longer runs every half epoch, and LoRA's gap in each setting."""
    gap, t3, scale = report["gap"], report["table3"], report["scale"]
    lines = [
        "## What closes LoRA's gap on the held-out MRs",
        "",
        "Table 3's rows varied one setting at a time (`--gap`), each at its Table 3 learning rate, seed "
        f"{report['base']['seed']}: trained {scale.gap_epochs:g} epochs (the held-out loss every half epoch, the "
        "learning rate decaying over all of them); LoRA at other ranks and α; and on two other bases, one "
        f"pre-trained {scale.gap_base_iters} steps instead of {scale.base_iters}, one of {scale.gap_base_layers} "
        f"blocks instead of {scale.n_layer} (their held-out losses "
        + " and ".join(f"{row['val_loss']:.3f}" for row in report["gap_bases"].values())
        + f", this page's base {report['base']['val_loss']:.3f}). The held-out loss is the number to move: test "
        "BLEU alone does not show the gap.",
        "",
        "| | varies | lr | trainable | held-out loss | against its Table 3 run | held-out BLEU (greedy) |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {row['of']} | {row['lr']:g} | {row['trainable']:,} | {row['val_loss']:.3f} | "
            f"{row['val_loss'] - t3[row['of']]['val_loss']:+.3f} | {100 * row['held_out']['BLEU']:.1f} |"
            for name, row in gap.items()
        ),
        "",
    ]
    lowest = {}  # the longer runs: (epoch, held-out loss) at their lowest
    for name, row in gap.items():
        if name.endswith(" epochs"):
            curve = [(step / report["epoch_steps"], loss) for step, loss in row["curve"]]
            lowest[row["of"]] = min(curve, key=lambda point: point[1])
            lines.append(
                f"- {name}: the held-out loss at epochs "
                + ", ".join(f"{epoch:.1f}: {loss:.3f}" for epoch, loss in curve)
                + f"; lowest at epoch {lowest[row['of']][0]:.1f}."
            )
    full, lora = t3["fine-tuning"], t3["LoRA r=4 q,v"]
    on_base = {
        base: {row["of"]: row["val_loss"] for n, row in gap.items() if n.endswith(f" {base} base")}
        for base in report["gap_bases"]
    }
    lines += [
        "",
        f"The gap, LoRA's held-out loss minus fine-tuning's: LoRA r=4 q,v {versus(lora, full, 'held-out loss')} in "
        f"Table 3 ({len(seeded(lora))} seeds' means, {scale.epochs:g} epoch; seed {lora['seed']} alone "
        f"{lora['val_loss'] - full['val_loss']:+.3f}); {lowest['LoRA r=4 q,v'][1] - lowest['fine-tuning'][1]:+.3f} "
        f"trained {scale.gap_epochs:g} epochs, each at its lowest; "
        + "".join(
            f"{losses['LoRA r=4 q,v'] - losses['fine-tuning']:+.3f} on the {base} base; "
            for base, losses in on_base.items()
        )
        + ", ".join(
            f"{name} {row['val_loss'] - full['val_loss']:+.3f}"
            for name, row in gap.items()
            if not name.endswith((" epochs", " base"))
        )
        + f" ({scale.epochs:g} epoch, against the same seed's fine-tuning).",
        "",
    ]
    return lines


def report_markdown(report: dict, args: argparse.Namespace) -> str:
    """docs/miniature.md: what was run, on what, and the tables."""
    scale, t3, base = report["scale"], report["table3"], report["base"]
    head = "| | trainable | lr | seed | held-out loss | train | BLEU | NIST | METEOR | ROUGE-L | CIDEr | name in the text |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"

    def table(rows: dict[str, dict], decoding: str) -> list[str]:
        return [head, rule] + [
            f"| {name} | {r['trainable']:,} | {r['lr']:g} | {r['seed']} | {r['val_loss']:.3f} | {r['train_s']:.0f} s | "
            f"{metric_cells(r[decoding])} | {names_cell(r[decoding])} |"
            for name, r in rows.items()
        ]

    full, lora = t3["fine-tuning"], t3["LoRA r=4 q,v"]
    first, repeat = report["copy_test"]
    runs = list(report["runs"].values())  # the base first
    decodes = {
        (run["folder"], kind): run[kind]["decode_s"]
        for t in ("table3", "table5", "table6")
        for row in report[t].values()
        for run in seeded(row)
        for kind in ("beam", "greedy", "held_out")
        if kind in run
    } | {(row["folder"], "greedy"): row["greedy"]["decode_s"] for rows in report["fig2"].values() for row in rows}
    train_s, decode_s = sum(r["train_s"] for r in runs), sum(decodes.values())
    device = resolve_device(args.device)
    trained_on = ([i["date"][:10] for i in report["invocations"] if i["trained"]] or [time.strftime("%Y-%m-%d")])[-1]
    lines = [
        "# The paper's GPT-2 results in miniature",
        "",
        f"Made by `python -m lab.miniature{' --quick' * args.quick}{' --gap' * args.gap}"
        f"{f' --lr-growth {args.lr_growth}' * (args.lr_growth is not None)}` on {describe_device(device)}, torch "
        f"{torch.__version__}, {describe_dtype(device, args.dtype)}, {trained_on}. {len(runs)} "
        f"training runs took {train_s / 60:.1f} minutes, decoding and scoring {decode_s / 60:.1f}; the command "
        "took "
        + ", then ".join(
            f"{i['wall_s'] / 60:.1f} minutes training {i['trained']} runs{' of --gap' * i.get('gap', False)} ({i['date']})"
            for i in report["invocations"]
            if i["trained"]
        )
        + " (a complete row is read, not rerun: a run that trains none takes seconds). The design, and why it is a fair small analogue of the "
        "paper's setting: [below](#the-design).",
        "",
        "## What it shows",
        "",
        *findings(report, decodes),
        "",
        "## The base",
        "",
        f"`train.py --base scratch --rank 0`: {scale.n_layer} blocks × {scale.n_embd} wide, {scale.n_head} heads, "
        f"{base['trainable']:,} parameters; {scale.base_iters} steps of {scale.base_batch} × {scale.block_size} "
        f"tokens ({base['train_s'] / 60:.1f} minutes), seed {base['seed']}.",
        "",
        "| held-out loss: sentences of the held-out MRs | <\\|endoftext\\|> after them | copy test: 30 random "
        "tokens | their repeat |",
        "|---:|---:|---:|---:|",
        f"| {base['val_loss']:.3f} | {report['end_of_text']:.2f} | {first:.2f} | {repeat:.2f} |",
        "",
        "## Table 3: LoRA against fine-tuning and the methods it replaces",
        "",
        f"Each method at the learning rate of lowest held-out loss (the candidates: [below](#learning-rates)), "
        f"trained with {scale.seeds} seeds (mean ± sample standard deviation): the held-out MRs, of the training "
        f"split's kind, decoded greedily, beside the first {full['beam']['mrs']} test MRs, decoded with beam search "
        f"(beam {scale.num_beams}, length penalty 0.9, no repeated 4-gram). Trainable parameters: their share of "
        "fine-tuning's in brackets; latency: one forward pass of 1 × 128 tokens against the base's, as bench.py "
        f"measures Table 1 (median of {scale.overhead_trials}; LoRA merged).",
        "",
        *seeds_table(t3),
        "",
        "Against fine-tuning, row by row: the paper's Table 3 (GPT-2 M, its BLEU) beside ours. A difference of our "
        "means is *beyond* the spread when it exceeds the sum of the two methods' standard deviations over seeds, "
        "else *within* it.",
        "",
        *beside_the_paper(t3),
        "",
        f"The runs of seed {full['seed']} alone, with their times and names:",
        "",
        *table(t3, "beam"),
        "",
        f"LoRA r=4 on Wq, Wv: BLEU {100 * lora['beam']['BLEU']:.1f} against fine-tuning's "
        f"{100 * full['beam']['BLEU']:.1f}{ratio(lora['beam']['BLEU'], full['beam']['BLEU'])}, with "
        f"{100 * lora['trainable'] / full['trainable']:.2f}% of its trainable parameters.",
        "",
        "Where a text ends, -log p(<|endoftext|>) after the held-out MRs' references (nats): "
        + ", ".join(f"{method} {row['end_of_text']:.2f}" for method, row in t3.items())
        + f"; the base, after their sentences alone: {report['end_of_text']:.2f}.",
        "",
        "## Table 5: which weights, at one budget of trainable parameters",
        "",
        f"r × (number of adapted matrices) = 8 in every block; lr {lora['lr']:g} (LoRA q,v's); greedy decoding.",
        "",
        *table(report["table5"], "greedy"),
        "",
        "## Table 6: the rank on Wq, Wv",
        "",
        f"Greedy decoding; fine-tuning, decoded greedily too: BLEU {100 * full['greedy']['BLEU']:.1f}.",
        "",
        *table(report["table6"], "greedy"),
        "",
        "![BLEU against the rank](miniature-rank.png) ![held-out loss during fine-tuning](miniature-loss.png)",
        "",
        "## Fig. 2: quality against trainable parameters",
        "",
        "Held-out loss and test BLEU (greedy) of LoRA on Wq, Wv at the ranks of Table 6, of Adapter^H, Adapter^L and "
        "PreLayer at several sizes (each at its Table 3 learning rate; Adapter^L at the small one's), and of "
        "fine-tuning; one seed each. The paper's Fig. 2 is on GPT-3, where prefix tuning's quality does not grow "
        "steadily with its length.",
        "",
        "| method | size | trainable | held-out loss | test BLEU (greedy) |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {size} | {row['trainable']:,} | {row['val_loss']:.3f} | {100 * row['greedy']['BLEU']:.1f} |"
            for name, rows in report["fig2"].items()
            for size, row in zip(dict(zip(FIG2, scale.fig2_sizes))[name], rows)
        ),
        "",
        "![Fig. 2 in miniature](miniature-fig2.png)",
        "",
        *(gap_section(report) if "gap" in report else []),
        "## Fig. 3 and Table 7: the subspaces of the r=8 and r=64 adapters (§7)",
        "",
        "φ(1, 1) between the top singular direction of the r=8 and the r=64 adapter's A (eq. 4; random "
        "directions: about 1/d), and φ(4, 4) between their top 4 (random: about 4/d):",
        "",
        "| block | matrix | φ(1, 1) | φ(4, 4) | 1/d |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {p['layer']} | {p['matrix']} | {p['phi11']:.2f} | {p['phi44']:.2f} | {1 / p['dim']:.3f} |"
            for p in report["phi"]
        ),
        "",
        "![φ of the last block](miniature-phi.png)",
        "",
        "ΔW against W for Wq of the last block (`python -m lab.analysis amplification`, Table 7):",
        "",
        "```",
        report["table7"],
        "```",
        "",
        "## Learning rates",
        "",
        "Held-out loss (mean cross-entropy over the targets of the held-out MRs' pairs) of each candidate:",
        "",
        *(
            f"- {method}: " + ", ".join(f"lr {lr:g}: {loss:.3f}" for lr, loss in tuning.items())
            for method, tuning in report["tuning"].items()
        ),
        "",
        "## The design",
        "",
        "**Why a base that knows the language.** The paper adapts GPT-2, pre-trained on WebText, to E2E (§5.5); "
        "LoRA steers what the base can already do (§7.3: ΔW amplifies directions W already holds, it does not add "
        "new ones). A base that never learned E2E's words measures the base, not LoRA: the table this page "
        "replaces (a base of 300 steps of Shakespeare) had LoRA write Shakespeare.",
        "",
        "**The pre-training text, WebText in miniature.** General English (tiny Shakespeare's paragraphs, "
        "WebNLG's texts on airports, food, buildings and people) and the domain's sentences (the training MRs' "
        "references, without their MRs), shuffled: as WebText holds restaurant descriptions but never E2E's "
        "MR → text pairs. Never the task: no MR occurs in it. Never the test split: no test MR or reference "
        "occurs in it, as it is or delexicalised; nor does any reference of a held-out MR, so the base's "
        "held-out loss is on sentences it never saw (tests/test_miniature.py checks both on the real data).",
        "",
        "**An end of text after every document.** GPT-2 was pre-trained with <|endoftext|> between WebText's "
        "documents, so it knows how a text ends; E2E's targets end with that token (prepare_data.py), and beam "
        "search stops there. The first base of this page (2026-12-01, the same CPU) had blank lines between its "
        "documents and never saw the token: -log p(<|endoftext|>) after a held-out sentence was 19.57 nats. "
        "Fine-tuning learned the end anyway (0.67 nats after a held-out reference), LoRA r=4 q,v did not "
        "(5.63), and beam search, which ranks whole texts by their log-probability, ran LoRA's texts on to 38.7 "
        "words against fine-tuning's 29.6 (the references: 27): BLEU 35.0 against 45.8, 76%, where greedy "
        "decoding gave 91%. This base ends its documents with the token, as GPT-2's pre-training did (the "
        "column of the base's table, and the line under Table 3). The long texts in that version's test scores "
        "are what pointed here; the change is GPT-2's own pre-training format, measured on held-out references, "
        "not a setting chosen by its test BLEU.",
        "",
        "**A vocabulary of the base's own tokens.** The base reads GPT-2's BPE trimmed to the tokens of its "
        "pre-training text and of the training pairs (and the pieces BPE builds them from): about 16,000 of "
        "50,257, split exactly as GPT-2 splits those texts; a test MR with a word outside them still encodes, "
        "in smaller pieces (prepare_data.trim_encoding). With all 50,257, a base of 4 blocks of 256 held 80% of "
        "its 16M parameters and of its arithmetic in the embedding and the vocabulary projection (GPT-2 M: 15%), "
        "rows of tokens it never saw: the trimmed base is 7.3M, 56% of it the embedding, and its steps are 1.6 "
        "(LoRA) to 2 (the base) times as fast (docs/benchmarks.md). Until 2026-12-06 this page used GPT-2's "
        "whole vocabulary.",
        "",
        "**Delexicalised names.** Writing an MR's name means copying a rare word from the MR, and the copy "
        "test shows this base cannot copy: its loss on a repeated sequence of random tokens is no lower than on "
        "the first occurrence, where GPT-2's falls to a fraction (induction heads, Olsson et al. 2022). LoRA "
        "cannot add a copying circuit with a few thousand parameters, and a base that copies needs far more "
        "pre-training than a CPU sweep allows. So `name` and `near` become X-name and X-near in MRs, "
        "references and pre-training sentences, as in the challenge's baseline TGen (Dušek and Jurčíček, 2016), "
        "and the real names are put back after decoding; the other slots (food, area, price, rating, type, "
        "family friendly) take a handful of values each, words the model learns. The last column counts the "
        "test MRs whose name is in the text, and those of names the training MRs never had.",
        "",
        "**The data splits.** E2E's train split (42,061 pairs; the paper's 5 epochs of GPT-2 M are days on a "
        "CPU) is not used: the valid split is the training set, less every 10th MR (with all its references), "
        "held out to choose each method's learning rate by its loss; the test split (630 MRs, 4,693 "
        "references) is only decoded and scored, never looked at to choose anything.",
        "",
        f"**The recipe**, the paper's Table 11 at this scale: one example a row, right-padded, the loss on the "
        f"targets; AdamW, weight decay 0.01, batch 8, {scale.epochs:g} epoch(s) (not 5: time), linear decay "
        f"after a warmup of 5% of the steps, label smoothing 0.1; LoRA α = {ALPHA}, dropout {LORA_DROPOUT} on "
        "its input. Table 5 keeps the paper's budget: r = 8 on one weight type, 4 on two, 2 on four.",
        "",
        "## Commands",
        "",
        "Each row is one `train.py` run (the base first); lab.miniature runs them in-process, then decodes:",
        "",
        "```bash",
        *(r["command"] for r in runs),
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = command_line("lab.miniature", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few MRs: the plumbing, in minutes")
    parser.add_argument(
        "--out", help="where data, runs and the report go (default: runs/miniature, or runs/miniature-quick)"
    )
    parser.add_argument(
        "--doc",
        help="also write the report here, its plots beside it (default: docs/miniature.md "
        "for the full sweep, none for --quick)",
    )
    seed_help = "train.py's --seed for the base and every row: the same seed, CPU kind and torch give the same tables"
    parser.add_argument("--seed", type=int, default=1337, help=seed_help)
    growth_help = (
        "where a method's best learning rate is a grid's end, try up to N more beyond it (x2 or /2 each; "
        f"default {Scale.lr_growth}, 0 for --quick)"
    )
    parser.add_argument("--lr-growth", type=int, metavar="N", help=growth_help)
    gap_help = "then measure what closes LoRA's gap to fine-tuning on the held-out MRs (epochs, rank, α, the base)"
    parser.add_argument("--gap", action="store_true", help=gap_help)
    parser.add_argument("--shakespeare", help="a local copy of tiny Shakespeare (default: downloaded)")
    parser.add_argument("--e2e", help="a local folder with E2E's valid.txt and test.txt (default: downloaded)")
    parser.add_argument("--webnlg", help="a local copy of WebNLG 2017's dev.json (default: downloaded)")
    add_hardware_flags(parser)
    args = parser.parse_args(argv)
    args.out = args.out or ("runs/miniature-quick" if args.quick else "runs/miniature")
    doc = args.doc if args.doc is not None else (None if args.quick else os.path.join("docs", "miniature.md"))
    try:
        report = sweep(args)
        analyse(report, args.out)
        plot(report, args.out)
        markdown = report_markdown(report, args)
        for path in [os.path.join(args.out, "miniature.md")] + ([doc] if doc else []):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(markdown)
            if os.path.dirname(path) != args.out.rstrip("/"):
                for png in ("miniature-phi.png", "miniature-rank.png", "miniature-loss.png", "miniature-fig2.png"):
                    shutil.copyfile(os.path.join(args.out, png), os.path.join(os.path.dirname(path) or ".", png))
            print(f"wrote {path}")
    except (ValueError, OSError) as e:
        sys.exit(f"lab.miniature: error: {e}")
    return report


if __name__ == "__main__":
    main()
