"""Fourier neural operator (Li et al. 2021) in 2-D, on the op layer's spectral convolution.

    x (B, in_channels, H, W)
      -> [grid embedding: + 2 coordinate channels]
      -> lifting ChannelMLP -> (B, hidden_channels, H, W)
      -> [domain padding]
      -> n_layers x { v = SpectralConv(v) + skip(v); GELU; [v = ChannelMLP(v) + mlp_skip(v_in); GELU] }
         (no GELU after the last layer)
      -> [crop the padding]
      -> projection ChannelMLP -> (B, out_channels, H, W)

Keyword names follow neuraloperator's ``FNO``. One convention differs and is worth stating:
``n_modes = (m1, m2)`` counts modes as the op layer does (Li et al.'s ``modes1, modes2``): m1
non-negative AND m1 negative frequencies along H, m2 rfft frequencies along W, so the spectral
weight is (C_in, C_out, 2*m1, m2). neuraloperator >= 0.3 counts the total along each axis instead:
its ``n_modes=(2*m1, 2*m2 - 2)`` keeps the same modes (``irno_kernels.weight_from_neuralop`` maps
the weights).

Every layer is either spectral (its weights live on frequencies, not grid points) or pointwise, so a
model trained at 64x64 runs unchanged at 128x128. Resolutions too coarse for the kept modes use the
modes that exist there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import irno_kernels
from irno.models._layers import ChannelMLP, GridEmbedding2D, make_skip

__all__ = ["SpectralConv2d", "FNO", "FNORefiner", "effective_modes"]


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name}: expected a positive int or a pair of them, got {v}")
    return v


def effective_modes(n_modes: tuple[int, int], H: int, W: int) -> tuple[int, int]:
    """The modes (m1, m2) that exist on an H x W grid: m1 <= H // 2, m2 <= W // 2 + 1."""
    return min(n_modes[0], H // 2), min(n_modes[1], W // 2 + 1)


def truncate_weight(weight: torch.Tensor, m1: int, m2: int) -> torch.Tensor:
    """Keep the lowest (m1, m2) modes of a (Cin, Cout, 2*M1, M2) weight -> (Cin, Cout, 2*m1, m2)."""
    M1 = weight.shape[2] // 2
    if m1 == M1 and m2 == weight.shape[3]:
        return weight
    return torch.cat([weight[:, :, :m1, :m2], weight[:, :, 2 * M1 - m1:, :m2]], dim=2)


class SpectralConv2d(nn.Module):
    """y = irfft2(Mix(rfft2(x))) with a dense complex weight: the FNO's global convolution.

    x: (B, in_channels, H, W) real -> y: (B, out_channels, H, W).
    ``weight``: complex (in_channels, out_channels, 2*m1, m2); rows 0..m1-1 act on frequencies
    0..m1-1 along H, rows m1..2*m1-1 on -m1..-1; columns on rfft frequencies 0..m2-1 along W.
    The FFT normalisation is ``irno_kernels.FFT_NORM``; the op layer fixes it.

    Init: complex normal with std sqrt(2 / (in + out)) (neuraloperator's choice).
    """

    def __init__(self, in_channels: int, out_channels: int, n_modes: int | Sequence[int],
                 init_std: float | None = None, dtype: torch.dtype = torch.cfloat):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.n_modes = _pair(n_modes, "n_modes")
        m1, m2 = self.n_modes
        std = init_std if init_std is not None else math.sqrt(2.0 / (in_channels + out_channels))
        self.weight = nn.Parameter(torch.randn(in_channels, out_channels, 2 * m1, m2, dtype=dtype) * std)

    def dense_weight(self) -> torch.Tensor:
        """The dense complex weight (Cin, Cout, 2*m1, m2) the op consumes."""
        return self.weight

    def _apply(self, fn, recurse=True):
        """Module-wide casts act on the real view of the complex parameters (this module's and its
        children's, e.g. TFNO's factors): ``.to(torch.float64)`` would otherwise drop their imaginary
        parts (a different operator) and ``.double()`` leave them complex64; so a float64 module holds
        complex128 weights. A cast to a dtype without a complex counterpart (bf16, fp16) keeps them
        complex64 (moved to the new device)."""
        owners = [(mod, list(mod._parameters)) for mod in (self.modules() if recurse else [self])]
        held = [(mod, k, p) for mod, _ in owners for k, p in mod._parameters.items()
                if p is not None and p.is_complex()]
        if not held:
            return super()._apply(fn, recurse)
        for mod, k, _ in held:
            del mod._parameters[k]
        try:
            super()._apply(fn, recurse)
        finally:
            for mod, k, p in held:
                new = _cast_complex(fn, p.data)
                # as Module._apply: in place where the tensor types allow it, else a new Parameter (e.g.
                # a move to the meta device)
                if torch._has_compatible_shallow_copy_type(p.data, new) and \
                        not torch.__future__.get_overwrite_module_params_on_conversion():
                    p.data = new
                    out = p
                else:
                    out = nn.Parameter(new, requires_grad=p.requires_grad)
                if p.grad is not None:
                    out.grad = _cast_complex(fn, p.grad)
                mod._parameters[k] = out
            for mod, order in owners:  # the original order (state_dict keys)
                mod._parameters = {k: mod._parameters[k] for k in order if k in mod._parameters}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W). Half-precision inputs (autocast) are
        transformed in float32 and cast back: the op works in float32 / float64."""
        H, W = x.shape[-2:]
        m1, m2 = effective_modes(self.n_modes, H, W)
        weight = truncate_weight(self.dense_weight(), m1, m2)
        dtype = x.dtype
        if dtype not in (torch.float32, torch.float64):
            x = x.float()
        if weight.dtype != _complex_of(x.dtype):
            weight = weight.to(_complex_of(x.dtype))
        return irno_kernels.spectral_conv2d(x, weight).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, n_modes={self.n_modes}"


def _cast_complex(fn, t: torch.Tensor) -> torch.Tensor:
    """``fn`` (a module cast) applied to complex t through its real view (module docstring of
    SpectralConv2d._apply)."""
    new = fn(torch.view_as_real(t))
    if new.dtype in (torch.float32, torch.float64):
        return torch.view_as_complex(new.contiguous())
    return t.to(new.device)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.cdouble if dtype == torch.float64 else torch.cfloat


class FNO(nn.Module):
    """2-D Fourier neural operator. (B, in_channels, H, W) -> (B, out_channels, H, W), any H, W.

    Args (neuraloperator's names where it has one):
        n_modes: (m1, m2) modes kept per spectral conv, op-layer convention (see module docstring).
        in_channels, out_channels: fields in and out.
        hidden_channels: width of the Fourier layers.
        n_layers: number of Fourier layers.
        lifting_channel_ratio: hidden width of the 2-layer lifting MLP = ratio * hidden_channels;
            0 makes the lifting one linear layer.
        projection_channel_ratio: hidden width of the 2-layer projection MLP, likewise.
        positional_embedding: "grid" appends the (y, x) coordinates in [0, 1) as 2 input channels
            (needed when a fixed pattern, e.g. a forcing, must be located); None appends nothing.
        non_linearity: activation (GELU).
        use_channel_mlp: a pointwise MLP after each spectral conv (neuraloperator's default).
        channel_mlp_expansion: its hidden width = expansion * hidden_channels.
        channel_mlp_dropout: dropout inside it.
        channel_mlp_skip: skip around it: 'soft-gating', 'linear', 'identity' or None.
        fno_skip: skip around each spectral conv: 'linear' (1x1 conv), 'identity', 'soft-gating', None.
        domain_padding: fraction of each side (a float, or one per dim) padded with zeros after the
            lifting and cropped before the projection, for non-periodic domains (the FFT then
            sees a buffer instead of a wrap-around). None or 0: no padding (periodic domains).
        domain_padding_mode: 'one-sided' pads bottom/right only; 'symmetric' pads both sides.
        factorization, rank: None for dense spectral weights; 'tucker' uses
            :class:`irno.models.TuckerSpectralConv2d` with ``rank`` (see :class:`TFNO`).

    ``forward_features(x)`` returns the projection MLP's hidden features and ``out_conv`` is its last
    1x1 conv, so ``forward(x) == out_conv(forward_features(x))``; IRNO fuses that last conv into the
    update when an FNO serves as refiner.
    """

    def __init__(
        self,
        n_modes: int | Sequence[int] = (12, 12),
        in_channels: int = 1,
        out_channels: int = 1,
        hidden_channels: int = 32,
        n_layers: int = 4,
        lifting_channel_ratio: float = 2,
        projection_channel_ratio: float = 2,
        positional_embedding: str | None = "grid",
        non_linearity: Callable[[torch.Tensor], torch.Tensor] = F.gelu,
        use_channel_mlp: bool = True,
        channel_mlp_expansion: float = 0.5,
        channel_mlp_dropout: float = 0.0,
        channel_mlp_skip: str | None = "soft-gating",
        fno_skip: str | None = "linear",
        domain_padding: float | Sequence[float] | None = None,
        domain_padding_mode: str = "one-sided",
        factorization: str | None = None,
        rank: float | Sequence[int] = 1.0,
    ):
        super().__init__()
        self.n_modes = _pair(n_modes, "n_modes")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.hidden_channels, self.n_layers = hidden_channels, n_layers
        self.non_linearity = non_linearity
        self.use_channel_mlp = use_channel_mlp
        self.factorization = factorization

        if positional_embedding == "grid":
            self.positional_embedding: nn.Module | None = GridEmbedding2D()
        elif positional_embedding is None:
            self.positional_embedding = None
        elif isinstance(positional_embedding, nn.Module):
            self.positional_embedding = positional_embedding
        else:
            raise ValueError(f"positional_embedding: expected 'grid', None or a module, got {positional_embedding!r}")
        lift_in = in_channels + (2 if positional_embedding == "grid" else 0)
        if isinstance(positional_embedding, nn.Module):
            lift_in = in_channels + getattr(positional_embedding, "out_channels", 2)

        lift_hidden = int(lifting_channel_ratio * hidden_channels)
        self.lifting = (ChannelMLP(lift_in, hidden_channels, lift_hidden, 2, non_linearity) if lift_hidden
                        else ChannelMLP(lift_in, hidden_channels, n_layers=1))

        self.convs = nn.ModuleList(self._make_conv(factorization, rank) for _ in range(n_layers))
        self.fno_skips = nn.ModuleList(
            make_skip(fno_skip, hidden_channels, hidden_channels) or nn.Identity() for _ in range(n_layers))
        self._has_fno_skip = fno_skip is not None
        if use_channel_mlp:
            mlp_hidden = max(1, int(round(channel_mlp_expansion * hidden_channels)))
            self.channel_mlps = nn.ModuleList(
                ChannelMLP(hidden_channels, hidden_channels, mlp_hidden, 2, non_linearity, channel_mlp_dropout)
                for _ in range(n_layers))
            self.channel_mlp_skips = nn.ModuleList(
                make_skip(channel_mlp_skip, hidden_channels, hidden_channels) or nn.Identity()
                for _ in range(n_layers))
            self._has_mlp_skip = channel_mlp_skip is not None

        proj_hidden = int(projection_channel_ratio * hidden_channels) or hidden_channels
        self.projection = ChannelMLP(hidden_channels, out_channels, proj_hidden, 2, non_linearity)

        if domain_padding is None:
            domain_padding = 0.0
        if isinstance(domain_padding, (int, float)):
            domain_padding = (float(domain_padding),) * 2
        self.domain_padding = tuple(float(p) for p in domain_padding)
        if domain_padding_mode not in ("one-sided", "symmetric"):
            raise ValueError(f"domain_padding_mode: expected 'one-sided' or 'symmetric', got {domain_padding_mode!r}")
        self.domain_padding_mode = domain_padding_mode

    def _make_conv(self, factorization, rank) -> nn.Module:
        h = self.hidden_channels
        if factorization is None or factorization == "dense":
            return SpectralConv2d(h, h, self.n_modes)
        if str(factorization).lower() == "tucker":
            from irno.models.tfno import TuckerSpectralConv2d

            return TuckerSpectralConv2d(h, h, self.n_modes, rank=rank)
        raise ValueError(f"factorization: expected None or 'tucker', got {factorization!r}")

    @property
    def out_conv(self) -> nn.Conv2d:
        """The last 1x1 conv of the projection."""
        return self.projection.layers[-1]

    def _pad(self, v: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, slice]]:
        H, W = v.shape[-2:]
        ph, pw = (round(f * n) for f, n in zip(self.domain_padding, (H, W)))
        if ph == 0 and pw == 0:
            return v, (slice(None), slice(None))
        if self.domain_padding_mode == "one-sided":
            return F.pad(v, (0, pw, 0, ph)), (slice(0, H), slice(0, W))
        return F.pad(v, (pw, pw, ph, ph)), (slice(ph, ph + H), slice(pw, pw + W))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding, lifting and Fourier layers: (B, in_channels, H, W) -> (B, hidden_channels, H, W)."""
        if self.positional_embedding is not None:
            x = self.positional_embedding(x)
        v = self.lifting(x)
        v, window = self._pad(v)
        last = self.n_layers - 1
        for i in range(self.n_layers):
            v_in = v
            v = self.convs[i](v)
            if self._has_fno_skip:
                v = v + self.fno_skips[i](v_in)
            if i < last:
                v = self.non_linearity(v)
            if self.use_channel_mlp:
                v = self.channel_mlps[i](v)
                if self._has_mlp_skip:
                    v = v + self.channel_mlp_skips[i](v_in)
                if i < last:
                    v = self.non_linearity(v)
        return v[..., window[0], window[1]]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, projection hidden, H, W): what ``out_conv`` reads."""
        return self.projection.hidden(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        return self.out_conv(self.forward_features(x))


class FNORefiner(FNO):
    """An FNO as the refinement operator Phi: (B, in_channels, H, W) -> correction (B, out_channels, H, W).

    Differs from :class:`FNO` only in defaults meant for a corrector: a smaller width, no grid
    embedding, and the last projection conv initialised with xavier gain ``out_gain`` (0.1) and zero
    bias, so Phi starts near 0 and the first iterate is close to the base (as the U-Net refiner).
    ``in_channels`` is the channels of x plus those of h.
    """

    def __init__(self, in_channels: int, out_channels: int, n_modes: int | Sequence[int] = (12, 12),
                 hidden_channels: int = 32, n_layers: int = 4, positional_embedding: str | None = None,
                 out_gain: float = 0.1, **kwargs):
        super().__init__(n_modes=n_modes, in_channels=in_channels, out_channels=out_channels,
                         hidden_channels=hidden_channels, n_layers=n_layers,
                         positional_embedding=positional_embedding, **kwargs)
        nn.init.xavier_uniform_(self.out_conv.weight, gain=out_gain)
        nn.init.zeros_(self.out_conv.bias)
