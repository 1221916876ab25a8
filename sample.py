"""Generate text from GPT-2 plus the LoRA adapter(s) of a training run, merged or not.

    python sample.py --merge                      # out/ of train.py: its adapter merged into its base
    python sample.py --out out --prompt "ROMEO:"  # the same adapter, unmerged: the same greedy text
    python sample.py --adapter a.safetensors --adapter b.safetensors --prompt "one" --prompt "two"
                                                  # two tasks in one batch, each row with its own adapter

The adapter file names the base it was trained on, which is loaded by default (`--init-from`
overrides it). With --merge each adapter is folded into the weights before it generates (paper
§4.1: no added latency), one adapter at a time. Without --merge the adapters stay beside the
weights and all rows, whatever their adapter, run as one batch (lora.adapter_per_row).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext

import tiktoken
import torch

from lora import (
    adapter_per_row, add_adapter, merge_lora, read_adapter, set_adapter, unmerge_lora,
)  # fmt: skip
from model import GPT, GPTConfig, autocast, resolve_device, resolve_dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--out", default=None, metavar="DIR",
                        help="a train.py output folder: its adapter.safetensors (a LoRA run) or its config.json + "
                             "model.safetensors (a --rank 0 run). Default: out, unless --adapter or --init-from "
                             "is given")
    source.add_argument("--adapter", action="append", metavar="FILE",
                        help="an adapter file; repeat it to run several adapters in one batch, one --prompt each")
    parser.add_argument("--init-from", default=None, metavar="BASE",
                        help="the base: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a folder with config.json + "
                             "model.safetensors, or scratch (random GPT-2 small, for timing). "
                             "Default: the base named in the adapter")
    parser.add_argument("--merge", action="store_true", help="merge each adapter into the weights before it generates")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="the text to continue, or FILE:path to read it from a file; one, or one per --adapter. "
                             "Default: a newline")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="samples per prompt, in one batch (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=200,
                        help="sample only from the k most likely tokens, 0 for all (default: %(default)s)")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the keys and values of earlier tokens; --no-kv-cache reruns the whole context "
                             "for every token, to measure what the cache saves")
    parser.add_argument("--seed", type=int, default=1337, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 or float16 on a GPU, float32 on the CPU), float32, bfloat16, float16")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
        parser.error("--num-samples and --max-new-tokens must be >= 1, --temperature and --top-k >= 0")
    return args


# ---- what to load: a base, and the adapters of a training run ------------------------------------


def find_run(out: str | None, adapters: list[str] | None, init_from: str | None) -> tuple[str, list[str]]:
    """(the base to load, the adapter files) from the command line's --out, --adapter, --init-from."""
    if adapters:
        return init_from or read_adapter(adapters[0])[1]["base"], adapters
    if out is None and init_from is not None:
        return init_from, []  # a base alone
    folder = out or "out"
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "no such folder"
        raise ValueError(f"--out {folder}{' (the default)' * (out is None)}: {what}; give a train.py output "
                         "folder, or --adapter FILE or --init-from gpt2")  # fmt: skip
    if os.path.isfile(os.path.join(folder, "adapter.safetensors")):  # a LoRA run
        path = os.path.join(folder, "adapter.safetensors")
        return init_from or read_adapter(path)[1]["base"], [path]
    if os.path.isfile(os.path.join(folder, "model.safetensors")):  # a --rank 0 run: the whole model
        return init_from or folder, []
    raise ValueError(
        f"{folder} holds neither adapter.safetensors nor model.safetensors: train with train.py first, "
        "or pass --adapter FILE or --init-from gpt2"
    )


def load_base(name_or_path: str) -> GPT:
    if name_or_path == "scratch":  # random weights: the speed of GPT-2 small without its download
        return GPT(GPTConfig())
    return GPT.from_pretrained(name_or_path)


def read_prompt(text: str) -> str:
    """The text of one --prompt: itself, or the contents of the file after FILE:. Never empty."""
    if not text.startswith("FILE:"):
        if not text:
            raise ValueError("--prompt is empty: give some text to continue (without --prompt: a newline)")
        return text
    path = text.removeprefix("FILE:")
    if not os.path.isfile(path):
        raise ValueError(f"--prompt {text}: {'not a file' if os.path.exists(path) else 'no such file'}")
    try:
        with open(path, encoding="utf-8") as f:
            prompt = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt {text}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not prompt:
        raise ValueError(f"--prompt {text}: {path} is empty")
    return prompt


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


def generate_with_adapters(
    model: GPT, prompts: list[list[int]], adapters: list[str | None], merge: bool, max_new_tokens: int, **sampling
) -> list[list[int]]:
    """Row i continues prompts[i] with the adapter adapters[i] (a name given to add_adapter, or None
    for the base). merge: one pass per adapter with it merged; else all rows in one mixed batch."""
    if not merge:
        with adapter_per_row(model, adapters) if any(adapters) else nullcontext():
            return generate_rows(model, prompts, max_new_tokens, **sampling)
    outputs: list[list[int]] = [[] for _ in prompts]
    for adapter in dict.fromkeys(adapters):  # each adapter once, in order of first use
        rows = [i for i, a in enumerate(adapters) if a == adapter]
        if adapter is not None:
            set_adapter(model, adapter)
            merge_lora(model)
        for row, tokens in zip(rows, generate_rows(model, [prompts[i] for i in rows], max_new_tokens, **sampling)):
            outputs[row] = tokens
        unmerge_lora(model)
    return outputs


def synchronize(device: str) -> None:
    """Wait for the GPU, so that a timer measures the work and not its queueing."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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
    texts = [read_prompt(p) for p in args.prompt or ["\n"]]  # before anything loads: a bad one fails at once
    base, adapter_paths = find_run(args.out, args.adapter, args.init_from)
    model = load_base(base)
    for path in dict.fromkeys(adapter_paths):  # named by their paths; checked against the base
        add_adapter(model, path, path)
    model.to(device).eval()

    encoding = tiktoken.get_encoding("gpt2")
    if model.config.vocab_size < encoding.n_vocab:
        raise ValueError(
            f"the base's vocabulary ({model.config.vocab_size}) is smaller than GPT-2's BPE ({encoding.n_vocab})"
        )
    adapters: list[str | None] = adapter_paths or [None]
    if len(texts) == 1:
        texts = texts * len(adapters)
    elif len(adapters) == 1:
        adapters = adapters * len(texts)
    elif len(texts) != len(adapters):
        raise ValueError(f"give one --prompt or one per --adapter: {len(texts)} prompts for {len(adapters)} adapters")

    prompts, window = [], model.config.block_size
    for i, text in enumerate(texts):
        tokens = encoding.encode(text, allowed_special={"<|endoftext|>"})
        if len(tokens) > window:
            print(f"note: prompt {i + 1} has {len(tokens)} tokens, more than the context ({window}); "
                  f"the model sees only its last {window}")  # fmt: skip
            tokens = tokens[-window:]
        prompts.append(tokens)
    rows = [(prompt, adapter) for prompt, adapter in zip(prompts, adapters) for _ in range(args.num_samples)]

    synchronize(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        outputs = generate_with_adapters(
            model, [p for p, _ in rows], [a for _, a in rows], args.merge, args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k or None, use_cache=args.kv_cache,
        )  # fmt: skip
    synchronize(device)
    seconds = time.perf_counter() - start

    for (_, adapter), tokens in zip(rows, outputs):
        print(f"--- {adapter or base} ---")
        print(encoding.decode([t for t in tokens if t < encoding.n_vocab]))  # a padded vocabulary's extras have no text
    n_tokens = len(rows) * args.max_new_tokens
    how = ("merged, one pass per adapter" if args.merge else "unmerged, one batch") if adapter_paths else "base only"
    cache = "KV cache" if args.kv_cache else "no KV cache"
    print(f"{n_tokens} tokens in {seconds:.2f} s: {n_tokens / seconds:,.1f} tokens/s ({len(rows)} "
          f"row{'s' * (len(rows) > 1)}, {how}, {cache}, {device}, {str(dtype).removeprefix('torch.')})")  # fmt: skip


if __name__ == "__main__":
    main()
