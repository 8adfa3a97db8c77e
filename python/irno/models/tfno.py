"""Tucker-factorised FNO (TFNO, Kossaifi et al.): the spectral weight of each layer is a Tucker tensor

    W[i, o, kx, ky] = sum_{a,b,c,d} G[a, b, c, d] U_in[i, a] U_out[o, b] U_x[kx, c] U_y[ky, d]

with a complex core G (r_in, r_out, r_x, r_y) and complex factors. Training works on the factors;
inference reconstructs the dense weight once and reuses it, so a frozen TFNO costs what a dense FNO
costs per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from irno.models.fno import FNO, SpectralConv2d

__all__ = ["TuckerSpectralConv2d", "TFNO", "tucker_ranks"]


def _tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    return math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks))


def tucker_ranks(shape: Sequence[int], rank: float | Sequence[int]) -> tuple[int, ...]:
    """Tucker ranks for a tensor of ``shape``.

    ``rank`` as a sequence of ints is taken as is (clipped to the shape). As a float in (0, 1] it is
    the fraction of the dense tensor's parameter count the factorisation may use (neuraloperator's
    and tensorly's convention): ranks r_i = max(1, round(c * s_i)) with the largest c in (0, 1] whose
    core + factors fit in ``rank * prod(shape)`` (found by bisection).
    """
    shape = tuple(int(s) for s in shape)
    if not isinstance(rank, (int, float)):
        ranks = tuple(max(1, min(int(r), s)) for r, s in zip(rank, shape))
        if len(ranks) != len(shape):
            raise ValueError(f"rank: expected {len(shape)} ranks for shape {shape}, got {tuple(rank)}")
        return ranks
    if not 0 < rank <= 1:
        raise ValueError(f"rank: expected a fraction in (0, 1] or a tuple of ints, got {rank}")
    budget = rank * math.prod(shape)

    def ranks_for(c: float) -> tuple[int, ...]:
        return tuple(max(1, min(s, round(c * s))) for s in shape)

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if _tucker_params(shape, ranks_for(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return ranks_for(lo)


def _orthonormal_columns(n: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, max(r, 1), dtype=dtype))
    return q[:, :r]


class TuckerSpectralConv2d(SpectralConv2d):
    """A :class:`SpectralConv2d` whose weight (Cin, Cout, 2*m1, m2) is stored in Tucker form.

    Args:
        in_channels, out_channels, n_modes: as :class:`SpectralConv2d`.
        rank: a parameter fraction (float in (0, 1], default 0.1 as neuraloperator's TFNO) or four
            explicit ranks (r_in, r_out, r_x, r_y); see :func:`tucker_ranks`.

    Parameters: ``core`` (r_in, r_out, r_x, r_y) and ``factors`` [U_in (Cin, r_in), U_out (Cout, r_out),
    U_x (2*m1, r_x), U_y (m2, r_y)], all complex. Init: orthonormal factors and a normal core scaled so
    that the reconstructed weight has the dense layer's std sqrt(2 / (in + out)).

    Cache: when the module is frozen (``not self.training`` and grad mode off, as a base inside IRNO)
    the dense weight is reconstructed once and reused. The cache is keyed by each factor's version
    counter, storage and dtype, so in-place updates (optimizer steps, ``load_state_dict``) and moves
    (``.to``) rebuild it; writes through ``param.data`` bypass the version counter and need
    :meth:`clear_cache`. In training mode or with grad on, the weight is rebuilt at every call (so
    gradients reach the factors) and the cache is dropped. ``n_reconstructions`` counts rebuilds.
    """

    def __init__(self, in_channels: int, out_channels: int, n_modes: int | Sequence[int],
                 rank: float | Sequence[int] = 0.1, init_std: float | None = None,
                 dtype: torch.dtype = torch.cfloat):
        nn.Module.__init__(self)
        from irno.models.fno import _pair

        self.in_channels, self.out_channels = in_channels, out_channels
        self.n_modes = _pair(n_modes, "n_modes")
        m1, m2 = self.n_modes
        shape = (in_channels, out_channels, 2 * m1, m2)
        self.ranks = tucker_ranks(shape, rank)
        std = init_std if init_std is not None else math.sqrt(2.0 / (in_channels + out_channels))
        core_std = std * math.sqrt(math.prod(shape) / math.prod(self.ranks))
        self.core = nn.Parameter(torch.randn(*self.ranks, dtype=dtype) * core_std)
        self.factors = nn.ParameterList(nn.Parameter(_orthonormal_columns(s, r, dtype))
                                        for s, r in zip(shape, self.ranks))
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self.n_reconstructions = 0

    def reconstruct(self) -> torch.Tensor:
        """The dense weight from the Tucker form (differentiable): (Cin, Cout, 2*m1, m2) complex."""
        self.n_reconstructions += 1
        u_in, u_out, u_x, u_y = self.factors
        return torch.einsum("abcd,ia,ob,xc,yd->ioxy", self.core, u_in, u_out, u_x, u_y)

    def _key(self) -> tuple:
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in (self.core, *self.factors))

    def clear_cache(self) -> None:
        self._cache, self._cache_key = None, None

    @property
    def cached(self) -> bool:
        """Whether a reconstructed dense weight is held."""
        return self._cache is not None

    def dense_weight(self) -> torch.Tensor:
        frozen = not self.training and not torch.is_grad_enabled()
        if not frozen:
            self.clear_cache()
            return self.reconstruct()
        if self.core.is_cuda and torch.cuda.is_current_stream_capturing():
            # a CUDA graph being captured: rebuild inside it, so that its replays read the Tucker
            # factors themselves (a load_state_dict reaches them) and never the cache, which
            # train() or a changed key frees
            return self.reconstruct().detach()
        key = self._key()
        if self._cache is None or key != self._cache_key:
            self._cache = self.reconstruct().detach()
            self._cache_key = key
        return self._cache

    def train(self, mode: bool = True):
        if mode:
            self.clear_cache()
        return super().train(mode)

    @property
    def weight(self) -> torch.Tensor:  # the dense weight, for code that reads SpectralConv2d.weight
        return self.dense_weight()

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, n_modes={self.n_modes}, ranks={self.ranks}"


class TFNO(FNO):
    """An :class:`FNO` whose spectral convolutions are :class:`TuckerSpectralConv2d`.

    Same arguments as :class:`FNO`; ``rank`` (default 0.1, neuraloperator's TFNO default) is the
    parameter fraction of each spectral weight or explicit Tucker ranks.
    """

    def __init__(self, *args, rank: float | Sequence[int] = 0.1, **kwargs):
        kwargs.setdefault("factorization", "tucker")
        super().__init__(*args, rank=rank, **kwargs)
