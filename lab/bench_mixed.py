"""Several adapters in one batch, measured: past the limitation the paper names in §4.2.

    python -m lab.bench_mixed                   # CPU: GPT-2 small, 4 adapters x 16 prompt tokens + 16 new tokens
    python -m lab.bench_mixed --device cuda     # GPU: GPT-2 medium, 8 adapters x 16 prompt tokens + 32 new tokens

N random q,v adapters (r=4), one prompt each, greedy generation as `python -m lab.multi_adapter` runs
it. Tokens/s of three ways of serving them, median [min-max] over 3 trials after a warm-up:
- one mixed batch: unmerged, every row with its own adapter (`adapter_per_row`);
- one merged pass per adapter, the merge and unmerge timed too (they are the cost of switching tasks);
- the ceiling, the reference: the same batch with one adapter merged, the base model's speed.
Prints the table and writes OUT/mixed_adapters.json in the format of bench.py's results.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

from bench import (
    LORA_RANK,
    add_model_flags,
    add_ratios,
    build_model,
    check_model_flags,
    markdown,
    number,
    parse_shapes,
    row,
    timed,
    write_results,
)
from lab import command_line
from lab.multi_adapter import add_adapter, generate_with_adapters
from lora import LoRAConfig, apply_lora, lora_layers
from utils import autocast, resolve_dtype

DEFAULTS = {"cpu": dict(size="gpt2", mixed="4x16+16"), "cuda": dict(size="gpt2-medium", mixed="8x16+32")}
MERGED_PER_ADAPTER = "one merged pass per adapter"
ONE_MERGED = "the same batch, one adapter merged (the ceiling)"
TRIALS = 3  # each trial is a whole generation, long enough to average out by itself


def mixed_adapter_rows(args: argparse.Namespace) -> list[dict]:
    """The three ways of serving args.mixed = (N adapters, prompt tokens, new tokens), as bench.py rows.
    Random adapters: the speed does not depend on their values."""
    n_adapters, prompt_length, new_tokens = args.mixed
    device, dtype = args.device, resolve_dtype(args.device, args.dtype)
    torch.manual_seed(0)
    model = apply_lora(build_model(args.size, device), LoRAConfig(LORA_RANK)).eval()
    names = [f"adapter{i}" for i in range(n_adapters)]
    for name in names:
        with torch.no_grad():
            for layer in lora_layers(model):
                for B in layer.lora_B.values():
                    B.normal_(0, 0.02)
        add_adapter(model, name)
    prompts = torch.randint(model.config.vocab_size, (n_adapters, prompt_length)).tolist()
    ways = {  # (the adapter of each row, merged)
        ONE_MERGED: ([names[0]] * n_adapters, True),
        "one mixed batch": (names, False),
        MERGED_PER_ADAPTER: (names, True),
    }
    seconds = {what: [] for what in ways}
    with autocast(device, dtype):
        for adapters, merge in ways.values():  # warm-up
            generate_with_adapters(model, prompts, adapters, merge, 2, temperature=0)
        for _ in tqdm(range(TRIALS), desc="mixed adapters", leave=False):
            for what, (adapters, merge) in ways.items():
                run = lambda: generate_with_adapters(model, prompts, adapters, merge, new_tokens, temperature=0)  # noqa: E731
                seconds[what].append(timed(run, device))
    shape = f"{n_adapters}x{prompt_length}+{new_tokens}"
    tokens_per_s = {what: [n_adapters * new_tokens / s for s in seconds[what]] for what in ways}
    return [
        row(args, "mixed adapters", what, "tokens/s", "tokens/s", tokens_per_s[what], ONE_MERGED, shape=shape)
        for what in ways
    ]


def throughput_table(rows: list[dict]) -> str:
    """One row a way of serving: tokens/s median [min–max] and its ratio to the reference."""
    lines = ["| | tokens/s |", "|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['what']} | {number(r['median'])} [{number(r['min'])}–{number(r['max'])}] (×{r['ratio']:.3g}) |"
        )
    return "\n".join(lines)


def parse_mixed(text: str) -> tuple[int, int, int]:
    """'4x16+16' -> (4 adapters, 16 prompt tokens, 16 new tokens)."""
    shape, _, new_tokens = text.partition("+")
    ((n_adapters, prompt_length),) = parse_shapes(shape)
    if not new_tokens.isdigit() or int(new_tokens) < 1:
        raise ValueError(f"bad --mixed '{text}': write adapters x prompt tokens + new tokens, like 4x16+16")
    return n_adapters, prompt_length, int(new_tokens)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure, print the table, write OUT/mixed_adapters.json; returns its rows."""
    parser = command_line("lab.bench_mixed", __doc__)
    add_model_flags(parser, "generation runs under its autocast")
    parser.add_argument("--mixed", help="adapters x prompt tokens + new tokens (CPU: 4x16+16, CUDA: 8x16+32)")
    parser.add_argument("--out", default="bench-out", help="folder for mixed_adapters.json (default: bench-out)")
    args = parser.parse_args(argv)
    try:
        check_model_flags(args, DEFAULTS)
        args.mixed = parse_mixed(args.mixed)
        rows = add_ratios(mixed_adapter_rows(args))
        print(markdown(rows, {"mixed adapters": throughput_table}))
        command = " ".join(["python", "-m", "lab.bench_mixed", *(sys.argv[1:] if argv is None else argv)])
        path = os.path.join(args.out, "mixed_adapters.json")
        write_results(rows, path, command)
        print(f"\nwrote {path}")
    except (ValueError, OSError) as e:
        sys.exit(f"lab.bench_mixed: error: {e}")
    return rows


if __name__ == "__main__":
    main()
