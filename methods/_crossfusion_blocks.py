"""Building blocks shared by ``crossfusion``, ``crossfusion_wo_cp`` and ``crossfusion_wo_fc``.

Memory-bounded attention (the reason this module exists):

- dropout 0, or any dropout on a non-CPU device: ``F.scaled_dot_product_attention`` (the flash kernel on CPU,
  flash / memory-efficient on CUDA), memory linear in the bag;
- dropout > 0 on CPU (the fused CPU kernel has no dropout and PyTorch would fall back to the O(Lq * Lk) math
  kernel): queries in chunks of at most ``block_bytes`` of attention matrix each, so only one chunk's matrix is
  alive in the forward and in the backward pass. ``dropout_impl="fast"`` (default): one autograd Function with
  a flash-style backward, reused buffers and a cheaper Bernoulli mask (``methods/_fast_attention.py``).
  ``dropout_impl="torch"`` (the reference): ``F.dropout`` on each chunk, every chunk wrapped in
  ``torch.utils.checkpoint`` (RNG state preserved, so the recomputed dropout mask is the same).

Attention maps ("attention received" per key token, head-averaged and summed over queries, as the official
``heatmap.py``) are computed the same chunked way under ``no_grad``, never forming the full matrix.

Module registration order, shapes and initialisation follow the official ``models/CrossFusion.py``
(RustinS/CrossFusion), so a seeded construction consumes the random stream in the same order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from methods._fast_attention import dropout_attention, fast_dropout

#: Default bound on the bytes of one block of attention matrix (heads x query chunk x keys, float32).
DEFAULT_BLOCK_BYTES = 64 * 2**20

#: With ``activation_checkpointing=None`` (auto), layers whose sequence is longer than this are checkpointed in
#: training. The largest real slide (34,500 10x tokens) stores about 100 kB of activations per 20x patch without
#: it (about 14 GB), and about a third with it; typical slides (N10 below 16k) keep the faster path.
DEFAULT_CHECKPOINT_MIN_TOKENS = 16_384

#: ``attention_backend`` values: "auto" (memory-bounded, see the module docstring) or "sdpa" (always
#: ``F.scaled_dot_product_attention`` with the dropout as given, the official code's call: on CPU with dropout
#: this is PyTorch's math kernel, O(Lq * Lk) memory; only for parity / kernel comparisons on small bags).
ATTENTION_BACKENDS = ("auto", "sdpa")

#: ``dropout_impl`` values for the chunked CPU path with dropout: "fast" (``methods/_fast_attention.py``) or
#: "torch" (``F.dropout`` in checkpointed chunks: the plain PyTorch reference).
DROPOUT_IMPLS = ("fast", "torch")


# --------------------------------------------------------------------------------------------------- attention
def _rows_per_block(n_heads: int, n_keys: int, block_bytes: int, element_size: int = 4) -> int:
    return max(1, int(block_bytes // max(1, n_heads * n_keys * element_size)))


def _math_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """``dropout(softmax(q k^T / sqrt(d))) v`` on one query chunk. ``q (B, H, c, d)``, ``k, v (B, H, M, d)``."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, c, M)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    use_checkpoint: bool | None = None,
) -> Tensor:
    """Exact softmax attention over query chunks; at most ``block_bytes`` of attention matrix per chunk.

    Parameters
    ----------
    q : Tensor, shape (B, H, N, d)
    k, v : Tensor, shape (B, H, M, d)
    dropout_p : float
        Dropout on the attention probabilities (applied as given: the caller decides train / eval).
    block_bytes : int
        Bound on ``H * chunk * M * 4`` bytes.
    use_checkpoint : bool or None
        Checkpoint each chunk (recompute it in the backward pass). None: whenever autograd records.

    Returns
    -------
    Tensor, shape (B, H, N, d)
    """
    rows = _rows_per_block(q.shape[0] * q.shape[1], k.shape[-2], block_bytes, q.element_size())
    if use_checkpoint is None:
        use_checkpoint = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs = []
    for start in range(0, q.shape[-2], rows):
        q_chunk = q[..., start : start + rows, :]
        if use_checkpoint:
            # preserve_rng_state (the default) replays the same dropout mask when the chunk is recomputed.
            outs.append(checkpoint(_math_attention, q_chunk, k, v, dropout_p, use_reentrant=False))
        else:
            outs.append(_math_attention(q_chunk, k, v, dropout_p))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    backend: str = "auto",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    dropout_impl: str = "fast",
) -> Tensor:
    """Scaled dot-product attention with bounded memory (see the module docstring for the kernel choice).

    ``q (B, H, N, d)``, ``k, v (B, H, M, d)`` -> ``(B, H, N, d)``. ``dropout_p`` is applied as given.
    """
    if backend == "sdpa" or dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if dropout_impl == "fast" and q.dtype in (torch.float32, torch.float64):
        return dropout_attention(q, k, v, dropout_p, block_bytes)
    return chunked_attention(q, k, v, dropout_p=dropout_p, block_bytes=block_bytes)


@torch.no_grad()
def received_attention(q: Tensor, k: Tensor, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Tensor:
    """Attention each key receives: ``mean_h sum_i softmax(q k^T / sqrt(d))[h, i, j]``, without dropout.

    Computed over query chunks (at most ``block_bytes`` of matrix alive). ``q (1, H, N, d)``, ``k (1, H, M, d)``
    -> ``(M,)`` float32 that sums to ``N``.
    """
    rows = _rows_per_block(q.shape[1], k.shape[-2], block_bytes, q.element_size())
    total = torch.zeros(k.shape[1], k.shape[-2], dtype=torch.float32, device=k.device)  # (H, M)
    k_t = k[0].transpose(-2, -1)
    scale = q.shape[-1] ** -0.5
    for start in range(0, q.shape[-2], rows):
        probs = torch.softmax(torch.matmul(q[0, :, start : start + rows], k_t) * scale, dim=-1)  # (H, c, M)
        total += probs.sum(dim=1).float()
    return total.mean(dim=0)


@torch.no_grad()
def query_attention(q_row: Tensor, k: Tensor) -> Tensor:
    """Head-averaged attention of one query row over all keys: ``q_row (1, H, 1, d)``, ``k (1, H, M, d)`` -> ``(M,)``."""
    probs = torch.softmax(torch.matmul(q_row, k.transpose(-2, -1)) * (q_row.shape[-1] ** -0.5), dim=-1)
    return probs[0, :, 0].float().mean(dim=0)


# ---------------------------------------------------------------------------------------------------- padding
def square_pad(x: Tensor) -> tuple[Tensor, int]:
    """Wrap-around square padding: ``side = ceil(sqrt(N))``; the first ``side**2 - N`` tokens are appended.

    ``x (1, N, D)`` -> ``(1, side**2, D)``, ``side``. (``side**2 - N <= N`` for every ``N >= 1``.)
    """
    n = x.shape[1]
    side = math.ceil(math.sqrt(n))
    n_added = side * side - n
    if n_added:
        x = torch.cat((x, x[:, :n_added]), dim=1)
    return x, side


def fold_padding(scores: Tensor, n_real: int) -> Tensor:
    """Attribute padded copies back to their source tokens: ``scores (side**2,)`` -> ``(n_real,)``.

    Padded position ``n_real + j`` is a copy of token ``j``, so its score is added to token ``j``.
    """
    real = scores[:n_real].clone()
    extra = scores[n_real:]
    real[: extra.shape[0]] += extra
    return real


# ---------------------------------------------------------------------------------------------------- modules
class Dropout(nn.Dropout):
    """``nn.Dropout`` that uses :func:`methods._fast_attention.fast_dropout` when the shared settings say
    ``dropout_impl="fast"`` (no settings: plain ``nn.Dropout``). Same parameters and state dict (none)."""

    def __init__(self, p: float, settings: "AttentionSettings | None" = None) -> None:
        super().__init__(p)
        self.settings = settings

    def forward(self, x: Tensor) -> Tensor:
        if self.settings is not None and self.settings.dropout_impl == "fast" and x.device.type == "cpu":
            return fast_dropout(x, self.p, self.training)
        return super().forward(x)


class FeedForward(nn.Module):
    """``Linear(D, r D), GELU, Dropout, Linear(r D, D), Dropout``: ``(1, N, D) -> (1, N, D)``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float, settings: "AttentionSettings | None" = None) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(), Dropout(dropout, settings), nn.Linear(hidden_dim, dim),
            Dropout(dropout, settings)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AttentionSettings:
    """Runtime settings shared by every attention, dropout and convolution module of one model (set by the
    model): attention kernel and memory bound, checkpointing, ``dropout_impl``, ``channels_last``."""

    def __init__(self, attn_dropout: float, official_eval_dropout: bool, backend: str, block_bytes: int,
                 activation_checkpointing: bool | None = None,
                 checkpoint_min_tokens: int = DEFAULT_CHECKPOINT_MIN_TOKENS, dropout_impl: str = "fast",
                 channels_last: bool = True) -> None:
        if dropout_impl not in DROPOUT_IMPLS:
            raise ValueError(f"methods/_crossfusion_blocks.py: dropout_impl must be one of {DROPOUT_IMPLS}, "
                             f"got {dropout_impl!r}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"methods/_crossfusion_blocks.py: attention_backend must be one of "
                             f"{ATTENTION_BACKENDS}, got {backend!r}")
        if not 0.0 <= attn_dropout < 1.0:
            raise ValueError(f"methods/_crossfusion_blocks.py: attn_dropout must be in [0, 1), got {attn_dropout}")
        if block_bytes < 1:
            raise ValueError(f"methods/_crossfusion_blocks.py: attention block bytes must be positive, got {block_bytes}")
        self.attn_dropout = attn_dropout
        self.official_eval_dropout = official_eval_dropout
        self.backend = backend
        self.block_bytes = block_bytes
        self.dropout_impl = dropout_impl
        self.channels_last = bool(channels_last)
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_min_tokens = checkpoint_min_tokens

    def checkpoint_layer(self, n_tokens: int, training: bool) -> bool:
        """Recompute this layer in the backward pass instead of storing its activations?

        Only when autograd records in training; True / False force it, None (auto) above ``checkpoint_min_tokens``.
        The result is numerically identical either way (the RNG state is replayed, so dropout masks match).
        """
        if not (training and torch.is_grad_enabled()) or self.activation_checkpointing is False:
            return False
        return bool(self.activation_checkpointing) or n_tokens > self.checkpoint_min_tokens

    def dropout_p(self, training: bool) -> float:
        """Self-attention dropout: only in training, unless the official eval-time dropout is requested."""
        return self.attn_dropout if (training or self.official_eval_dropout) else 0.0


class _HeadProjections(nn.Module):
    """Biased q/k/v and output projections (registered in that order) and the split into ``heads`` heads."""

    def __init__(self, dim: int, heads: int, settings: AttentionSettings) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim)
        self.settings = settings

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, d_h)


class MultiHeadSelfAttention(_HeadProjections):
    """Biased q/k/v projections, ``heads`` heads, attention dropout, output projection (no output dropout).

    ``forward(x (1, N, D))`` -> ``(1, N, D)``, and (when ``want_map``) ``(received (N,), cls_row (N,))``:
    the head-averaged attention each token receives summed over queries, and the first token's attention row.
    """

    def forward(self, x: Tensor, want_map: bool = False):
        b, n, d = x.shape
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        s = self.settings
        out = attention(q, k, v, s.dropout_p(self.training), s.backend, s.block_bytes, s.dropout_impl)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        maps = None
        if want_map:
            maps = (received_attention(q.detach(), k.detach(), s.block_bytes),
                    query_attention(q[:, :, :1].detach(), k.detach()))
        return out, maps


class Block(nn.Module):
    """``depth`` layers of ``x = LN1(x); x = x + MHA(x); x = LN2(x); x = x + FFN(x)`` (the official normalised
    residual stream, not standard pre-LN). Returns ``(x, maps of the last layer or None)``."""

    def __init__(self, dim: int, depth: int, heads: int, hidden_dim: int, dropout: float,
                 settings: AttentionSettings) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), MultiHeadSelfAttention(dim, heads, settings), nn.LayerNorm(dim),
                           FeedForward(dim, hidden_dim, dropout, settings)])
            for _ in range(depth)
        )

    @staticmethod
    def _layer(x: Tensor, norm_1: nn.Module, attn: nn.Module, norm_2: nn.Module, ffn: nn.Module,
               want_map: bool = False):
        x = norm_1(x)
        x_attn, maps = attn(x, want_map=want_map)
        x = norm_2(x + x_attn)
        return ffn(x) + x, maps

    def forward(self, x: Tensor, want_map: bool = False):
        maps = None
        last = len(self.layers) - 1
        for i, (norm_1, attn, norm_2, ffn) in enumerate(self.layers):
            want = want_map and i == last  # maps come from the last layer, under no_grad, from its own q, k
            if not want and attn.settings.checkpoint_layer(x.shape[1], self.training):
                # Only the layer input is kept; the layer is recomputed (same dropout masks) in the backward pass.
                x, _ = checkpoint(self._layer, x, norm_1, attn, norm_2, ffn, use_reentrant=False)
            else:
                x, maps = self._layer(x, norm_1, attn, norm_2, ffn, want)
        return x, maps


def tokens_to_grid(tokens: Tensor, side: int, channels_last: bool) -> Tensor:
    """Row-major token grid: ``(B, side**2, D)`` -> ``(B, D, side, side)``.

    ``channels_last``: a view with NHWC strides (no copy; oneDNN's depthwise / grouped convolutions run about
    twice as fast on it, forward and backward). Otherwise the official contiguous NCHW copy.
    """
    b, _, d = tokens.shape
    if channels_last:
        return tokens.reshape(b, side, side, d).permute(0, 3, 1, 2)
    return tokens.transpose(1, 2).reshape(b, d, side, side)


def grid_to_tokens(grid: Tensor, channels_last: bool) -> Tensor:
    """Inverse of :func:`tokens_to_grid`: ``(B, D, side, side)`` -> ``(B, side**2, D)`` (a view when NHWC)."""
    if channels_last:
        b, d = grid.shape[:2]
        return grid.permute(0, 2, 3, 1).reshape(b, -1, d)
    return grid.flatten(2).transpose(1, 2)


class PPEG(nn.Module):
    """Pyramid position encoding: ``grid + dw7(grid) + dw5(grid) + dw3(grid)`` on the row-major ``side x side``
    grid of tokens (depthwise ``Conv2d`` with bias); with ``class_token`` the first token skips the convolutions.
    The grid's memory layout follows ``settings.channels_last`` (same maths)."""

    def __init__(self, dim: int, class_token: bool, settings: "AttentionSettings | None" = None) -> None:
        super().__init__()
        self.class_token = class_token
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.settings = settings

    def forward(self, x: Tensor, side: int) -> Tensor:
        nhwc = self.settings is not None and self.settings.channels_last
        head, tokens = (x[:, :1], x[:, 1:]) if self.class_token else (None, x)
        grid = tokens_to_grid(tokens, side, nhwc)
        if nhwc:  # the same sum as one 7x7 depthwise convolution (kernels added; about 3x faster)
            grid = merged_conv(grid, [self.proj, self.proj1, self.proj2]) + grid
        else:
            grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        tokens = grid_to_tokens(grid, nhwc)
        return tokens if head is None else torch.cat((head, tokens), dim=1)


class PadTransformer(nn.Module):
    """``Block -> PPEG -> Block`` on an already square-padded sequence (plus a leading class token when
    ``class_token``). Returns ``(x, maps of the post-PPEG block's last layer or None)``."""

    def __init__(self, dim: int, depth: int, heads: int, hidden_dim: int, dropout: float, class_token: bool,
                 settings: AttentionSettings) -> None:
        super().__init__()
        self.pre_layers = Block(dim, depth, heads, hidden_dim, dropout, settings)
        self.post_layers = Block(dim, depth, heads, hidden_dim, dropout, settings)
        self.ppeg = PPEG(dim, class_token, settings)

    def forward(self, x: Tensor, side: int, want_map: bool = False):
        x, _ = self.pre_layers(x)
        x = self.ppeg(x, side)
        return self.post_layers(x, want_map=want_map)


class CrossAttention(_HeadProjections):
    """Cross-attention with one learnable scale embedding ``e (1, 1, D)`` added to query *and* context.

    ``forward(x (1, N, D), context (1, M, D))`` -> ``out_proj(attention(W_q(x+e), W_k(c+e), W_v(c+e)))``
    ``(1, N, D)`` and, when ``want_map``, the attention each context token receives ``(M,)``. No dropout (the
    official cross-attention dropouts are 0), so it always runs on the fused kernel.
    """

    def __init__(self, dim: int, heads: int, settings: AttentionSettings) -> None:
        super().__init__(dim, heads, settings)
        self.scale_embeddings = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.scale_embeddings, std=0.02)

    def forward(self, x: Tensor, context: Tensor, want_map: bool = False):
        b, n, d = x.shape
        q = self._split(self.q_proj(x + self.scale_embeddings))
        k = self._split(self.k_proj(context + self.scale_embeddings))
        v = self._split(self.v_proj(context + self.scale_embeddings))
        out = attention(q, k, v, 0.0, self.settings.backend, self.settings.block_bytes)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        received = received_attention(q.detach(), k.detach(), self.settings.block_bytes) if want_map else None
        return out, received


class CrossAttentionBlock(nn.Module):
    """``u = LN(x + CrossAttention(x, context))``; ``u + FFN(u)`` (residual on the un-embedded query)."""

    def __init__(self, dim: int, heads: int, hidden_dim: int, dropout: float, settings: AttentionSettings) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(dim, heads, settings)
        self.ln = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, hidden_dim, dropout, settings)

    def _block(self, x: Tensor, context: Tensor, want_map: bool = False):
        out, received = self.cross_attn(x, context, want_map=want_map)
        u = self.ln(x + out)
        return u + self.ffn(u), received

    def forward(self, x: Tensor, context: Tensor, want_map: bool = False):
        if not want_map and self.cross_attn.settings.checkpoint_layer(max(x.shape[1], context.shape[1]),
                                                                      self.training):
            # Only the inputs are kept; the block is recomputed (same dropout masks) in the backward pass.
            return checkpoint(self._block, x, context, use_reentrant=False)
        return self._block(x, context, want_map)


def merged_conv(x: Tensor, convs: list[nn.Conv2d]) -> Tensor:
    """``sum_i convs[i](x)`` as one convolution: the odd, centred, stride-1 kernels (same groups and channels)
    are zero-padded to the largest size and added, the biases added. The same function (rounding aside: the
    taps are summed before the products) in one pass over ``x`` instead of one per kernel; gradients reach
    every kernel through the sum."""
    size = max(conv.kernel_size[0] for conv in convs)
    weight = sum(F.pad(conv.weight, [(size - conv.kernel_size[0]) // 2] * 4) for conv in convs)
    bias = sum(conv.bias for conv in convs)
    return F.conv2d(x, weight, bias, padding=size // 2, groups=convs[0].groups)


class MultiScaleConv(nn.Module):
    """Grouped ``Conv2d(D_in, D_out, k, groups)`` for k = 7, 5, 3, summed, plus a grouped 1x1 residual when
    ``D_in != D_out``: ``(1, D_in, H, W) -> (1, D_out, H, W)``. With ``settings.channels_last`` the four
    convolutions run as one (:func:`merged_conv`)."""

    def __init__(self, in_dim: int, out_dim: int, groups: int, settings: "AttentionSettings | None" = None) -> None:
        super().__init__()
        self.settings = settings
        self.proj = nn.Conv2d(in_dim, out_dim, 7, 1, 3, groups=groups)
        self.proj1 = nn.Conv2d(in_dim, out_dim, 5, 1, 2, groups=groups)
        self.proj2 = nn.Conv2d(in_dim, out_dim, 3, 1, 1, groups=groups)
        self.x_proj = nn.Conv2d(in_dim, out_dim, 1, 1, 0, groups=groups) if in_dim != out_dim else None

    def forward(self, x: Tensor) -> Tensor:
        if self.settings is not None and self.settings.channels_last:
            convs = [self.proj, self.proj1, self.proj2] + ([self.x_proj] if self.x_proj is not None else [])
            out = merged_conv(x, convs)
            return out if self.x_proj is not None else out + x
        conv = self.proj(x) + self.proj1(x) + self.proj2(x)
        return (x if self.x_proj is None else self.x_proj(x)) + conv


def weighted_sum(tensors: list[Tensor], weight: Tensor, bias: Tensor) -> Tensor:
    """``bias + sum_i weight[i] * tensors[i]``: ``Conv3d(n, 1, kernel_size=1)`` over the tensors stacked as its
    input channels, without the stack (the result keeps the tensors' memory layout)."""
    out = tensors[0] * weight[0]
    for i in range(1, len(tensors)):
        out = out + tensors[i] * weight[i]
    return out + bias


class ConvProcessor(nn.Module):
    """The Conv Processor: ``n_scales`` token maps ``(1, side**2, D)`` -> ``(1, side**2, D)``.

    With ``n_scales == 3``: stack as channels ``(1, 3, D, side, side)``, ``Conv3d(3 -> 1, 1x1x1)`` (a learned
    weighted sum plus bias: 4 parameters). With ``n_scales == 1`` (the single-scale ablation) there is no
    Conv3d. Then ``MultiScaleConv(D -> D/2, groups D/2)``, ReLU, ``Dropout2d``, ``Linear(D/2 -> D)``, LN.
    """

    def __init__(self, dim: int, dropout: float, n_scales: int = 3,
                 settings: "AttentionSettings | None" = None) -> None:
        super().__init__()
        self.settings = settings
        self.conv_channels = dim // 2
        self.conv3d = nn.Conv3d(n_scales, 1, kernel_size=1) if n_scales > 1 else None
        self.conv_block = nn.Sequential(
            MultiScaleConv(dim, self.conv_channels, self.conv_channels, settings), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout)
        )
        self.linear = nn.Sequential(nn.Linear(self.conv_channels, dim), nn.LayerNorm(dim))

    def forward(self, maps: list[Tensor], side: int) -> Tensor:
        nhwc = self.settings is not None and self.settings.channels_last
        grids = [tokens_to_grid(m, side, nhwc) for m in maps]
        if self.conv3d is None:
            x = grids[0]
        elif nhwc:  # the same 1x1x1 Conv3d as a weighted sum (oneDNN's Conv3d took ~0.5 s fwd + bwd here)
            x = weighted_sum(grids, self.conv3d.weight.view(-1), self.conv3d.bias)  # NHWC like the grids
        else:
            x = self.conv3d(torch.stack(grids, dim=1)).squeeze(1)  # (B, D, side, side)
        x = self.conv_block(x)  # (B, D/2, side, side)
        return self.linear(grid_to_tokens(x, nhwc))


def init_weights_like_official(module: nn.Module) -> None:
    """Official ``init_weight``: Linear trunc_normal(0.02) / bias 0; LayerNorm 1 / 0; Conv2d/3d kaiming_normal
    (fan_out, relu) / bias 0. Apply with ``model.apply``."""
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        return
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)
