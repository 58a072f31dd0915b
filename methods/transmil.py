"""TransMIL: transformer-based correlated MIL, with a discrete-time survival head.

Paper: Z. Shao, H. Bian, Y. Chen, Y. Wang, J. Zhang, X. Ji, Y. Zhang, "TransMIL: Transformer based Correlated
Multiple Instance Learning for Whole Slide Image Classification", NeurIPS 2021.
Official repository: github.com/szc19990412/TransMIL (``models/TransMIL.py``), which uses lucidrains'
``nystrom-attention`` (github.com/lucidrains/nystrom-attention).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from nystrom_attention import NystromAttention
from torch import Tensor, nn

from methods._layers import checked_features

from benchmark.api import AttentionMap, Bag, Needs, register_method, SurvivalOutput


#: ``nystrom_impl`` values: "fast" (:func:`nystrom_forward`) or "package" (``NystromAttention.forward``).
NYSTROM_IMPLS = ("fast", "package")


class PaddedSquare(NamedTuple):
    """An ``m x m`` matrix over ``n`` real tokens and ``p = m - n`` zero padding tokens that no permutation of the
    padding changes, stored in ``O(n^2)``: in block form (real tokens first)
    ``[[rr, u 1^T], [1 w^T, alpha I + beta 1 1^T]]``; :meth:`dense` lays it out with the padding in front, as the
    package does.

    ``rr (..., n, n)``; ``u, w (..., n)``: the constant real-row / real-column values of the off-diagonal blocks;
    ``alpha, beta (...)``. Products, transposes and ``c M + d I`` of such matrices are again such matrices, so
    the pseudo-inverse iteration runs on ``n x n`` blocks instead of ``m x m`` matrices.
    """

    rr: Tensor
    u: Tensor
    w: Tensor
    alpha: Tensor
    beta: Tensor

    def matmul(self, other: "PaddedSquare", p: int) -> "PaddedSquare":
        """``self @ other``, block by block (the padding blocks contribute through sums over ``p`` rows)."""
        return PaddedSquare(
            self.rr @ other.rr + p * self.u[..., :, None] * other.w[..., None, :],
            (self.rr @ other.u[..., None])[..., 0] + (other.alpha + p * other.beta)[..., None] * self.u,
            (self.w[..., None, :] @ other.rr)[..., 0, :] + (self.alpha + p * self.beta)[..., None] * other.w,
            self.alpha * other.alpha,
            (self.w * other.u).sum(-1) + self.alpha * other.beta + self.beta * other.alpha + p * self.beta * other.beta,
        )

    def transpose(self) -> "PaddedSquare":
        return PaddedSquare(self.rr.transpose(-1, -2), self.w, self.u, self.alpha, self.beta)

    def affine(self, scale: float | Tensor, shift: float = 0.0) -> "PaddedSquare":
        """``scale * M + shift * I`` (``scale``: a number or a 0-d tensor)."""
        eye = torch.eye(self.rr.shape[-1], dtype=self.rr.dtype, device=self.rr.device)
        return PaddedSquare(self.rr * scale + shift * eye, self.u * scale, self.w * scale,
                            self.alpha * scale + shift, self.beta * scale)

    def dense(self, p: int) -> Tensor:
        """The ``(..., m, m)`` matrix with the padding in front, as the package lays it out."""
        n = self.rr.shape[-1]
        out = self.rr.new_empty(*self.rr.shape[:-2], n + p, n + p)
        out[..., p:, p:] = self.rr
        out[..., p:, :p] = self.u[..., None]
        out[..., :p, p:] = self.w[..., None, :]
        eye = torch.eye(p, dtype=self.rr.dtype, device=self.rr.device)
        out[..., :p, :p] = self.alpha[..., None, None] * eye + self.beta[..., None, None]
        return out


def padded_softmax(scores: Tensor, p: int) -> PaddedSquare:
    """``softmax`` of the ``m x m`` similarities of ``n`` real and ``p`` zero tokens (whose scores are all 0).

    A real row is its ``n`` scores and ``p`` zeros: one extra logit ``log p`` stands for the ``p`` zeros, and
    each padding column gets a ``p``-th of its probability. A padding row is uniform, ``1 / m``.
    """
    n = scores.shape[-1]
    batch, m = scores.shape[:-2], n + p
    if p:
        logits = torch.cat((scores, scores.new_full((*scores.shape[:-1], 1), math.log(p))), dim=-1)
        probs = logits.softmax(dim=-1)
        rr, u = probs[..., :n], probs[..., n] / p
    else:
        rr, u = scores.softmax(dim=-1), scores.new_zeros(scores.shape[:-1])
    return PaddedSquare(rr, u, scores.new_full((*batch, n), 1 / m), scores.new_zeros(batch),
                        scores.new_full(batch, 1 / m))


def padded_pinv(x: PaddedSquare, p: int, iters: int) -> PaddedSquare:
    """``moore_penrose_iter_pinv`` of the package on a :class:`PaddedSquare`: the same iteration from the same
    start, ``x^T`` over (largest absolute row sum) x (largest absolute column sum), both over the whole batch."""
    # A padding row (column) holds w (u), alpha + beta on the diagonal and beta p - 1 times.
    padding_block = (x.alpha + x.beta).abs() + (p - 1) * x.beta.abs()
    row_sums = [x.rr.abs().sum(-1) + p * x.u.abs()]
    col_sums = [x.rr.abs().sum(-2) + p * x.w.abs()]
    if p:
        row_sums.append((x.w.abs().sum(-1) + padding_block)[..., None])
        col_sums.append((x.u.abs().sum(-1) + padding_block)[..., None])
    z = x.transpose().affine(1 / (torch.cat(row_sums, -1).max() * torch.cat(col_sums, -1).max()))
    for _ in range(iters):
        xz = x.matmul(z, p)
        inner = xz.matmul(xz.affine(-1.0, 7.0), p).affine(-1.0, 15.0)
        z = z.affine(0.25).matmul(xz.matmul(inner, p).affine(-1.0, 13.0), p)
    return z


def nystrom_forward(attn: NystromAttention, x: Tensor, return_attn_matrices: bool = False):
    """``NystromAttention.forward(x)`` (no mask) with the same maths and dropout draws, on ``n x n`` blocks.

    ``x (B, n, dim)`` -> ``(B, n, dim)`` (and the three factors as the package returns them, detached). A bag
    of at most ``m`` tokens (every demo bag: 65 tokens, ``m`` = 256) is padded in front with ``m - n`` zero
    tokens and has one token per landmark, so:

    - the padded rows of ``q, k, v`` are zero (``to_qkv`` has no bias), and only real rows are projected;
    - the three similarity matrices ``q k_l^T``, ``q_l k_l^T``, ``q_l k^T`` are one matrix, whose padded rows
      and columns are constant: the softmax, its pseudo-inverse iteration and the products are done on
      :class:`PaddedSquare` blocks (``O(n^3)`` per iteration instead of ``O(m^3)``);
    - the value convolution of the real rows sees zeros in front either way;
    - the output projection's dropout draws its mask over all ``m`` rows, as the package does, before the crop.

    Larger bags run the package's forward unchanged.
    """
    b, n, _ = x.shape
    h, m = attn.heads, attn.num_landmarks
    if n > m:
        return attn(x, return_attn_matrices=return_attn_matrices)
    p = m - n
    q, k, v = (t.reshape(b, n, h, -1).transpose(1, 2) for t in attn.to_qkv(x).chunk(3, dim=-1))  # (B, h, n, d)
    similarity = padded_softmax(torch.einsum("... i d, ... j d -> ... i j", q * attn.scale, k), p)
    pinv = padded_pinv(similarity, p, attn.pinv_iterations)
    left = similarity.matmul(pinv, p)
    # attn3 @ v: real rows rr @ v; every padding row is the mean 1/m sum_j v_j, seen by real rows through u.
    out = left.rr @ (similarity.rr @ v) + p * left.u[..., None] * (v.sum(-2, keepdim=True) / m)
    if attn.residual:
        out = out + attn.res_conv(v)
    out = attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1))
    out = attn.to_out[1](nn.functional.pad(out, (0, 0, p, 0)))[:, -n:] if p else attn.to_out[1](out)
    if not return_attn_matrices:
        return out
    with torch.no_grad():
        dense = similarity.dense(p)
        return out, (dense, pinv.dense(p), dense)


class TransLayer(nn.Module):
    """Pre-LN Nystrom self-attention with a residual connection and no feed-forward block.

    ``x + NystromAttention(LayerNorm(x))``; ``dim_head = dim // 8``, 8 heads, ``dim // 2`` landmarks, 6
    pseudo-inverse iterations, depthwise value-residual convolution of kernel 33, dropout 0.1 after the output
    projection (an ``nn.Dropout``, so inactive in eval mode), as in the official ``TransLayer``.
    ``nystrom_impl``: "fast" (:func:`nystrom_forward`) or "package" (the package's forward, the reference).
    """

    def __init__(self, dim: int = 512, dropout: float = 0.1, nystrom_impl: str = "fast",
                 num_landmarks: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim=dim,
            dim_head=dim // 8,
            heads=8,
            num_landmarks=num_landmarks or dim // 2,
            pinv_iterations=6,
            residual=True,
            residual_conv_kernel=33,
            dropout=dropout,
        )
        self.nystrom_impl = nystrom_impl

    def _attention(self, x: Tensor, **kwargs):
        if self.nystrom_impl == "fast":
            return nystrom_forward(self.attn, x, **kwargs)
        return self.attn(x, **kwargs)

    def forward(self, x: Tensor, return_attn_matrices: bool = False):
        """``x``: ``(1, n, dim)`` -> ``(1, n, dim)``; optionally also the three Nystrom factors of the layer
        (``attn1 (1, h, n_pad, m)``, ``pinv (1, h, m, m)``, ``attn3 (1, h, m, n_pad)``, front-padded)."""
        if return_attn_matrices:
            out, factors = self._attention(self.norm(x), return_attn_matrices=True)
            return x + out, factors
        return x + self._attention(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + dw7(x) + dw5(x) + dw3(x)`` on the tokens laid out row-major
    on a ``side x side`` grid (depthwise ``Conv2d`` with bias); the class token passes through unchanged."""

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: Tensor, side: int) -> Tensor:
        """``x``: ``(1, 1 + side * side, dim)`` -> same shape."""
        batch, _, dim = x.shape
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat((cls_token, grid.flatten(2).transpose(1, 2)), dim=1)


#: Tuned besides the shared space (whose ``dropout`` is the Nystrom output dropout, 0.1 official): the
#: Nystrom landmarks (256 = dim // 2 official; HVTSurv's patient-level TransMIL uses 64) and the width (512
#: official, 128 in HVTSurv).
SEARCH_SPACE = {"num_landmarks": {"choices": [64, 128, 256]}, "dim": {"choices": [128, 256, 512]}}


@register_method(
    "transmil",
    cost_prior=0.069, paper_row=3,
    reference_options={"nystrom_impl": "package"},  # NystromAttention.forward of the nystrom-attention package
    needs=Needs(magnifications=(20,)),
    search_space=SEARCH_SPACE,
    source="Shao et al. NeurIPS 2021; github.com/szc19990412/TransMIL (models/TransMIL.py)",
)
class TransMIL(nn.Module):
    """TransMIL (official configuration, ``D = 512``) with one output per survival bin.

    Forward on one bag of ``N`` 20x patches:

    1. ``Linear(in_dim -> D), ReLU`` ``(N, D)``;
    2. square padding: ``side = ceil(sqrt(N))``; the first ``side**2 - N`` tokens are appended again at the end
       (wrap-around duplication, no mask);
    3. prepend the class token (``randn(1, 1, D)``, no re-initialisation, as the official code);
    4. ``TransLayer``, ``PPEG``, ``TransLayer`` (two pre-LN Nystrom layers: 8 heads x 64, 256 landmarks,
       6 pseudo-inverse iterations, residual conv 33, dropout 0.1);
    5. ``LayerNorm(D)``, class token, ``Linear(D -> n_bins)`` logits ``(1, n_bins)``.

    Parameters: 2,673,172 at ``in_dim`` 1024, 2,935,316 at 1536, 2,411,028 at 512 (4 bins).

    Parameters
    ----------
    in_dim : int
        Patch-feature dimension.
    n_bins : int
        Number of discrete-time survival bins.
    dim : int
        Token width ``D`` (512 in the official code; heads stay 8, so ``dim`` must be a multiple of 8).
    dropout : float
        Dropout after each attention output projection (0.1 official); acts only in training.
    nystrom_impl : {"fast", "package"}
        "fast" (default): :func:`nystrom_forward`, the package's maths and dropout draws with less work on bags
        of at most 256 tokens (real rows only: the padding's constant rows and columns are carried as
        :class:`PaddedSquare` blocks); larger bags run the package's forward. "package":
        ``NystromAttention.forward``, the reference. Outputs and gradients agree to rounding (float64: 1e-13).
    num_landmarks : int, optional
        Nystrom landmarks of both layers (default ``dim // 2``: 256 official).

    Notes
    -----
    Deliberate deviations from the official code:

    - Nystrom attention from ``nystrom-attention`` >= 0.0.10 (0.0.14 here), which returns the last ``n`` rows
      after front padding. The official code pins 0.0.9, whose ``out[:, :n]`` misaligns every token by the pad
      length whenever ``n % 256 != 0``; published TransMIL numbers come from that shifted behaviour.
    - The class token follows the module's device (the official code calls ``.cuda()``).
    - ``nystrom_impl="fast"`` computes the package's function with less work (see :func:`nystrom_forward`);
      only the order of floating-point sums differs.
    - The classification head's ``n_classes`` becomes ``n_bins`` logits, trained with the shared NLL; no
      softmax / argmax.

    Outputs ``attention["attention"]``, ``(N,)``, aligned with ``bag.features[20]`` rows: the class token's row
    of the last layer's Nystrom attention, averaged over heads, ``attn1[cls] @ pinv @ attn3``. It costs
    ``O(heads * landmarks * n)`` and never forms an ``n x n`` matrix. It is the Nystrom approximation of the
    softmax row (it may hold small negative values and need not sum exactly to one), it ignores the value
    residual convolution, and the wrap-around duplicates are cropped away (each patch keeps the score of its
    original position only).
    """

    def __init__(self, in_dim: int, n_bins: int = 4, dim: int = 512, dropout: float = 0.1,
                 nystrom_impl: str = "fast", num_landmarks: int | None = None) -> None:
        super().__init__()
        if nystrom_impl not in NYSTROM_IMPLS:
            raise ValueError(f"methods/transmil.py: nystrom_impl must be one of {NYSTROM_IMPLS}, got {nystrom_impl!r}")
        if in_dim < 1 or n_bins < 1:
            raise ValueError(f"methods/transmil.py: in_dim and n_bins must be positive, got {in_dim}, {n_bins}")
        if dim % 16 != 0:
            raise ValueError(f"methods/transmil.py: dim must be a multiple of 16 (8 heads, dim // 2 landmarks), "
                             f"got {dim}")
        self.in_dim = in_dim
        self.n_bins = n_bins
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim=dim, dropout=dropout, nystrom_impl=nystrom_impl,
                                 num_landmarks=num_landmarks)
        self.pos_layer = PPEG(dim=dim)
        self.layer2 = TransLayer(dim=dim, dropout=dropout, nystrom_impl=nystrom_impl,
                                 num_landmarks=num_landmarks)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, n_bins)

    def forward(self, bag: Bag) -> SurvivalOutput:
        """Score one bag.

        Parameters
        ----------
        bag : Bag
            Reads ``bag.features[20]``, ``(N, in_dim)``.

        Returns
        -------
        SurvivalOutput
            ``logits`` ``(1, n_bins)``; ``attention["attention"]`` ``(N,)``.
        """
        feats = checked_features(bag, 20, self.in_dim, "methods/transmil.py")
        n_patches = feats.shape[0]
        h = self.fc1(feats).unsqueeze(0)  # (1, N, D)

        side = math.ceil(math.sqrt(n_patches))
        n_added = side * side - n_patches
        if n_added:
            # Wrap-around duplication of the first tokens (modulo N, so tiny bags never run short).
            wrap = torch.arange(n_added, device=h.device) % n_patches
            h = torch.cat((h, h[:, wrap]), dim=1)  # (1, side**2, D)

        h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1)  # (1, 1 + side**2, D)
        h = self.layer1(h)
        h = self.pos_layer(h, side)
        h, (attn1, pinv, attn3) = self.layer2(h, return_attn_matrices=True)
        logits = self.fc2(self.norm(h)[:, 0])  # (1, n_bins)

        with torch.no_grad():
            n_tokens = h.shape[1]
            landmarks = self.layer2.attn.num_landmarks
            front_pad = (landmarks - n_tokens % landmarks) % landmarks  # Nystrom pads at the front
            cls_row = (attn1[:, :, front_pad : front_pad + 1] @ pinv) @ attn3  # (1, heads, 1, n_pad)
            scores = cls_row.mean(dim=1)[0, 0, front_pad + 1 : front_pad + 1 + n_patches]  # (N,)
        return SurvivalOutput.from_logits(logits, attention={"attention": AttentionMap(20, scores.detach())})
