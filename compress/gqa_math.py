r"""MHA→GQA conversion math: pure functions on head-shaped weight tensors.

Notation (one attention layer). ``D`` hidden size, ``d`` head dim, ``H`` query heads,
``G`` KV heads before, ``N`` after. Every projection is kept *augmented*: an extra input
column holds its bias (zero where the model has none), and inputs are ``x̃ = [x; 1]``.

- ``q``: ``[H, d, D+1]`` query rows per head; ``k``, ``v``: ``[G, d, D+1]``.
- ``o``: ``[H, D, d]`` the o_proj columns that read each query head.
- ``kv_of[h]``: the KV head query head ``h`` reads (``h // (H/G)`` in transformers).
- ``cov``: ``E[x̃ x̃ᵀ]`` ``[D+1, D+1]`` over calibration tokens (attention inputs).

RoPE rotates each *plane* ``(a, a + d/2)`` of q and k by an angle that depends on the
position only. Seen as a complex number ``q̃_p = q_a + i q_b`` the rotation is a product
with ``e^{iθ}``, and the logit is ``Σ_p Re(conj(q̃_p) k̃_p e^{i(θ_j-θ_i)})``. Two facts follow:
pooling rows of K before RoPE equals pooling the rotated keys (RoPE is linear and the same
for every head), and multiplying a query plane by a complex scalar commutes with RoPE.

Objectives (what ``fit`` minimizes; the tests check them):

*Keys.* Averaging over the relative rotation angle φ (uniform: keys at many distances),
with query token i and key token j independent,
``E_φ (Re(z e^{iφ}))² = |z|²/2``, so the squared logit error of query head h is
``½ Σ_p E|q̃'_p(i) k̃'_p(j) − q̃_p(i) k̃_p(j)|²`` (conjugates omitted), see
:func:`key_objective`. With q unchanged it is ``½ Σ_p λ_{h,p} E|Δk̃_p|²``, where
``λ_{h,p} = E|q̃_{h,p}|²`` is the query energy of plane p (RoPE keeps it). Each row of the
pooled key then solves ``Σ_h λ_{h,p} (k' − k_{kv(h)}) C = 0``: for any invertible ``C``,
``k'_p = Σ_h λ_{h,p} k_{kv(h),p} / Σ_h λ_{h,p}``, a *query-energy-weighted mean per RoPE
plane* (the input covariance cancels; the unweighted least squares gives back the mean).

*Values.* Head h adds ``O_h V_{kv(h)} z_h`` to the output, with ``z_h = Σ_j a_h(i,j) x̃_j``
its attention-weighted input (linear in x̃ because Σ_j a = 1 carries the bias). With
``E[z zᵀ] ≈ C``, the value objective of a group is ``Σ_h ‖(O'_h V' − O_h V_{kv(h)}) C^{½}‖²``
(:func:`value_objective`). For a fixed row space of ``V' C^{½}`` the best ``O'_h`` projects
``O_h V_{kv(h)} C^{½}`` on it, so the optimum is the top-d right singular subspace of the
stacked ``[O_h V_{kv(h)} C^{½}]_h``: a truncated SVD, exact when the heads agree. It lies in
the span of the original value rows, so we solve it in their coefficients (no ``C^{-½}``):
with ``V_all`` the stacked value heads of the group, ``Nm = V_all C V_allᵀ`` and
``Ob = blockdiag_g Σ_{h: kv(h)=g} O_hᵀ O_h``, take the top-d eigenvectors of ``Lᵀ Ob L``
(``Nm = L Lᵀ``). The free ``d×d`` basis is chosen so that ``V'`` is closest to the mean
(keeps magnitudes familiar to a quantizer), and ``O'_h = O_h V_{kv(h)} C V'ᵀ (V' C V'ᵀ)⁻¹``.
That basis can be nearly singular: on SmolLM2 the o columns grew to norms ~800 and cancelled,
so 4-bit rounding of v_proj/o_proj was amplified ~1000× (:func:`noise_amplification`). The
stage therefore ends with :func:`balance_values`, an exact basis change that makes the rank-1
terms orthogonal. A Tikhonov penalty on the value fit is available (``ridge``, :func:`fit_values`;
off by default, as measured).

*fit_q* (keys, beyond ``fit``): also let each query head rescale each of its RoPE planes by
a complex scalar γ (exact under RoPE). Per plane the key objective becomes
``Σ_g λ_{g,p} ‖(β_g w' − w_g) C^{½}‖²`` with complex rows ``w_g = k_{g,a} + i k_{g,b}``,
``β_g = conj(γ)``: a weighted complex rank-1 approximation, solved by the top eigenvector
of a ``G×G`` Hermitian Gram matrix. ``β = 1`` is ``fit``'s solution, so it is never worse.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

POOLINGS = ("mean", "fit", "fit_q")
GROUPINGS = ("contiguous", "similarity")


# ----------------------------------------------------------------------------- layout


def augment(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[out, in]`` weight and optional bias → ``[out, in + 1]``."""
    col = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, col[:, None].to(weight.dtype)], dim=1)


def split_heads(aug: Tensor, head_dim: int) -> Tensor:
    """``[heads*d, in]`` → ``[heads, d, in]``."""
    return aug.reshape(-1, head_dim, aug.shape[-1])


def o_heads(o_weight: Tensor, head_dim: int) -> Tensor:
    """o_proj ``[D, H*d]`` → ``[H, D, d]`` (the columns each head writes through)."""
    D = o_weight.shape[0]
    return o_weight.reshape(D, -1, head_dim).permute(1, 0, 2)


def o_merge(o: Tensor) -> Tensor:
    """Inverse of :func:`o_heads`."""
    H, D, d = o.shape
    return o.permute(1, 0, 2).reshape(D, H * d)


def kv_of_queries(num_heads: int, num_kv_heads: int) -> list[int]:
    """transformers' rule: query head h reads KV head ``h // (H/G)``."""
    group = num_heads // num_kv_heads
    return [h // group for h in range(num_heads)]


def planes(head_dim: int) -> tuple[Tensor, Tensor]:
    """Row indices (a, b) of the RoPE planes (rotate_half layout)."""
    half = head_dim // 2
    a = torch.arange(half)
    return a, a + half


def second_moment(x: Tensor) -> Tensor:
    """``Σ x̃ x̃ᵀ`` over all tokens of ``x`` ``[..., D]`` (float64), ``x̃ = [x; 1]``."""
    flat = x.reshape(-1, x.shape[-1]).double()
    flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)
    return flat.T @ flat


# ----------------------------------------------------------------------------- energies


def row_energy(rows: Tensor, cov: Tensor) -> Tensor:
    """``E[(r·x̃)²]`` for each row of ``rows`` ``[..., D+1]``."""
    return ((rows @ cov) * rows).sum(-1).clamp_min(0)


def query_plane_energy(q: Tensor, cov: Tensor) -> Tensor:
    """``λ[h, p] = E|q̃_{h,p}|²`` ``[H, d/2]``; RoPE keeps it."""
    e = row_energy(q, cov)
    a, b = planes(q.shape[1])
    return e[:, a] + e[:, b]


def _complex_rows(k: Tensor) -> Tensor:
    """``[..., d, D+1]`` real → ``[..., d/2, D+1]`` complex rows ``k_a + i k_b``."""
    a, b = planes(k.shape[-2])
    return torch.complex(k[..., a, :], k[..., b, :])


def _real_rows(w: Tensor) -> Tensor:
    return torch.cat([w.real, w.imag], dim=-2)


def rotate_query_planes(q: Tensor, gamma: Tensor) -> Tensor:
    """Multiply each RoPE plane of each query head by a complex scalar ``gamma`` ``[H, d/2]``."""
    return _real_rows(_complex_rows(q) * gamma[..., None])


# ----------------------------------------------------------------------------- objectives


@dataclass
class Rotary:
    """The relative RoPE rotations the key objective averages over.

    ``angles[p, t] = −θ_p · t`` for key-to-query distances ``t = 0..T−1`` and ``weights[t] ∝ T − t``:
    every causal pair of a window of T tokens counts once. High-frequency planes turn many times
    (their average is rotation-free), low-frequency planes barely turn (queries and keys keep a
    fixed alignment there, which the 2×2 plane moments then capture).
    """

    angles: Tensor  # [d/2, T]
    weights: Tensor  # [T], sums to 1

    @classmethod
    def from_inv_freq(cls, inv_freq: Tensor, seq_len: int) -> Rotary:
        t = torch.arange(seq_len, dtype=torch.float64)
        w = (seq_len - t) / (seq_len - t).sum()
        return cls(-inv_freq.double()[:, None] * t[None, :], w)

    @classmethod
    def default(cls, head_dim: int, theta: float = 10000.0, seq_len: int = 512) -> Rotary:
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        return cls.from_inv_freq(inv, seq_len)

    def matrices(self) -> Tensor:
        """``R[p, t]`` ``[d/2, T, 2, 2]`` acting on a plane (a, b) as ``e^{iφ}``."""
        c, s = self.angles.cos(), self.angles.sin()
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)

    def average(self, m: Tensor) -> Tensor:
        """``E_t[R_tᵀ M R_t]`` per plane for ``m`` ``[..., d/2, 2, 2]``."""
        r = self.matrices()
        return torch.einsum("t,ptji,...pjk,ptkl->...pil", self.weights, r, m, r)


def plane_rows(w: Tensor) -> Tensor:
    """``[..., d, D+1]`` → ``[..., d/2, 2, D+1]`` (rows a and b of each plane)."""
    a, b = planes(w.shape[-2])
    return torch.stack([w[..., a, :], w[..., b, :]], dim=-2)


def unplane_rows(w: Tensor) -> Tensor:
    return torch.cat([w[..., 0, :], w[..., 1, :]], dim=-2)


def plane_moments(rows: Tensor, cov: Tensor) -> Tensor:
    """``E[q_p q_pᵀ]`` ``[..., d/2, 2, 2]`` of the planes of ``rows`` ``[..., d, D+1]``."""
    pr = plane_rows(rows.double())
    return pr @ cov @ pr.transpose(-1, -2)


def key_objective(q_old: Tensor, k_old: Tensor, q_new: Tensor, k_new: Tensor, cov: Tensor, rotary: Rotary) -> Tensor:
    """Mean squared logit error of one query head over token pairs and relative rotations, per plane.

    The planes' squared errors are summed: cross-plane terms average out between planes that turn
    at different rates and are neglected (that is what lets each plane be fitted on its own).

    ``q_*``, ``k_*``: ``[d, D+1]``. Per plane (rows A of q, B of k, 2×D+1) the error is
    ``x̃_iᵀ Δ x̃_j`` with ``Δ = A'ᵀ R B' − Aᵀ R B``; for independent tokens
    ``E = E_R tr(C Δ C Δᵀ) = Σ ± E_R tr((A₂ C A₁ᵀ) R (B₁ C B₂ᵀ) Rᵀ)``.
    """
    qa, qb = plane_rows(q_old.double()), plane_rows(q_new.double())
    ka, kb = plane_rows(k_old.double()), plane_rows(k_new.double())
    r = rotary.matrices()
    terms = ((1.0, qb, kb), (-1.0, qa, ka))
    total = torch.zeros((), dtype=torch.float64)
    for (s1, a1, b1), (s2, a2, b2) in itertools.product(terms, terms):
        p21 = a2 @ cov @ a1.transpose(-1, -2)  # [P, 2, 2]
        k12 = b1 @ cov @ b2.transpose(-1, -2)
        rk = torch.einsum("ptij,pjk,ptlk->ptil", r, k12, r)  # R K Rᵀ
        total = total + s1 * s2 * torch.einsum("t,pij,ptji->", rotary.weights, p21, rk)
    return total


def value_objective(o_old: Tensor, v_old: Tensor, o_new: Tensor, v_new: Tensor, cov: Tensor) -> Tensor:
    """``‖(O' V' − O V) C^{½}‖²`` for one query head (``o``: ``[D, d]``, ``v``: ``[d, D+1]``)."""
    delta = o_new.double() @ v_new.double() - o_old.double() @ v_old.double()
    return ((delta @ cov) * delta).sum()


# ----------------------------------------------------------------------------- grouping


def contiguous_groups(num_units: int, num_groups: int) -> list[list[int]]:
    size = num_units // num_groups
    return [list(range(g * size, (g + 1) * size)) for g in range(num_groups)]


def kv_distances(q: Tensor, k: Tensor, v: Tensor, o: Tensor, kv_of: list[int], cov: Tensor) -> Tensor:
    """How much two KV heads lose when pooled together ``[G, G]`` (0 on the diagonal).

    Key part: the query-energy-weighted key difference (the ``fit`` key objective of the
    pair); value part: the value difference seen through the o_proj columns that read it.
    Each part is divided by its mean head energy so that the two are comparable.
    """
    G = k.shape[0]
    lam = query_plane_energy(q.double(), cov)  # [H, d/2]
    kv = torch.tensor(kv_of)
    lam_g = torch.stack([lam[kv == g].mean(0) for g in range(G)])  # [G, d/2]
    od = o.double()
    gram = od.transpose(1, 2) @ od  # [H, d, d]
    ok = torch.stack([gram[kv == g].sum(0) for g in range(G)])  # [G, d, d]
    kc = _complex_rows(k.double())  # [G, d/2, D+1]
    vd = v.double()
    dist = torch.zeros(G, G, dtype=torch.float64)
    key_norm = torch.stack([(lam_g[g] * _cplx_energy(kc[g], cov)).sum() for g in range(G)]).mean()
    val_norm = torch.stack([torch.trace(ok[g] @ vd[g] @ cov @ vd[g].T) for g in range(G)]).mean()
    for g1, g2 in itertools.combinations(range(G), 2):
        lam_pair = (lam_g[g1] + lam_g[g2]) / 2
        dk = (lam_pair * _cplx_energy(kc[g1] - kc[g2], cov)).sum() / key_norm.clamp_min(1e-30)
        dv_rows = vd[g1] - vd[g2]
        dv = torch.trace((ok[g1] + ok[g2]) / 2 @ dv_rows @ cov @ dv_rows.T) / val_norm.clamp_min(1e-30)
        dist[g1, g2] = dist[g2, g1] = dk + dv
    return dist


def _cplx_energy(w: Tensor, cov: Tensor) -> Tensor:
    """``E|w x̃|²`` per complex row."""
    return row_energy(w.real, cov) + row_energy(w.imag, cov)


def partition_cost(dist: Tensor, groups: list[list[int]]) -> float:
    return float(sum(dist[i, j] for g in groups for i, j in itertools.combinations(g, 2)))


def balanced_partition(dist: Tensor, num_groups: int, restarts: int = 8, seed: int = 0) -> list[list[int]]:
    """Split units into ``num_groups`` equal groups with small within-group distance.

    For mean pooling the within-group sum of pairwise squared distances is exactly the pooling
    error (``Σ_i ‖x_i − x̄‖² = Σ_{i<j} ‖x_i − x_j‖² / m``). Local search by swapping two units of
    different groups, from the contiguous split and a few random ones; the best is kept, and
    contiguous wins ties so that a model whose grouping is already best is left as it is.
    """
    units = dist.shape[0]
    if num_groups in (1, units):
        return contiguous_groups(units, num_groups)
    gen = torch.Generator().manual_seed(seed)
    starts = [contiguous_groups(units, num_groups)]
    for _ in range(restarts):
        order = torch.randperm(units, generator=gen).tolist()
        size = units // num_groups
        starts.append([sorted(order[g * size : (g + 1) * size]) for g in range(num_groups)])
    best, best_cost = starts[0], partition_cost(dist, starts[0])
    for start in starts:
        groups = _swap_search(dist, [list(g) for g in start])
        cost = partition_cost(dist, groups)
        if cost < best_cost - 1e-12 * max(1.0, abs(best_cost)):
            best, best_cost = groups, cost
    return sorted((sorted(g) for g in best), key=lambda g: g[0])


def _swap_search(dist: Tensor, groups: list[list[int]]) -> list[list[int]]:
    def unit_cost(u: int, group: list[int]) -> float:
        return float(sum(dist[u, w] for w in group if w != u))

    improved = True
    while improved:
        improved = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            for i, j in itertools.product(range(len(groups[a])), range(len(groups[b]))):
                u, w = groups[a][i], groups[b][j]
                rest_a = [x for x in groups[a] if x != u]
                rest_b = [x for x in groups[b] if x != w]
                gain = (unit_cost(u, rest_a) + unit_cost(w, rest_b)) - (unit_cost(w, rest_a) + unit_cost(u, rest_b))
                if gain > 1e-12:
                    groups[a][i], groups[b][j] = w, u
                    improved = True
    return groups


def query_order(groups: list[list[int]], unit_queries: list[list[int]]) -> list[int]:
    """The query-head permutation that makes each group of units contiguous.

    ``unit_queries[u]`` lists the query heads of unit u; new head i is old head ``order[i]``.
    """
    return [h for g in groups for u in g for h in unit_queries[u]]


@dataclass
class Attention:
    """One layer's attention, augmented and split by head (see the module docstring)."""

    q: Tensor  # [H, d, D+1]
    k: Tensor  # [G, d, D+1]
    v: Tensor  # [G, d, D+1]
    o: Tensor  # [H, D, d]
    kv_of: list[int]

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[0]

    def permute_queries(self, order: list[int]) -> Attention:
        """Reorder query heads (q rows, o columns): the layer's function is unchanged."""
        idx = torch.tensor(order)
        return Attention(self.q[idx], self.k, self.v, self.o[idx], [self.kv_of[h] for h in order])


def similarity_order(att: Attention, num_groups: int, cov: Tensor) -> list[int]:
    """Query-head order for ``similarity`` grouping (balanced groups of alike KV heads)."""
    H, G = att.num_heads, att.num_kv_heads
    dist = kv_distances(att.q, att.k, att.v, att.o, att.kv_of, cov)
    if G % num_groups == 0:
        # Units are the KV heads with their query heads: an existing grouping stays whole.
        unit_queries = [[h for h in range(H) if att.kv_of[h] == g] for g in range(G)]
        unit_dist = dist
    else:
        unit_queries = [[h] for h in range(H)]
        kv = torch.tensor(att.kv_of)
        unit_dist = dist[kv][:, kv]
    groups = balanced_partition(unit_dist, num_groups)
    return query_order(groups, unit_queries)


# ----------------------------------------------------------------------------- pooling


@dataclass
class Pooled:
    """The converted attention: ``N`` KV heads, new q and o (o/q change only for fit kinds)."""

    q: Tensor  # [H, d, D+1]
    k: Tensor  # [N, d, D+1]
    v: Tensor  # [N, d, D+1]
    o: Tensor  # [H, D, d]


def pool(att: Attention, num_groups: int, pooling: str, cov: Tensor | None = None,
         rotary: Rotary | None = None, value_ridge: float = 0.0) -> Pooled:
    """Pool KV heads into ``num_groups`` contiguous groups of query heads (``h // (H/N)``).

    ``rotary`` (fit kinds): the RoPE rotations to average the key objective over; default
    θ = 10000 over 512-token windows.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}")
    if pooling != "mean" and cov is None:
        raise ValueError(f"pooling '{pooling}' needs the input second moment")
    H, d = att.num_heads, att.q.shape[1]
    rotary = rotary or Rotary.default(d)
    size = H // num_groups
    q_new, o_new = att.q.clone(), att.o.clone()
    ks, vs = [], []
    for n in range(num_groups):
        members = list(range(n * size, (n + 1) * size))
        kv = [att.kv_of[h] for h in members]
        if pooling == "mean":
            ks.append(att.k[kv].mean(0))
            vs.append(att.v[kv].mean(0))
            continue
        cov64 = cov.double()
        if pooling == "fit":
            ks.append(fit_keys(att.q[members], att.k[kv], cov64, rotary).to(att.k.dtype))
        else:
            k, gamma = fit_keys_q(att.q[members], kv, att.k, cov64, rotary)
            ks.append(k.to(att.k.dtype))
            q_new[members] = rotate_query_planes(att.q[members].double(), gamma).to(att.q.dtype)
        v, o = fit_values(att.o[members], kv, att.v, cov64, ridge=value_ridge)
        vs.append(v.to(att.v.dtype))
        o_new[members] = o.to(att.o.dtype)
    return Pooled(q_new, torch.stack(ks), torch.stack(vs), o_new)


def fit_keys(q: Tensor, k_targets: Tensor, cov: Tensor, rotary: Rotary) -> Tensor:
    """Least-squares pooled key of a group (``q``, ``k_targets``: ``[m, d, D+1]``) → ``[d, D+1]``.

    Per plane, with ``Q̄_h = E_R[Rᵀ E[q_h q_hᵀ] R]`` (2×2), the objective
    ``Σ_h tr(Q̄_h (K' − K_h) C (K' − K_h)ᵀ)`` is minimized by ``K' = (Σ Q̄_h)⁻¹ Σ Q̄_h K_h``
    (C cancels). Where all planes turn many times Q̄ is ``λ/2·I``: an energy-weighted mean.
    """
    qbar = rotary.average(plane_moments(q, cov))  # [m, P, 2, 2]
    kt = plane_rows(k_targets.double())  # [m, P, 2, D+1]
    return unplane_rows(_solve_planes(qbar.sum(0), (qbar @ kt).sum(0), kt.mean(0)))


def _solve_planes(lhs: Tensor, rhs: Tensor, fallback: Tensor) -> Tensor:
    """``lhs⁻¹ rhs`` per plane (``[P, 2, 2]``, ``[P, 2, n]``); ``fallback`` where lhs is singular."""
    out = fallback.clone()
    ok = torch.linalg.det(lhs).abs() > 1e-12 * lhs.abs().amax((-1, -2)).clamp_min(1e-300) ** 2
    if ok.any():
        out[ok] = torch.linalg.solve(lhs[ok], rhs[ok])
    return out


_J = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)


def fit_keys_q(
    q: Tensor, kv: list[int], k: Tensor, cov: Tensor, rotary: Rotary, iterations: int = 8
) -> tuple[Tensor, Tensor]:
    """``fit_q`` keys: pooled key ``[d, D+1]`` and complex plane scales γ ``[m, d/2]`` of the members.

    Scaling a query plane by γ (``G``: γ as a 2×2 matrix) commutes with RoPE, so head h's error is
    ``qᵀ R (Gᵀ k' − k_h)``. Alternate exact least squares: for fixed G,
    ``K' = (Σ G Q̄ Gᵀ)⁻¹ Σ G Q̄ K_h``; for fixed K', each γ solves a 2×2 system. It starts from the
    better, per plane, of ``fit`` (γ = 1) and the rank-1 solution of the rotation-free objective
    (:func:`fit_keys_rank1`); no step raises the objective, so it never ends above ``fit``.
    """
    qbar = rotary.average(plane_moments(q, cov))  # [m, P, 2, 2]
    kt = plane_rows(k[kv].double())  # [m, P, 2, D+1]
    eye = torch.eye(2, dtype=torch.float64)

    def g_t(gamma: Tensor) -> Tensor:  # Gᵀ = conj(γ) = γr I + γi J, per member and plane
        return gamma.real[..., None, None] * eye + gamma.imag[..., None, None] * _J

    def objective(gamma: Tensor, kp: Tensor) -> Tensor:  # per plane [P]
        diff = g_t(gamma) @ kp - kt
        return torch.einsum("mpij,mpjk,mpik->p", qbar, diff @ cov, diff)

    ones = torch.ones(q.shape[0], q.shape[1] // 2, dtype=torch.complex128)
    k_fit = plane_rows(fit_keys(q, k[kv], cov, rotary))
    k_r1, g_r1 = fit_keys_rank1(q, kv, k, cov)
    k_r1 = plane_rows(k_r1.double())
    take = objective(g_r1, k_r1) < objective(ones, k_fit)  # [P]
    gamma = torch.where(take, g_r1, ones)
    kp = torch.where(take[:, None, None], k_r1, k_fit)
    for _ in range(iterations):
        gt = g_t(gamma)
        g = gt.transpose(-1, -2)
        kp = _solve_planes((g @ qbar @ gt).sum(0), (g @ qbar @ kt).sum(0), kp)
        # γ of each member and plane: minimize tr(Q̄ (γr K' + γi J K' − K_h) C (…)ᵀ).
        basis = torch.stack([kp, _J @ kp], 1).expand(kt.shape[0], -1, -1, -1, -1)  # [m, P, 2, 2, D+1]
        bc = basis @ cov
        gram = torch.einsum("mpij,mpajk,mpbik->mpab", qbar, bc, basis)
        lin = torch.einsum("mpij,mpajk,mpik->mpa", qbar, bc, kt)
        ok = torch.linalg.det(gram).abs() > 1e-12 * gram.abs().amax((-1, -2)).clamp_min(1e-300) ** 2
        if ok.any():
            sol = torch.linalg.solve(gram[ok], lin[ok][..., None])[..., 0]
            gamma = gamma.clone()
            gamma[ok] = torch.complex(sol[:, 0], sol[:, 1])
    # Free scale per plane: mean |γ| of one (K' takes the inverse), familiar magnitudes for a quantizer.
    scale = gamma.abs().mean(0).clamp_min(1e-12)
    return unplane_rows(kp * scale[:, None, None]), gamma / scale


def fit_keys_rank1(q: Tensor, kv: list[int], k: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """``fit_q`` keys: per plane, complex rank-1 fit ``β_g w'`` of the group's keys.

    Returns the pooled key ``[d, D+1]`` and ``γ`` ``[m, d/2]`` to multiply each member query
    head's planes by.
    """
    distinct = sorted(set(kv))
    lam_h = query_plane_energy(q.double(), cov)  # [m, d/2]
    lam = torch.stack([lam_h[[i for i, g in enumerate(kv) if g == c]].sum(0) for c in distinct])  # [c, d/2]
    w = _complex_rows(k[distinct].double())  # [c, d/2, D+1]
    cov_c = cov.to(torch.complex128)
    half = w.shape[1]
    pooled = torch.zeros(half, w.shape[2], dtype=torch.complex128)
    beta = torch.ones(len(distinct), half, dtype=torch.complex128)
    for p in range(half):
        lp = lam[:, p].clamp_min(0)
        if float(lp.sum()) <= 0:
            pooled[p] = w[:, p].mean(0)
            continue
        a = lp.sqrt()[:, None].to(torch.complex128) * w[:, p]  # [c, D+1]
        gram = a @ cov_c @ a.conj().T  # Hermitian [c, c]
        _, vecs = torch.linalg.eigh(gram)
        u = vecs[:, -1]
        row = u.conj() @ a  # best rank-1: a ≈ u (uᴴ a)
        safe = lp.sqrt().clamp_min(1e-150).to(torch.complex128)
        b = torch.where(lp > 0, u / safe, torch.zeros_like(u))
        # Free scale and phase: make the energy-weighted mean of β one (β = 1 reproduces ``fit``).
        s = (lp.to(torch.complex128) * b).sum() / lp.sum()
        if abs(s) < 1e-12:
            pooled[p] = (lp[:, None] * w[:, p]).sum(0) / lp.sum()
            continue
        pooled[p] = row * s
        beta[:, p] = b / s
    gamma = torch.stack([beta[distinct.index(g)] for g in kv]).conj()
    return _real_rows(pooled), gamma


def ridge_cov(cov: Tensor, ridge: float) -> Tensor:
    """``C + μ̄ I`` with ``μ̄ = ridge · tr(C) / (D+1)``: every input direction gets at least that energy."""
    if ridge <= 0:
        return cov
    mu = ridge * cov.diagonal().mean()
    return cov + mu * torch.eye(cov.shape[0], dtype=cov.dtype)


def fit_values(
    o: Tensor, kv: list[int], v: Tensor, cov: Tensor, rel_eps: float = 1e-10, ridge: float = 0.0
) -> tuple[Tensor, Tensor]:
    r"""Best shared value head and o_proj columns for a group (truncated SVD in coefficients).

    ``o``: ``[m, D, d]`` the members' o_proj columns, ``kv[i]``: member i's old KV head, ``v``:
    all old value heads. Returns ``V'`` ``[d, D+1]`` and the members' new o columns ``[m, D, d]``.

    *Ridge (Tikhonov).* With ``ridge = μ > 0`` it minimizes
    ``f_μ = Σ_h ‖(O'_h V' − O_h V_h) C^½‖² + μ̄ Σ_h ‖O'_h V' − O_h V_h‖²_F = Σ_h ‖(…)(C + μ̄ I)^½‖²``
    (``μ̄ = μ·tr C/(D+1)``, :func:`ridge_cov`): the same closed form with ``C_μ = C + μ̄ I``.
    ``C`` is estimated from a few thousand strongly correlated tokens, and directions it barely
    sees leave the product free; the penalty keeps the product near the original there. It
    bounds the weights: the whitened rows have ``V_w C_μ V_wᵀ = I``, so ``‖v_w‖² ≤ 1/μ̄``, and
    ``O'_h = O_h V_h C_μ V_wᵀ`` (before the basis choice), so ``‖O'_h‖ ≤ ‖O_h V_h C_μ^½‖``.
    Guarantee: ``f_μ(fit) ≤ f_μ(mean)``, hence ``f(fit) ≤ f(mean) + μ̄ Σ_h ‖(O_h V̄ − O_h V_h)‖²_F``
    on the unpenalized objective (equal to ``f(fit) ≤ f(mean)`` at ``μ = 0``).
    Default 0 (the stage's ``value_ridge``): on SmolLM2 3 → 1 (eval/results/gqa-smollm2.md) μ = 0.1
    cut the held-out hidden-state error of 3 layers by 4% but raised perplexity on 8 × 512 held-out
    tokens (fit 284 → 323, fit_q 41.5 → 42.7, fit_q + RTN 81.8 → 94.9). The value fit is bounded
    without it (it stays in the span of the old value rows, weighted by their energy); what broke
    int4 was the basis, which :func:`balance_values` fixes exactly.
    """
    cov = ridge_cov(cov, ridge)
    distinct = sorted(set(kv))
    d = v.shape[1]
    v_all = v[distinct].double().reshape(-1, v.shape[2])  # [c*d, D+1]
    o = o.double()
    blocks = [sum(o[i].T @ o[i] for i, g in enumerate(kv) if g == c) for c in distinct]
    ob = torch.block_diag(*blocks)  # [c*d, c*d]
    nm = v_all @ cov @ v_all.T
    nm = (nm + nm.T) / 2
    evals, evecs = torch.linalg.eigh(nm)
    keep = evals > rel_eps * evals.max().clamp_min(1e-300)
    mean_v = v[kv].double().mean(0)
    if int(keep.sum()) < d:  # too few directions (degenerate calibration): plain mean
        return mean_v, o
    basis = evecs[:, keep] * evals[keep].rsqrt()  # columns c with cᵀ Nm c = I
    low = basis * evals[keep]  # Nm·basis
    m = low.T @ ob @ low
    _, y = torch.linalg.eigh((m + m.T) / 2)
    coef = basis @ y[:, -d:]  # [c*d, d]; V_w = coefᵀ V_all has V_w C V_wᵀ = I
    v_white = coef.T @ v_all
    # Basis closest to the mean: T = argmin ‖(T V_w − V̄) C^½‖ = V̄ C V_wᵀ.
    t = mean_v @ cov @ v_white.T
    if torch.linalg.cond(t) > 1e8:
        t = torch.eye(d, dtype=t.dtype) * row_energy(mean_v, cov).mean().sqrt()
    v_new = t @ v_white
    cross = v_all @ cov @ v_white.T  # [c*d, d] = V_g C V_wᵀ stacked
    t_inv = torch.linalg.inv(t)
    o_new = torch.stack(
        [o[i] @ cross[distinct.index(g) * d : (distinct.index(g) + 1) * d] @ t_inv for i, g in enumerate(kv)]
    )
    return v_new, o_new


def refit_output(gram: Tensor, cross: Tensor, weight: Tensor, damp: float = 0.1) -> Tensor:
    """o_proj refit on activations: ``argmin_W Σ ‖W a'_t − y_t‖² + δ‖W − W₀‖²``.

    ``gram = Σ a' a'ᵀ`` over the converted attention's o_proj inputs, ``cross = Σ y a'ᵀ`` with
    ``y`` the original attention's output (bias removed), ``weight`` the current o_proj ``W₀``.
    This sees everything the pooled keys changed (attention patterns included), which the
    closed-form value fit cannot. ``δ = damp · mean diag(gram)`` pulls toward ``W₀`` where the
    calibration activations say little; tokens of a window are far from independent, and on
    SmolLM2 with 2048 calibration tokens damp 1e-3 overfit (held-out error unchanged, calibration
    error ÷3) while 0.1 cut the held-out error of 3 layers' output by a third.
    """
    gram, cross, w0 = gram.double(), cross.double(), weight.double()
    delta = damp * gram.diagonal().mean().clamp_min(1e-12)
    lhs = gram + delta * torch.eye(gram.shape[0], dtype=gram.dtype)
    rhs = cross + delta * w0
    return torch.linalg.solve(lhs, rhs.T).T  # lhs symmetric: W = rhs lhs⁻¹


def convert(
    att: Attention,
    num_groups: int,
    pooling: str = "mean",
    grouping: str = "contiguous",
    cov: Tensor | None = None,
    rotary: Rotary | None = None,
    value_ridge: float = 0.0,
) -> tuple[Pooled, list[int]]:
    """Group (permuting query heads) and pool; returns the result and the query order used."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}")
    order = list(range(att.num_heads))
    if grouping == "similarity" and 1 < num_groups < att.num_heads:
        if cov is None:
            raise ValueError("similarity grouping needs the input second moment")
        order = similarity_order(att, num_groups, cov.double())
        att = att.permute_queries(order)
    return pool(att, num_groups, pooling, cov, rotary, value_ridge), order


def noise_amplification(o: Tensor, v: Tensor, cov: Tensor) -> float:
    """How much independent relative noise on the rank-1 terms of ``O V`` is amplified.

    ``o``: ``[R, d]`` (every o_proj column that reads the value rows, stacked), ``v``: ``[d, D+1]``.
    Returns ``Σ_r ‖o_r‖² ‖v_r C^½‖² / ‖O V C^½‖²``: 1 when the terms are orthogonal (no
    cancellation), large when big terms cancel and rounding each of them leaves a big residue.
    """
    o, v, cov = o.double(), v.double(), cov.double()
    terms = (o * o).sum(0) * row_energy(v, cov)
    prod = o @ v
    return float(terms.sum() / ((prod @ cov) * prod).sum().clamp_min(1e-300))


def balance_values(
    o: Tensor, v: Tensor, cov: Tensor, ref_energy: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    r"""Exact change of the value basis that makes ``O V`` quantizable (the output is unchanged).

    ``o``: ``[R, d]`` every o_proj column reading the ``d`` value rows ``v`` ``[d, D+1]``; any
    invertible ``T`` gives ``(O T⁻¹)(T V) = O V``. With ``V C Vᵀ = R Rᵀ`` and the SVD
    ``O R = U S Qᵀ``, we take ``V' = diag(a) Qᵀ R⁻¹ V`` and ``O' = U S diag(a)⁻¹``:

    - the rank-1 terms ``o'_r v'_rᵀ`` are then orthogonal (columns of ``O'`` orthogonal, rows of
      ``V'`` C-orthogonal), so rounding each row or column by a relative ε errs by ε relative to
      ``O V`` (:func:`noise_amplification` is 1): no large terms that cancel;
    - RTN rounds v_proj row by row, so the row scales ``a`` are free for v_proj; o_proj is rounded
      per output row over groups of its columns, so ``a_r ∝ s_r`` gives every column of ``O'`` the
      same norm (no small column lost under a large one of its group);
    - a global factor makes the mean row energy of ``V'`` equal to ``ref_energy`` (default: ``V``'s
      own), keeping magnitudes familiar.
    """
    o64, v64, cov64 = o.double(), v.double(), cov.double()
    gram = v64 @ cov64 @ v64.T
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    if float(evals.min()) <= 1e-12 * float(evals.max().clamp_min(1e-300)):
        return o, v  # rank-deficient value rows: nothing safe to do
    r = evecs * evals.sqrt()  # V C Vᵀ = R Rᵀ
    r_inv = (evecs / evals.sqrt()).T
    u, s, qh = torch.linalg.svd(o64 @ r, full_matrices=False)
    s = s.clamp_min(1e-12 * float(s.max().clamp_min(1e-300)))
    v_w = qh @ r_inv @ v64  # C-orthonormal rows
    target = row_energy(v64, cov64).mean() if ref_energy is None else torch.as_tensor(ref_energy, dtype=torch.float64)
    a = s * (target / (s * s).mean()).sqrt()  # mean energy of the rows of V' = target
    return (u * (s / a)).to(o.dtype), (a[:, None] * v_w).to(v.dtype)


def balance_pooled(pooled: Pooled, cov: Tensor) -> Pooled:
    """:func:`balance_values` for every KV group (query heads ``h // (H/N)``); the output is unchanged."""
    H, D, d = pooled.o.shape
    N = pooled.v.shape[0]
    size = H // N
    v_new, o_new = pooled.v.clone(), pooled.o.clone()
    for n in range(N):
        members = slice(n * size, (n + 1) * size)
        stacked = pooled.o[members].reshape(-1, d)  # [m*D, d]
        o_b, v_b = balance_values(stacked, pooled.v[n], cov)
        v_new[n], o_new[members] = v_b, o_b.reshape(size, D, d)
    return Pooled(pooled.q, pooled.k, v_new, o_new)
