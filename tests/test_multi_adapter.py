"""Several adapters on one base: switching the merged one, and mixed-adapter batches."""

import pytest
import torch
import torch.nn.functional as F

import lora
from conftest import TINY
from lab.multi_adapter import adapted_layers, adapter_per_row, add_adapter, bank, set_adapter
from model import GPT

TARGETS = ("q", "v", "o", "mlp")  # fused and unfused layers, several parts per layer


def randomize_adapter(model: GPT, seed: int) -> None:
    """Give the active adapter random A and B (B starts at zero, and ΔW = 0 would prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.fixture
def two_adapter_files(tiny_model, tmp_path) -> tuple[GPT, list[str]]:
    """The tiny base (its weights kept as they are) and two adapter files trained on it."""
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    lora.apply_lora(tiny_model, lora.LoRAConfig(rank=2, alpha=4, targets=TARGETS))
    paths = []
    for seed, name in enumerate("ab"):
        randomize_adapter(tiny_model, seed)
        paths.append(str(tmp_path / f"{name}.safetensors"))
        lora.save_adapter(tiny_model, paths[-1])
    base = GPT(TINY).eval()
    base.load_state_dict(base_state)
    return base, paths


def base_only(state: dict[str, torch.Tensor]) -> GPT:
    model = GPT(TINY).eval()
    model.load_state_dict({k: v for k, v in state.items() if ".lora_" not in k and ".bank_" not in k})
    return model


def fresh_merged(W0: dict[str, torch.Tensor], path: str) -> GPT:
    """The base loaded anew, with one adapter loaded from its file and merged."""
    model = base_only(W0)
    lora.load_adapter(model, path)
    lora.merge_lora(model)
    return model


def test_switching_merged_adapters_a_b_a_equals_a_fresh_load_of_a(two_adapter_files):
    base, (a, b) = two_adapter_files
    W0 = {k: v.clone() for k, v in base.state_dict().items()}
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    add_adapter(base, "a", a)
    add_adapter(base, "b", b)
    set_adapter(base, "a")
    lora.merge_lora(base)
    first_a, _ = base(idx)
    set_adapter(base, "b")  # unmerges a, merges b
    assert all(layer.merged for layer in lora.lora_layers(base))
    assert (base(idx)[0] - fresh_merged(W0, b)(idx)[0]).abs().max().item() <= 1e-5
    set_adapter(base, "a")
    expected, _ = fresh_merged(W0, a)(idx)
    assert (base(idx)[0] - expected).abs().max().item() <= 1e-5
    assert (first_a - expected).abs().max().item() <= 1e-5
    assert (expected - fresh_merged(W0, b)(idx)[0]).abs().max().item() > 1e-2  # the two tasks differ
    lora.unmerge_lora(base)
    for key, value in W0.items():
        assert (base.state_dict()[key] - value).abs().max().item() <= 1e-6, key


def test_mixed_batch_equals_each_row_alone_with_its_adapter_merged(two_adapter_files):
    base, (a, b) = two_adapter_files
    W0 = {k: v.clone() for k, v in base.state_dict().items()}
    add_adapter(base, "a", a)
    add_adapter(base, "b", b)
    rows = ["b", None, "a", "b"]
    idx = torch.randint(0, TINY.vocab_size, (len(rows), 12))
    with adapter_per_row(base, rows):
        mixed, _ = base(idx)
    for row, name in enumerate(rows):
        alone = base_only(W0) if name is None else fresh_merged(W0, {"a": a, "b": b}[name])
        assert (mixed[row] - alone(idx[row : row + 1])[0][0]).abs().max().item() <= 1e-5, row
    assert (
        len(lora.lora_layers(base)) == 4 * TINY.n_layer
    )  # the adapted layers back in place: c_attn, c_proj, c_fc, c_proj


def test_mixed_batch_generation_equals_merged_generation_per_adapter(two_adapter_files):
    base, paths = two_adapter_files
    for name, path in zip("ab", paths):
        add_adapter(base, name, path)
    idx = torch.randint(0, TINY.vocab_size, (3, 5))
    with adapter_per_row(base, ["a", "b", None]):
        mixed = base.generate(idx, 30, temperature=0)  # 35 tokens: past the 32-token window too
    for row, name in enumerate(["a", "b"]):
        set_adapter(base, name)
        lora.merge_lora(base)
        assert torch.equal(mixed[row], base.generate(idx[row : row + 1], 30, temperature=0)[0]), name
        lora.unmerge_lora(base)


def test_a_banked_adapter_is_a_copy_that_later_loads_and_training_leave_alone(two_adapter_files, tmp_path):
    base, (a, b) = two_adapter_files
    W0 = {k: v.clone() for k, v in base.state_dict().items()}
    lora.load_adapter(base, a)
    add_adapter(base, "e2e")  # a copy of the active adapter, as after training
    lora.load_adapter(base, b)  # the active adapter changes: the banked copy must not
    add_adapter(base, "shk")
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    with torch.no_grad(), adapter_per_row(base, ["e2e", "shk"]):
        mixed, _ = base(idx)
    for row, path in enumerate((a, b)):
        alone, _ = fresh_merged(W0, path)(idx[row : row + 1])
        assert (mixed[row] - alone[0]).abs().max() <= 1e-5, path
    set_adapter(base, "e2e")
    expected, _ = lora.read_adapter(a)
    for key, tensor in lora.lora_state_dict(base).items():
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize("targets", [("q", "v"), ("o",), ("mlp",)], ids=",".join)
def test_mixed_batch_training_gives_each_bank_slot_the_gradient_of_its_rows_alone(tiny_model, targets):
    lora.apply_lora(tiny_model, lora.LoRAConfig(rank=2, alpha=4, targets=targets))
    for seed, name in enumerate(["a", "b", "c"]):
        randomize_adapter(tiny_model, seed)
        add_adapter(tiny_model, name)  # a copy of the active adapter
    banks = [stacked for _, layer in adapted_layers(tiny_model) for stacked in bank(layer).values()]
    for p in banks:
        p.requires_grad_(True)
    idx = torch.randint(0, TINY.vocab_size, (3, 8))

    def bank_gradients(rows: list[int], names: list[str | None]) -> list[torch.Tensor]:
        for p in banks:
            p.grad = None
        with adapter_per_row(tiny_model, names):
            logits, _ = tiny_model(idx[rows])
        F.cross_entropy(logits.flatten(0, 1), idx[rows].flatten(), reduction="sum").backward()
        return [p.grad.clone() for p in banks]

    mixed = bank_gradients([0, 1, 2], ["c", None, "a"])
    row_c, row_a = bank_gradients([0], ["c"]), bank_gradients([2], ["a"])
    for grad, grad_c, grad_a in zip(mixed, row_c, row_a):
        assert (grad[2] - grad_c[2]).abs().max() <= 1e-5 and grad_c[2].abs().max() > 0  # c: row 0's alone
        assert (grad[0] - grad_a[0]).abs().max() <= 1e-5 and grad_a[0].abs().max() > 0  # a: row 2's alone
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # b, not in the batch
    assert all(
        A.grad is None for layer in lora.lora_layers(tiny_model) for A in layer.lora_A.values()
    )  # nor the active one
    assert tiny_model.transformer.wte.weight.grad is None


def test_adapter_mistakes_are_clear_errors(two_adapter_files):
    base, (a, _) = two_adapter_files
    other = lora.apply_lora(base_only(base.state_dict()), lora.LoRAConfig(rank=4, targets=TARGETS))
    with pytest.raises(ValueError, match=r"has LoRA LoRAConfig\(rank=2,"):
        add_adapter(other, "a", a)
    with pytest.raises(ValueError, match="no LoRA layers"):
        add_adapter(base, "a")
    add_adapter(base, "a", a)
    with pytest.raises(ValueError, match="already on this model"):
        add_adapter(base, "a", a)
    with pytest.raises(ValueError, match="no adapter named 'c' on this model \\(it has: a\\)"):
        set_adapter(base, "c")
    with pytest.raises(ValueError, match="a batch of 2 rows but 3 adapter choices"):
        with adapter_per_row(base, ["a", "a", None]):
            base(torch.zeros(2, 4, dtype=torch.long))
    lora.merge_lora(base)
    with pytest.raises(ValueError, match="run unmerged"):
        with adapter_per_row(base, ["a"]):
            pass


def test_in_bf16_every_path_gives_the_fp32_logits_within_rounding(tiny_model):
    """bf16 rounds each path its own way (merged: W0 + ΔW, once; unmerged: W0·x and B·A·x apart; a mixed
    batch: batched matmuls), so greedy texts may part where two tokens nearly tie: equal texts are checked
    in fp32. What holds in bf16: each path's logits are the fp32 ones to within 5% of what the adapter
    changes in them (measured: at most 1.3% over 20 seeds)."""
    lora.apply_lora(tiny_model, lora.LoRAConfig(rank=3, alpha=8, targets=TARGETS))  # α/r = 8/3: no bf16 number
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in lora.lora_layers(tiny_model):
                for B in layer.lora_B.values():
                    B.normal_(0, 0.05)  # A keeps its init: ΔW about a trained one's size, not many times W0
        add_adapter(tiny_model, name)
    idx = torch.randint(0, TINY.vocab_size, (2, 12))

    def logits(bf16: bool, path: str) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if path == "mixed":
                with adapter_per_row(tiny_model, ["a", "b"]):
                    return tiny_model(idx)[0].float()
            rows = []
            for row, name in enumerate("ab"):
                set_adapter(tiny_model, name)
                if path == "merged":
                    lora.merge_lora(tiny_model)  # inside autocast, as lab.multi_adapter --merge merges
                rows.append(tiny_model(idx[row : row + 1])[0][0].float())
                lora.unmerge_lora(tiny_model)
            return torch.stack(rows)

    expected = logits(bf16=False, path="unmerged")
    with torch.no_grad(), adapter_per_row(tiny_model, [None, None]):
        effect = (expected - tiny_model(idx)[0]).abs().max()  # what the adapters change in the logits
    for path in ("unmerged", "merged", "mixed"):
        error = (logits(bf16=True, path=path) - expected).abs().max()
        assert 0 < error <= 0.05 * effect, (path, error, effect)
