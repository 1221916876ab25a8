import json
import math

import pytest
import torch

from conftest import TINY, keep_lora_only_on
from lab.analysis import (
    TABLE7_ROWS,
    adapted_matrices,
    amplification,
    amplification_tables,
    format_table,
    main,
    subspace_basis,
    subspace_similarity,
)
from lora import LoRAConfig, apply_lora, lora_layers, save_adapter
from model import GPT


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    """k random orthonormal columns of R^d (Haar: QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def A_with(directions: torch.Tensor, singular_values: list[float]) -> torch.Tensor:
    """An r × d matrix A whose right-singular vectors are the columns of `directions`, in this order
    of importance when singular_values decrease."""
    r = directions.shape[1]
    return orthonormal(r, r, seed=99) @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ directions.T


def basis(A: torch.Tensor) -> torch.Tensor:
    """A's right-singular vectors, as the paper's φ uses them (B plays no part)."""
    return subspace_basis(A, torch.zeros(1, A.shape[0]))


# ---- φ on subspaces with known answers (paper §7.2, eq. 4) ----------------------------------------


def test_subspace_with_itself_is_1_everywhere():
    A = torch.randn(8, 64, dtype=torch.float64)
    phi = subspace_similarity(basis(A), basis(3 * A))
    assert phi.shape == (8, 8)
    # 1 on the diagonal, and off it too: the top-i directions lie inside the top-j for i ≤ j
    assert torch.allclose(phi, torch.ones(8, 8, dtype=torch.float64), atol=1e-10)


def test_disjoint_subspaces_give_0():
    directions = orthonormal(32, 12, seed=0)
    A1 = A_with(directions[:, :4], [4, 3, 2, 1])
    A2 = A_with(directions[:, 4:], [8, 7, 6, 5, 4, 3, 2, 1])
    phi = subspace_similarity(basis(A1), basis(A2))
    assert phi.shape == (4, 8)
    assert phi.abs().max() < 1e-12


def test_singular_vectors_are_ordered_by_importance():
    """A2's strongest direction is A1's only one: φ(1, 1) = 1. A3 has it second: φ(1, 1) = 0, φ(1, 2) = 1."""
    e = orthonormal(16, 3, seed=1)
    A1 = A_with(e[:, :1], [1.0])
    A2 = A_with(e, [5, 2, 1])
    A3 = A_with(e[:, [1, 0, 2]], [5, 2, 1])
    U1 = basis(A1)
    assert subspace_similarity(U1, basis(A2))[0, 0] == pytest.approx(1.0, abs=1e-12)
    phi = subspace_similarity(U1, basis(A3))
    assert phi[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert phi[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert phi[0, 2] == pytest.approx(1.0, abs=1e-12)


def test_random_subspaces_give_max_i_j_over_d():
    """E‖U_iᵀ U_j‖²_F = i·j/d for independent random subspaces of R^d, so φ ≈ max(i, j)/d."""
    d, r1, r2, trials = 64, 8, 16, 30
    g = torch.Generator().manual_seed(0)
    phi = torch.stack(
        [
            subspace_similarity(
                basis(torch.randn(r1, d, generator=g, dtype=torch.float64)),
                basis(torch.randn(r2, d, generator=g, dtype=torch.float64)),
            )
            for _ in range(trials)
        ]
    ).mean(0)
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    ratio = phi / (torch.maximum(i, j) / d)
    # the whole r1 × r2 corner averages many directions and concentrates; one direction pair does not
    assert ratio[-1, -1] == pytest.approx(1.0, abs=0.1)
    assert ratio.mean() == pytest.approx(1.0, abs=0.2)
    assert 0.3 < ratio[0, 0] < 3


def test_B_and_delta_subspaces():
    """B's left-singular vectors span B's columns; ΔW = B·A has A's row space but B sets its order."""
    d_out, d_in, r = 24, 20, 3
    rows, cols = orthonormal(d_in, r, seed=2), orthonormal(d_out, r, seed=3)
    A = rows.T.clone()  # orthonormal rows: A alone ranks no direction above another
    B = cols @ torch.diag(torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))  # ΔW's strongest: A's 2nd row
    U_B = subspace_basis(A, B, of="B")
    assert torch.allclose(U_B @ U_B.T @ cols, cols, atol=1e-10)  # spans B's columns
    U_delta = subspace_basis(A, B, of="delta")
    assert U_delta.shape == (d_in, r)
    assert abs(U_delta[:, 0] @ rows[:, 1]) == pytest.approx(1.0, abs=1e-10)


# ---- Table 7 on a constructed W and ΔW (paper §7.3) ------------------------------------------------


def constructed_W(d_out=48, d_in=40):
    U, V = orthonormal(d_out, d_in, seed=4), orthonormal(d_in, d_in, seed=5)
    s = 20 * 0.85 ** torch.arange(d_in, dtype=torch.float64)  # a decaying spectrum, as trained weights have
    return U, s, V, U @ torch.diag(s) @ V.T


def test_table7_update_along_W_top_directions_amplifies_by_its_scale():
    U, s, V, W = constructed_W()
    r = 4
    top = U[:, :r] @ torch.diag(s[:r]) @ V[:, :r].T
    row = amplification(W, 0.5 * top, r)
    assert row["onto W"] == pytest.approx(s[:r].norm().item(), rel=1e-9)  # ‖top-r σ‖
    assert row["onto ΔW"] == pytest.approx(row["onto W"], rel=1e-9)  # ΔW spans W's own top-r
    assert row["‖W‖_F"] == pytest.approx(s.norm().item(), rel=1e-9)
    assert row["‖ΔW‖_F"] == pytest.approx(0.5 * s[:r].norm().item(), rel=1e-9)
    assert row["amplification"] == pytest.approx(0.5, rel=1e-9)


def test_table7_update_along_weak_directions_is_a_large_amplification():
    """The paper's finding: ΔW lives where W is weak, so ‖ΔW‖ / ‖UᵀWVᵀ‖ is large."""
    U, s, V, W = constructed_W()
    r = 4
    weak = slice(30, 34)
    delta = U[:, weak] @ torch.diag(torch.full((r,), 3.0, dtype=torch.float64)) @ V[:, weak].T
    row = amplification(W, delta, r)
    assert row["onto ΔW"] == pytest.approx(s[weak].norm().item(), rel=1e-9)
    assert row["amplification"] == pytest.approx(6.0 / s[weak].norm().item(), rel=1e-9)
    assert row["amplification"] > 10


def test_table7_random_directions_see_r_squared_over_d_out_d_in_of_W():
    """E‖UᵀWV‖²_F = ‖W‖²_F · r² / (d_out · d_in) for random orthonormal U (d_out × r), V (d_in × r)."""
    W = torch.randn(48, 40, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    r, trials = 8, 12
    mean_square = sum(amplification(W, W, r, seed=seed)["onto random"] ** 2 for seed in range(trials)) / trials
    expected = W.norm().item() ** 2 * r**2 / (W.shape[0] * W.shape[1])
    assert mean_square == pytest.approx(expected, rel=0.15)


# ---- on adapter files, through the command line -----------------------------------------------------


@pytest.fixture
def two_adapters(tmp_path):
    """A tiny base saved to a folder, and two adapters of it (r = 2 and r = 4) with random B."""
    torch.manual_seed(0)
    base = GPT(TINY)
    base.save_pretrained(str(tmp_path / "base"))
    paths = []
    for rank in (2, 4):
        model = apply_lora(
            GPT.from_pretrained(str(tmp_path / "base")), LoRAConfig(rank=rank, alpha=8, targets=("q", "v", "mlp"))
        )
        with torch.no_grad():
            for layer in lora_layers(model):
                for B in layer.lora_B.values():
                    B.normal_()
        paths.append(str(tmp_path / f"r{rank}.safetensors"))
        save_adapter(model, paths[-1])
    return tmp_path, paths


def test_similarity_command_writes_json_and_pngs(two_adapters, capsys):
    tmp_path, (r2, r4) = two_adapters
    out = str(tmp_path / "analysis")
    main(["similarity", r2, r4, "--layers", "all", "--targets", "q,v,mlp", "--out", out])
    summary = json.load(open(f"{out}/similarity.json"))
    assert summary["ranks"] == [2, 4]
    assert [(r["layer"], r["matrix"]) for r in summary["results"]] == [
        (layer, name) for layer in range(TINY.n_layer) for name in ("q", "v", "mlp.c_fc", "mlp.c_proj")
    ]
    assert all(len(r["phi"]) == 2 and len(r["phi"][0]) == 4 for r in summary["results"])
    assert {r["dim"] for r in summary["results"] if r["matrix"] == "mlp.c_proj"} == {4 * TINY.n_embd}
    for layer in range(TINY.n_layer):
        with open(f"{out}/similarity-layer{layer}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "layer  1 q" in capsys.readouterr().out

    main(["similarity", r4, r4, "--targets", "q,v", "--out", out])  # an adapter against itself: 1 everywhere
    summary = json.load(open(f"{out}/similarity.json"))
    assert [(r["layer"], r["matrix"]) for r in summary["results"]] == [(1, "q"), (1, "v")]
    assert all(math.isclose(x, 1.0, abs_tol=1e-9) for r in summary["results"] for row in r["phi"] for x in row)

    for of in ("B", "delta"):  # the other two subspaces: the same table shape, the choice recorded
        main(["similarity", r2, r4, "--of", of, "--targets", "v", "--out", out])
        summary = json.load(open(f"{out}/similarity.json"))
        assert summary["of"] == of and len(summary["results"][0]["phi"][0]) == 4


def test_adapted_matrices_reads_the_adapter_layout(two_adapters):
    from lora import read_adapter

    tensors, _ = read_adapter(two_adapters[1][1])
    matrices = adapted_matrices(tensors)
    A, B = matrices[(0, "v")]
    assert torch.equal(A, tensors["transformer.h.0.attn.c_attn.lora_A.v"])
    assert torch.equal(B, tensors["transformer.h.0.attn.c_attn.lora_B.v"])
    assert matrices[(1, "mlp.c_proj")][0].shape == (4, 4 * TINY.n_embd)


def test_amplification_command_prints_table7(two_adapters, capsys):
    tmp_path, (r2, r4) = two_adapters
    main(["amplification", r2, r4, "--targets", "v"])  # base from the adapters' metadata
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["layer", "1,", "W", "=", "v", "r", "=", "2", "r", "=", "4"]

    # the numbers are Table 7's for W = the v rows of c_attn and ΔW = (α/r)·B·A
    base = GPT.from_pretrained(str(tmp_path / "base"))
    C = TINY.n_embd
    W = base.transformer.h[1].attn.c_attn.weight[2 * C :].detach()
    from lora import read_adapter

    tensors, _ = read_adapter(r4)
    delta = (8 / 4) * tensors["transformer.h.1.attn.c_attn.lora_B.v"] @ tensors["transformer.h.1.attn.c_attn.lora_A.v"]
    row = amplification(W, delta, 4)
    last_line = out.strip().splitlines()[-1]
    assert last_line.startswith("‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F")
    assert float(last_line.split()[-1]) == pytest.approx(row["amplification"], abs=1e-3)


def test_amplification_lines_numbers_up_by_adapter_and_says_where_one_has_none(two_adapters, capsys):
    """Adapters of other targets or other blocks: each number under its own adapter, `none` where it has none."""
    tmp_path, (r2, r4) = two_adapters
    q_only = apply_lora(GPT.from_pretrained(str(tmp_path / "base")), LoRAConfig(rank=3, targets=("q",)))
    with torch.no_grad():
        for layer in lora_layers(q_only):
            layer.lora_B["q"].normal_()
    save_adapter(q_only, str(tmp_path / "q.safetensors"))
    main(["amplification", str(tmp_path / "q.safetensors"), r4, "--targets", "q,v"])
    lines = capsys.readouterr().out.splitlines()
    v_block = lines[lines.index(next(line for line in lines if line.startswith("layer 1, W = v"))) :]
    assert v_block[0].split()[-6:] == ["r", "=", "3", "r", "=", "4"]  # both adapters head every block
    expected = next(r for r in amplification_tables([r4], None, "-1", "v", 0))["amplification"]
    assert v_block[6].split()[-2:] == ["none", f"{expected:.3f}"]  # r = 4's number in r = 4's column
    assert lines[-1] == "none: that adapter has no update of that matrix in that layer"

    # an adapter of the last block only, beside one of every block (records as amplification_tables gives them)
    row = dict(zip([key for key, _ in TABLE7_ROWS], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    records = [
        dict(adapter="last.safetensors", rank=2, layer=0, matrix="q"),
        dict(adapter="every.safetensors", rank=4, layer=0, matrix="q", **row),
        dict(adapter="last.safetensors", rank=2, layer=1, matrix="q", **row),
        dict(adapter="every.safetensors", rank=4, layer=1, matrix="q", **{k: 10 * v for k, v in row.items()}),
    ]
    table = format_table(records).splitlines()
    assert table[0].split()[-6:] == ["r", "=", "2", "r", "=", "4"] and table[6].split()[-2:] == ["none", "6.000"]
    assert table[8].split()[-6:] == ["r", "=", "2", "r", "=", "4"] and table[14].split()[-2:] == ["6.000", "60.000"]


def test_similarity_of_an_adapter_of_some_blocks_compares_the_blocks_both_have(two_adapters, capsys):
    tmp_path, (r2, r4) = two_adapters
    last_block = apply_lora(GPT.from_pretrained(str(tmp_path / "base")), LoRAConfig(rank=2, targets=("q", "v")))
    path = str(tmp_path / "last-block.safetensors")
    save_adapter(keep_lora_only_on(last_block, {(1, "attn.c_attn")}), path)
    main(["similarity", path, r4, "--layers", "all", "--targets", "q", "--out", str(tmp_path / "analysis")])
    summary = json.load(open(tmp_path / "analysis" / "similarity.json"))
    assert [(r["layer"], r["matrix"]) for r in summary["results"]] == [(1, "q")]
    assert summary["not_compared"] == [f"layer 0 q: {path} has no update there, not compared"]
    assert f"note: layer 0 q: {path} has no update there" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no matrix asked for is adapted by both: layer 0 q"):
        main(["similarity", path, r4, "--layers", "0", "--targets", "q"])
    with pytest.raises(
        SystemExit, match="holds other LoRA tensors than this model's LoRA"
    ):  # load_adapter: every block
        main(["amplification", path])


def test_bad_input_is_one_clear_error(two_adapters, tmp_path):
    _, (r2, r4) = two_adapters
    with pytest.raises(SystemExit, match="layer 5 does not exist: the base has 2 layers"):
        main(["similarity", r2, r4, "--layers", "5"])
    with pytest.raises(SystemExit, match="adapt none of 'o'"):
        main(["similarity", r2, r4, "--targets", "o"])
    with pytest.raises(SystemExit, match="analysis: error: .*missing"):
        main(["amplification", str(tmp_path / "missing.safetensors")])
