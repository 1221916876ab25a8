"""The lab: experiments and measurements beside the core, which never imports it (bench.py only the adapter
baselines it measures): the Table-1 adapter baselines, §7 analysis, PEFT interop, several adapters in one batch
and their benchmark, profiling, the E2E evaluation, and the paper's GPT-2 tables in miniature."""

import argparse


def command_line(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m lab.<name>`: its --help prints the module's docstring as written."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
