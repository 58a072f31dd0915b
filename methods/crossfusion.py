"""CrossFusion and its two ablations (``crossfusion``, ``crossfusion_wo_cp``, ``crossfusion_wo_fc``).

Paper: Soraki, Wang, Elmore and Shapiro (University of Washington), "CrossFusion: A Multi-Scale Cross-Attention
Convolutional Fusion Model for Cancer Survival Prediction", arXiv 2503.02064 (v2: MIDL 2026, PMLR 315:2906-2921).
Official repository: github.com/RustinS/CrossFusion (``models/CrossFusion.py``, ``models/CrossFusionConcat.py``,
``models/CrossFusionSingle.py``), HEAD df5473de.

The networks, defaults and initialisation are those of the official code (parameter counts equal, see
``tests/methods/test_crossfusion.py``); the building blocks and the memory-bounded attention are in
``methods/_crossfusion_blocks.py``. See ``docs/CROSSFUSION.md`` for the whole-slide memory / speed figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from benchmark.api import AttentionMap, Bag, Needs, register_method, SurvivalOutput
from benchmark.naming import did_you_mean
from methods._crossfusion_blocks import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_CHECKPOINT_MIN_TOKENS,
    AttentionSettings,
    ConvProcessor,
    CrossAttentionBlock,
    PadTransformer,
    fold_padding,
    init_weights_like_official,
    square_pad,
)
from methods._layers import checked_features

_FILE = "methods/crossfusion.py"
_SOURCE = "Soraki, Wang, Elmore, Shapiro arXiv 2503.02064 (MIDL 2026); github.com/RustinS/CrossFusion"

#: With ``return_attention=None``, attention maps are computed in eval mode only when the largest
#: query x key product of the maps is at most this (13,496 x 3,449 patches is about 4.7e7; the largest
#: slide's fine cross-attention, 34,500 x 138,000 = 4.8e9, would add minutes on a CPU).
DEFAULT_MAP_MAX_PAIRS = 2 * 10**8


def _check_features(bag: Bag, magnification: int, in_dim: int) -> Tensor:
    return checked_features(bag, magnification, in_dim, _FILE,
                            needs_hint="CrossFusion needs Needs.magnifications to include it")


@dataclass(frozen=True)
class CrossFusionOptions:
    """The options of the three CrossFusion variants (every keyword of ``create_method`` besides ``in_dim`` and
    ``n_bins``). Validated on construction.

    Parameters
    ----------
    embed_dim, num_heads, num_layers, mlp_ratio : int, int, int, float
        512, 4, 1 (depth of each of the two Blocks of a Pad-Transformer), 2.0 as the official code.
    dropout : float
        FFN and Conv-Processor ``Dropout2d`` rate (0.3); training only.
    attn_dropout : float
        Self-attention dropout in the Pad-Transformers (0.2). Cross-attention has none (as official).
    official_eval_dropout : bool
        **Parity option.** The official code keeps the self-attention dropout on at evaluation (its SDPA call
        ignores ``self.training``), which makes validation stochastic. False (default): dropout only in training.
        True: reproduce the official behaviour.
    attention_backend : {"auto", "sdpa"}
        "auto": the fused kernel whenever dropout is 0, query chunks + checkpointing when dropout is on on
        CPU (bounded memory). "sdpa": always ``F.scaled_dot_product_attention`` with dropout, as the official
        code (on CPU with dropout: the math kernel, O(N^2) memory; for kernel comparisons on small bags only).
    attention_block_mb : float
        Bound (MiB) on one block of attention matrix in the chunked path and in the attention maps (64).
    return_attention : bool or None
        Attention maps: True always (also in training, under ``no_grad``), False never, None (default) in eval
        mode only when the largest query x key product is at most ``attention_map_max_pairs``.
    attention_map_max_pairs : int
        Threshold of the automatic choice above (``DEFAULT_MAP_MAX_PAIRS``).
    activation_checkpointing : bool or None
        Recompute each transformer layer and cross-attention block in the backward pass instead of storing its
        activations (numerically identical: dropout masks are replayed). None (default): only for sequences
        longer than ``checkpoint_min_tokens`` (16,384), i.e. the largest slides. There it cut the largest slide's
        training step from at least 15.7 GB to 5.7 GB (docs/CROSSFUSION.md), at the price of one extra forward
        pass of each checkpointed layer. True always, False never.
    checkpoint_min_tokens : int
        Threshold of the automatic choice above.
    dropout_impl : {"fast", "torch"}
        Self-attention with dropout on CPU (training). "fast" (default): one autograd Function over query chunks
        with a flash-style backward (probabilities recomputed from q, k; no checkpointed forward), reused
        buffers, and a Bernoulli drop mask cut from 64-bit random words (``methods/_fast_attention.py``).
        "torch": ``F.dropout`` in checkpointed chunks, the plain PyTorch reference. Same function and gradients
        (to rounding) with the same mask; the masks themselves are other draws than ``F.dropout``'s. The FFN
        dropouts follow the same choice ("fast": one-byte masks from the same generator, one fused pass).
    channels_last : bool
        Run the PPEG and Conv-Processor convolutions on NHWC views of the token grid (True, default: about
        twice as fast on CPU, no transposing copies) or on the official contiguous NCHW copies (False, the
        reference). Same maths; the kernels' summation order differs (outputs equal to about 1e-6).
    """

    embed_dim: int = 512
    num_heads: int = 4
    num_layers: int = 1
    dropout: float = 0.3
    attn_dropout: float = 0.2
    mlp_ratio: float = 2.0
    official_eval_dropout: bool = False
    attention_backend: str = "auto"
    attention_block_mb: float = 64
    return_attention: bool | None = None
    attention_map_max_pairs: int = DEFAULT_MAP_MAX_PAIRS
    activation_checkpointing: bool | None = None
    checkpoint_min_tokens: int = DEFAULT_CHECKPOINT_MIN_TOKENS
    dropout_impl: str = "fast"
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads != 0 or self.embed_dim % 2 != 0:
            raise ValueError(f"{_FILE}: embed_dim ({self.embed_dim}) must be even and divisible by num_heads "
                             f"({self.num_heads})")
        if self.num_layers < 1:
            raise ValueError(f"{_FILE}: num_layers must be >= 1, got {self.num_layers}")
        if self.checkpoint_min_tokens < 0:
            raise ValueError(f"{_FILE}: checkpoint_min_tokens must be >= 0, got {self.checkpoint_min_tokens}")
        if self.attention_block_mb <= 0:
            raise ValueError(f"{_FILE}: attention_block_mb must be positive, got {self.attention_block_mb}")

    @classmethod
    def from_keywords(cls, options: dict) -> "CrossFusionOptions":
        """The options from ``create_method`` keywords; an unknown name is one clear error."""
        known = [f.name for f in fields(cls)]
        unknown = [name for name in options if name not in known]
        if unknown:
            raise did_you_mean(unknown[0], known, "CrossFusion option")
        return cls(**options)

    def attention_settings(self) -> AttentionSettings:
        """The runtime settings every attention, dropout and convolution module of the model shares."""
        return AttentionSettings(
            self.attn_dropout, bool(self.official_eval_dropout), self.attention_backend,
            int(self.attention_block_mb * 2**20), self.activation_checkpointing, int(self.checkpoint_min_tokens),
            self.dropout_impl, bool(self.channels_last),
        )


class _CrossFusionBase(nn.Module):
    """What the three variants share: options, projections, Pad-Transformers, the final stage."""

    options_type = CrossFusionOptions

    def _setup(self, in_dim: int, n_bins: int, options: CrossFusionOptions) -> None:
        if in_dim < 1 or n_bins < 1:
            raise ValueError(f"{_FILE}: in_dim and n_bins must be positive, got {in_dim}, {n_bins}")
        self.options = options
        self.in_dim, self.n_bins, self.embed_dim = in_dim, n_bins, options.embed_dim
        self.hidden_dim = int(options.embed_dim * options.mlp_ratio)
        self.attention_settings = options.attention_settings()
        self.return_attention = options.return_attention
        self.attention_map_max_pairs = options.attention_map_max_pairs

    @property
    def official_eval_dropout(self) -> bool:
        return self.attention_settings.official_eval_dropout

    @official_eval_dropout.setter
    def official_eval_dropout(self, value: bool) -> None:
        self.attention_settings.official_eval_dropout = bool(value)

    def _projection(self, in_dim: int) -> nn.Module:
        if in_dim == self.embed_dim:
            return nn.Identity()
        return nn.Sequential(nn.Linear(in_dim, self.embed_dim), nn.LayerNorm(self.embed_dim))

    def _pad_transformer(self, class_token: bool) -> PadTransformer:
        o = self.options
        return PadTransformer(self.embed_dim, o.num_layers, o.num_heads, self.hidden_dim, o.dropout, class_token,
                              self.attention_settings)

    def _want_maps(self, largest_pairs: int) -> bool:
        if self.return_attention is None:
            return (not self.training) and largest_pairs <= self.attention_map_max_pairs
        return bool(self.return_attention)

    def _final(self, fused: Tensor, side: int, n_real: int, magnification: int, want_maps: bool,
               maps: dict[str, AttentionMap]) -> Tensor:
        """Class token, final Pad-Transformer, LN, head: ``fused (1, side**2, D)`` -> logits ``(1, n_bins)``."""
        x = torch.cat((self.cls_token.expand(fused.shape[0], -1, -1).to(fused.dtype), fused), dim=1)
        x, final_maps = self.final_transformer(x, side, want_map=want_maps)
        if final_maps is not None:
            received, cls_row = final_maps
            maps["final_transformer"] = AttentionMap(magnification, fold_padding(received[1:], n_real))
            maps["final_cls"] = AttentionMap(magnification, fold_padding(cls_row[1:], n_real))
        return self.mlp_head(self.final_ln(x)[:, 0])


class CrossFusion(_CrossFusionBase):
    """CrossFusion (official configuration: ``D = 512``, 4 heads, depth 1, FFN ratio 2, dropout 0.3,
    self-attention dropout 0.2).

    Forward on one bag with ``N5``, ``N10``, ``N20`` patches (``side = ceil(sqrt(N10))``):

    1. per-scale ``Linear(in_dim -> D) + LayerNorm`` (identity when ``in_dim == D``): ``x5 (1, N5, D)``,
       ``x10 (1, N10, D)``, ``x20 (1, N20, D)``;
    2. coarse cross-attention block (query 10x, context 5x; one scale embedding added to both; residual on the
       un-embedded query, LN, FFN with residual) ``(1, N10, D)``; wrap-around square pad to ``(1, side**2, D)``;
       coarse Pad-Transformer (``LN, x + MHA, LN, x + FFN``; PPEG 7/5/3; the same block again), LN;
    3. fine branch: the same with context 20x (query again the projected 10x tokens);
    4. source branch: square pad of ``x10``, source Pad-Transformer, LN;
    5. fusion of ``[source, fine, coarse]`` ``(1, side**2, D)``: the Conv Processor, or
       ``concat -> Linear(3D -> D) -> LN`` (:class:`CrossFusionConcat`, the w/o CP ablation);
    6. class token, final Pad-Transformer (PPEG skips the class token), LN, token 0, ``Linear(D -> n_bins)``.

    Parameters: 24,536,584 at ``in_dim`` 2048, 23,750,152 at 1536, 22,963,720 at 1024, 22,570,504 at 768,
    21,386,248 at 512 (4 bins); w/o CP 25,147,908 at 2048.

    Parameters
    ----------
    in_dim : int
        Patch-feature dimension (the same at every magnification).
    n_bins : int
        Number of discrete-time survival bins.
    **options
        The fields of :class:`CrossFusionOptions` (official defaults).

    Notes
    -----
    Attention maps (``SurvivalOutput.attention``; head-averaged "attention received": the attention matrix
    summed over queries, as the official ``heatmap.py``'s ``importance_N_prime`` / ``compute_patch_importance``;
    no dropout; computed in query chunks, never as a full matrix):

    - ``"coarse_cross"`` (5x, ``(N5,)``) and ``"fine_cross"`` (20x, ``(N20,)``): received in the two
      cross-attention blocks (each sums to ``N10``);
    - ``"source_transformer"`` and ``"final_transformer"`` (10x, ``(N10,)``): received in the last attention
      layer of the source / final Pad-Transformer, over all queries (the final one includes the class token as
      a query; the class token's own column is dropped);
    - ``"final_cls"`` (10x): the class token's attention row in that last final layer.

    Padding: the wrap-around copies' received attention is added to the patch they copy, so the 10x maps
    are aligned with ``bag.features[10]`` rows and lose no mass.

    Deliberate deviations from the official code: attention dropout only in training (option above);
    device-agnostic (the official code hard-codes CUDA at construction); memory-bounded attention on CPU with
    dropout; with ``dropout_impl="fast"`` the drop probability is within ``2**-16`` of ``attn_dropout``
    (``round(p 2^16) / 2^16`` for three entries in four, ``round(p 2^15) / 2^15`` for the fourth) and the masks
    come from a counter-based hash keyed per chunk from the default generator (compiled fused kernels on large calls, ``methods/_fused_dropout.py``); activation checkpointing on very large bags (same numbers, less memory); no fp16 autocast; the
    unused modules (``dropout_emb``, ``PreNorm``) are not built. A patient with several slides: the loader
    concatenates each scale's slides, so the 10x grid spans all slides.
    """

    #: "conv": the Conv Processor; "concat" (:class:`CrossFusionConcat`): concatenation + Linear.
    fusion = "conv"

    def __init__(self, in_dim: int, n_bins: int = 4, **options) -> None:
        super().__init__()
        self._setup(in_dim, n_bins, CrossFusionOptions.from_keywords(options))
        fusion = self.fusion
        d, s, dropout = self.embed_dim, self.attention_settings, self.options.dropout
        # Registration order follows the official __init__ (same random-stream order at construction).
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        nn.init.normal_(self.cls_token, std=1e-6)
        self.coarse_proj = self._projection(in_dim)
        self.source_proj = self._projection(in_dim)
        self.fine_proj = self._projection(in_dim)
        self.fine_cross = CrossAttentionBlock(d, self.options.num_heads, self.hidden_dim, dropout, s)
        self.coarse_cross = CrossAttentionBlock(d, self.options.num_heads, self.hidden_dim, dropout, s)
        self.coarse_transformer = self._pad_transformer(class_token=False)
        self.coarse_ln = nn.LayerNorm(d)
        self.fine_transformer = self._pad_transformer(class_token=False)
        self.fine_ln = nn.LayerNorm(d)
        self.source_transformer = self._pad_transformer(class_token=False)
        self.source_ln = nn.LayerNorm(d)
        if fusion == "concat":  # CrossFusionConcat registers it before the final transformer
            self.pre_final_linear = nn.Sequential(nn.Linear(3 * d, d), nn.LayerNorm(d))
        self.final_transformer = self._pad_transformer(class_token=True)
        self.final_ln = nn.LayerNorm(d)
        if fusion == "conv":
            self.conv_processor = ConvProcessor(d, dropout, n_scales=3, settings=s)
        self.mlp_head = nn.Sequential(nn.Linear(d, n_bins))
        self.apply(init_weights_like_official)

    def forward(self, bag: Bag) -> SurvivalOutput:
        """Score one bag.

        Parameters
        ----------
        bag : Bag
            Reads ``bag.features[5]`` ``(N5, in_dim)``, ``[10]`` ``(N10, in_dim)``, ``[20]`` ``(N20, in_dim)``.

        Returns
        -------
        SurvivalOutput
            ``logits`` ``(1, n_bins)``; ``attention`` as in the class notes (when computed).
        """
        f5 = _check_features(bag, 5, self.in_dim)
        f10 = _check_features(bag, 10, self.in_dim)
        f20 = _check_features(bag, 20, self.in_dim)
        n10 = f10.shape[0]
        side = math.ceil(math.sqrt(n10))
        want = self._want_maps(max(n10 * f20.shape[0], side**4))
        maps: dict[str, AttentionMap] = {}

        x_coarse = self.coarse_proj(f5).unsqueeze(0)  # (1, N5, D)
        x_source = self.source_proj(f10).unsqueeze(0)  # (1, N10, D)
        x_fine = self.fine_proj(f20).unsqueeze(0)  # (1, N20, D)

        coarse, received = self.coarse_cross(x_source, x_coarse, want_map=want)  # (1, N10, D)
        if received is not None:
            maps["coarse_cross"] = AttentionMap(5, received)
        coarse, _ = square_pad(coarse)
        coarse = self.coarse_ln(self.coarse_transformer(coarse, side)[0])  # (1, side**2, D)

        fine, received = self.fine_cross(x_source, x_fine, want_map=want)
        if received is not None:
            maps["fine_cross"] = AttentionMap(20, received)
        fine, _ = square_pad(fine)
        fine = self.fine_ln(self.fine_transformer(fine, side)[0])

        source, _ = square_pad(x_source)
        source, source_maps = self.source_transformer(source, side, want_map=want)
        source = self.source_ln(source)
        if source_maps is not None:
            maps["source_transformer"] = AttentionMap(10, fold_padding(source_maps[0], n10))

        if self.fusion == "conv":
            fused = self.conv_processor([source, fine, coarse], side)
        else:
            fused = self.pre_final_linear(torch.cat((source, fine, coarse), dim=-1))
        logits = self._final(fused, side, n10, 10, want, maps)
        return SurvivalOutput.from_logits(logits, attention=maps)


class CrossFusionConcat(CrossFusion):
    """CrossFusion without the Conv Processor (the official "w/o CP" ablation, ``CrossFusionConcat.py``):
    ``concat(source, fine, coarse) -> Linear(3D -> D) -> LN`` in step 5 of :class:`CrossFusion`; everything
    else, the options and the deviations as there."""

    fusion = "concat"


class CrossFusionSingle(_CrossFusionBase):
    """CrossFusion without fine and coarse scales (the official "w/o F&C" ablation, ``CrossFusionSingle.py``).

    20x only, no cross-attention: ``Linear + LN`` projection, square pad (``side = ceil(sqrt(N20))``), source
    Pad-Transformer, LN, Conv Processor without the Conv3d (``MultiScaleConv D -> D/2``, ReLU, ``Dropout2d``,
    ``Linear + LN``), class token, final Pad-Transformer, LN, head. 9,730,564 parameters at ``in_dim`` 2048.

    Options (:class:`CrossFusionOptions`) and deviations as :class:`CrossFusion`. Attention maps (20x, ``(N20,)``):
    ``"source_transformer"``, ``"final_transformer"``, ``"final_cls"``. Full self-attention over the 20x bag:
    the most expensive variant on whole slides (see ``docs/CROSSFUSION.md``).
    """

    def __init__(self, in_dim: int, n_bins: int = 4, **options) -> None:
        super().__init__()
        self._setup(in_dim, n_bins, CrossFusionOptions.from_keywords(options))
        d = self.embed_dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        nn.init.normal_(self.cls_token, std=1e-6)
        self.source_proj = self._projection(in_dim)
        self.source_transformer = self._pad_transformer(class_token=False)
        self.source_ln = nn.LayerNorm(d)
        self.final_transformer = self._pad_transformer(class_token=True)
        self.final_ln = nn.LayerNorm(d)
        self.conv_processor = ConvProcessor(d, self.options.dropout, n_scales=1, settings=self.attention_settings)
        self.mlp_head = nn.Sequential(nn.Linear(d, n_bins))
        self.apply(init_weights_like_official)

    def forward(self, bag: Bag) -> SurvivalOutput:
        """Score one bag: reads ``bag.features[20]`` ``(N20, in_dim)``; returns logits ``(1, n_bins)``."""
        f20 = _check_features(bag, 20, self.in_dim)
        n20 = f20.shape[0]
        side = math.ceil(math.sqrt(n20))
        want = self._want_maps(side**4)
        maps: dict[str, AttentionMap] = {}
        source, _ = square_pad(self.source_proj(f20).unsqueeze(0))
        source, source_maps = self.source_transformer(source, side, want_map=want)
        source = self.source_ln(source)
        if source_maps is not None:
            maps["source_transformer"] = AttentionMap(20, fold_padding(source_maps[0], n20))
        fused = self.conv_processor([source], side)
        logits = self._final(fused, side, n20, 20, want, maps)
        return SurvivalOutput.from_logits(logits, attention=maps)


_NEEDS_MULTI = Needs(magnifications=(5, 10, 20))


#: Tuned besides the shared space (whose ``dropout`` is the FFN / Conv Processor dropout, 0.3 official): the
#: depth of each Pad-Transformer block (``num_attn_layers`` 1), the heads (4, head dim 128) and the
#: self-attention dropout (0.2) of ``train.sh``.
SEARCH_SPACE = {"num_layers": {"low": 1, "high": 2}, "num_heads": {"choices": [2, 4, 8]},
                "attn_dropout": {"low": 0.0, "high": 0.3}}


#: What the harness's tools use: the plain-PyTorch reference path (``bench --reference``: SDPA attention, the
#: package's ``F.dropout``, NCHW convolutions), the official code's kernel choice (``bench --official``: attention
#: dropout on at evaluation, SDPA with that dropout) and FLOP counting without recomputation.
_TOOL_OPTIONS = {
    "reference_options": {"attention_backend": "sdpa", "dropout_impl": "torch", "channels_last": False},
    "official_options": {"official_eval_dropout": True, "attention_backend": "sdpa"},
    "flop_count_options": {"activation_checkpointing": False},
}


@register_method("crossfusion", needs=_NEEDS_MULTI, search_space=SEARCH_SPACE, cost_prior=0.086, paper_row=8,
                 **_TOOL_OPTIONS,
                 source=_SOURCE + " (models/CrossFusion.py)")
def crossfusion(in_dim: int, n_bins: int = 4, **options) -> CrossFusion:
    """CrossFusion with the Conv Processor (see :class:`CrossFusion`)."""
    return CrossFusion(in_dim, n_bins, **options)


@register_method("crossfusion_wo_cp", needs=_NEEDS_MULTI, search_space=SEARCH_SPACE, cost_prior=0.081,
                 **_TOOL_OPTIONS,
                 source=_SOURCE + " (models/CrossFusionConcat.py)")
def crossfusion_wo_cp(in_dim: int, n_bins: int = 4, **options) -> CrossFusionConcat:
    """Ablation w/o CP: concatenation + ``Linear(3D -> D) + LN`` instead of the Conv Processor."""
    return CrossFusionConcat(in_dim, n_bins, **options)


@register_method("crossfusion_wo_fc", needs=Needs(magnifications=(20,)), search_space=SEARCH_SPACE, cost_prior=0.065,
                 **_TOOL_OPTIONS,
                 source=_SOURCE + " (models/CrossFusionSingle.py)")
def crossfusion_wo_fc(in_dim: int, n_bins: int = 4, **options) -> CrossFusionSingle:
    """Ablation w/o F&C: 20x only, no cross-attention (see :class:`CrossFusionSingle`)."""
    return CrossFusionSingle(in_dim, n_bins, **options)
