"""Adapters between lora.py and Hugging Face PEFT, exactly, in both directions.

PEFT puts one LoRA on each whole module: lora_A (R × d_in) and lora_B (d_out × R) in nn.Linear's
layout, scaling lora_alpha / R (lora_alpha / √R with use_rslora), stored in a folder as
`adapter_config.json` + `adapter_model.safetensors` with keys like
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`. GPT-2's four projections are Conv1D
modules in transformers, whose weight is stored (d_in × d_out); PEFT sets `fan_in_fan_out` for them
and transposes B·A when it adds it, so A and B themselves keep the layout that ours have.

Ours (lora.py) gives each of q, k, v its own A (r × C) and B (C × r) on a row block of the fused
c_attn (3C × C). Stacked, they are one PEFT LoRA of rank n·r on c_attn, n the number of parts:

    ΔW_c_attn = (α/r) · [B_q·A_q ; B_k·A_k ; B_v·A_v] = (α_peft / (n·r)) · B_peft · A_peft

with A_peft = cat(A_q, A_v) (2r × C) for q,v, B_peft (3C × 2r) holding B_q in rows 0..C, columns
0..r and B_v in rows 2C..3C, columns r..2r, zeros elsewhere, and α_peft = (α/r)·n·r, from the
config's own `scaling`, so that α_peft / (n·r) is our scaling whatever it is made of. Exact: the
same products, the same scaling. `o` is attn.c_proj and `mlp` is mlp.c_fc and mlp.c_proj, one part
each: A and B are copied as they are. A c_attn rank that differs from the others goes into PEFT's
`rank_pattern` / `alpha_pattern`. Which modules of which blocks are adapted comes from the
adapter's own tensors (PEFT's `target_modules` and `layers_to_transform`).

Importing reverses this. A folder we exported says so in its safetensors header, and comes back
tensor for tensor. Any other PEFT LoRA (made with PEFT's API, say) comes in exactly too, but wider:
a rank-R update of the whole c_attn does not split into separate q, k, v updates of lower rank in
general, so each of q, k, v gets rank R with A_q = A_k = A_v = A_peft and B_q, B_k, B_v the row
blocks of B_peft ((B·A)'s row block is B_block·A). Modules of lower rank are padded to the largest
(extra rows of A keep their fresh init, the matching columns of B are zero, so they add nothing),
and each module's scaling is folded into its B, so one α/r fits all.

    python -m lab.peft_interop export out/adapter.safetensors --out out/peft
    python -m lab.peft_interop import out/peft --base gpt2 --out out/from-peft.safetensors
    then, in Python: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained('gpt2'), 'out/peft')
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, fields

import torch
from safetensors.torch import save_file

from lab import command_line, parse_adapter_key
from lora import (
    TARGETS,
    LoRAConfig,
    apply_lora,
    lora_state_dict,
    read_adapter,
    save_adapter,
)
from model import GPT, PRETRAINED
from utils import atomic_path, open_safetensors, unwrap

PEFT_PREFIX = "base_model.model."
HUB_ORGANISATION = "openai-community/"  # where the hub keeps gpt2, gpt2-medium, ...
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_KEY = re.compile(
    r"(?:base_model\.model\.)?transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight"
)


def parts_of(module: str, targets: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """The (target, chunk of rows, number of chunks) that `targets` put on `module`, in TARGETS order."""
    return [(t, where.chunk, where.n_chunks) for t in targets for where in TARGETS[t] if where.module == module]


def modules_of(targets: tuple[str, ...]) -> list[str]:
    """The modules `targets` adapt, each once: ('q', 'v', 'mlp') -> ['attn.c_attn', 'mlp.c_fc', 'mlp.c_proj']."""
    return list(dict.fromkeys(where.module for t in targets for where in TARGETS[t]))


# ---- export: ours -> PEFT ---------------------------------------------------------------------------


# LoRAConfig's fields that the export maps: whatever its `scaling` is made of becomes lora_alpha / R, the
# tensors' own keys say which modules of which blocks are adapted, dropout is lora_dropout. A field added to
# LoRAConfig, set to anything but its default, is refused until checked against PEFT and added here.
EXPORTED_SETTINGS = {"rank", "alpha", "targets", "dropout"}


def export_peft(adapter: str | GPT, folder: str) -> dict:
    """Write `folder/adapter_config.json` + `folder/adapter_model.safetensors` that PEFT loads onto
    transformers' GPT2LMHeadModel with the same outputs. `adapter`: an adapter file or a model with
    LoRA. Returns the PEFT config written."""
    if isinstance(adapter, str):
        tensors, metadata = read_adapter(adapter)
        config, base, n_layer = metadata["lora_config"], metadata["base"], metadata["base_config"]["n_layer"]
    else:
        raw = unwrap(adapter)
        tensors = {k: v.detach().cpu() for k, v in lora_state_dict(raw).items()}
        config, base, n_layer = raw.lora_config, raw.name_or_path, raw.config.n_layer
    odd = [f.name for f in fields(config) if f.name not in EXPORTED_SETTINGS and getattr(config, f.name) != f.default]
    if odd:
        raise ValueError(f"the PEFT export does not support the LoRA setting(s) {', '.join(odd)} of this adapter")
    found: dict[tuple[int, str], dict[str, dict[str, torch.Tensor]]] = {}  # (block, module) -> target -> A and B
    for key, tensor in tensors.items():
        layer, module, matrix, target = parse_adapter_key(key)
        found.setdefault((layer, module), {}).setdefault(target, {})[matrix] = tensor
    if not found:
        raise ValueError("the adapter holds no LoRA tensors: nothing to export")
    layers = sorted({layer for layer, _ in found})
    modules = modules_of(tuple(t for t in TARGETS if any(t in parts for parts in found.values())))
    if set(found) != {(layer, module) for layer in layers for module in modules}:
        raise ValueError(
            "the PEFT export needs the same modules adapted in every adapted block (target_modules × "
            f"layers_to_transform); this adapter adapts {', '.join(f'{m} of block {b}' for b, m in sorted(found))}"
        )
    peft_tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for (layer, module), parts in sorted(found.items()):
        stacked = parts_of(module, tuple(t for t in TARGETS if t in parts))  # (target, chunk, n_chunks): q, k, v
        A = torch.cat([parts[target]["A"] for target, _, _ in stacked])  # (R, d_in), R the parts' ranks summed
        rows = parts[stacked[0][0]]["B"].shape[0]  # each part: d_out / n_chunks rows
        B, column = A.new_zeros(rows * stacked[0][2], A.shape[0]), 0  # (d_out, R)
        for target, chunk, _ in stacked:
            rank = parts[target]["B"].shape[1]
            B[chunk * rows : (chunk + 1) * rows, column : column + rank] = parts[target]["B"]
            column += rank
        if A.shape[0] != config.rank:  # stacked q/k/v: alpha R·(α/r), so that PEFT's alpha / R is our scaling
            rank_pattern[module], alpha_pattern[module] = A.shape[0], A.shape[0] * config.scaling
        prefix = f"{PEFT_PREFIX}transformer.h.{layer}.{module}"
        peft_tensors[f"{prefix}.lora_A.weight"], peft_tensors[f"{prefix}.lora_B.weight"] = A.contiguous(), B
    peft_config = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        base_model_name_or_path=HUB_ORGANISATION + base if base in PRETRAINED else base,
        r=config.rank,
        lora_alpha=config.rank * config.scaling,  # PEFT's scaling is lora_alpha / r: ours, whatever it is made of
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=modules,
        layers_to_transform=None if layers == list(range(n_layer)) else layers,
        fan_in_fan_out=True,  # GPT-2's Conv1D
        lora_dropout=config.dropout,
        bias="none",
        use_rslora=False,
        use_dora=False,
        inference_mode=True,
    )
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, WEIGHTS_FILE)) as tmp:
        # the header records our config, so an import can undo the stacking tensor for tensor
        save_file(peft_tensors, tmp, metadata={"format": "pt", "lora_py_config": json.dumps(asdict(config))})
    with atomic_path(os.path.join(folder, CONFIG_FILE)) as tmp, open(tmp, "w") as f:
        json.dump(peft_config, f, indent=2)
    return peft_config


# ---- import: PEFT -> ours ---------------------------------------------------------------------------


# adapter_config.json fields that keep PEFT's LoRA plain (h = W0·x + scaling·B·A·x, W0 untouched),
# each either handled below or without effect on the outputs. Any other field set to something
# other than its default (False, None, {}, []) changes the method, and is refused.
PLAIN_LORA_FIELDS = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "r",
    "lora_alpha",
    "lora_dropout",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "bias",
    "init_lora_weights",
    "runtime_config",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
}
# init_lora_weights values that only choose the starting A and B; the others (pissa, olora, corda,
# loftq, ...) also rewrite W0 or switch to a LoRA variant, so the adapter needs a base we do not have
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
ADAPTABLE = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's Conv1D modules
# the other modules of transformers' GPT2LMHeadModel, in each block and outside them
OTHER_IN_BLOCK = ("ln_1", "attn", "attn.attn_dropout", "attn.resid_dropout", "ln_2", "mlp", "mlp.act", "mlp.dropout")
OTHER_MODULES = (
    "transformer",
    "transformer.wte",
    "transformer.wpe",
    "transformer.drop",
    "transformer.h",
    "transformer.ln_f",
    "lm_head",
)


def peft_pattern(pattern: dict | None, layer: int, module: str) -> object | None:
    """The value a rank_pattern or alpha_pattern gives one module: the first key that matches its
    name, as PEFT's get_pattern_key matches them; None if none does."""
    name = f"transformer.h.{layer}.{module}"
    key = next((k for k in pattern or {} if re.match(rf"(.*\.)?({k})$", name)), None)
    return None if key is None else pattern[key]


def peft_targets(peft_config: dict, name: str) -> bool:
    """Whether PEFT puts a LoRA on the module `name` (transformers' GPT-2 naming), as PEFT's
    check_target_module_exists decides from target_modules, exclude_modules and layers_to_transform."""

    def matches(entries: str | list[str] | None) -> bool:
        if not entries:
            return False
        if isinstance(entries, str):
            return re.fullmatch(entries, name) is not None
        return any(name == entry or name.endswith(f".{entry}") for entry in entries)

    if matches(peft_config.get("exclude_modules")):
        return False
    target_modules = peft_config.get("target_modules") or ["c_attn"]  # unset: PEFT's default for GPT-2
    if target_modules == "all-linear":  # every linear layer but the output one: GPT-2's four Conv1D
        return name.endswith(ADAPTABLE) and name.startswith("transformer.h.")
    if not matches(target_modules):
        return False
    layers = peft_config.get("layers_to_transform")
    if layers is None:
        return True
    layer = re.match(r"transformer\.h\.(\d+)\.", name)
    return layer is not None and int(layer.group(1)) in ([layers] if isinstance(layers, int) else layers)


def check_peft_config(folder: str, peft_config: dict, layers: list[int]) -> None:
    """Refuse, before any tensor or base is loaded, a PEFT config whose maths lora.py does not
    reproduce exactly: another method, a LoRA variant, trained biases, or modules other than GPT-2's
    four projections. fan_in_fan_out may be either: for GPT-2's Conv1D, PEFT sets it itself (with a
    warning), and A and B have the same shapes both ways."""
    where = f"{folder}/{CONFIG_FILE}"
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: a {peft_config.get('peft_type')} adapter, not LoRA")
    if peft_config.get("bias", "none") != "none":
        raise ValueError(
            f"{where}: bias {peft_config['bias']!r} trains biases too; lora.py adapts with A and B only (bias 'none')"
        )
    init = peft_config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise ValueError(
            f"{where}: init_lora_weights {init!r} changes the base weights or the method, not just "
            f"the start of A and B; lora.py imports plain LoRA ({', '.join(map(repr, PLAIN_INITS))})"
        )
    unsupported = [key for key, value in peft_config.items() if key not in PLAIN_LORA_FIELDS and value]
    if unsupported:
        raise ValueError(f"{where} uses {', '.join(unsupported)}: not plain LoRA, lora.py has no equivalent")
    names = [f"transformer.h.{layer}.{module}" for layer in layers for module in ADAPTABLE + OTHER_IN_BLOCK]
    every_layer = {**peft_config, "layers_to_transform": None}  # which layers: checked against the tensors
    targeted = [name for name in [*names, *OTHER_MODULES] if peft_targets(every_layer, name)]
    others = [name for name in targeted if not name.endswith(ADAPTABLE) or not name.startswith("transformer.h.")]
    if others or not targeted:
        what = f"puts a LoRA on {others[0]}" if others else "matches none of GPT-2's modules"
        raise ValueError(
            f"{where}: target_modules {peft_config.get('target_modules')!r} {what}; lora.py adapts "
            f"{', '.join(ADAPTABLE)}"
        )


def read_peft(folder: str) -> tuple[dict, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], dict | None]:
    """(adapter_config, {(layer, module): (A, B)}, our LoRA config if we exported it) of a PEFT folder.
    Refuses what has no exact counterpart here (see check_peft_config) and tensors PEFT would not load."""
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} is not a PEFT folder: no {CONFIG_FILE}")
    try:
        with open(config_path, encoding="utf-8") as f:
            peft_config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not JSON ({e})") from None
    if not isinstance(peft_config, dict) or "peft_type" not in peft_config:
        raise ValueError(f"{config_path} is not a PEFT config (a JSON object with a peft_type)")
    with open_safetensors(os.path.join(folder, WEIGHTS_FILE)) as f:
        ours = (f.metadata() or {}).get("lora_py_config")
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key in f.keys():
            match = PEFT_KEY.fullmatch(key)
            if match is None:
                raise ValueError(
                    f"{folder}: tensor {key} is not a LoRA A or B of a module lora.py adapts ({', '.join(ADAPTABLE)})"
                )
            layer, module, which = match.groups()
            pairs.setdefault((int(layer), module), {})[which] = f.get_tensor(key)
    check_peft_config(folder, peft_config, sorted({layer for layer, _ in pairs}))
    for (layer, module), pair in pairs.items():
        where = f"{folder}: layer {layer}'s {module}"
        if not peft_targets(peft_config, f"transformer.h.{layer}.{module}"):
            raise ValueError(
                f"{where} has a LoRA that adapter_config.json leaves out (target_modules "
                f"{peft_config.get('target_modules')!r}, layers_to_transform "
                f"{peft_config.get('layers_to_transform')!r}): PEFT would not load it"
            )
        if set(pair) != {"A", "B"}:
            has, lacks = ("lora_A", "lora_B") if "A" in pair else ("lora_B", "lora_A")
            raise ValueError(f"{where} has a {has} but no {lacks}: the folder is incomplete")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"{where}: lora_A is {tuple(A.shape)} and lora_B {tuple(B.shape)}; they must be "
                "(R, d_in) and (d_out, R), R the rank"
            )
        rank = peft_pattern(peft_config.get("rank_pattern"), layer, module) or peft_config.get("r", 8)
        if A.shape[0] != rank:
            raise ValueError(
                f"{where} has lora_A of rank {A.shape[0]}, but adapter_config.json says {rank} "
                "(r, rank_pattern): PEFT would refuse to load it"
            )
    return peft_config, {key: (pair["A"], pair["B"]) for key, pair in pairs.items()}, json.loads(ours) if ours else None


def peft_alpha(peft_config: dict, layer: int, module: str) -> float:
    """The lora_alpha PEFT gives one module: alpha_pattern's, else lora_alpha."""
    alpha = peft_pattern(peft_config.get("alpha_pattern"), layer, module)
    return alpha if alpha is not None else peft_config.get("lora_alpha", 8)


def peft_scaling(peft_config: dict, alpha: float, rank: int) -> float:
    """PEFT's scaling: alpha / R, or alpha / √R with use_rslora."""
    return alpha / (math.sqrt(rank) if peft_config.get("use_rslora") else rank)


def import_peft(folder: str, base: str | GPT | None = None) -> GPT:
    """The base (default: the adapter's base_model_name_or_path) with the PEFT adapter in `folder`
    as our LoRA, same outputs as PEFT gives. Save it with lora.save_adapter."""
    peft_config, pairs, ours = read_peft(folder)
    if base is None:
        base = peft_config.get("base_model_name_or_path") or ""
        base = base.removeprefix(HUB_ORGANISATION)
        if not base:
            raise ValueError(f"{folder}'s adapter_config.json names no base model: pass one")
    model = GPT.from_pretrained(base) if isinstance(base, str) else base
    n_layer = model.config.n_layer
    if any(layer >= n_layer for layer, _ in pairs):
        raise ValueError(f"{folder} adapts layer {max(layer for layer, _ in pairs)}, but the base has {n_layer} layers")
    if ours is not None:  # our own export: undo the stacking
        config = LoRAConfig.from_dict(ours, f"{folder}/{WEIGHTS_FILE}")
    else:  # any PEFT LoRA: every part of a module gets its whole A; the widest rank for all
        adapted_modules = {module for _, module in pairs}
        targets = tuple(t for t, places in TARGETS.items() if any(where.module in adapted_modules for where in places))
        rank = max(A.shape[0] for A, _ in pairs.values())
        # our α/r is PEFT's default scaling; modules with another fold the ratio into B
        alpha = peft_scaling(peft_config, peft_config.get("lora_alpha", 8), peft_config.get("r", rank)) * rank
        config = LoRAConfig(rank, alpha, targets, peft_config.get("lora_dropout", 0.0))
    apply_lora(model, config)
    scaling = config.scaling
    with torch.no_grad():
        for layer_index, block in enumerate(model.transformer.h):
            for module in modules_of(config.targets):
                if (layer_index, module) not in pairs:
                    continue  # not adapted there by PEFT: B stays zero, ΔW = 0
                A, B = pairs[(layer_index, module)]
                lora = block.get_submodule(module)
                if A.shape[1] != lora.in_features or B.shape[0] != lora.out_features:
                    raise ValueError(
                        f"{folder}: {module} of layer {layer_index} is {B.shape[0]} × {A.shape[1]}, "
                        f"the base's is {lora.out_features} × {lora.in_features}"
                    )
                fold = peft_scaling(peft_config, peft_alpha(peft_config, layer_index, module), A.shape[0]) / scaling
                parts = parts_of(module, config.targets)
                if ours is not None and A.shape[0] != len(parts) * config.rank:
                    raise ValueError(
                        f"{folder}: {module} of layer {layer_index} has rank {A.shape[0]}, "
                        f"not {len(parts)} × {config.rank} as its header says"
                    )
                for column, (target, _, _) in enumerate(parts):
                    rows = lora.parts[target]
                    if ours is not None:  # this part's own block of columns
                        columns = slice(column * config.rank, (column + 1) * config.rank)
                        lora.lora_A[target].copy_(A[columns])
                        lora.lora_B[target].copy_(B[rows, columns] * fold)
                    else:
                        lora.lora_A[target][: A.shape[0]] = A
                        lora.lora_B[target].zero_()
                        lora.lora_B[target][:, : A.shape[0]] = B[rows] * fold
    return model


# ---- command line -----------------------------------------------------------------------------------


def check_out(path: str, folder: bool) -> None:
    """Refuse an --out that cannot be written as asked (a folder for export, a file for import)
    before anything is read or loaded."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path} is a file, not a folder: export writes a PEFT folder")
    if not folder and os.path.isdir(path):
        raise ValueError(f"--out {path} is a folder: import writes one adapter file, e.g. {path}/adapter.safetensors")
    if not folder and not os.path.isdir(os.path.dirname(path) or "."):
        raise ValueError(f"--out {path}: no folder {os.path.dirname(path)} to write it in")


def main(argv: list[str] | None = None) -> None:
    parser = command_line("lab.peft_interop", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="our adapter file -> a PEFT folder (a PEFT LoRA of transformers' GPT-2)"
    )
    export.add_argument("adapter", help="an adapter file written by lora.save_adapter / train.py")
    export.add_argument("--out", required=True, help="the PEFT folder to write (created if missing)")
    to_ours = commands.add_parser("import", help="a PEFT folder (a PEFT LoRA of GPT-2) -> our adapter file")
    to_ours.add_argument("folder", help="a PEFT folder: adapter_config.json + adapter_model.safetensors")
    to_ours.add_argument("--base", help="gpt2, gpt2-medium, ... or a folder (default: the PEFT config's base model)")
    to_ours.add_argument("--out", required=True, help="the adapter file to write, e.g. adapter.safetensors")
    args = parser.parse_args(argv)
    try:
        check_out(args.out, folder=args.command == "export")
        if args.command == "export":
            config = export_peft(args.adapter, args.out)
            ranks = {m: config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]}
            modules = ", ".join(f"{m} (rank {r})" for m, r in ranks.items())
            blocks = config["layers_to_transform"]
            print(
                f"wrote {args.out}/{CONFIG_FILE} and {WEIGHTS_FILE}: PEFT LoRA on {modules}"
                f"{f' of blocks {blocks}' if blocks else ''}, base {config['base_model_name_or_path']}"
            )
        else:
            model = import_peft(args.folder, args.base)
            save_adapter(model, args.out)
            c = model.lora_config
            print(
                f"wrote {args.out}: rank {c.rank}, alpha {c.alpha:g} on {','.join(c.targets)}, "
                f"base {model.name_or_path}"
            )
    except (ValueError, OSError) as e:
        sys.exit(f"lab.peft_interop: error: {e}")


if __name__ == "__main__":
    main()
