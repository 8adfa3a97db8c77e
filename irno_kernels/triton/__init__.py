"""Triton kernels of the irno ops (DESIGN sections 2 and 3): the second fast path beside CUDA.

Each function has the signature of the op's reference (``irno_kernels.<op>_ref``) and returns what
the reference returns, differentiably; arguments arrive validated by the public wrappers in
irno_kernels, which call these when the backend is "triton". Every kernel is a torch.library op in
the ``irno_triton`` namespace (``torch.ops.irno_triton.*``) with a fake kernel and autograd, so
torch.compile and CUDA graphs see through it.

Triton runs on CUDA tensors, or on CPU tensors through its interpreter when TRITON_INTERPRET=1 was
set before triton was imported. Importing this package raises ImportError without triton.
"""

from irno_kernels.triton._lib import INTERPRET, NAMESPACE
from irno_kernels.triton.norm import channel_layer_norm
from irno_kernels.triton.pad import periodic_pad_cat, periodic_upsample2x
from irno_kernels.triton.spectral_conv import spectral_conv2d
from irno_kernels.triton.spectrum import radial_spectrum, spectral_loss
from irno_kernels.triton.update import refine_update, refine_update_, residual_update, residual_update_

#: ops with a Triton kernel, named as in irno_kernels.backend.OPS
OPS = ("spectral_conv2d", "residual_update", "refine_update", "radial_spectrum", "spectral_loss",
       "channel_layer_norm", "periodic_pad2d", "periodic_upsample2x")

__all__ = ["OPS", "INTERPRET", "NAMESPACE",
           "residual_update", "residual_update_", "refine_update", "refine_update_",
           "radial_spectrum", "spectral_loss", "spectral_conv2d", "channel_layer_norm", "periodic_pad_cat",
           "periodic_upsample2x"]
