"""The baseline of bench_irno: IRNO written in plain PyTorch, the way a paper's reference code would be.

Nothing from irno or irno_kernels runs here: spectral layers are torch.fft.rfft2 + two einsums on
the corner modes + irfft2 with two separate weight tensors (Li et al.'s layout); the U-Net uses
nn.Conv2d with circular padding and nn.LayerNorm on a channels-last permutation; the update is
``h = h + alpha * phi(cat(x, h))`` in separate ops; the spectral loss recomputes both spectra with
torch.fft at every step and reads one precomputed weight tensor per step.

The modules are filled from the project's models (``PlainIRNO.from_irno``) so that both compute the
same function and bench_irno can check that they agree before it times them. Only the
configuration the benchmark builds is implemented; anything else raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PlainIRNO", "PlainFNO", "PlainUNet", "PlainSpectralConv", "plain_irno_loss"]


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight copy: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def _copy_conv(dst: nn.Conv2d, src: nn.Conv2d) -> None:
    _copy(dst.weight, src.weight)
    if dst.bias is not None:
        _copy(dst.bias, src.bias)


def _unsupported(what: str) -> ValueError:
    return ValueError(f"the plain baseline does not implement {what}; build the project model without it")


class PlainSpectralConv(nn.Module):
    """Li et al.'s SpectralConv2d: weights1 act on the modes [:m1, :m2], weights2 on [-m1:, :m2].

    The FFT is normalised with norm="forward" (the project's convention), so that the weights mean the
    same thing in both implementations.
    """

    def __init__(self, cin: int, cout: int, m1: int, m2: int):
        super().__init__()
        self.cout, self.m1, self.m2 = cout, m1, m2
        self.weights1 = nn.Parameter(torch.zeros(cin, cout, m1, m2, dtype=torch.cfloat))
        self.weights2 = nn.Parameter(torch.zeros(cin, cout, m1, m2, dtype=torch.cfloat))

    def forward(self, x):
        B, _, H, W = x.shape
        m1, m2 = self.m1, self.m2
        if m1 > H // 2 or m2 > W // 2 + 1:
            raise ValueError(f"x: {m1}x{m2} modes need a grid of at least {2 * m1}x{2 * (m2 - 1)}, got {H}x{W}")
        x_ft = torch.fft.rfft2(x, norm="forward")
        out_ft = torch.zeros(B, self.cout, H, W // 2 + 1, dtype=torch.cfloat, device=x.device)
        out_ft[:, :, :m1, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, :m1, :m2], self.weights1)
        out_ft[:, :, -m1:, :m2] = torch.einsum("bixy,ioxy->boxy", x_ft[:, :, -m1:, :m2], self.weights2)
        # column 0 made Hermitian along H: irfft2 of a non-Hermitian column differs between cuFFT and
        # pocketfft; this is the Re(ifft2) reading that irno's op defines (irno_kernels.hermitian_edges)
        col = out_ft[..., 0].clone()
        out_ft[..., 0] = 0.5 * (col + torch.roll(torch.flip(col, [-1]), 1, -1).conj())
        return torch.fft.irfft2(out_ft, s=(H, W), norm="forward")


class PlainFNO(nn.Module):
    """FNO with a grid embedding, a 2-layer lifting, n_layers x (spectral conv + 1x1 skip, GELU,
    channel MLP + soft-gating skip, GELU; no GELU after the last), a 2-layer projection."""

    def __init__(
        self, cin: int, cout: int, width: int, m1: int, m2: int, n_layers: int, lift: int, mlp: int, proj: int
    ):
        super().__init__()
        self.n_layers = n_layers
        self.lift1, self.lift2 = nn.Conv2d(cin + 2, lift, 1), nn.Conv2d(lift, width, 1)
        self.spectral = nn.ModuleList(PlainSpectralConv(width, width, m1, m2) for _ in range(n_layers))
        self.skip = nn.ModuleList(nn.Conv2d(width, width, 1, bias=False) for _ in range(n_layers))
        self.mlp1 = nn.ModuleList(nn.Conv2d(width, mlp, 1) for _ in range(n_layers))
        self.mlp2 = nn.ModuleList(nn.Conv2d(mlp, width, 1) for _ in range(n_layers))
        self.gate = nn.ParameterList(nn.Parameter(torch.ones(1, width, 1, 1)) for _ in range(n_layers))
        self.proj1, self.proj2 = nn.Conv2d(width, proj, 1), nn.Conv2d(proj, cout, 1)

    def forward(self, x):
        B, _, H, W = x.shape
        gy = torch.linspace(0, 1, H + 1, device=x.device, dtype=x.dtype)[:-1]
        gx = torch.linspace(0, 1, W + 1, device=x.device, dtype=x.dtype)[:-1]
        gy, gx = torch.meshgrid(gy, gx, indexing="ij")
        x = torch.cat([x, gy.expand(B, 1, H, W), gx.expand(B, 1, H, W)], dim=1)
        v = self.lift2(F.gelu(self.lift1(x)))
        for i in range(self.n_layers):
            v_in = v
            v = self.spectral[i](v) + self.skip[i](v_in)
            if i < self.n_layers - 1:
                v = F.gelu(v)
            v = self.mlp2[i](F.gelu(self.mlp1[i](v))) + v_in * self.gate[i]
            if i < self.n_layers - 1:
                v = F.gelu(v)
        return self.proj2(F.gelu(self.proj1(v)))

    @classmethod
    def from_fno(cls, fno) -> PlainFNO:
        """The same function as an :class:`irno.FNO` built with its defaults (grid embedding, dense
        weights, linear + soft-gating skips, GELU, no domain padding), its weights copied."""
        from irno.models import GridEmbedding2D, SoftGating

        pe = fno.positional_embedding
        if not isinstance(pe, GridEmbedding2D) or pe.boundaries != [(0.0, 1.0), (0.0, 1.0)]:
            raise _unsupported("a positional embedding other than the default grid")
        if any(fno.domain_padding) or fno.factorization not in (None, "dense") or not fno.use_channel_mlp:
            raise _unsupported("domain padding, factorised weights or FNO layers without a channel MLP")
        if fno.non_linearity is not F.gelu or len(fno.lifting.layers) != 2 or len(fno.projection.layers) != 2:
            raise _unsupported("a non-GELU activation or a lifting/projection other than 2 layers")
        if not all(isinstance(s, nn.Conv2d) and s.bias is None for s in fno.fno_skips):
            raise _unsupported("an fno_skip other than 'linear'")
        if not all(isinstance(s, SoftGating) for s in fno.channel_mlp_skips):
            raise _unsupported("a channel_mlp_skip other than 'soft-gating'")
        if any(len(m.layers) != 2 or not isinstance(m.dropout, nn.Identity) for m in fno.channel_mlps):
            raise _unsupported("channel MLPs other than 2 layers without dropout")
        m1, m2 = fno.n_modes
        width = fno.hidden_channels
        plain = cls(
            fno.in_channels,
            fno.out_channels,
            width,
            m1,
            m2,
            fno.n_layers,
            fno.lifting.layers[0].out_channels,
            fno.channel_mlps[0].layers[0].out_channels,
            fno.projection.layers[0].out_channels,
        )
        _copy_conv(plain.lift1, fno.lifting.layers[0])
        _copy_conv(plain.lift2, fno.lifting.layers[1])
        for i in range(fno.n_layers):
            w = fno.convs[i].dense_weight()
            _copy(plain.spectral[i].weights1, w[:, :, :m1])
            _copy(plain.spectral[i].weights2, w[:, :, m1:])
            _copy_conv(plain.skip[i], fno.fno_skips[i])
            _copy_conv(plain.mlp1[i], fno.channel_mlps[i].layers[0])
            _copy_conv(plain.mlp2[i], fno.channel_mlps[i].layers[1])
            _copy(plain.gate[i], fno.channel_mlp_skips[i].weight)
        _copy_conv(plain.proj1, fno.projection.layers[0])
        _copy_conv(plain.proj2, fno.projection.layers[1])
        return plain.to(next(fno.parameters()).device)


class PlainBlock(nn.Module):
    """2 x (3x3 circular conv -> LayerNorm over channels -> GELU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="circular")
        self.norm1 = nn.LayerNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, padding_mode="circular")
        self.norm2 = nn.LayerNorm(cout)

    def forward(self, x):
        x = self.norm1(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.gelu(x)
        x = self.norm2(self.conv2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.gelu(x)


class PlainUNet(nn.Module):
    """The paper's refiner: encoder blocks + 2x2 max-pool, bottleneck, bilinear up + 3x3 conv, skip
    concatenation, decoder blocks, 1x1 output conv. H and W must be multiples of 2^depth.

    ``periodic_up``: the bilinear upsampling wraps around the edges (pad 1 circularly, upsample, crop),
    as the project's periodic U-Net does; False clamps at the edges (F.interpolate alone)."""

    def __init__(self, cin: int, cout: int, depth: int, width: int, periodic_up: bool = False):
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.depth, self.periodic_up = depth, periodic_up
        self.enc = nn.ModuleList(PlainBlock(a, b) for a, b in zip([cin] + widths[:-2], widths[:-1]))
        self.mid = PlainBlock(widths[-2], widths[-1])
        self.up = nn.ModuleList(
            nn.Conv2d(widths[i + 1], widths[i], 3, padding=1, padding_mode="circular") for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(PlainBlock(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(width, cout, 1)

    def forward(self, x):
        if x.shape[-2] % 2**self.depth or x.shape[-1] % 2**self.depth:
            raise ValueError(f"x: the plain U-Net needs H and W divisible by {2**self.depth}, got {tuple(x.shape)}")
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.mid(x)
        for up, block, skip in zip(self.up, self.dec, reversed(skips)):
            x = up(self.upsample(x))
            x = block(torch.cat([skip, x], dim=1))
        return self.out(x)

    def upsample(self, x):
        if not self.periodic_up:
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(F.pad(x, (1, 1, 1, 1), mode="circular"), scale_factor=2, mode="bilinear", align_corners=False)
        return x[..., 2:-2, 2:-2]

    @classmethod
    def from_unet(cls, unet) -> PlainUNet:
        """The same function as an :class:`irno.UNetRefiner` with periodic padding and no positional
        channels, its weights copied."""
        if getattr(unet, "positional", False) or unet.padding not in ("periodic", "circular"):
            raise _unsupported("a U-Net with positional channels or non-periodic padding")
        # which upsampling the project's U-Net does (it has changed): ask it
        probe = torch.randn(1, 2, 4, 6, device=next(unet.parameters()).device)
        up = getattr(unet, "_upsample", None)
        periodic_up = False
        if up is not None:
            with torch.no_grad():
                got = up(probe)
            clamp, wrap = cls(1, 1, 1, 1, False).upsample(probe), cls(1, 1, 1, 1, True).upsample(probe)
            if torch.allclose(got, wrap, atol=1e-6) and not torch.allclose(got, clamp, atol=1e-6):
                periodic_up = True
            elif not torch.allclose(got, clamp, atol=1e-6):
                raise _unsupported("the project U-Net's upsampling (neither clamped nor periodic bilinear)")
        plain = cls(unet.in_channels, unet.out_channels, unet.depth, unet.width, periodic_up)

        def copy_block(dst: PlainBlock, src) -> None:
            convs = [m for m in src.net if isinstance(m, nn.Conv2d)]
            norms = [m for m in src.net if not isinstance(m, nn.Conv2d) and hasattr(m, "weight")]
            if len(convs) != 2 or len(norms) != 2 or any(n.eps != 1e-5 for n in norms):
                raise _unsupported("a U-Net block other than 2 x (conv, channel LayerNorm eps 1e-5, GELU)")
            for c_dst, c_src in ((dst.conv1, convs[0]), (dst.conv2, convs[1])):
                _copy_conv(c_dst, c_src)
            for n_dst, n_src in ((dst.norm1, norms[0]), (dst.norm2, norms[1])):
                _copy(n_dst.weight, n_src.weight)
                _copy(n_dst.bias, n_src.bias)

        for dst, src in zip(plain.enc, unet.down):
            copy_block(dst, src)
        copy_block(plain.mid, unet.bottleneck)
        for dst, src in zip(plain.up, unet.up_convs):
            _copy_conv(dst, src)
        for dst, src in zip(plain.dec, unet.up_blocks):
            copy_block(dst, src)
        _copy_conv(plain.out, unet.out_conv)
        return plain.to(next(unet.parameters()).device)


class PlainIRNO(nn.Module):
    """h_0 = base(x) (no grad); h_{k+1} = h_k + alpha * phi(cat(x, h_k))."""

    def __init__(self, base: nn.Module, phi: nn.Module, alpha: float):
        super().__init__()
        self.base, self.phi, self.alpha = base, phi, alpha
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x, steps: int, return_trajectory: bool = False):
        with torch.no_grad():
            h = self.base(x)
        traj = [h]
        for _ in range(steps):
            h = h + self.alpha * self.phi(torch.cat([x, h], dim=1))
            traj.append(h)
        return traj if return_trajectory else h

    @classmethod
    def from_irno(cls, model) -> PlainIRNO:
        """The same function as an :class:`irno.IRNO` whose base is an FNO and refiner a U-Net on the
        same grid as x, weights copied."""
        return cls(PlainFNO.from_fno(model.base), PlainUNet.from_unet(model.refiner), model.alpha)


def spectral_weight(H: int, W: int, lam: float, f0: float = 0.5, device=None) -> torch.Tensor:
    """w(f) = 1 + (|f| / f0)^lam on the rfft2 grid, divided by its mean: (H, W//2+1) float32."""
    fy = torch.fft.fftfreq(H, dtype=torch.float64, device=device)
    fx = torch.fft.rfftfreq(W, dtype=torch.float64, device=device)
    f = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    w = 1 + (f / f0) ** lam
    return (w / w.mean()).float()


def plain_irno_loss(
    model: PlainIRNO, x, y, K: int, weights: list[torch.Tensor], beta_s: float = 1.0, beta_fp: float = 0.01
):
    """(1/K) sum_k [MSE(h_{k+1}, y) + beta_s * L_spec(h_{k+1}, y; lambda_k)] + beta_fp * mean(phi(x, y)^2);
    ``weights[k]`` is the spectral weight of step k (:func:`spectral_weight` with lambda_k)."""
    traj = model(x, K, return_trajectory=True)
    total = 0.0
    for k in range(K):
        h = traj[k + 1]
        mse = ((h - y) ** 2).mean()
        P = torch.fft.rfft2(h, norm="ortho")
        Y = torch.fft.rfft2(y, norm="ortho")
        spec = (weights[k] * (P.abs() - Y.abs()) ** 2).mean()
        total = total + mse + beta_s * spec
    total = total / K
    return total + beta_fp * (model.phi(torch.cat([x, y], dim=1)) ** 2).mean()
