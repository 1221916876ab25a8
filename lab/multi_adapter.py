"""Several LoRA adapters on one base: switching the merged one, and batches whose rows each use their own.

    python -m lab.multi_adapter --adapter a.safetensors --adapter b.safetensors --prompt "one" --prompt "two"

§4.1: to switch tasks, recover W0 by subtracting B·A, then add another B'·A'. §4.2 (practical
benefits) adds that only the LoRA weights are swapped, not the whole model, and names the cost:
with A and B merged into W, inputs of different tasks cannot share one forward pass, unless the
modules stay unmerged and are chosen per sample. Here each adapted layer keeps a bank: every named
adapter's tensors (the layer's `adapter_tensors`: A and B, and a variant's own) stacked (0.6 MB an
adapter for GPT-2 small at r = 4 on q,v); `set_adapter` swaps one in (an unmerge and a merge, never
a reload of the base), and `adapter_per_row` runs the layer's own forward with each row's tensors, so
the bank holds no copy of eq. 3 and serves any variant of the layer (DoRA too).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.func import functional_call

import sample
from lab import command_line
from lora import LoRALinear, check_adapter_fits, lora_state_dict, merge_lora, read_adapter, unmerge_lora, unmerged
from model import GPT
from utils import add_hardware_flags, autocast, for_inference, resolve_device, resolve_dtype, unwrap


def adapted_layers(model: GPT) -> list[tuple[str, LoRALinear]]:
    """(name in the model, layer) of every adapted layer."""
    raw = unwrap(model)
    if getattr(raw, "lora_config", None) is None:
        raise ValueError("this model has no LoRA layers to bank adapters in")
    return [(name, m) for name, m in raw.named_modules() if isinstance(m, LoRALinear)]


def bank_name(key: str) -> str:
    """The buffer that banks the adapter tensor `key` of a layer: 'lora_A.q' -> 'bank_lora_A_q'."""
    return "bank_" + key.replace(".", "_")


def bank(layer: LoRALinear) -> dict[str, torch.Tensor]:
    """{adapter tensor: every banked adapter's, stacked (n_adapters, ...)} of one layer. Buffers, not parameters:
    never part of an adapter (nor of the state dict), they follow the model to its device and dtype; frozen
    unless you set their `requires_grad`."""
    return {key: layer.get_buffer(bank_name(key)) for key in layer.adapter_tensors()}


def adapter_names(model: GPT) -> list[str]:
    """The named adapters in the bank, in bank order."""
    raw = unwrap(model)
    if not hasattr(raw, "adapter_names"):
        raw.adapter_names = []
    return raw.adapter_names


def add_adapter(model: GPT, name: str, path: str | None = None) -> None:
    """Keep an adapter under `name` in the model's bank: the one in the file `path` (checked like
    load_adapter), or without a path a copy of the model's active adapter (e.g. one just trained).
    All adapters on one model share the LoRA settings, so that they stack."""
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
    for module_name, layer in adapted_layers(raw):
        for key, active in layer.adapter_tensors().items():
            # a copy, never a view: the bank must not change when the active adapter trains or loads
            new = tensors[f"{module_name}.{key}"].detach().to(active.device, layer.weight.dtype)[None]
            banked = getattr(layer, bank_name(key), None)
            layer.register_buffer(bank_name(key), new.clone() if banked is None else torch.cat([banked, new]), False)
    adapter_names(raw).append(name)


def set_adapter(model: GPT, name: str) -> None:
    """Make the named adapter the active one. On a merged model this switches the merged task:
    the old ΔW comes out, the new one goes in (fp32: W0 in between to ≤ 1e-6)."""
    raw = unwrap(model)
    index = adapter_indices(raw, [name])[0]
    with unmerged(raw), torch.no_grad():
        for _, layer in adapted_layers(raw):
            for key, stacked in bank(layer).items():
                layer.adapter_tensors()[key].copy_(stacked[index])


class AdapterPerRow(nn.Module):
    """Stands in for an adapted layer inside `adapter_per_row`: row b of the batch runs the layer's own forward
    with adapter index[b]'s tensors from the bank (a leading batch dimension on each: torch.func.functional_call
    swaps them in), rows of index -1 the base alone."""

    def __init__(self, layer: LoRALinear, index: torch.Tensor):
        super().__init__()
        self.layer, self.index, self.some_base_only = layer, index, bool((index < 0).any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) != self.index.size(0):
            raise ValueError(f"a batch of {x.size(0)} rows but {self.index.size(0)} adapter choices")
        per_row = {key: stacked[self.index.clamp(min=0)] for key, stacked in bank(self.layer).items()}
        h = functional_call(self.layer, per_row, (x,))
        if not self.some_base_only:
            return h
        base_only = (self.index < 0).view(-1, *[1] * (x.dim() - 1))
        return torch.where(base_only, nn.functional.linear(x, self.layer.weight, self.layer.bias), h)


@contextmanager
def adapter_per_row(model: GPT, names: list[str | None]) -> Iterator[None]:
    """Inside the block, row b of every batch runs with the adapter names[b] (None: the base
    alone), in one forward pass. Works for generation (the rows keep their adapters at every step)
    and for training: gradients reach the banks of the adapters used, zero for the others (set
    `requires_grad` on the `bank` buffers to train them). Needs an unmerged model."""
    raw = unwrap(model)
    layers = adapted_layers(raw)
    if any(layer.merged for _, layer in layers):
        raise ValueError("mixed-adapter batches run unmerged: call unmerge_lora(model) first")
    index = torch.tensor(adapter_indices(raw, names), device=layers[0][1].weight.device)
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(raw.get_submodule(parent), child, AdapterPerRow(layer, index))
    try:
        yield
    finally:
        for name, layer in layers:
            parent, _, child = name.rpartition(".")
            setattr(raw.get_submodule(parent), child, layer)


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
