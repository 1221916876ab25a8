"""Our adapters in Hugging Face PEFT and back: same logits as PEFT on transformers' GPT-2 (≤ 1e-4)."""

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch

from conftest import TINY, keep_lora_only_on, load_hf
from lab import peft_interop
from lab.peft_interop import ADAPTABLE, export_peft, import_peft, main
from lora import LoRAConfig, apply_lora, lora_layers, read_adapter, save_adapter
from model import GPT

peft = pytest.importorskip("peft")


def randomize(model, std=0.5):
    """A and B random, so that every block of every ΔW shows up in the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model):
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                p.normal_(0, std)


def tokens():
    torch.manual_seed(2)
    return torch.randint(0, TINY.vocab_size, (2, 12))


def peft_logits(hf_folder, peft_folder):
    model = peft.PeftModel.from_pretrained(load_hf(hf_folder), peft_folder).eval()
    with torch.no_grad():
        return model(tokens()).logits, model


@pytest.mark.parametrize(
    "rank, alpha, targets",
    [(2, 8, ("q", "v")), (3, 5, ("k",)), (2, 4, ("q", "k", "v", "o", "mlp"))],
)
def test_exported_adapter_gives_our_logits_in_peft(hf_folder, tmp_path, rank, alpha, targets):
    ours = apply_lora(GPT.from_pretrained(hf_folder).eval(), LoRAConfig(rank=rank, alpha=alpha, targets=targets))
    randomize(ours)
    adapter = str(tmp_path / "adapter.safetensors")
    save_adapter(ours, adapter)
    folder = str(tmp_path / "peft")
    config = export_peft(adapter, folder)

    expected = ours(tokens())[0]
    theirs, peft_model = peft_logits(hf_folder, folder)
    assert (theirs - expected).abs().max().item() <= 1e-4
    assert (theirs - load_hf(hf_folder)(tokens()).logits).abs().max().item() > 1e-2  # the adapter does act

    # exactly PEFT's own layout: the same keys and shapes as it saves for this config
    saved = peft.get_peft_model_state_dict(peft_model)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        assert json.load(f) == config
    from safetensors.torch import load_file

    ours_peft = load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours_peft.items()} == {k: v.shape for k, v in saved.items()}
    n_attn = sum(t in ("q", "k", "v") for t in targets)
    assert config["rank_pattern"] == ({"attn.c_attn": n_attn * rank} if n_attn > 1 else {})
    assert ours_peft["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (n_attn * rank, TINY.n_embd)


def test_export_from_a_model_equals_export_from_its_file(hf_folder, tmp_path):
    ours = apply_lora(GPT.from_pretrained(hf_folder), LoRAConfig(rank=2, targets=("q", "v")))
    randomize(ours)
    save_adapter(ours, str(tmp_path / "adapter.safetensors"))
    from_model = export_peft(ours, str(tmp_path / "a"))
    assert from_model == export_peft(str(tmp_path / "adapter.safetensors"), str(tmp_path / "b"))
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / f / "adapter_model.safetensors")) for f in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_gives_back_the_same_adapter(hf_folder, tmp_path):
    ours = apply_lora(GPT.from_pretrained(hf_folder), LoRAConfig(rank=2, alpha=6, targets=("q", "v", "mlp")))
    randomize(ours)
    save_adapter(ours, str(tmp_path / "adapter.safetensors"))
    export_peft(str(tmp_path / "adapter.safetensors"), str(tmp_path / "peft"))
    back = import_peft(str(tmp_path / "peft"), base=hf_folder)
    save_adapter(back, str(tmp_path / "back.safetensors"))
    before, meta_before = read_adapter(str(tmp_path / "adapter.safetensors"))
    after, meta_after = read_adapter(str(tmp_path / "back.safetensors"))
    assert meta_after == meta_before
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_imported_here_gives_peft_logits(hf_folder, tmp_path, use_rslora):
    """A LoRA made with PEFT's own API: c_attn at rank 4, c_proj (attention and MLP) and c_fc at
    rank 2 with their own alpha, and only layer 1 adapted for c_fc."""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        rank_pattern={"c_proj": 2, "c_fc": 2},
        alpha_pattern={"mlp.c_proj": 3},
        use_rslora=use_rslora,
        exclude_modules=r".*h\.0\.mlp\.c_fc",
    )
    peft_model = peft.get_peft_model(load_hf(hf_folder), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    folder = str(tmp_path / "peft")
    peft_model.save_pretrained(folder)
    expected, _ = peft_logits(hf_folder, folder)

    ours = import_peft(folder, base=hf_folder).eval()
    assert ours.lora_config.targets == ("q", "k", "v", "o", "mlp")
    assert ours.lora_config.rank == 4
    assert (ours(tokens())[0] - expected).abs().max().item() <= 1e-4

    main(["import", folder, "--base", hf_folder, "--out", str(tmp_path / "adapter.safetensors")])
    reloaded = GPT.from_pretrained(hf_folder).eval()
    from lora import load_adapter

    load_adapter(reloaded, str(tmp_path / "adapter.safetensors"))
    assert (reloaded(tokens())[0] - expected).abs().max().item() <= 1e-4


def test_command_line_and_clear_errors(hf_folder, tmp_path, capsys):
    ours = apply_lora(GPT.from_pretrained(hf_folder), LoRAConfig(rank=2, targets=("q", "v")))
    save_adapter(ours, str(tmp_path / "adapter.safetensors"))
    main(["export", str(tmp_path / "adapter.safetensors"), "--out", str(tmp_path / "peft")])
    assert "attn.c_attn (rank 4)" in capsys.readouterr().out
    main(["import", str(tmp_path / "peft"), "--out", str(tmp_path / "back.safetensors")])  # base from the config
    assert read_adapter(str(tmp_path / "back.safetensors"))[1]["base"] == hf_folder

    with pytest.raises(SystemExit, match="peft_interop: error: .*adapter_config.json"):
        main(["import", str(tmp_path), "--base", hf_folder, "--out", str(tmp_path / "x.safetensors")])
    weights_path = tmp_path / "peft" / "adapter_model.safetensors"
    weights = weights_path.read_bytes()
    weights_path.write_text("not safetensors")
    with pytest.raises(SystemExit, match="peft_interop: error: .*adapter_model.safetensors is not a safetensors file"):
        main(["import", str(tmp_path / "peft"), "--out", str(tmp_path / "x.safetensors")])
    weights_path.write_bytes(weights)
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(SystemExit, match="uses use_dora: not plain LoRA"):
        main(["import", str(tmp_path / "peft"), "--out", str(tmp_path / "x.safetensors")])


@dataclass(frozen=True)
class RsLoRAConfig(LoRAConfig):
    """A learner's new option, added as the issue did: rsLoRA's scaling α/√r (Kalajdzievski, 2023)."""

    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else super().scaling


def test_a_new_scaling_is_refused_until_declared_then_exported_from_the_configs_scaling(
    hf_folder, tmp_path, monkeypatch
):
    ours = apply_lora(GPT.from_pretrained(hf_folder).eval(), RsLoRAConfig(4, 8, ("q", "v", "o"), use_rslora=True))
    randomize(ours, std=0.3)
    with pytest.raises(ValueError, match="does not support the LoRA setting\\(s\\) use_rslora of this adapter"):
        export_peft(ours, str(tmp_path / "refused"))
    monkeypatch.setattr(peft_interop, "EXPORTED_SETTINGS", peft_interop.EXPORTED_SETTINGS | {"use_rslora"})
    config = export_peft(ours, str(tmp_path / "peft"))  # the learner checked it and declared it exported
    theirs, _ = peft_logits(hf_folder, str(tmp_path / "peft"))
    assert (theirs - ours(tokens())[0]).abs().max().item() <= 1e-4
    assert config["lora_alpha"] == 4 * 8 / 2 and config["alpha_pattern"] == {"attn.c_attn": 8 * 8 / 2}  # R·α/√r


def test_an_adapter_of_some_blocks_exports_the_blocks_it_has(hf_folder, tmp_path, capsys):
    ours = apply_lora(GPT.from_pretrained(hf_folder).eval(), LoRAConfig(rank=2, targets=("q", "v", "mlp")))
    randomize(ours)
    save_adapter(
        keep_lora_only_on(ours, {(1, module) for module in ADAPTABLE}), str(tmp_path / "last-block.safetensors")
    )
    main(["export", str(tmp_path / "last-block.safetensors"), "--out", str(tmp_path / "peft")])
    assert "of blocks [1]" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and config["target_modules"] == [
        "attn.c_attn",
        "mlp.c_fc",
        "mlp.c_proj",
    ]
    theirs, _ = peft_logits(hf_folder, str(tmp_path / "peft"))
    assert (theirs - ours(tokens())[0]).abs().max().item() <= 1e-4
    assert (theirs - load_hf(hf_folder)(tokens()).logits).abs().max().item() > 1e-2  # block 1's adapter does act

    q_then_o = apply_lora(GPT.from_pretrained(hf_folder), LoRAConfig(rank=2, targets=("q", "o")))
    keep_lora_only_on(q_then_o, {(0, "attn.c_attn"), (1, "attn.c_proj")})
    with pytest.raises(
        ValueError, match="same modules adapted in every adapted block.*attn.c_attn of block 0, attn.c_proj"
    ):
        export_peft(q_then_o, str(tmp_path / "refused"))


@pytest.mark.parametrize(
    "change",
    [
        {"fan_in_fan_out": False},  # PEFT sets it back to True for GPT-2's Conv1D, with a warning
        {"target_modules": "all-linear"},
        {"target_modules": None},
        {"target_modules": ["c_attn"]},
        {"target_modules": r".*\.h\.\d+\.attn\.c_attn"},
        {"layers_to_transform": [0, 1]},
    ],
)
def test_import_accepts_configs_peft_loads_the_same(hf_folder, tmp_path, change):
    ours = apply_lora(GPT.from_pretrained(hf_folder).eval(), LoRAConfig(rank=2, targets=("q", "v")))
    randomize(ours)
    save_adapter(ours, str(tmp_path / "adapter.safetensors"))
    folder = tmp_path / "peft"
    export_peft(str(tmp_path / "adapter.safetensors"), str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    imported = import_peft(str(folder), hf_folder)
    assert (imported(tokens())[0] - ours(tokens())[0]).abs().max().item() <= 1e-5
