"""The lab: experiments and measurements beside the core, which never imports it (bench.py only the adapter
baselines it measures, lora.py only a LoRA variant's layer, by its name in lora.VARIANTS, when a config asks for
it, train.py only lab/methods.py, when --method asks for it): the Table-1 adapter baselines, the methods of
Table 3, DoRA, §7 analysis, PEFT interop, several adapters in one batch and their benchmark, profiling, the E2E
evaluation, and the paper's GPT-2 tables in miniature."""

import argparse
import re


def command_line(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m lab.<name>`: its --help prints the module's docstring as written."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


# An adapter tensor's name is its parameter's name in the model (lora.lora_state_dict), such as
# 'transformer.h.0.attn.c_attn.lora_A.q': the block, the module, the matrix ('A', 'B', or a variant's own, such as
# DoRA's 'magnitude') and the target. Read here, once, for the tools that work on adapter files without a model.
ADAPTER_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)\.lora_(\w+?)\.(\w+)")


def parse_adapter_key(key: str) -> tuple[int, str, str, str]:
    """(block, module, matrix, target) of an adapter tensor's name."""
    match = ADAPTER_KEY.fullmatch(key)
    if match is None:
        raise ValueError(f"'{key}' is not the name of an adapter tensor")
    block, module, matrix, target = match.groups()
    return int(block), module, matrix, target
