"""TransMIL: transformer-based correlated MIL, with a discrete-time survival head.

Paper: Z. Shao, H. Bian, Y. Chen, Y. Wang, J. Zhang, X. Ji, Y. Zhang, "TransMIL: Transformer based Correlated
Multiple Instance Learning for Whole Slide Image Classification", NeurIPS 2021.
Official repository: github.com/szc19990412/TransMIL (``models/TransMIL.py``), which uses lucidrains'
``nystrom-attention`` (github.com/lucidrains/nystrom-attention).
"""
from __future__ import annotations

import math

import torch
from nystrom_attention import NystromAttention
from nystrom_attention.nystrom_attention import moore_penrose_iter_pinv
from torch import Tensor, nn

from benchmark.data.bag import Bag, Needs
from benchmark.training.output import AttentionMap, SurvivalOutput
from benchmark.training.registry import register_method
from methods._inputs import checked_features


#: ``nystrom_impl`` values: "fast" (:func:`nystrom_forward`) or "package" (``NystromAttention.forward``).
NYSTROM_IMPLS = ("fast", "package")


def nystrom_forward(attn: NystromAttention, x: Tensor, return_attn_matrices: bool = False):
    """``NystromAttention.forward(x)`` (no mask) with the same maths and random draws, less work on small bags.

    ``x (B, n, dim)`` -> ``(B, n, dim)`` (and the three factors as the package returns them). A bag of at most
    ``m`` tokens (one token per landmark: every demo bag) has two exact savings:

    - the front padding up to ``m`` rows is applied to ``q, k, v`` instead of ``x``: ``to_qkv`` has no bias, so
      padded rows are zero either way, and only the ``n`` real rows go through the projection (a 65-token demo
      bag is padded to 256);
    - the landmarks are the tokens themselves (a sum over one token divided by 1), so the three similarity
      matrices ``q k_l^T``, ``q_l k_l^T``, ``q_l k^T`` are the same matrix: it is computed and softmaxed once.

    Larger bags run the package's forward unchanged (their padding is under one row in ``l``; padding the
    3x wider ``q, k, v`` instead of ``x`` would cost more than it saves). The output projection and its
    dropout run on all padded rows before the crop, as in the package, so the dropout draws are the same.
    """
    b, n, _ = x.shape
    h, m = attn.heads, attn.num_landmarks
    if n > m:
        return attn(x, return_attn_matrices=return_attn_matrices)
    pad = m - n
    qkv = nn.functional.pad(attn.to_qkv(x), (0, 0, pad, 0))  # (B, m, 3 h d), zeros in front
    q, k, v = (t.reshape(b, m, h, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, h, m, d)
    attn1 = attn2 = attn3 = torch.einsum("... i d, ... j d -> ... i j", q * attn.scale, k).softmax(dim=-1)
    attn2_inv = moore_penrose_iter_pinv(attn2, attn.pinv_iterations)
    out = (attn1 @ attn2_inv) @ (attn3 @ v)
    if attn.residual:
        out = out + attn.res_conv(v)
    out = attn.to_out(out.transpose(1, 2).reshape(b, m, -1))[:, -n:]
    return (out, (attn1, attn2_inv, attn3)) if return_attn_matrices else out


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
        of at most 256 tokens (the ``q, k, v`` projection on real rows only; one similarity matrix instead of
        three); larger bags run the package's forward. "package": ``NystromAttention.forward``, the reference.
        Outputs agree to about 1e-6.
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
      rounding may differ from the package's by about one ulp.
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
