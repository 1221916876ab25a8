"""Generate text from GPT-2 plus the LoRA adapter of a training run, merged or not.

    python sample.py --merge                          # out/ of train.py: its adapter merged into its base
    python sample.py --run-dir out --prompt "ROMEO:"      # the same adapter unmerged: the same greedy text
    python sample.py --adapter a.safetensors --temperature 0
    python sample.py --base gpt2 --prompt "Hello"     # the base alone

An adapter file names the base it was trained on, which is loaded by default (`--base` overrides
it). With --merge the adapter is folded into the weights before generating (paper §4.1: no added
latency); without it, every step computes W0·x + (α/r)·B·A·x. Several adapters in one batch:
lab/multi_adapter.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import tiktoken
import torch

import prepare_data
from lora import load_adapter, merge_lora, read_adapter
from model import GPT
from utils import add_hardware_flags, for_inference, read_text, resolve_device, resolve_dtype, synchronize


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    run_help = "a train.py run folder: its adapter (LoRA) or its model (--rank 0); out, unless --adapter or --base"
    source.add_argument("--run-dir", metavar="DIR", help=run_help)
    source.add_argument("--adapter", metavar="FILE", help="an adapter file, instead of a run folder")
    base_help = "the base: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a model folder; if unset, the adapter's base"
    parser.add_argument("--base", help=base_help)
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the weights before generating")
    parser.add_argument(
        "--prompt", default="\n", metavar="TEXT", help="the text to continue, or FILE:path (default: a newline)"
    )
    parser.add_argument("--num-samples", type=int, default=1, help="samples of the prompt, in one batch (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default: 0.8)")
    parser.add_argument(
        "--top-k", type=int, default=200, help="sample from the k most likely tokens, 0: all (default: 200)"
    )
    cache_help = "reuse the keys and values of earlier tokens (--no-kv-cache: rerun the context for every token)"
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True, help=cache_help)
    parser.add_argument("--seed", type=int, default=1337, help="(default: 1337)")
    add_hardware_flags(parser)
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
        parser.error("--num-samples and --max-new-tokens must be >= 1, --temperature and --top-k >= 0")
    return args


# ---- what to load: a base, and the adapter of a training run --------------------------------------


def find_run(run: str | None, adapter: str | None, base: str | None) -> tuple[str, str | None]:
    """(the base to load, the adapter file or None) from the command line's --run-dir, --adapter, --base."""
    if adapter:
        return base or read_adapter(adapter)[1]["base"], adapter
    if run is None and base is not None:
        return base, None  # a base alone
    folder = run or "out"
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "no such folder"
        raise ValueError(
            f"--run-dir {folder}{' (the default)' * (run is None)}: {what}; give a train.py run "
            "folder, or --adapter FILE or --base gpt2"
        )
    if os.path.isfile(os.path.join(folder, "adapter.safetensors")):  # a LoRA run
        path = os.path.join(folder, "adapter.safetensors")
        return base or read_adapter(path)[1]["base"], path
    if os.path.isfile(os.path.join(folder, "method.safetensors")):  # a run of lab/methods.py
        raise ValueError(
            f"{folder} is the run of a method LoRA is compared with (train.py --method): decode it with lab.e2e"
        )
    if os.path.isfile(os.path.join(folder, "model.safetensors")):  # a --rank 0 run: the whole model
        return base or folder, None
    raise ValueError(
        f"{folder} holds neither adapter.safetensors nor model.safetensors: train with train.py first, "
        "or pass --adapter FILE or --base gpt2"
    )


def load_base(name_or_path: str) -> GPT:
    if name_or_path == "scratch":
        raise ValueError(
            "the adapter was trained on a random base (--base scratch) that was never saved: "
            "train the base with --rank 0 first, then the adapter on that folder"
        )
    return GPT.from_pretrained(name_or_path)


def read_prompt(text: str) -> str:
    """The text of one --prompt: itself, or the contents of the file after FILE:. Never empty."""
    if not text.startswith("FILE:"):
        if not text:
            raise ValueError("--prompt is empty: give some text to continue (without --prompt: a newline)")
        return text
    return read_text(text.removeprefix("FILE:"), "--prompt FILE:")


def model_encoding(model: GPT) -> tiktoken.Encoding:
    """The BPE a model reads: its folder's trimmed one (prepare_data.TOKENIZER), else GPT-2's."""
    encoding = prepare_data.load_encoding(model.name_or_path if os.path.isdir(model.name_or_path) else None)
    if model.config.vocab_size < encoding.n_vocab:
        raise ValueError(
            f"the base's vocabulary ({model.config.vocab_size}) is smaller than its BPE's ({encoding.n_vocab}: "
            f"{encoding.name}); a model trained on a trimmed BPE keeps it in its folder ({prepare_data.TOKENIZER})"
        )
    return encoding


def encode_prompts(model: GPT, texts: list[str]) -> tuple[tiktoken.Encoding, list[list[int]]]:
    """The model's BPE, and each text's tokens (its last block_size tokens if it is longer)."""
    encoding = model_encoding(model)
    prompts, window = [], model.config.block_size
    for i, text in enumerate(texts):
        tokens = encoding.encode(text, allowed_special={"<|endoftext|>"})
        if len(tokens) > window:
            print(
                f"note: prompt {i + 1} has {len(tokens)} tokens, more than the context ({window}); "
                f"the model sees only its last {window}"
            )
            tokens = tokens[-window:]
        prompts.append(tokens)
    return encoding, prompts


# ---- generation --------------------------------------------------------------------------------


def generate_rows(model: GPT, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
    """One batched `generate` over prompts of any lengths; each row's prompt and continuation."""
    lengths = [len(p) for p in prompts]
    device = model.transformer.wte.weight.device
    padded = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=device)  # right-padded
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = torch.tensor(prompt)
    tokens = model.generate(padded, max_new_tokens, prompt_lengths=lengths, **sampling).tolist()
    return [row[: n + max_new_tokens] for row, n in zip(tokens, lengths)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"sample.py: error: {e}")


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    text = read_prompt(args.prompt)  # before anything loads: a bad one fails at once
    base, adapter = find_run(args.run_dir, args.adapter, args.base)
    model = load_base(base)
    if adapter is not None:
        load_adapter(model, adapter)  # checked against the base
        if args.merge:
            merge_lora(model)
    for_inference(model, device, dtype)
    encoding, prompts = encode_prompts(model, [text])

    synchronize(device)
    start = time.perf_counter()
    outputs = generate_rows(
        model,
        prompts * args.num_samples,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        use_cache=args.kv_cache,
    )
    synchronize(device)
    seconds = time.perf_counter() - start

    for tokens in outputs:
        print(f"--- {adapter or base} ---")
        print(encoding.decode([t for t in tokens if t < encoding.n_vocab]))  # a padded vocabulary's extras have no text
    n_tokens = len(outputs) * args.max_new_tokens
    how = ("merged" if args.merge else "unmerged") if adapter else "base only"
    cache = "KV cache" if args.kv_cache else "no KV cache"
    print(
        f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:,.1f} tokens/s ({how}, {cache}, {device}, "
        f"{str(dtype).removeprefix('torch.')})"
    )


if __name__ == "__main__":
    main()
