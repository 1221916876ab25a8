"""Every kind of adapted layer (lora.VARIANTS) through every consumer: each consumer gives the layer's own logits
or refuses in one line, never a third answer. Then DoRA (lab/dora.py) against PEFT's use_dora."""

import copy
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import prepare_data
import sample
import train
from conftest import ROOT, english_text, loud_base
from lab.analysis import amplification_tables, similarity
from lab.dora import DoRALinear
from lab.multi_adapter import adapter_per_row, add_adapter
from lab.peft_interop import export_peft
from lora import (
    VARIANTS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from model import GPT, GPTConfig

KINDS = sorted(VARIANTS)
BPE_TINY = GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)  # sample.py needs GPT-2's BPE


def randomize(model: GPT, seed: int = 0) -> None:
    """Every adapter tensor moved off its initial value (B off zero, DoRA's magnitudes off ‖W0‖), so that each
    one changes the logits and none can be lost unseen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(p * (1 + 0.3 * noise) if p.any() else 0.5 * noise)


@pytest.fixture
def base_folder(tmp_path) -> str:
    """A tiny base with GPT-2's vocabulary and weights large enough that greedy text follows the adapter."""
    return loud_base(str(tmp_path / "base"), BPE_TINY, 1.0)


def adapted(base_folder: str, kind: str) -> GPT:
    model = apply_lora(GPT.from_pretrained(base_folder).eval(), LoRAConfig(4, 8.0, ("q", "v", "o", "mlp"), 0.0, kind))
    randomize(model)
    return model


def one_line_refusal(error: pytest.ExceptionInfo) -> bool:
    return "\n" not in str(error.value) and len(str(error.value)) > 20


@pytest.mark.parametrize("kind", KINDS)
def test_merging_saving_and_loading_give_the_layers_own_logits(base_folder, tmp_path, kind):
    model = adapted(base_folder, kind)
    assert {type(m) for m in model.modules() if isinstance(m, LoRALinear)} == {LoRAConfig(variant=kind).layer}
    idx = torch.randint(0, BPE_TINY.vocab_size, (2, 12))
    with torch.no_grad():
        own, base = model(idx)[0], GPT.from_pretrained(base_folder)(idx)[0]
    assert (own - base).abs().max() > 0.1  # the adapter does something

    path = str(tmp_path / "adapter.safetensors")
    save_adapter(model, path)
    assert load_file(path).keys() == lora_state_dict(model).keys()  # every tensor the layers own, found by ownership
    loaded = GPT.from_pretrained(base_folder).eval()
    assert load_adapter(loaded, path).variant == kind
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], own)

    W0 = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    with torch.no_grad():
        assert (model(idx)[0] - own).abs().max() <= 1e-4 * own.abs().max()
    unmerge_lora(model)
    assert all((model.state_dict()[k] - v).abs().max() <= 1e-5 for k, v in W0.items())


@pytest.mark.parametrize("kind", KINDS)
def test_sample_py_merged_and_unmerged_writes_the_layers_own_greedy_text(base_folder, tmp_path, kind, capsys):
    tiktoken = pytest.importorskip("tiktoken")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(ROOT), "shared", "tiktoken"))
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception:
        pytest.skip("tiktoken's gpt2 encoding is not available offline")
    model = adapted(base_folder, kind)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(model, path)
    prompt = encoding.encode("Hello there")
    with torch.no_grad():
        tokens = model.generate(torch.tensor([prompt]), 10, temperature=0)[0].tolist()
    for merge in ([], ["--merge"]):
        argv = ["--adapter", path, "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "10"]
        sample.main([*argv, "--dtype", "float32", *merge])
        printed = capsys.readouterr().out.splitlines()
        assert printed[0] == f"--- {path} ---" and "\n".join(printed[1:-1]) == encoding.decode(tokens), merge


@pytest.mark.parametrize("kind", KINDS)
def test_the_multi_adapter_bank_runs_the_layers_own_forward(base_folder, kind):
    model = adapted(base_folder, kind)
    idx = torch.randint(0, BPE_TINY.vocab_size, (3, 10))
    with torch.no_grad():
        own, base = model(idx)[0], GPT.from_pretrained(base_folder)(idx)[0]
        add_adapter(model, "own")  # a copy of the active adapter
        randomize(model, seed=1)  # the active adapter changes; the banked copy must not
        with adapter_per_row(model, ["own", None, "own"]):
            mixed = model(idx)[0]
    assert (mixed[[0, 2]] - own[[0, 2]]).abs().max() <= 1e-5 * own.abs().max()
    assert (mixed[1] - base[1]).abs().max() <= 1e-5 * base.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_the_analysis_and_the_peft_export_serve_the_layer_or_refuse_in_one_line(base_folder, tmp_path, kind):
    model = adapted(base_folder, kind)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(model, path)
    layer = LoRAConfig(variant=kind).layer
    if layer.update_is_low_rank:
        records, _ = similarity(path, path, layers="all")
        assert all(torch.allclose(r["phi"], torch.ones_like(r["phi"])) for r in records)
    else:
        with pytest.raises(ValueError, match="not B·A of rank r") as error:
            similarity(path, path)
        assert one_line_refusal(error)
    row = amplification_tables([path], None, "0", "q", seed=0)[0]  # Table 7's ΔW: the layer's own update
    c_attn = model.transformer.h[0].attn.c_attn
    assert row["‖ΔW‖_F"] == pytest.approx(c_attn.delta_weight("q").double().norm().item(), rel=1e-6)
    if kind == "lora":  # exact against PEFT: tests/test_peft_interop.py
        assert export_peft(path, str(tmp_path / "peft"))["r"] == 4
    else:
        with pytest.raises(ValueError, match="does not support the LoRA setting\\(s\\) variant") as error:
            export_peft(path, str(tmp_path / "peft"))
        assert one_line_refusal(error)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_resumed_run_of_each_kind_ends_bit_for_bit_where_a_straight_run_ends(tmp_path, monkeypatch, kind, dtype):
    tokens = np.frombuffer(english_text(12_000).encode("ascii"), dtype=np.uint8).astype(np.uint16)
    data = str(tmp_path / "chars")
    meta = dict(format="text", tokenizer="ascii", vocab_size=128, eot_token=0)
    prepare_data.write_folder(data, {"train.bin": tokens[:11_000], "val.bin": tokens[11_000:]}, meta)
    run = ["--base", "scratch", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--rank", "4", "--variant", kind]
    run += ["--lora-dropout", "0.1", "--block-size", "32", "--batch-size", "4", "--max-iters", "12", "--data", data]
    run += ["--eval-interval", "6", "--eval-iters", "2", "--warmup-iters", "2", "--device", "cpu", "--dtype", dtype]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.main([*run, "--run-dir", straight])

    class Killed(Exception):
        pass

    def die_while_writing_the_adapter(model, path):
        raise Killed  # after the step-6 checkpoint, before the adapter beside it

    monkeypatch.setattr(train, "save_adapter", die_while_writing_the_adapter)
    with pytest.raises(Killed):
        train.main([*run, "--run-dir", resumed])
    monkeypatch.undo()
    train.main([*run, "--run-dir", resumed, "--resume"])
    a, b = (load_file(os.path.join(out, "adapter.safetensors")) for out in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_magnitude" in k for k in a) == (kind == "dora")  # DoRA's magnitudes trained and saved too


def test_flags_that_do_not_apply_refuse_in_one_line(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--rank", "0", "--variant", "dora"])
    assert re.search(r"--variant configure LoRA, but --rank 0 trains every weight", capsys.readouterr().err)
    with pytest.raises(ValueError, match=f"unknown LoRA variant 'qlora': choose from {', '.join(VARIANTS)}$"):
        LoRAConfig(variant="qlora")


# ---- DoRA against PEFT's use_dora ---------------------------------------------------------------------------------


def test_dora_equals_peft_use_dora_merged_and_unmerged_with_the_same_gradients():
    """One nn.Linear adapted by both, the same A, B and magnitude: the same outputs unmerged and merged, and the
    same gradients for A, B and m (the norm a constant in the backward pass, as both do)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10)
    ours = DoRALinear(copy.deepcopy(linear), {"all": slice(0, 10)}, LoRAConfig(4, 8.0, variant="dora"))
    theirs = peft.get_peft_model(
        torch.nn.Sequential(linear),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, lora_dropout=0.0),
    )
    peft_layer = theirs.base_model.model[0]
    with torch.no_grad():
        assert torch.allclose(ours.lora_magnitude["all"], peft_layer.lora_magnitude_vector["default"].weight)
        for p in (ours.lora_A["all"], ours.lora_B["all"], ours.lora_magnitude["all"]):
            p.copy_(p * (1 + 0.3 * torch.randn(p.shape)) if p.any() else 0.5 * torch.randn(p.shape))
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A["all"])
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B["all"])
        peft_layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude["all"])
    x = torch.randn(3, 5, 12)
    y_ours, y_theirs = ours(x), theirs(x)
    assert (y_ours - y_theirs).abs().max() <= 1e-5 and (y_ours - linear(x)).abs().max() > 0.1
    y_ours.pow(2).sum().backward()
    y_theirs.pow(2).sum().backward()
    pairs = [
        (ours.lora_A["all"], peft_layer.lora_A["default"].weight),
        (ours.lora_B["all"], peft_layer.lora_B["default"].weight),
        (ours.lora_magnitude["all"], peft_layer.lora_magnitude_vector["default"].weight),
    ]
    assert all(torch.allclose(a.grad, b.grad, atol=1e-5) for a, b in pairs)
    with torch.no_grad():
        ours.merge()
        theirs.merge_adapter()
        assert torch.allclose(ours.weight, peft_layer.base_layer.weight, atol=1e-6)
        assert (ours(x) - y_theirs).abs().max() <= 1e-5
        ours.unmerge()
        theirs.unmerge_adapter()
        assert torch.allclose(ours.weight, linear.weight, atol=1e-6)
