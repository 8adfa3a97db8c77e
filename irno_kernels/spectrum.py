"""Radial spectrum and spectral loss (stub: being written)."""


def radial_spectrum(x, *, backend=None):
    raise NotImplementedError


def radial_spectrum_ref(x):
    raise NotImplementedError


def spectral_loss(pred, target, lam, f0=0.5, mode="magnitude", *, backend=None):
    raise NotImplementedError


def spectral_loss_ref(pred, target, lam, f0=0.5, mode="magnitude"):
    raise NotImplementedError


def shell_index(H, W, device=None):
    raise NotImplementedError


def spectral_weights(H, W, lam, f0=0.5, device=None, dtype=None):
    raise NotImplementedError
