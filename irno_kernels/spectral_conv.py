"""Spectral convolution (stub: being written)."""

FFT_NORM = "forward"


def spectral_conv2d(x, weight, modes=None, *, backend=None):
    raise NotImplementedError


def spectral_conv2d_ref(x, weight):
    raise NotImplementedError


def weight_from_neuralop(weight):
    raise NotImplementedError


def weight_to_neuralop(weight, n_modes):
    raise NotImplementedError
