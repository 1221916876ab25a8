"""Every command a user reads in README.md and docs/*.md runs as written, as far as its arguments go.

For each line of a ```bash block that starts with `python ` or `torchrun ` (lines ending in `\\` joined,
`$VAR` expanded from the block's own `VAR="..."` lines), the script is imported and its `main(argv)`
called with exactly those arguments, with argument parsing wrapped to raise `Parsed` as soon as it is
done: the flags and values are accepted and nothing is run. Where a script has its own `parse_args`
function (train.py, sample.py, bench.py), that function is wrapped, so its checks after argparse (e.g.
train.py's parser.error on bad combinations, bench.py's known --size) must pass too; elsewhere
argparse.ArgumentParser.parse_args is. A renamed or removed flag makes argparse exit with status 2,
and the test fails.

Also: the README stays short, its links resolve, its eq. 3 line is lora.py's, and nothing a user
reads (the docs, every --help) speaks of where the project is developed.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import inspect
import io
import os
import re
import shlex

import pytest
import torch

import lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]

# `python -m X` commands of other projects, not ours: nothing of ours to parse.
EXTERNAL = {"pytest"}
# Words about where the project is developed, which nothing a user reads may contain.
FORBIDDEN = ("../shared", "this machine", "development machine", "development session", "lent for")
EQ3 = "delta = self.scaling * (x @ self.lora_A[name].mT @ self.lora_B[name].mT)"


class Parsed(Exception):
    """Raised right after the arguments were parsed (and checked), instead of running the work."""


def bash_lines(path: str) -> list[tuple[int, str, dict[str, str]]]:
    """(line number, logical line, the block's variables so far) of every ```bash block in a file."""
    found, block, variables, pending, start = [], False, {}, "", 0
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                block, variables = stripped in ("```bash", "```sh", "```shell"), {}
                continue
            if not block:
                continue
            if not pending:
                start = number
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            logical, pending = pending + stripped, ""
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", logical)
            if assignment:
                variables[assignment.group(1)] = " ".join(shlex.split(assignment.group(2), comments=True))
            found.append((start, logical, dict(variables)))
    return found


def expand(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"${name} is not set in its own block: set it there, or spell the arguments out")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def script_and_args(tokens: list[str]) -> tuple[str, list[str]]:
    """('train', [...]) for `python train.py ...`, ('lab.analysis', [...]) for `python -m lab.analysis ...`,
    and the script part of `torchrun [its options] train.py ...`."""
    if tokens[0] == "python" and len(tokens) > 2 and tokens[1] == "-m":
        return tokens[2], tokens[3:]
    if tokens[0] == "python" and len(tokens) > 1 and tokens[1].endswith(".py"):
        return tokens[1][:-3].replace("/", "."), tokens[2:]
    if tokens[0] == "torchrun":
        for i, token in enumerate(tokens):
            if token.endswith(".py"):
                return token[:-3].replace("/", "."), tokens[i + 1 :]
    raise ValueError(f"cannot tell which script `{' '.join(tokens)}` runs")


def documented_commands() -> list[tuple[str, str, dict[str, str]]]:
    commands = []
    for path in DOCS:
        for number, line, variables in bash_lines(path):
            if line.startswith(("python ", "torchrun ")):
                head = shlex.split(line, comments=True)[:3]
                if head[:2] == ["python", "-m"] and head[2] in EXTERNAL:
                    continue
                commands.append((f"{path}:{number}", line, variables))
    return commands


COMMANDS = documented_commands()


def check_parses(module_name: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Call module.main(args) with parsing wrapped to raise Parsed; fail unless Parsed is raised."""
    module = importlib.import_module(module_name)
    if "-h" in args or "--help" in args:  # prints the help and exits 0
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
            module.main(args)
        assert exit_.value.code == 0
        return
    own = getattr(module, "parse_args", None)
    needs_cuda = any(a.startswith("cuda") for a in args) and not torch.cuda.is_available()
    with monkeypatch.context() as patch:
        if inspect.isfunction(own) and own.__module__ == module.__name__ and not needs_cuda:

            def wrapped(*a, **k):
                own(*a, **k)
                raise Parsed

            patch.setattr(module, "parse_args", wrapped)
        else:  # argparse alone (also for a --device cuda command without CUDA here, which the checks refuse)
            original = argparse.ArgumentParser.parse_args

            def wrapped(self, *a, **k):
                original(self, *a, **k)
                raise Parsed

            patch.setattr(argparse.ArgumentParser, "parse_args", wrapped)
        with pytest.raises(Parsed):
            module.main(args)


@pytest.mark.parametrize("where,line,variables", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_parses(where, line, variables, monkeypatch):
    tokens = shlex.split(expand(line, variables), comments=True)
    module_name, args = script_and_args(tokens)
    check_parses(module_name, args, monkeypatch)


def test_the_check_catches_a_renamed_flag(monkeypatch):
    with pytest.raises(SystemExit):
        check_parses("train", ["--out", "out/x"], monkeypatch)  # --out was train.py's name for --run-dir
    with pytest.raises(SystemExit):
        check_parses("train", ["--rank", "0", "--alpha", "16"], monkeypatch)  # parsed, then refused by its checks


def test_every_script_is_documented():
    seen = {script_and_args(shlex.split(expand(line, v), comments=True))[0] for _, line, v in COMMANDS}
    core = {"train", "sample", "prepare_data", "bench"}
    wanted = core | {"lab.analysis", "lab.peft_interop", "lab.multi_adapter", "lab.bench_mixed"}
    assert wanted <= seen, f"no documented command for {sorted(wanted - seen)}"


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.readlines()) <= 250


def test_the_readme_points_to_eq3_by_a_name_that_holds_it():
    """No line numbers in prose: the README names the function where eq. 3 is written, and that function exists
    and holds eq. 3's line."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert EQ3 in readme and not re.search(r"lora\.py#L\d+|lora\.py` line \d+", readme)
    row = next(line for line in readme.splitlines() if line.startswith("| §4.1, eq. 3"))
    names = re.findall(r"`([A-Z]\w*)\.(\w+)`", row)  # `Class.method`
    assert ("LoRALinear", "forward") in names, row
    for cls, method in names:
        assert EQ3 in inspect.getsource(getattr(getattr(lora, cls), method)), f"{cls}.{method} does not hold eq. 3"


@pytest.mark.parametrize("path", DOCS)
def test_links_resolve(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "#")):
            continue
        file = target.split("#")[0]
        assert os.path.exists(os.path.join(ROOT, os.path.dirname(path), file)), f"{path}: broken link {target}"


def help_texts() -> dict[str, str]:
    """--help of every command line, subcommands included, without a subprocess."""
    runs = {
        "train": [[]],
        "sample": [[]],
        "prepare_data": [[]],
        "bench": [[]],
        "lab.multi_adapter": [[]],
        "lab.bench_mixed": [[]],
        "lab.e2e_metrics": [[]],
        "lab.analysis": [[], ["similarity"], ["amplification"]],
        "lab.peft_interop": [[], ["export"], ["import"]],
    }
    texts = {}
    for name, prefixes in runs.items():
        module = importlib.import_module(name)
        for prefix in prefixes:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                module.main([*prefix, "--help"])
            texts[" ".join([name, *prefix])] = out.getvalue()
    return texts


def test_nothing_speaks_of_the_development_setting():
    texts = dict(help_texts())
    for path in DOCS:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            texts[path] = f.read()
    found = [(where, word) for where, text in texts.items() for word in FORBIDDEN if word in text]
    assert not found, found
