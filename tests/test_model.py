import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model
from conftest import ROOT, TINY, load_hf
from model import GPT, GPTConfig


def test_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert model.num_parameters() == 124_439_808  # Hugging Face's count for gpt2, tied embeddings


def test_logits_match_transformers(hf_folder):
    model = GPT.from_pretrained(hf_folder).eval()
    idx = torch.randint(0, TINY.vocab_size, (3, TINY.block_size))
    ours, _ = model(idx)
    theirs = load_hf(hf_folder)(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert model.lm_head.weight is model.transformer.wte.weight


def test_hub_layout_without_prefix_and_with_attention_masks(hf_folder, tmp_path):
    """The hub's model.safetensors names tensors `h.0...` and old files carry `.attn.bias` masks."""
    state = load_file(os.path.join(hf_folder, "model.safetensors"))
    hub = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    hub["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, TINY.block_size, TINY.block_size))
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(hub, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(open(os.path.join(hf_folder, "config.json")).read())
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    a, _ = GPT.from_pretrained(str(folder)).eval()(idx)
    b, _ = GPT.from_pretrained(hf_folder).eval()(idx)
    assert torch.equal(a, b)


def test_save_pretrained_round_trip_here_and_in_transformers(hf_folder, tmp_path):
    model = GPT.from_pretrained(hf_folder).eval()
    out = str(tmp_path / "ours")
    model.save_pretrained(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no temp files left
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    expected, _ = model(idx)
    again, _ = GPT.from_pretrained(out).eval()(idx)
    assert torch.equal(expected, again)
    assert (load_hf(out)(idx).logits - expected).abs().max().item() <= 1e-4


def test_loss_ignores_minus_one_targets(tiny_model):
    idx = torch.randint(0, TINY.vocab_size, (2, 6))
    targets = torch.randint(0, TINY.vocab_size, (2, 6))
    targets[:, :3] = -1
    logits, _ = tiny_model(idx)
    no_logits, loss = tiny_model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 3:].flatten(0, 1), targets[:, 3:].flatten())
    assert no_logits is None and torch.allclose(loss, expected)
    _, smoothed = tiny_model(idx, targets, label_smoothing=0.1)
    uniform = -torch.log_softmax(logits[:, 3:], dim=-1).mean()  # -Σ_k log p_k / K, averaged over the targets
    assert torch.allclose(smoothed, 0.9 * expected + 0.1 * uniform, atol=1e-6)


def test_bad_names_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt3'"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))


def test_offline_download_names_the_alternatives(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = "from model import GPT; GPT.from_pretrained('gpt2')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "could not fetch gpt2's weights" in result.stderr
    assert "--base scratch" in result.stderr and "local folder" in result.stderr


def test_sequence_longer_than_context_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="longer than the context"):
        tiny_model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_config_json_names_gpt2(tmp_path, tiny_model):
    tiny_model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_positions"] == TINY.block_size


def test_checkpoint_files_get_the_usual_permissions(tmp_path, tiny_model):
    tiny_model.save_pretrained(str(tmp_path))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weight_trains", [False, True])  # LoRA (the tied lm_head frozen) and full fine-tuning
def test_chunked_loss_has_the_plain_loss_and_gradients(monkeypatch, label_smoothing, weight_trains):
    monkeypatch.setattr(model, "LOSS_CHUNK_ROWS", 4)  # 37 rows: 9 chunks, the last one uneven
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=weight_trains)
    targets = torch.randint(101, (37,))
    loss = model.chunked_cross_entropy(x, weight, targets, label_smoothing)
    inputs = (x, weight) if weight_trains else (x,)
    grads = torch.autograd.grad(3 * loss, inputs)  # a gradient other than 1 flows in, as under a GradScaler
    plain = F.cross_entropy(x @ weight.t(), targets, label_smoothing=label_smoothing)
    plain_grads = torch.autograd.grad(3 * plain, inputs)
    assert torch.allclose(loss, plain, atol=1e-6)
    for grad, plain_grad in zip(grads, plain_grads):
        assert torch.allclose(grad, plain_grad, atol=1e-7, rtol=1e-5)


def test_chunked_loss_where_the_targets_probability_underflows(monkeypatch):
    """Logits 300 apart: the softmax underflows to 0 at some targets; the loss there is still exact."""
    monkeypatch.setattr(model, "LOSS_CHUNK_ROWS", 4)
    torch.manual_seed(0)
    x, weight = (100 * torch.randn(9, 16)).requires_grad_(), torch.randn(101, 16)
    targets = torch.randint(101, (9,))
    loss = model.chunked_cross_entropy(x, weight, targets, 0.1)
    plain = F.cross_entropy(x @ weight.t(), targets, label_smoothing=0.1)
    assert plain.item() > 100 and torch.isfinite(loss) and torch.allclose(loss, plain, rtol=1e-5)
    assert torch.allclose(torch.autograd.grad(loss, x)[0], torch.autograd.grad(plain, x)[0], atol=1e-6)


def test_chunked_loss_under_bf16_autocast_is_the_plain_one_within_bf16_rounding(tiny_model, monkeypatch):
    monkeypatch.setattr(model, "LOSS_CHUNK_ROWS", 5)
    idx, targets = torch.randint(0, TINY.vocab_size, (2, 12)), torch.randint(0, TINY.vocab_size, (2, 12))
    targets[0, :4] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = tiny_model(idx, targets)
        logits, _ = tiny_model(idx)
        plain = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert loss.dtype == torch.float32 and abs(loss.item() - plain.item()) < 1e-2
    loss.backward()
    assert tiny_model.transformer.wte.weight.grad.dtype == torch.float32


def test_activation_checkpointing_in_bf16_gives_the_same_gradients():
    """In bf16 on a CPU a training forward writes attention out (utils.attention); recomputed block by block
    in the backward pass, it gives the gradients that keeping its activations gives."""
    torch.manual_seed(0)
    tiny = GPT(TINY).to(torch.bfloat16).train()
    idx, targets = torch.randint(0, TINY.vocab_size, (2, 12)), torch.randint(0, TINY.vocab_size, (2, 12))
    grads = {}
    for checkpointing in (True, False):
        tiny.activation_checkpointing = checkpointing
        grads[checkpointing] = torch.autograd.grad(tiny(idx, targets)[1], list(tiny.parameters()))
    for grad, grad_checkpointed in zip(grads[False], grads[True]):
        assert torch.equal(grad, grad_checkpointed)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Each block recomputed in the backward pass, dropout included, gives what keeping its activations gives."""
    torch.manual_seed(0)
    tiny = GPT(replace(TINY, dropout=0.1)).train()
    idx, targets = torch.randint(0, TINY.vocab_size, (2, 12)), torch.randint(0, TINY.vocab_size, (2, 12))
    results = {}
    for checkpointing in (False, True):
        tiny.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks in both runs
        _, loss = tiny(idx, targets)
        results[checkpointing] = loss.item(), torch.autograd.grad(loss, list(tiny.parameters()))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results[False], results[True]
    assert loss == loss_checkpointed
    for grad, grad_checkpointed in zip(grads, grads_checkpointed):
        assert torch.allclose(grad, grad_checkpointed, atol=1e-6)
