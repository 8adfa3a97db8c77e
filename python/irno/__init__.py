"""irno: Iterative Refinement Neural Operators.

    from irno import IRNO, FNO
    base = FNO(n_modes=(12, 12), in_channels=4, out_channels=1, hidden_channels=32)   # pretrained
    model = IRNO(base, alpha=0.2, K=6)       # frozen base + the paper's U-Net refiner
    y = model(x)                              # h_K;  model(x, steps=12) runs longer
    traj = model(x, return_trajectory=True)   # [h_0, ..., h_K]
    fast = model.graphed(x)                   # CUDA-graph replay of inference: fast(x) == model(x)
    model, meta = irno.load("runs/demo")      # a model trained by the CLI (runs/demo/irno/best)
    y_raw = irno.predict("runs/demo", x_raw)  # physical units in and out (the run's data statistics)

Subpackages: :mod:`irno.models` (FNO, TFNO, WDSR, UNetRefiner, FNORefiner), :mod:`irno.losses`,
:mod:`irno.metrics`, :mod:`irno.analysis`; the ops live in :mod:`irno_kernels`.
"""

from irno import analysis, losses, metrics, models
from irno.graphed import GraphedIRNO
from irno.graphed_train import GraphedTrainStep
from irno.irno import IRNO, pick_refiner_dtype, resample
from irno.losses import H1Loss, IRNOLoss, LpLoss, ProgressiveSpectralLoss, fixed_point_loss, fixed_point_weight
from irno.models import FNO, TFNO, WDSR, FNORefiner, SpectralConv2d, TuckerSpectralConv2d, UNetRefiner
from irno.pipeline import load, predict

__version__ = "0.1.0"

__all__ = [
    "IRNO", "GraphedIRNO", "GraphedTrainStep", "resample", "pick_refiner_dtype", "load", "predict",
    "FNO", "TFNO", "WDSR", "UNetRefiner", "FNORefiner", "SpectralConv2d", "TuckerSpectralConv2d",
    "ProgressiveSpectralLoss", "IRNOLoss", "LpLoss", "H1Loss", "fixed_point_loss", "fixed_point_weight",
    "models", "losses", "metrics", "analysis",
]
