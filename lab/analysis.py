"""The paper's §7, "Understanding the low-rank updates", measured on adapters trained here.

Two questions, each a subcommand:

similarity (§7.2, Fig. 3 and 4): do two adapters of one base, say r = 8 and r = 64, or two seeds,
learn the same directions? For the A of each adapted matrix (r × d_in), take its right-singular
vectors, ordered by singular value; U1_i are the top i of adapter 1, U2_j the top j of adapter 2:

    φ(A1, A2, i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j)      in [0, 1]               (paper, eq. 4)

1 means the smaller of the two subspaces lies inside the other; 0 means they are orthogonal. Random
subspaces of R^d give E‖U_iᵀ U_j‖²_F = i·j/d, so φ ≈ max(i, j)/d: the baseline to read φ against.
We follow the paper in using A's right-singular vectors: its U_A are "the right-singular unitary
matrices" of A, a subspace of the input space R^d_in. `--of B` takes B's left-singular vectors
instead (R^d_out; the paper notes the same analysis can be done with B), `--of delta` the top-r
right-singular vectors of ΔW = (α/r)·B·A, which span A's row space when B has full rank but are
ordered by the whole product.

amplification (§7.3, Table 7): how does ΔW relate to W? Project W onto ΔW's r-dimensional subspace,
‖Uᵀ W Vᵀ‖_F with U (d_out × r) and Vᵀ (r × d_in) the top-r left/right singular vectors of ΔW, and
compare with the same projection onto W's own top-r directions and onto a random matrix's. The paper
finds ΔW "amplifies" directions W already has but does not emphasise: ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F is large
(about 21 for r = 4 on GPT-3's layer 48 Wq). W is in nn.Linear's layout (d_out × d_in), as in
model.py; q, k and v are the three row blocks of the fused attn.c_attn.

Adapted matrices are named q, k, v, o, and mlp.c_fc / mlp.c_proj (the two of the `mlp` target).

    python -m lab.analysis similarity out/e2e-r8/adapter.safetensors out/e2e-r64/adapter.safetensors
    python -m lab.analysis amplification out/e2e-r8/adapter.safetensors out/e2e-r64/adapter.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from lab import command_line, parse_adapter_key
from lora import TARGETS, LoRALinear, load_adapter, read_adapter
from model import GPT, same_weights
from utils import atomic_path

# ---- which matrices an adapter adapts ------------------------------------------------------------


def matrix_name(module: str, target: str) -> str:
    """q, k, v, o name one matrix each; the mlp target adapts two, named by their module."""
    return module if target == "mlp" else target


MATRICES = [matrix_name(where.module, target) for target, places in TARGETS.items() for where in places]


def in_order(keys) -> list[tuple[int, str]]:
    """(layer, matrix name) pairs, each once, by layer, then q, k, v, o, mlp.c_fc, mlp.c_proj."""
    return sorted(set(keys), key=lambda key: (key[0], MATRICES.index(key[1])))


def adapted_matrices(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, matrix name): (A, B)} from an adapter's tensors (`transformer.h.0.attn.c_attn.lora_A.q`...)."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, module, which, target = parse_adapter_key(key)
        found.setdefault((layer, matrix_name(module, target)), {})[which] = tensor
    return {key: (found[key]["A"], found[key]["B"]) for key in in_order(found)}


def select(names: list[tuple[int, str]], n_layer: int, layers: str, targets: str) -> list[tuple[int, str]]:
    """The (layer, matrix) pairs a command line asks for. layers: 'all' or indices, -1 the last;
    targets: 'all' or matrix names, `mlp` meaning both of its matrices."""
    if layers == "all":
        wanted_layers = set(range(n_layer))
    else:
        wanted_layers = set()
        for text in layers.split(","):
            if not re.fullmatch(r"\s*-?\d+\s*", text):
                raise ValueError(f"--layers takes 'all' or comma-separated layer indices such as 0,-1, not {layers!r}")
            index = int(text)
            if not -n_layer <= index < n_layer:
                raise ValueError(f"layer {index} does not exist: the base has {n_layer} layers (0 to {n_layer - 1})")
            wanted_layers.add(index % n_layer)
    wanted = MATRICES if targets == "all" else [t.strip() for t in targets.split(",") if t.strip()]
    chosen = [
        (layer, name)
        for layer, name in names
        if layer in wanted_layers and any(name == t or name.startswith(f"{t}.") for t in wanted)
    ]
    if not chosen:
        available = sorted({name for _, name in names})
        raise ValueError(f"the adapter(s) adapt none of {targets!r}: they adapt {', '.join(available)}")
    return chosen


# ---- §7.2: subspace similarity -------------------------------------------------------------------


def subspace_basis(A: torch.Tensor, B: torch.Tensor, of: str = "A") -> torch.Tensor:
    """Orthonormal columns, most important first, of the subspace one adapter learned for one matrix:
    A's right-singular vectors (d_in × r), B's left-singular vectors (d_out × r), or ΔW's top-r
    right-singular vectors (d_in × r): those of B·A, as ΔW is B·A times the layer's scaling, which moves no
    direction (the layer declares the form: `update_is_low_rank`). In float64: the small singular values order
    the columns."""
    A, B = A.double(), B.double()
    if of == "A":
        return torch.linalg.svd(A, full_matrices=False).Vh.T
    if of == "B":
        return torch.linalg.svd(B, full_matrices=False).U
    if of == "delta":
        return torch.linalg.svd(B @ A, full_matrices=False).Vh[: A.shape[0]].T
    raise ValueError(f"unknown subspace '{of}': choose A, B or delta")


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) for every i ≤ r1, j ≤ r2 at once (paper, eq. 4).
    ‖U1_iᵀ U2_j‖²_F is the sum of the squared overlaps (U1ᵀU2)² over the top-left i × j corner,
    so two cumulative sums give the whole (r1 × r2) table."""
    overlaps = (U1.T @ U2) ** 2  # (r1, r2): squared cosines between single directions
    corner_sums = overlaps.cumsum(0).cumsum(1)
    i = torch.arange(1, U1.shape[1] + 1, dtype=corner_sums.dtype)
    j = torch.arange(1, U2.shape[1] + 1, dtype=corner_sums.dtype)
    return corner_sums / torch.minimum(i[:, None], j[None, :])


def similarity(
    path1: str, path2: str, of: str = "A", layers: str = "-1", targets: str = "all"
) -> tuple[list[dict], list[dict]]:
    """φ for each requested (layer, matrix) that both adapters adapt, as records {layer, matrix,
    dim (of the space the subspaces live in), phi (r1 × r2)}, and the two files' metadata, each with
    `not_compared`: the requested (layer, matrix) pairs that the other adapts and this one does not."""
    (tensors1, meta1), (tensors2, meta2) = read_adapter(path1), read_adapter(path2)
    for path, config in ((path1, meta1["lora_config"]), (path2, meta2["lora_config"])):
        if not config.layer.update_is_low_rank:  # the layer says whether its update is B·A
            raise ValueError(
                f"{path} is a {config.variant} adapter, whose update is not B·A of rank r: φ compares the "
                "subspaces of A, B and B·A (§7.2), which say nothing of it; Table 7 (amplification) does take it"
            )
    if meta1["base_config"] != meta2["base_config"] or not same_weights(
        meta1["base_fingerprint"], meta2["base_fingerprint"]
    ):
        raise ValueError(
            f"{path1} and {path2} were trained on different bases ({meta1['base']} and {meta2['base']}, whose "
            "shapes or weights differ): similarity compares two adapters of one base"
        )
    matrices1, matrices2 = adapted_matrices(tensors1), adapted_matrices(tensors2)
    common = [key for key in matrices1 if key in matrices2]
    if not common:
        names1, names2 = (", ".join(dict.fromkeys(name for _, name in m)) for m in (matrices1, matrices2))
        raise ValueError(f"{path1} adapts {names1} and {path2} adapts {names2}: no matrix in common to compare")
    records, meta1["not_compared"], meta2["not_compared"] = [], [], []
    for layer, name in select(in_order([*matrices1, *matrices2]), meta1["base_config"]["n_layer"], layers, targets):
        if (layer, name) not in matrices1 or (layer, name) not in matrices2:
            (meta1 if (layer, name) not in matrices1 else meta2)["not_compared"].append((layer, name))
            continue
        U1 = subspace_basis(*matrices1[(layer, name)], of)
        U2 = subspace_basis(*matrices2[(layer, name)], of)
        records.append(dict(layer=layer, matrix=name, dim=U1.shape[0], phi=subspace_similarity(U1, U2)))
    if not records:
        raise ValueError(
            f"no matrix asked for is adapted by both: {'; '.join(not_compared((path1, path2), [meta1, meta2]))}"
        )
    return records, [meta1, meta2]


def not_compared(paths: tuple[str, str], metadata: list[dict]) -> list[str]:
    """A line for each (layer, matrix) that `similarity` left out, naming the adapter without it."""
    return [
        f"layer {layer} {name}: {path} has no update there, not compared"
        for path, m in zip(paths, metadata)
        for layer, name in m["not_compared"]
    ]


def plot_similarity(records: list[dict], labels: tuple[str, str], of: str, path: str) -> None:
    """One heatmap per record, side by side (the adapted matrices of one layer), as the paper's Fig. 3."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(records), figsize=(4.6 * len(records), 3.2), squeeze=False, layout="constrained")
    for ax, record in zip(axes[0], records):
        r1, r2 = record["phi"].shape
        image = ax.imshow(
            record["phi"].numpy(),
            vmin=0,
            vmax=1,
            cmap="viridis",
            aspect="auto",
            extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5),
            interpolation="nearest",
        )
        ax.set_title(f"layer {record['layer']}, {record['matrix']}: φ({of}, i, j)")
        ax.set_xlabel(f"j (top-j of {labels[1]})")
        ax.set_ylabel(f"i (top-i of {labels[0]})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.05)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# ---- §7.3: ΔW against W ---------------------------------------------------------------------------


def projection_norm(W: torch.Tensor, of: torch.Tensor, rank: int) -> float:
    """‖Uᵀ W Vᵀ‖_F with U (d_out × r), Vᵀ (r × d_in) the top-r singular vectors of `of`."""
    U, _, Vh = torch.linalg.svd(of, full_matrices=False)
    return torch.linalg.matrix_norm(U[:, :rank].T @ W @ Vh[:rank].T).item()


def amplification(W: torch.Tensor, delta: torch.Tensor, rank: int, seed: int = 0) -> dict[str, float]:
    """The paper's Table 7 for one matrix: W projected onto ΔW's, W's own and a random matrix's
    top-r directions; ‖W‖_F, ‖ΔW‖_F and the amplification factor ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F, U and V
    those of ΔW."""
    W, delta = W.double(), delta.double()
    random = torch.randn(W.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    onto_delta = projection_norm(W, delta, rank)
    norm_delta = torch.linalg.matrix_norm(delta).item()
    return {
        "onto ΔW": onto_delta,
        "onto W": projection_norm(W, W, rank),
        "onto random": projection_norm(W, random, rank),
        "‖W‖_F": torch.linalg.matrix_norm(W).item(),
        "‖ΔW‖_F": norm_delta,
        "amplification": norm_delta / onto_delta,
    }


def weights_and_updates(model: GPT) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, matrix name): (W, ΔW)} of a base with an unmerged adapter loaded: W the frozen rows
    that the adapter's part covers (d_rows × d_in), ΔW = W_eff − W0 as the layer computes it ((α/r)·B·A for LoRA)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            layer, module_name = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name).groups()
            for target, rows in module.parts.items():
                key = (int(layer), matrix_name(module_name, target))
                found[key] = (module.weight[rows].detach().float(), module.delta_weight(target).detach())
    return found


def amplification_tables(paths: list[str], base: str | None, layers: str, targets: str, seed: int) -> list[dict]:
    """Table 7's numbers for each requested (layer, matrix) that any adapter adapts, one record per
    adapter each, in the order of `paths` (without the numbers where that adapter has no update); W
    from `base` (default: the base recorded in the adapters)."""
    files = [read_adapter(path) for path in paths]  # each file checked before the base loads
    base = base or files[0][1]["base"]
    adapted = in_order(key for tensors, _ in files for key in adapted_matrices(tensors))
    wanted = select(adapted, files[0][1]["base_config"]["n_layer"], layers, targets)
    results = []
    for path in paths:
        model = GPT.from_pretrained(base)  # a fresh base each: load_adapter injects LoRA in place
        config = load_adapter(model, path)  # refuses an adapter of another base
        pairs = weights_and_updates(model)
        for layer, name in wanted:
            row = amplification(*pairs[(layer, name)], config.rank, seed) if (layer, name) in pairs else {}
            results.append(dict(adapter=path, rank=config.rank, layer=layer, matrix=name, **row))
    return results


TABLE7_ROWS = [
    ("onto ΔW", "‖Uᵀ W Vᵀ‖_F, U,V of ΔW"),
    ("onto W", "             U,V of W"),
    ("onto random", "             U,V random"),
    ("‖W‖_F", "‖W‖_F"),
    ("‖ΔW‖_F", "‖ΔW‖_F"),
    ("amplification", "‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F"),
]


def format_table(results: list[dict]) -> str:
    """The paper's Table 7 layout: one column per adapter (in the order of the records), one block per
    (layer, matrix), each number under its own adapter's heading; `none` where that adapter has no update."""
    width = max(len(label) for _, label in TABLE7_ROWS) + 2
    ranks = {r["adapter"]: r["rank"] for r in results}  # the columns
    lines, has_none = [], False
    for layer, name in dict.fromkeys((r["layer"], r["matrix"]) for r in results):
        block = {
            r["adapter"]: r for r in results if (r["layer"], r["matrix"]) == (layer, name) and "amplification" in r
        }
        has_none |= len(block) < len(ranks)
        title = f"layer {layer}, W = {name}"
        lines.append(f"{title:<{width}}" + "".join(f"{'r = ' + str(rank):>10}" for rank in ranks.values()))
        for key, label in TABLE7_ROWS:
            cells = (f"{block[a][key]:>10.3f}" if a in block else f"{'none':>10}" for a in ranks)
            lines.append(f"{label:<{width}}" + "".join(cells))
        lines.append("")
    if has_none:
        lines.append("none: that adapter has no update of that matrix in that layer")
    return "\n".join(lines).rstrip()


# ---- command line -------------------------------------------------------------------------------


def run_similarity(args: argparse.Namespace) -> None:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file, not a folder: give a folder for the PNGs and similarity.json")
    records, metadata = similarity(args.adapter1, args.adapter2, args.of, args.layers, args.targets)
    notes = not_compared((args.adapter1, args.adapter2), metadata)
    labels = tuple(f"r = {m['lora_config'].rank}" for m in metadata)
    if labels[0] == labels[1]:
        labels = ("adapter 1", "adapter 2")
    for r in records:
        diagonal = " ".join(f"{r['phi'][i, i]:.2f}" for i in range(min(8, *r["phi"].shape)))
        print(
            f"layer {r['layer']:>2} {r['matrix']:<10} φ(i, i), i = 1, 2, ...: {diagonal}   "
            f"(random subspaces: ≈ i/{r['dim']})"
        )
    for note in notes:
        print(f"note: {note}")
    os.makedirs(args.out, exist_ok=True)
    for layer in dict.fromkeys(r["layer"] for r in records):
        path = os.path.join(args.out, f"similarity-layer{layer}.png")
        plot_similarity([r for r in records if r["layer"] == layer], labels, args.of, path)
        print(f"wrote {path}")
    summary = dict(
        paper="LoRA §7.2, eq. 4: phi[i-1][j-1] = ‖U1_iᵀ U2_j‖²_F / min(i, j); random subspaces: ≈ max(i, j)/dim",
        of=args.of,
        adapters=[args.adapter1, args.adapter2],
        ranks=[m["lora_config"].rank for m in metadata],
        results=[dict(r, phi=r["phi"].tolist()) for r in records],
        not_compared=notes,
    )
    path = os.path.join(args.out, "similarity.json")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, ensure_ascii=False)
    print(f"wrote {path}")


def run_amplification(args: argparse.Namespace) -> None:
    results = amplification_tables(args.adapters, args.base, args.layers, args.targets, args.seed)
    print(format_table(results))


def main(argv: list[str] | None = None) -> None:
    parser = command_line("lab.analysis", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser(
        "similarity",
        help="φ(A1, A2, i, j) between two adapters of one base (paper §7.2, Fig. 3 and 4)",
        description="Normalised subspace similarity φ(i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j) between the top-i "
        "singular directions of adapter 1 and the top-j of adapter 2, per layer and adapted matrix. "
        "Needs only the two adapter files (same base, any ranks). Writes a heatmap PNG per layer "
        "(one panel per matrix) and all numbers to similarity.json.",
    )
    sim.add_argument("adapter1", help="an adapter file (adapter.safetensors), e.g. trained with --rank 8")
    sim.add_argument("adapter2", help="a second adapter of the same base, e.g. --rank 64, or another seed")
    sim.add_argument(
        "--of",
        default="A",
        choices=["A", "B", "delta"],
        help="whose singular vectors: A's right ones as in the paper (default), B's left ones, or ΔW's right ones",
    )
    sim.add_argument("--layers", default="-1", help="comma-separated layer indices (-1 = last) or 'all' (default -1)")
    sim.add_argument("--targets", default="all", help="matrices: q,k,v,o,mlp, or all that both adapt (default all)")
    sim.add_argument(
        "--out", default="out-analysis", help="folder for the PNGs and similarity.json (default: out-analysis)"
    )
    sim.set_defaults(run=run_similarity)

    amp = commands.add_parser(
        "amplification",
        help="ΔW against W: the paper's Table 7 (§7.3)",
        description="For each adapter (one table column each): ‖Uᵀ W Vᵀ‖_F with U, V the top-r singular "
        "vectors of ΔW, of W itself and of a random matrix; ‖W‖_F; ‖ΔW‖_F; and the amplification factor "
        "‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F. W comes from the base (default: the base recorded in the adapter).",
    )
    amp.add_argument("adapters", nargs="+", help="one or more adapter files of the same base")
    amp.add_argument("--base", default=None, help="the base: gpt2... or a folder (default: the adapter's own)")
    amp.add_argument("--layers", default="-1", help="comma-separated layer indices (-1 = last) or 'all' (default -1)")
    amp.add_argument("--targets", default="q", help="matrices: q,k,v,o,mlp (default q, as Table 7)")
    amp.add_argument("--seed", type=int, default=0, help="seed of the random matrix (default 0)")
    amp.set_defaults(run=run_amplification)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"lab.analysis: error: {e}")


if __name__ == "__main__":
    main()
