"""lab/methods.py, the methods LoRA's Table 3 compares it with, trained through train.py: only their parameters
train, decoding with the KV cache equals decoding without, their files reload the same logits, and the tools that
do not know them refuse them in one line."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import prepare_data
import sample
import train
from conftest import TINY, english_text, loud_base
from lab.analysis import similarity
from lab.beam_search import beam_search
from lab.e2e import load_run
from lab.methods import apply_method, load_method, method_state_dict, save_method
from lab.peft_interop import export_peft
from lora import read_adapter
from model import GPT

SPECS = ["ft-top=1", "adapter-h=4", "adapter-l=6", "prefix=3"]
D = TINY.n_embd


def expected_count(spec: str) -> int:
    """Each method's trainable parameters, counted by hand."""
    per_block = {
        "ft-top=1": 12 * D * D + 13 * D,  # c_attn 3d²+3d, c_proj d²+d, c_fc 4d²+4d, c_proj 4d²+d, two LayerNorms 4d
        "adapter-h=4": 2 * (D * 4 + 4 + 4 * D + D),  # two adapters a block, after attention and MLP
        "adapter-l=6": 2 * D + D * 6 + 6 + 6 * D + D,  # one a block, after the MLP, LayerNorm first
        "prefix=3": 2 * 3 * D,  # 3 keys and 3 values (all heads: d wide) a block
    }[spec]
    return per_block * (1 if spec.startswith("ft-top") else TINY.n_layer)


def moved(model: GPT, seed: int = 0) -> GPT:
    """The method's parameters moved off their start (an adapter's up-projection starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method_state_dict(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture
def base_folder(tmp_path) -> str:
    """A tiny base whose weights are large enough that greedy text follows what a method changes."""
    return loud_base(str(tmp_path / "base"), TINY, 0.5)


@pytest.mark.parametrize("spec", SPECS)
def test_only_the_methods_parameters_train(base_folder, spec):
    model = apply_method(GPT.from_pretrained(base_folder), spec)
    trainable = {key for key, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.method_tensors)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_count(spec)
    if spec.startswith("ft-top"):  # the last block, nothing else: not the embeddings, nor ln_f
        assert all(key.startswith(f"transformer.h.{TINY.n_layer - 1}.") for key in trainable)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    for _ in range(2):  # two steps: an adapter's down-projection gets a gradient once its up-projection is not 0
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == trainable


@pytest.mark.parametrize("spec", SPECS)
def test_greedy_decoding_with_the_kv_cache_equals_decoding_without(base_folder, spec):
    model = moved(apply_method(GPT.from_pretrained(base_folder), spec)).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 5))
    with torch.no_grad():
        cached = model.generate(idx, 20, temperature=0)
        assert torch.equal(cached, model.generate(idx, 20, temperature=0, use_cache=False))
        assert not torch.equal(cached, GPT.from_pretrained(base_folder).generate(idx, 20, temperature=0))


@pytest.mark.parametrize("spec", SPECS)
def test_a_method_file_reloads_the_same_logits_and_only_onto_its_base(base_folder, tmp_path, spec):
    model = moved(apply_method(GPT.from_pretrained(base_folder), spec)).eval()
    path = str(tmp_path / "method.safetensors")
    save_method(model, path)
    assert load_file(path).keys() == set(model.method_tensors)
    loaded = GPT.from_pretrained(base_folder).eval()
    assert load_method(loaded, path) == spec
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="whose weights differ") as error:
        load_method(GPT(TINY), path)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"another base .*n_embd 16 \(file\) vs 32 \(model\)"):
        load_method(GPT(replace(TINY, n_embd=32)), path)


def char_data(tmp_path) -> str:
    tokens = np.frombuffer(english_text(12_000).encode("ascii"), dtype=np.uint8).astype(np.uint16)
    folder = str(tmp_path / "chars")
    meta = dict(format="text", tokenizer="ascii", vocab_size=128, eot_token=0)
    prepare_data.write_folder(folder, {"train.bin": tokens[:11_000], "val.bin": tokens[11_000:]}, meta)
    return folder


@pytest.mark.parametrize("spec", SPECS)
def test_train_py_trains_a_method_resumes_it_exactly_and_lab_e2e_loads_it(tmp_path, monkeypatch, spec):
    data = char_data(tmp_path)
    base = str(tmp_path / "base")
    scratch = ["--base", "scratch", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--rank", "0"]
    small = ["--block-size", "32", "--batch-size", "4", "--eval-iters", "2", "--device", "cpu", "--data", data]
    train.main([*scratch, *small, "--max-iters", "4", "--run-dir", base])
    run = ["--base", base, "--rank", "0", "--method", spec, "--lr", "1e-2", *small, "--max-iters", "12"]
    run += ["--eval-interval", "6", "--warmup-iters", "2", "--dtype", "float32"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    model = train.main([*run, "--run-dir", straight])
    ours = model.state_dict()  # the base's own weights, bit for bit (an adapted projection is `c_proj.0` now)
    for key, weight in GPT.from_pretrained(base).state_dict().items():
        key = key if key in ours else key.replace("c_proj.", "c_proj.0.")
        assert key in model.method_tensors or torch.equal(ours[key], weight), key
    assert not os.path.exists(os.path.join(straight, "model.safetensors"))

    def die_while_writing_the_product(model, path):
        raise KeyboardInterrupt  # killed after the step-6 checkpoint, before the method file beside it

    monkeypatch.setattr("lab.methods.save_method", die_while_writing_the_product)
    with pytest.raises(SystemExit):
        train.main([*run, "--run-dir", resumed])
    monkeypatch.undo()
    train.main([*run, "--run-dir", resumed, "--resume"])
    a, b = (load_file(os.path.join(out, "method.safetensors")) for out in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    decoded, described = load_run(straight, None)  # lab.e2e decodes the method's run: its own logits
    assert described.endswith(f"+ {spec}")
    idx = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(decoded.eval()(idx)[0], model.eval()(idx)[0])


def test_tools_that_do_not_know_a_method_refuse_it_in_one_line(base_folder, tmp_path, capsys):
    model = moved(apply_method(GPT.from_pretrained(base_folder), "adapter-h=4"))
    run = tmp_path / "run"
    run.mkdir()
    path = str(run / "method.safetensors")
    save_method(model, path)
    with pytest.raises(SystemExit) as error:
        sample.main(["--run-dir", str(run)])
    assert "is the run of a method LoRA is compared with" in str(error.value) and "\n" not in str(error.value)
    for tool in (read_adapter, lambda p: similarity(p, p), lambda p: export_peft(p, str(tmp_path / "peft"))):
        with pytest.raises(ValueError, match="is not an adapter written by lora.py") as error:
            tool(path)
        assert "\n" not in str(error.value)


def test_a_method_needs_rank_0_and_a_known_name(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "adapter-h=8"])
    assert "--method adapter-h=8 replaces LoRA: give --rank 0 with it" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method 'prefix-tuning=10': give NAME=SIZE, NAME one of ft-top,"):
        apply_method(GPT(TINY), "prefix-tuning=10")


def test_a_prefixed_model_decodes_the_same_with_beam_search_and_with_prompts_of_other_lengths(base_folder):
    """Beam search keeps its own KV cache, which holds the tokens alone; the attention adds the prefix at every
    step. With one beam it is greedy decoding; prompts of different lengths in one batch get what each gets alone."""
    model = moved(apply_method(GPT.from_pretrained(base_folder), "prefix=3")).eval()
    prompts = [[5, 9, 2, 7], [11, 3]]
    greedy = dict(num_beams=1, no_repeat_ngram_size=0, eos_token_id=[])
    together = beam_search(model, prompts, 12, **greedy)
    for prompt, tokens in zip(prompts, together):
        assert (
            model.generate(torch.tensor([prompt]), 12, temperature=0, use_cache=False)[0, len(prompt) :].tolist()
            == tokens
        )
        assert (
            beam_search(model, [prompt], 12, num_beams=3, eos_token_id=[])
            == beam_search(model, [prompt, prompts[0]], 12, num_beams=3, eos_token_id=[])[:1]
        )
