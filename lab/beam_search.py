"""Beam search as the LoRA paper decodes E2E NLG (arXiv:2106.09685, Table 11: beam size 10, length
penalty 0.9, no-repeat n-gram size 4), token for token what Hugging Face transformers' `generate`
gives with `num_beams`, `length_penalty`, `no_repeat_ngram_size`, `eos_token_id` and `early_stopping`
(its `_beam_search`, transformers 5.x). Shapes: B prompts, K beams, V vocab, T buffer length."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import GPT, KVCache

NONE = -1.0e9  # the score transformers gives to what must not be chosen: it adds it, as here


@torch.no_grad()
def beam_search(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    num_beams: int = 10,
    length_penalty: float = 0.9,
    no_repeat_ngram_size: int = 4,
    eos_token_id: int | list[int] = 50256,
    early_stopping: bool = False,
) -> list[list[int]]:
    """The best continuation of each prompt: its generated tokens, without the prompt and without
    the EOS that ended it (so a continuation shorter than max_new_tokens is one that ended at EOS).
    Call eval() first.

    num_beams: hypotheses kept per prompt. Each step extends them all, ranks the 2 * num_beams
    best extensions (one num_beams more per extra EOS id) by summed log-probability, sets aside
    those among the best num_beams that end in EOS (or reach max_new_tokens) as finished, and
    goes on with the best num_beams that do not.
    length_penalty: a finished hypothesis of n generated tokens (EOS counted) scores
    sum_logprobs / n ** length_penalty; above 0 favours longer ones.
    no_repeat_ngram_size: no n-gram of this size occurs twice in prompt + continuation (0: off).
    eos_token_id: the id, or ids, that end a hypothesis (an empty list: none, every hypothesis runs
    to max_new_tokens). The LoRA authors' E2E command line ends at 50256 and at 628, "\\n\\n".
    early_stopping: False (transformers' default) stops a prompt once num_beams hypotheses are
    finished and the best running one, scored at its current length, is no better than the worst
    finished; True stops it as soon as num_beams hypotheses are finished. ("never" is not offered.)

    Prompts advance together, num_beams rows each, one forward pass a step on a KV cache; the
    search ends when every prompt is done.
    """
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    B, K, V = len(prompts), num_beams, model.config.vocab_size
    lengths = [len(p) for p in prompts]
    if B == 0 or min(lengths) < 1 or max_new_tokens < 1 or K < 1:
        raise ValueError("beam search needs prompts of at least one token, max_new_tokens >= 1 and num_beams >= 1")
    T = max(lengths) + max_new_tokens
    if T > model.config.block_size:
        raise ValueError(f"prompt + max_new_tokens = {T} tokens is longer than the context ({model.config.block_size})")
    device = model.lm_head.weight.device
    # Prompts of different lengths without an attention mask: right-pad them and advance all rows
    # one position a step, as GPT.generate does. A row still inside its prompt is given its next
    # prompt token (no scoring), so no row ever sees padding; its beam search, all K beams equal
    # until then, starts at the step where its prompt ends. Each prompt gets what it gets alone.
    seqs = torch.zeros(B, K, T, dtype=torch.long, device=device)  # each prompt's K beams
    for b, p in enumerate(prompts):
        seqs[b, :, : len(p)] = torch.tensor(p, device=device)
    scores = torch.full((B, K), NONE, device=device)  # running beams' summed log-probabilities:
    scores[:, 0] = 0.0  # the K beams start equal, so only beam 0's extensions count at first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in prompts]  # (score, tokens), best first
    done = [False] * B
    width = (1 + max(1, len(eos))) * K  # extensions ranked per prompt and step

    filled = min(lengths)  # seqs[:, :, :filled] is known in every row
    caches = [KVCache(T) for _ in model.transformer.h]
    x = model.hidden_states(seqs[:, 0, :filled], caches)[:, -1]  # each prompt once, then copied to its K beams
    for c in caches:
        c.k, c.v = c.k.repeat_interleave(K, 0), c.v.repeat_interleave(K, 0)  # (B, ...) -> (B * K, ...)
    x = x.repeat_interleave(K, 0)  # (B, C) -> (B * K, C)
    active = list(range(B))  # the prompts not done: row i of seqs, scores, x and the caches is prompt active[i]
    while True:
        A = len(active)
        logp = F.log_softmax(model.lm_head(x).float(), dim=-1)  # (A * K, V)
        if no_repeat_ngram_size > 0:
            ban_repeated_ngrams(seqs.view(A * K, T)[:, :filled], logp, no_repeat_ngram_size)
        # A prompt's best `width` extensions are among each of its beams' best `width`: rank those alone
        row_top, row_token = logp.topk(min(width, V))  # (A * K, w)
        candidates = row_top.view(A, K, -1) + scores[:, :, None]  # summed log-probabilities (A, K, w)
        top, index = candidates.view(A, -1).topk(width)  # (A, width), best first
        parent, token = index // row_top.size(1), row_token.view(A, -1).gather(1, index)
        generated = [filled + 1 - lengths[b] for b in active]  # tokens generated with this step's (< 1: in the prompt)
        at_max = torch.tensor(generated, device=device)[:, None] == max_new_tokens  # (A, 1)
        ends = torch.isin(token, torch.tensor(eos, dtype=torch.long, device=device)) | at_max  # (A, width)
        running = top + ends.float() * NONE  # those that end cannot go on
        # Finished: those that end among the best K, scored sum_logprobs / generated ** length_penalty.
        divisor = torch.tensor([max(n, 1) ** length_penalty for n in generated], device=device)[:, None]
        penalized = top[:, :K] / divisor
        for i, j in ends[:, :K].nonzero().tolist():
            b = active[i]
            if generated[i] >= 1:
                tokens = seqs[i, parent[i, j], lengths[b] : filled].tolist() + [token[i, j].item()]
                finished[b].append((penalized[i, j].item(), tokens[:-1] if tokens[-1] in eos else tokens))
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
        # Go on with the best K that do not end; rows still inside their prompt take its next token.
        keep = running.topk(K).indices  # (A, K), best first
        keep = keep.gather(1, in_place(parent.gather(1, keep)))  # ... in their parents' slots where they can
        in_prompt = torch.tensor(generated, device=device)[:, None] < 1  # (A, 1)
        beams = torch.where(in_prompt, torch.arange(K, device=device), parent.gather(1, keep))  # (A, K)
        next_token = torch.where(in_prompt, seqs[:, :, filled], token.gather(1, keep))
        scores = torch.where(in_prompt, scores, running.gather(1, keep))
        seqs = seqs.gather(1, beams[:, :, None].expand(A, K, T))
        seqs[:, :, filled] = next_token
        filled += 1
        # transformers' test, after each step, for a prompt being done: at max_new_tokens, or with K
        # finished and (early_stopping, or the best running beam, scored at its length, is no better
        # than the worst finished)
        best_running = (scores.max(1, keepdim=True).values / divisor).view(A).tolist()
        for i, b in enumerate(active):
            full = len(finished[b]) == K
            cannot_improve = full and best_running[i] <= finished[b][-1][0]
            done[b] = generated[i] == max_new_tokens or (full and (early_stopping or cannot_improve))
        if all(done):
            return [hyps[0][1] for hyps in finished]
        # A prompt that is done leaves the batch: its rows are no longer computed
        go_on = [i for i, b in enumerate(active) if not done[b]]
        if len(go_on) == A:  # the same prompts: each slot whose beam is another's child copies that one's rows
            rows = (beams + torch.arange(A, device=device)[:, None] * K).view(-1)
            moved = (rows != torch.arange(A * K, device=device)).nonzero().view(-1)
            for c in caches:
                for t in (c.k, c.v):
                    t[moved, :, : c.length] = t[rows[moved], :, : c.length]  # a copy: read before written
        else:
            active = [active[i] for i in go_on]
            go_on = torch.tensor(go_on, device=device)
            seqs, scores = seqs[go_on], scores[go_on]
            rows = (beams[go_on] + go_on[:, None] * K).view(-1)  # cache rows to keep, in their new order
            for c in caches:  # only the positions filled so far: a buffer of max_new_tokens is mostly empty
                c.k, c.v = (reordered(t, rows, c.length) for t in (c.k, c.v))
        x = model.hidden_states(seqs.view(len(active) * K, T)[:, filled - 1 : filled], caches)[:, -1]


def in_place(parents: torch.Tensor) -> torch.Tensor:
    """An order of the kept beams (A, K), given their parents' slots (A, K), best first: a beam goes to its
    parent's slot when it is that parent's first child there, the others to the slots no beam claimed. Each
    row of the result lists, slot by slot, which kept beam it gets. Only a beam in another's slot then copies
    its cache rows, where copying every row each step took a fifth of the search (the 630 test MRs, beam 10:
    58.3 s -> 42.8 s, the same texts)."""
    order = []
    for row in parents.tolist():
        slot_of, taken = [-1] * len(row), set()
        for j, parent in enumerate(row):
            if parent not in taken:
                slot_of[j] = parent
                taken.add(parent)
        free = iter(sorted(set(range(len(row))) - taken))
        slot_of = [slot if slot >= 0 else next(free) for slot in slot_of]
        order.append(sorted(range(len(row)), key=slot_of.__getitem__))
    return torch.tensor(order, device=parents.device)


def reordered(buffer: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """A new KV-cache buffer (len(rows), nh, max_length, hs) holding buffer's `rows`, in that order, for the
    first `length` positions (the rest is never read before it is written)."""
    new = buffer.new_empty(len(rows), *buffer.shape[1:])
    torch.index_select(buffer[:, :, :length], 0, rows, out=new[:, :, :length])
    return new


def ban_repeated_ngrams(seqs: torch.Tensor, logp: torch.Tensor, n: int) -> None:
    """Set logp (R, V) to -inf, in place, on every token that would repeat an n-gram of its row of
    seqs (R, L): each earlier n-gram whose first n - 1 tokens are the row's last n - 1 bans its last token."""
    L = seqs.size(1)
    if L < n:
        return
    windows = seqs.unfold(1, n, 1)  # (R, L - n + 1, n): every n-gram
    matches = (windows[..., :-1] == seqs[:, L - n + 1 :][:, None]).all(-1)  # (R, L - n + 1)
    rows, starts = matches.nonzero(as_tuple=True)
    logp[rows, windows[rows, starts, -1]] = float("-inf")
