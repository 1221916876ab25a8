import copy
import os
import re
from dataclasses import fields, replace

import pytest
import torch

from conftest import TINY, load_hf
from lab.analysis import adapted_matrices, amplification_tables, matrix_name, similarity
from lab.peft_interop import EXPORTED_SETTINGS, export_peft
from lora import (
    TARGETS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    read_adapter,
    save_adapter,
    unmerge_lora,
)
from model import GPT, GPTConfig
from utils import parameter_summary


def randomize_B(model, std=0.5):
    """B starts at zero; tests that need ΔW != 0 give it random values."""
    with torch.no_grad():
        for layer in lora_layers(model):
            for B in layer.lora_B.values():
                B.normal_(0, std)


def tokens(B=2, T=12):
    return torch.randint(0, TINY.vocab_size, (B, T))


def test_adapted_model_equals_base_at_init(tiny_model):
    idx = tokens()
    base, _ = tiny_model(idx)
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8, targets=tuple(TARGETS)))
    adapted, _ = tiny_model(idx)
    assert torch.equal(base, adapted)
    assert all(torch.count_nonzero(A) > 0 for layer in lora_layers(tiny_model) for A in layer.lora_A.values())


def test_only_A_and_B_train_and_both_get_gradients(tiny_model):
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "o", "mlp")))
    randomize_B(tiny_model)
    idx = tokens()
    _, loss = tiny_model(idx, idx)
    loss.backward()
    for name, p in tiny_model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_lora, name
        if is_lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def eq3_written_plainly(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """h = W0·x + (α/r)·B·A·x (paper, eq. 3) on each adapted chunk of rows, W0·x on the others:
    out of place, ΔW built, the chunks concatenated. A reference that shares no line with LoRALinear.forward."""
    chunks, start = [], 0
    for name, rows in sorted(layer.parts.items(), key=lambda part: part[1].start):
        W0, bias, delta_W = layer.weight[rows], layer.bias[rows], layer.lora_B[name] @ layer.lora_A[name]
        chunks.append(x @ layer.weight[start : rows.start].T + layer.bias[start : rows.start])  # not adapted
        chunks.append(x @ W0.T + bias + layer.scaling * x @ delta_W.T)
        start = rows.stop
    chunks.append(x @ layer.weight[start:].T + layer.bias[start:])
    return torch.cat(chunks, dim=-1)


# each target alone, the README's q,v and every projection, and §4.2 Table 5's combinations
@pytest.mark.parametrize(
    "targets",
    [("q",), ("k",), ("v",), ("o",), ("mlp",), ("q", "v"), ("q", "k"), ("q", "k", "v", "o"), tuple(TARGETS)],
    ids=",".join,
)
def test_every_target_trains_with_the_gradients_of_eq3_written_plainly(tiny_model, monkeypatch, targets):
    apply_lora(tiny_model, LoRAConfig(rank=2, alpha=4, targets=targets))
    randomize_B(tiny_model)  # B = 0 gives A a zero gradient, which would compare nothing
    idx = tokens()

    def gradients() -> dict[str, torch.Tensor]:
        tiny_model.zero_grad(set_to_none=True)
        tiny_model(idx, idx)[1].backward()
        return {name: p.grad for name, p in tiny_model.named_parameters() if p.requires_grad}

    ours = gradients()
    monkeypatch.setattr(LoRALinear, "forward", eq3_written_plainly)
    reference = gradients()
    n_parts = sum(len(TARGETS[t]) for t in targets)  # q, k, v one part each of c_attn; mlp two modules
    assert ours.keys() == reference.keys() and len(ours) == 2 * n_parts * TINY.n_layer
    for name, grad in ours.items():
        assert grad.abs().max() > 0, name
        assert (grad - reference[name]).abs().max() <= 1e-5 * reference[name].abs().max(), name


@pytest.mark.parametrize(
    "targets, expected",
    [(("q", "v"), 147_456), (("q", "k", "v", "o", "mlp"), 4 * 12 * (4 * (768 + 768) + 2 * (768 + 3072)))],
)
def test_trainable_count_is_sum_of_r_times_din_plus_dout(targets, expected):
    with torch.device("meta"):
        model = GPT(GPTConfig())
    apply_lora(model, LoRAConfig(rank=4, targets=targets))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert parameter_summary(model).startswith(f"trainable {expected:,} / total {124_439_808 + expected:,}")


def test_lora_put_into_a_model_in_eval_mode_is_in_eval_mode(tiny_model):
    """load_adapter on `GPT.from_pretrained(...).eval()` must not sample with the adapter's dropout on."""
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8, dropout=0.5))
    randomize_B(tiny_model)
    idx = tokens()
    assert not any(m.training for m in tiny_model.modules())
    assert torch.equal(tiny_model(idx)[0], tiny_model(idx)[0])
    assert any(m.training for m in apply_lora(GPT(TINY), LoRAConfig(dropout=0.5)).modules())  # train mode stays


def test_merged_equals_unmerged_and_unmerge_restores_W0(tiny_model):
    W0 = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=16, targets=("q", "k", "v", "o", "mlp")))
    randomize_B(tiny_model)
    idx = tokens()
    unmerged, _ = tiny_model(idx)
    merge_lora(tiny_model)
    merged, _ = tiny_model(idx)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert (
        tiny_model.transformer.h[0].attn.c_attn.weight - W0["transformer.h.0.attn.c_attn.weight"]
    ).abs().max() > 1e-3
    merge_lora(tiny_model)  # a second merge must not add ΔW twice
    twice, _ = tiny_model(idx)
    assert torch.equal(merged, twice)
    unmerge_lora(tiny_model)
    for key, value in W0.items():
        assert (tiny_model.state_dict()[key] - value).abs().max().item() <= 1e-6, key


def test_same_output_as_loralib_merged_linear():
    """Our q,v on the fused c_attn against the authors' MergedLinear(enable_lora=[True, False, True])."""
    loralib = pytest.importorskip("loralib")
    C, r, alpha = 16, 4, 8
    torch.manual_seed(0)
    theirs = loralib.MergedLinear(C, 3 * C, r=r, lora_alpha=alpha, enable_lora=[True, False, True], merge_weights=False)
    base = torch.nn.Linear(C, 3 * C)
    base.load_state_dict({"weight": theirs.weight.detach(), "bias": theirs.bias.detach()})
    ours = LoRALinear(base, {"q": slice(0, C), "v": slice(2 * C, 3 * C)}, LoRAConfig(r, alpha))
    with torch.no_grad():
        ours.lora_B["q"].normal_()
        ours.lora_B["v"].normal_()
        theirs.lora_A.copy_(torch.cat([ours.lora_A["q"], ours.lora_A["v"]]))
        theirs.lora_B.copy_(torch.cat([ours.lora_B["q"], ours.lora_B["v"]]))
    x = torch.randn(2, 5, C)
    expected = theirs(x)
    assert (ours(x) - expected).abs().max().item() <= 1e-5
    ours.merge()
    assert (ours(x) - expected).abs().max().item() <= 1e-5


def test_adapter_round_trip_holds_only_lora_tensors(tiny_model, tmp_path):
    apply_lora(tiny_model, LoRAConfig(rank=2, alpha=4, targets=("q", "v", "mlp")))
    randomize_B(tiny_model)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(tiny_model, path)
    tensors, metadata = read_adapter(path)
    assert set(tensors) == {
        f"transformer.h.{i}.{key}"
        for i in range(TINY.n_layer)
        for key in (
            "attn.c_attn.lora_A.q",
            "attn.c_attn.lora_B.q",
            "attn.c_attn.lora_A.v",
            "attn.c_attn.lora_B.v",
            "mlp.c_fc.lora_A.mlp",
            "mlp.c_fc.lora_B.mlp",
            "mlp.c_proj.lora_A.mlp",
            "mlp.c_proj.lora_B.mlp",
        )
    }
    assert metadata["lora_config"] == LoRAConfig(rank=2, alpha=4, targets=("q", "v", "mlp"), dropout=0.0)
    assert metadata["base_config"]["n_embd"] == TINY.n_embd

    fresh = GPT(TINY).eval()
    fresh.load_state_dict({k: v for k, v in tiny_model.state_dict().items() if ".lora_" not in k}, strict=False)
    load_adapter(fresh, path)  # injects LoRA from the file's metadata
    idx = tokens()
    assert torch.equal(fresh(idx)[0], tiny_model(idx)[0])
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_saved_keys_have_no_compile_prefix(tiny_model, tmp_path):
    apply_lora(tiny_model, LoRAConfig(rank=2))
    compiled = torch.compile(tiny_model, backend="eager")
    assert set(lora_state_dict(compiled)) == set(lora_state_dict(tiny_model))
    save_adapter(compiled, str(tmp_path / "a.safetensors"))
    assert not any("_orig_mod" in k for k in read_adapter(str(tmp_path / "a.safetensors"))[0])


def test_adapter_for_another_base_is_a_clear_error(tiny_model, tmp_path):
    apply_lora(tiny_model, LoRAConfig(rank=2))
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(tiny_model, path)
    wider = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match=r"another base .*n_embd 16 \(file\) vs 32 \(model\)"):
        load_adapter(wider, path)
    torch.manual_seed(123)
    same_shape_other_weights = GPT(TINY)
    with pytest.raises(ValueError, match="weights differ"):
        load_adapter(same_shape_other_weights, path)
    for name in ("transformer.h.1.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.bias"):
        one_tensor_differs = GPT(TINY)
        one_tensor_differs.load_state_dict(tiny_model.state_dict(), strict=False)
        with torch.no_grad():
            one_tensor_differs.get_parameter(name).add_(0.05)  # the last block, W0 itself, a LayerNorm
        with pytest.raises(ValueError, match="weights differ"):
            load_adapter(one_tensor_differs, path)
    bf16_copy = GPT(TINY)
    bf16_copy.load_state_dict(tiny_model.state_dict(), strict=False)
    load_adapter(bf16_copy.to(torch.bfloat16), path)  # the same base in bf16 is the same base
    merge_lora(tiny_model)
    save_adapter(tiny_model, path)  # a merged model fingerprints its W0, not W0 + ΔW
    load_adapter(bf16_copy.float(), path)
    other_targets = apply_lora(GPT(TINY), LoRAConfig(rank=2, targets=("q", "k")))
    other_targets.load_state_dict(tiny_model.state_dict(), strict=False)
    mismatch = f"has LoRA {LoRAConfig(rank=2)}; the model's LoRA is {other_targets.lora_config}"  # as the config prints
    with pytest.raises(ValueError, match=re.escape(mismatch)):
        load_adapter(other_targets, path)


def test_a_file_that_is_not_safetensors_is_a_clear_error(tiny_model, tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_text("not an adapter")
    with pytest.raises(ValueError, match="adapter.safetensors is not a safetensors file"):
        load_adapter(tiny_model, str(path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=4, targets=("q", "wq")), "unknown LoRA target"),
        (dict(rank=4, targets=()), "unknown LoRA target"),
    ],
)
def test_bad_lora_settings_are_clear_errors(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(tiny_model, LoRAConfig(**kwargs))


def test_compiles_without_graph_breaks_and_runs_under_autocast(tiny_model):
    apply_lora(tiny_model, LoRAConfig(rank=2, targets=("q", "v", "o")))
    randomize_B(tiny_model)
    idx = tokens()
    expected, _ = tiny_model(idx)
    compiled = torch.compile(tiny_model, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    assert torch.allclose(compiled(idx)[0], expected, atol=1e-5)
    targets = idx.clone()
    targets[:, :3] = -1  # the training loss too: logits only where a loss is taken, a data-dependent shape
    assert torch.allclose(compiled(idx, targets)[1], tiny_model(idx, targets)[1], atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = tiny_model(idx)
    assert low.dtype == torch.bfloat16 and (low.float() - expected).abs().max() < 0.1


def test_bf16_unmerge_drifts_by_at_most_a_rounding_step(tiny_model):
    """What the unmerge docstring promises in low precision."""
    tiny_model.to(torch.bfloat16)
    W0 = tiny_model.transformer.h[0].attn.c_attn.weight.clone()
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8))
    randomize_B(tiny_model, std=0.05)
    merge_lora(tiny_model)
    unmerge_lora(tiny_model)
    W = tiny_model.transformer.h[0].attn.c_attn.weight
    drift = (W.float() - W0.float()).abs()
    assert (drift <= W0.float().abs() * 2**-7 + 1e-6 + 2**-7 * 0.05).all()


def test_merging_inside_autocast_still_computes_delta_W_in_fp32(tiny_model):
    """lab.multi_adapter --merge merges inside its bf16 autocast: ΔW must be the fp32 one, as outside it
    (in bf16 it would move W by up to one bf16 step of ΔW, and greedy texts apart)."""
    apply_lora(tiny_model, LoRAConfig(rank=4, alpha=8, targets=tuple(TARGETS)))
    randomize_B(tiny_model)
    merged_outside = copy.deepcopy(tiny_model)
    merge_lora(merged_outside)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merge_lora(tiny_model)
        assert lora_layers(tiny_model)[0].delta_weight("q").dtype == torch.float32
    expected = merged_outside.state_dict()
    for name, weight in tiny_model.state_dict().items():
        assert torch.equal(weight, expected[name]), name


# a value other than the default for each LoRAConfig field: a field added to LoRAConfig needs one here
NON_DEFAULT = {"rank": 3, "alpha": 5.0, "targets": ("k", "o", "mlp"), "dropout": 0.1, "variant": "dora"}


def test_every_lora_setting_has_a_value_to_try():
    assert NON_DEFAULT.keys() == {f.name for f in fields(LoRAConfig)}
    assert all(getattr(LoRAConfig(), name) != value for name, value in NON_DEFAULT.items())


@pytest.mark.parametrize("setting", sorted(NON_DEFAULT))
def test_each_lora_setting_survives_files_merging_the_peft_export_and_the_analysis(hf_folder, tmp_path, setting):
    """Each field set to something other than its default in turn, through everything that reads a LoRAConfig."""
    peft = pytest.importorskip("peft")
    config = replace(LoRAConfig(), **{setting: NON_DEFAULT[setting]})
    model = apply_lora(GPT.from_pretrained(hf_folder).eval(), config)
    randomize_B(model)
    idx = tokens()
    expected, _ = model(idx)

    path = str(tmp_path / "adapter.safetensors")  # save -> load: the same config and outputs
    save_adapter(model, path)
    loaded = GPT.from_pretrained(hf_folder).eval()
    assert load_adapter(loaded, path) == config and torch.equal(loaded(idx)[0], expected)

    W0 = {k: v.clone() for k, v in model.state_dict().items()}  # merge -> unmerge
    merge_lora(model)
    assert (model(idx)[0] - expected).abs().max().item() <= 1e-5
    unmerge_lora(model)
    assert all((model.state_dict()[k] - v).abs().max().item() <= 1e-6 for k, v in W0.items())

    if setting in EXPORTED_SETTINGS:  # the PEFT export: exact against PEFT, or one line refusing
        export_peft(path, str(tmp_path / "peft"))
        theirs = peft.PeftModel.from_pretrained(load_hf(hf_folder), str(tmp_path / "peft")).eval()
        assert (theirs(idx).logits - expected).abs().max().item() <= 1e-4
    else:
        with pytest.raises(ValueError, match=f"does not support the LoRA setting\\(s\\) {setting} of this adapter"):
            export_peft(path, str(tmp_path / "peft"))

    matrices = adapted_matrices(read_adapter(path)[0])  # the analysis: against itself φ = 1, and Table 7's ΔW
    if config.layer.update_is_low_rank:
        records, metadata = similarity(path, path, layers="all")
        assert [(r["layer"], r["matrix"]) for r in records] == list(matrices) and not metadata[0]["not_compared"]
        assert all(torch.allclose(r["phi"], torch.ones_like(r["phi"])) for r in records)
    else:  # φ reads the subspaces of B·A: an update of another form is refused in one line
        with pytest.raises(ValueError, match="whose update is not B·A of rank r") as error:
            similarity(path, path, layers="all")
        assert "\n" not in str(error.value)
    rows = amplification_tables([path], None, "all", "all", seed=0)
    assert [(r["layer"], r["matrix"]) for r in rows] == list(matrices)
    merge_lora(model)  # Table 7's ΔW is what merging adds to W0, whatever the layer's form of update
    added = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            block, module = name.removeprefix("transformer.h.").split(".", 1)
            for target, part in layer.parts.items():
                change = layer.weight[part].detach() - W0[f"{name}.weight"][part]
                added[(int(block), matrix_name(module, target))] = change.double().norm().item()
    assert all(row["‖ΔW‖_F"] == pytest.approx(added[(row["layer"], row["matrix"])], rel=1e-4) for row in rows)
