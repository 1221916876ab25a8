"""Several LoRA adapters on one base: switching the merged one, and batches whose rows each use their own.

    python -m lab.multi_adapter --adapter a.safetensors --adapter b.safetensors --prompt "one" --prompt "two"

§4.1: to switch tasks, recover W0 by subtracting B·A, then add another B'·A'. §4.2 (practical
benefits) adds that only the LoRA weights are swapped, not the whole model, and names the cost:
with A and B merged into W, inputs of different tasks cannot share one forward pass, unless the
modules stay unmerged and are chosen per sample. Here each LoRA layer keeps every named adapter's
A and B stacked in its bank (0.6 MB an adapter for GPT-2 small at r = 4 on q,v); `set_adapter`
swaps one in (an unmerge and a merge, never a reload of the base), and `adapter_per_row` gives
each row of one unmerged batch its own adapter.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

import sample
from lab import command_line
from lora import (
    LoRALinear,
    adapter_key,
    check_adapter_fits,
    lora_state_dict,
    merge_lora,
    read_adapter,
    unmerge_lora,
    unmerged,
)
from model import GPT
from utils import add_hardware_flags, autocast, for_inference, resolve_device, resolve_dtype, unwrap


class BankedLoRALinear(LoRALinear):
    """A LoRALinear (sharing its weights and active adapter) that also holds a bank of named
    adapters: `bank_A[part]` (n_adapters, r, d_in), `bank_B[part]` (n_adapters, d_rows, r). While
    `adapter_index` (one entry per row of the batch, -1 for none) is set, each row gets its own."""

    def __init__(self, layer: LoRALinear):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.parts = layer.in_features, layer.out_features, layer.parts
        self.weight, self.bias, self.scaling, self.merged = layer.weight, layer.bias, layer.scaling, layer.merged
        self.lora_A, self.lora_B, self.lora_dropout = layer.lora_A, layer.lora_B, layer.lora_dropout
        self.bank_A, self.bank_B = nn.ParameterDict(), nn.ParameterDict()
        self.adapter_index: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_index is None:
            return super().forward(x)
        if x.size(0) != self.adapter_index.size(0):
            raise ValueError(f"a batch of {x.size(0)} rows but {self.adapter_index.size(0)} adapter choices")
        h = nn.functional.linear(x, self.weight, self.bias)  # W0·x
        x = self.lora_dropout(x)
        has_adapter = (self.adapter_index >= 0).to(h.dtype).view(-1, 1, 1)  # rows with -1 get nothing
        index = self.adapter_index.clamp(min=0)
        for name, rows in self.parts.items():
            A_per_row = self.bank_A[name][index]  # (B, r, d_in)
            B_per_row = self.bank_B[name][index]  # (B, d_rows, r)
            # eq. 3 with each row's own A and B, two batched matmuls: (B, T, d_in) -> (B, T, r) -> (B, T, d_rows)
            delta = self.scaling * (x @ A_per_row.transpose(1, 2) @ B_per_row.transpose(1, 2)) * has_adapter
            h = h + nn.functional.pad(delta, (rows.start, self.out_features - rows.stop))  # out of place, as LoRALinear
        return h


def banked_layers(model: GPT) -> list[tuple[str, BankedLoRALinear]]:
    """The model's LoRA layers, each turned into a BankedLoRALinear the first time (named as in the model)."""
    raw = unwrap(model)
    if getattr(raw, "lora_config", None) is None:
        raise ValueError("this model has no LoRA layers to bank adapters in")
    layers = []
    for name, layer in [(n, m) for n, m in raw.named_modules() if isinstance(m, LoRALinear)]:
        if not isinstance(layer, BankedLoRALinear):
            parent, _, child = name.rpartition(".")
            layer = BankedLoRALinear(layer)
            setattr(raw.get_submodule(parent), child, layer)
        layers.append((name, layer))
    return layers


def adapter_names(model: GPT) -> list[str]:
    """The named adapters in the bank, in bank order."""
    raw = unwrap(model)
    if not hasattr(raw, "adapter_names"):
        raw.adapter_names = []
    return raw.adapter_names


def add_adapter(model: GPT, name: str, path: str | None = None) -> None:
    """Keep an adapter under `name` in the model's bank: the one in the file `path` (checked like
    load_adapter), or without a path a copy of the model's active adapter (e.g. one just trained).
    All adapters on one model share the rank, alpha and targets, so that they stack."""
    raw = unwrap(model)
    if path is not None:
        tensors, metadata = read_adapter(path)
        check_adapter_fits(raw, path, tensors, metadata)
    elif getattr(raw, "lora_config", None) is None:
        raise ValueError("this model has no LoRA layers to copy an adapter from")
    else:
        tensors = lora_state_dict(raw)
    if name in adapter_names(raw):
        raise ValueError(f"an adapter named '{name}' is already on this model")
    for module_name, layer in banked_layers(raw):
        block, module = module_name.removeprefix("transformer.h.").split(".", 1)
        for bank, matrix in ((layer.bank_A, "A"), (layer.bank_B, "B")):
            for part in layer.parts:
                # a copy, never a view: the bank must not change when the active adapter trains or loads
                new = tensors[adapter_key(int(block), module, matrix, part)].detach()
                new = new.to(layer.weight.device, layer.weight.dtype)
                stacked = torch.cat([bank[part], new[None]]) if part in bank else new[None].clone()
                bank[part] = nn.Parameter(stacked, requires_grad=False)  # frozen unless you train the bank
    adapter_names(raw).append(name)


def set_adapter(model: GPT, name: str) -> None:
    """Make the named adapter the active one. On a merged model this switches the merged task:
    the old ΔW comes out, the new one goes in (fp32: W0 in between to ≤ 1e-6)."""
    raw = unwrap(model)
    index = adapter_indices(raw, [name])[0]
    with unmerged(raw), torch.no_grad():
        for _, layer in banked_layers(raw):
            for part in layer.parts:
                layer.lora_A[part].copy_(layer.bank_A[part][index])
                layer.lora_B[part].copy_(layer.bank_B[part][index])


@contextmanager
def adapter_per_row(model: GPT, names: list[str | None]) -> Iterator[None]:
    """Inside the block, row b of every batch runs with the adapter names[b] (None: the base
    alone), in one forward pass. Works for generation (the rows keep their adapters at every step)
    and for training: gradients reach the banks of the adapters used, zero for the others (set
    `requires_grad` on the `bank_A`/`bank_B` parameters to train them). Needs an unmerged model."""
    raw = unwrap(model)
    layers = [layer for _, layer in banked_layers(raw)]
    if any(layer.merged for layer in layers):
        raise ValueError("mixed-adapter batches run unmerged: call unmerge_lora(model) first")
    index = torch.tensor(adapter_indices(raw, names), device=layers[0].weight.device)
    for layer in layers:
        layer.adapter_index = index
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_index = None


def adapter_indices(model: GPT, names: list[str | None]) -> list[int]:
    known = adapter_names(model)
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise ValueError(f"no adapter named '{unknown[0]}' on this model (it has: {', '.join(known) or 'none'})")
    return [-1 if n is None else known.index(n) for n in names]


def generate_with_adapters(
    model: GPT, prompts: list[list[int]], adapters: list[str | None], merge: bool, max_new_tokens: int, **sampling
) -> list[list[int]]:
    """Row i continues prompts[i] with the adapter adapters[i] (a name given to add_adapter, or None
    for the base). merge: one pass per adapter with it merged; else all rows in one mixed batch."""
    if not merge:
        with adapter_per_row(model, adapters) if any(adapters) else nullcontext():
            return sample.generate_rows(model, prompts, max_new_tokens, **sampling)
    outputs: list[list[int]] = [[] for _ in prompts]
    for adapter in dict.fromkeys(adapters):  # each adapter once, in order of first use
        rows = [i for i, a in enumerate(adapters) if a == adapter]
        if adapter is not None:
            set_adapter(model, adapter)
            merge_lora(model)
        for row, tokens in zip(
            rows, sample.generate_rows(model, [prompts[i] for i in rows], max_new_tokens, **sampling)
        ):
            outputs[row] = tokens
        unmerge_lora(model)
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = command_line("lab.multi_adapter", __doc__)
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="FILE",
        help="an adapter file; repeat it for several, with one --prompt each (or one for all)",
    )
    parser.add_argument(
        "--prompt", action="append", metavar="TEXT", help="the text to continue, or FILE:path; default: a newline"
    )
    parser.add_argument("--base", help="the base; default: the one named in the first adapter")
    parser.add_argument(
        "--merge", action="store_true", help="one pass per adapter with it merged, instead of one mixed batch"
    )
    parser.add_argument("--max-new-tokens", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)")
    add_hardware_flags(parser)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(device, args.dtype)  # checked before the model loads
        model = sample.load_base(args.base or read_adapter(args.adapter[0])[1]["base"])
        for path in dict.fromkeys(args.adapter):  # named by their paths; each checked against the base
            add_adapter(model, path, path)
        # one mixed batch runs in the 16-bit dtype; --merge merges and unmerges once per adapter, so its weights
        # stay fp32 under autocast, where unmerging gives W0 back (16-bit weights would drift by a rounding a time)
        for_inference(model, device, torch.float32 if args.merge else dtype)
        texts = [sample.read_prompt(p) for p in args.prompt or ["\n"]]  # text, or FILE:path, as sample.py reads it
        if len(texts) not in (1, len(args.adapter)):
            raise ValueError(f"give one --prompt or one per --adapter: {len(texts)} for {len(args.adapter)} adapters")
        texts = texts * len(args.adapter) if len(texts) == 1 else texts
        encoding, prompts = sample.encode_prompts(model, texts)
        with autocast(device, dtype) if args.merge else nullcontext():
            outputs = generate_with_adapters(
                model, prompts, args.adapter, args.merge, args.max_new_tokens, temperature=args.temperature
            )
    except (ValueError, OSError) as e:
        sys.exit(f"lab.multi_adapter: error: {e}")
    for adapter, tokens in zip(args.adapter, outputs):
        print(f"--- {adapter} ---\n{encoding.decode(tokens)}")


if __name__ == "__main__":
    main()
