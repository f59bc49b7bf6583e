"""Auxiliary losses and routing statistics as pure functions.

Legend: T tokens, E experts. ``valid_T`` masks padding out of every mean.
"""

from __future__ import annotations

import torch


def masked_mean_T(x_TE: torch.Tensor, valid_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid tokens of each column -> [E]."""
    if valid_T is None:
        return x_TE.mean(0)
    v = valid_T.to(x_TE.dtype).unsqueeze(1)
    return (x_TE * v).sum(0) / v.sum().clamp_min(1.0)


def load_balance_loss(prob_TE: torch.Tensor, assign_TE: torch.Tensor, valid_T=None) -> torch.Tensor:
    """E * sum_e mean_t(prob[:, e]) * mean_t(assign[:, e]); ``assign`` carries no gradient.

    Switch/GShard: prob = softmax, assign = one-hot of the first choice.
    DTS: prob = combine weights w, assign = the selection mask (equals E while every expert is selected).
    """
    E = prob_TE.shape[1]
    return (
        E
        * (
            masked_mean_T(prob_TE, valid_T) * masked_mean_T(assign_TE.detach().to(prob_TE.dtype), valid_T)
        ).sum()
    )


def router_z_loss(logits_TE: torch.Tensor, valid_T=None) -> torch.Tensor:
    """ST-MoE z-loss: mean_t logsumexp(z_t)^2."""
    lse_T1 = torch.logsumexp(logits_TE, dim=-1, keepdim=True) ** 2
    return masked_mean_T(lse_T1, valid_T).squeeze(0)


def entropy_T(prob_TE: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's routing distribution."""
    return -(prob_TE * prob_TE.clamp_min(1e-20).log()).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# Balance losses on fractions (batch, sequence, global), the chunk and locality losses (BlockFFN), and the
# sequence structure they need. Legend adds: B sequences, S positions (T = B*S), C chunks, L chunk length.


def load_fractions(
    assign_TE: torch.Tensor,
    valid_T=None,
    extra_counts_E=None,
    per_token: bool = False,
    extra_tokens=None,
) -> torch.Tensor:
    """f_e, no gradient. ``per_token`` False: the share of the assigned (token, expert) pairs that went to e
    (sums to 1); True: the mean over valid tokens of assign[:, e] (sums to the mean number of assigned
    experts per token: Switch/GShard's fraction of tokens whose first choice is e, DTS's mean selection).

    ``extra_counts_E`` (and, per token, ``extra_tokens``): assignments (tokens) counted earlier in the same
    step (other micro-batches), added in.
    """
    a = assign_TE.detach().float()
    if per_token and extra_counts_E is None:
        return masked_mean_T(a, valid_T)
    if valid_T is not None:
        a = a * valid_T.unsqueeze(1)
    counts_E = a.sum(0)
    if extra_counts_E is not None:
        counts_E = counts_E + extra_counts_E
    if not per_token:
        return counts_E / counts_E.sum().clamp_min(1.0)
    tokens = a.new_tensor(float(a.shape[0])) if valid_T is None else valid_T.float().sum()
    if extra_tokens is not None:
        tokens = tokens + extra_tokens
    return counts_E / tokens.clamp_min(1.0)


def balance_loss(
    prob_TE: torch.Tensor,
    assign_TE: torch.Tensor,
    valid_T=None,
    extra_counts_E=None,
    per_token: bool = False,
    extra_tokens=None,
) -> torch.Tensor:
    """E * sum_e f_e * P_e with f the load fractions (``load_fractions``) and P the mean probability over
    valid tokens.

    With f a share of pairs it equals 1 at uniform P for any load (the Sigma-MoE failure mode: a
    uniform-looking router satisfies it without balancing anything), and its minimum 1 at a uniform load;
    per token it is that value times the mean number of assigned experts per token.
    """
    E = prob_TE.shape[1]
    f_E = load_fractions(assign_TE, valid_T, extra_counts_E, per_token, extra_tokens).to(prob_TE.dtype)
    return E * (f_E * masked_mean_T(prob_TE, valid_T)).sum()


def sequence_balance_loss(
    prob_TE, assign_TE, shape: tuple[int, int], valid_T=None, per_token: bool = False
) -> torch.Tensor:
    """``balance_loss`` inside each sequence, averaged over the sequences that hold a valid token."""
    B, S = shape
    E = prob_TE.shape[1]
    v_BS = torch.ones(B, S, device=prob_TE.device) if valid_T is None else valid_T.view(B, S).float()
    a_BSE = assign_TE.detach().float().view(B, S, E) * v_BS.unsqueeze(-1)
    per_B = v_BS.sum(1) if per_token else a_BSE.sum((1, 2))
    f_BE = a_BSE.sum(1) / per_B.clamp_min(1.0).unsqueeze(1)
    p_BE = (prob_TE.view(B, S, E) * v_BS.unsqueeze(-1)).sum(1) / v_BS.sum(1, keepdim=True).clamp_min(1.0)
    per_seq_B = E * (f_BE.to(prob_TE.dtype) * p_BE).sum(1)
    has_B = (v_BS.sum(1) > 0).to(prob_TE.dtype)
    return (per_seq_B * has_B).sum() / has_B.sum().clamp_min(1.0)


def sequence_shape(shape: tuple[int, int] | None, num_tokens: int) -> tuple[int, int]:
    """(B, S) of the flattened tokens; without one, the tokens are one sequence."""
    if shape is None or shape[0] * shape[1] != num_tokens:
        return (1, num_tokens)
    return shape


def previous_token_index(shape: tuple[int, int], valid_T=None, device=None) -> torch.Tensor:
    """[T] long: the index of the previous token of the same sequence, -1 at a sequence start or where
    either token is padding (pairs never cross a sequence boundary)."""
    B, S = shape
    t_BS = torch.arange(B * S, device=device).view(B, S)
    prev_BS = t_BS - 1
    prev_BS[:, 0] = -1
    prev_T = prev_BS.reshape(-1)
    if valid_T is not None:
        ok_T = valid_T & valid_T[prev_T.clamp_min(0)] & (prev_T >= 0)
        prev_T = torch.where(ok_T, prev_T, torch.full_like(prev_T, -1))
    return prev_T


def locality_loss(s_TE: torch.Tensor, prev_T: torch.Tensor, sharpness: float) -> torch.Tensor:
    """BlockFFN activation locality: BCE-with-logits of sharpness * s[prev(t)] against the target
    sigmoid(sharpness * s[t]), mean over the tokens with a previous token and over experts (0 if none)."""
    has_T = prev_T >= 0
    if not bool(has_T.any()):
        return s_TE.sum() * 0.0
    cur = s_TE[has_T]
    prev = s_TE[prev_T[has_T]]
    target = torch.sigmoid(sharpness * cur)
    return torch.nn.functional.binary_cross_entropy_with_logits(sharpness * prev, target)


def chunk_index(shape: tuple[int, int], chunk_len: int, device=None) -> tuple[torch.Tensor, int]:
    """[T] chunk of each token (chunks of ``chunk_len`` positions inside each sequence; the last chunk of a
    sequence may be shorter) and the number of chunks."""
    B, S = shape
    per_seq = -(-S // chunk_len)
    pos_S = torch.arange(S, device=device) // chunk_len
    chunk_BS = torch.arange(B, device=device).unsqueeze(1) * per_seq + pos_S
    return chunk_BS.reshape(-1), B * per_seq


def chunk_sparsity_loss(p_TE: torch.Tensor, shape, chunk_len: int, valid_T=None) -> torch.Tensor:
    """BlockFFN chunk sparsification: mean over (chunk, expert) of P(expert fires at least once in the
    chunk) = 1 - prod_t (1 - p[t, e]); padding fires never. Computed as a sum of logs per chunk."""
    T, E = p_TE.shape
    p = p_TE if valid_T is None else p_TE * valid_T.unsqueeze(1)
    chunk_T, C = chunk_index(shape, chunk_len, p_TE.device)
    log_none_TE = torch.log1p(-p.clamp(max=1.0 - 1e-6))
    log_none_CE = torch.zeros(C, E, dtype=p.dtype, device=p.device).index_add(0, chunk_T, log_none_TE)
    if valid_T is not None:  # chunks made only of padding do not count
        has_C = torch.zeros(C, device=p.device).index_add(0, chunk_T, valid_T.float()) > 0
        return (1.0 - log_none_CE.exp())[has_C].mean() if bool(has_C.any()) else p.sum() * 0.0
    return (1.0 - log_none_CE.exp()).mean()


def chunk_sparsity_loss_reference(p_TE: torch.Tensor, shape, chunk_len: int, valid_T=None) -> torch.Tensor:
    """Brute force: sum the probability of every on/off pattern of the chunk in which the expert fires at
    least once (exponential in the chunk length: tests only)."""
    B, S = shape
    E = p_TE.shape[1]
    values = []
    for b in range(B):
        for start in range(0, S, chunk_len):
            ts = [b * S + s for s in range(start, min(start + chunk_len, S))]
            ts = [t for t in ts if valid_T is None or bool(valid_T[t])]
            if not ts:
                continue
            for e in range(E):
                total = torch.zeros((), dtype=torch.float64)
                for pattern in range(1, 2 ** len(ts)):
                    prob = torch.ones((), dtype=torch.float64)
                    for i, t in enumerate(ts):
                        pe = p_TE[t, e].double()
                        prob = prob * (pe if (pattern >> i) & 1 else 1.0 - pe)
                    total = total + prob
                values.append(total)
    return torch.stack(values).mean().to(p_TE.dtype)
