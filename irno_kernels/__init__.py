"""irno_kernels: the op layer of irno.

Typed wrappers over the compiled ops (``torch.ops.irno.*``), their pure-PyTorch references
(``*_ref``, the specification), fake and autograd registrations, and the choice of backend.
The package imports without the compiled module ``_C``: the references then serve every op.

Ops (see each docstring for shapes):
    spectral_conv2d(x, weight, modes=None)     spectral convolution y = irfft2(Mix(rfft2(x)))
    residual_update(h, phi, alpha)             h + alpha * phi
    refine_update(h, z, weight, bias, alpha)   h + alpha * conv1x1(z), fused
    radial_spectrum(x)                         energy per radial shell of rfft2(x, norm="ortho")
    spectral_loss(pred, target, lam, f0, mode) progressive spectral loss (one pass over the spectra)
    channel_layer_norm(x, weight, bias, eps)   LayerNorm over the channels at every grid point
    periodic_pad_cat(xs, halo)                 cat(xs, 1) padded periodically (periodic_pad2d: one x)
    periodic_upsample2x(x, halo)               periodic bilinear x2, written with a periodic halo
"""

from irno_kernels.backend import BACKENDS, HAS_C, available, backends, resolve
from irno_kernels.norm import channel_layer_norm, channel_layer_norm_ref
from irno_kernels.pad import (
    periodic_pad2d,
    periodic_pad_cat,
    periodic_pad_cat_ref,
    periodic_upsample2x,
    periodic_upsample2x_ref,
)
from irno_kernels.spectral_conv import (
    FFT_NORM,
    spectral_conv2d,
    spectral_conv2d_ref,
    weight_from_neuralop,
    weight_to_neuralop,
)
from irno_kernels.spectrum import (
    radial_spectrum,
    radial_spectrum_ref,
    shell_index,
    spectral_loss,
    spectral_loss_ref,
    spectral_weights,
)
from irno_kernels.update import (
    refine_update,
    refine_update_,
    refine_update_ref,
    residual_update,
    residual_update_,
    residual_update_ref,
)

if HAS_C:
    from irno_kernels import _C  # noqa: F401


def build_info() -> dict:
    """Facts about the compiled module (torch version, CUDA, archs, compiler), or why it is absent."""
    if not HAS_C:
        from irno_kernels.backend import _C_ERROR

        return {"built": False, "error": _C_ERROR}
    return {"built": True, **_C.build_info()}


__all__ = [
    "BACKENDS", "HAS_C", "available", "backends", "resolve", "build_info",
    "FFT_NORM", "spectral_conv2d", "spectral_conv2d_ref", "weight_from_neuralop", "weight_to_neuralop",
    "radial_spectrum", "radial_spectrum_ref", "shell_index", "spectral_loss", "spectral_loss_ref",
    "spectral_weights",
    "residual_update", "residual_update_", "residual_update_ref",
    "refine_update", "refine_update_", "refine_update_ref",
    "channel_layer_norm", "channel_layer_norm_ref",
    "periodic_pad2d", "periodic_pad_cat", "periodic_pad_cat_ref", "periodic_upsample2x", "periodic_upsample2x_ref",
]
