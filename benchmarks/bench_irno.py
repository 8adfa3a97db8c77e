"""IRNO end to end: a plain PyTorch implementation vs the project's eager IRNO vs CUDA-graph replay.

Model: an FNO base (4 layers; 16 modes, width 64 at 256x256; 12 modes, width 32 otherwise) + the
paper's U-Net refiner (depth 4, width 16; output conv gain 1 so that every step matters), K = 6.
Variants, side by side in one run on one device (DESIGN section 7):

    plain         plain PyTorch as a paper's code would write it (benchmarks/_plain.py), fp32,
                  sharing the project model's weights
    irno          the project's eager IRNO: its ops, in-place updates at inference
    graphed       irno.GraphedIRNO: base + K steps replayed as one CUDA graph (training: the whole
                  step, forward + backward + clip + Adam, captured as one graph)
    graphed+bf16  the same with the refiner in bf16 and NHWC (IRNO(refiner_dtype=torch.bfloat16,
                  channels_last=True): Phi under autocast, the base, h and the updates in fp32)

Before timing, each fp32 variant's output (inference) or loss and gradients (training) must agree
with plain's (relative L2 error, TF32 off for the check); bf16's error is recorded, not checked.
Cases: inference at 256x256 batch 1 and 16 (4 fields in, 1 out) and 128x384 batch 4 (4 fields in
and out); one training step (K unrolled steps, loss + backward + clip + Adam) at 128x128 batch 16;
and the time per call against the number of steps (0..2K) at the first case, plotted with --plot. CUDA: median of
CUDA-event timings (triton.testing.do_bench) after warm-up; CPU: torch.utils.benchmark with the
threads pinned and recorded. CSV rows (device, versions, date, commit, shapes) are appended to --csv
after every case. Exit status 1 when a variant disagrees with plain or raises (it is then not timed).

    python benchmarks/bench_irno.py --device cuda --csv out.csv --plot out.png
    python benchmarks/bench_irno.py --device cpu --quick --threads 1      # tiny shapes, < 1 minute
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, time_fn, write_csv  # noqa: E402
from _plain import PlainIRNO, plain_irno_loss, spectral_weight  # noqa: E402
from irno import FNO, IRNO, GraphedIRNO, IRNOLoss, UNetRefiner  # noqa: E402
from irno.analysis import count_flops  # noqa: E402
from irno.graphed_train import GraphedTrainStep  # noqa: E402
from irno.losses import spectral_lambda  # noqa: E402

VARIANTS = ("plain", "irno", "graphed", "graphed+bf16")
CUDA_ONLY = ("graphed", "graphed+bf16")
LR, WEIGHT_DECAY, CLIP, BETA_FP = 3e-4, 1e-5, 1.0, 0.01


@dataclass
class Case:
    kind: str  # "infer" or "train"
    B: int
    cx: int  # fields in
    cy: int  # fields out (channels of h)
    H: int
    W: int
    modes: int
    width: int  # FNO width
    depth: int = 4  # U-Net
    uwidth: int = 16

    @property
    def name(self) -> str:
        return f"{self.H}x{self.W} B{self.B} {self.cx}->{self.cy}"

    @property
    def model(self) -> str:
        return f"FNO m{self.modes} w{self.width} + UNet d{self.depth} w{self.uwidth}"


def cases(device: str, quick: bool) -> list[Case]:
    if quick:  # tiny: the CPU smoke test
        return [
            Case("infer", 1, 2, 1, 32, 32, 4, 8, 2, 4),
            Case("infer", 4, 2, 1, 32, 32, 4, 8, 2, 4),
            Case("infer", 2, 4, 4, 16, 48, 4, 8, 2, 4),
            Case("train", 4, 2, 1, 32, 32, 4, 8, 2, 4),
        ]
    if device == "cuda":
        return [
            Case("infer", 1, 4, 1, 256, 256, 16, 64),
            Case("infer", 16, 4, 1, 256, 256, 16, 64),
            Case("infer", 4, 4, 4, 128, 384, 12, 32),
            Case("train", 16, 4, 1, 128, 128, 12, 32),
        ]
    return [
        Case("infer", 1, 4, 1, 64, 64, 12, 32),
        Case("infer", 16, 4, 1, 64, 64, 12, 32),
        Case("infer", 2, 4, 4, 64, 192, 12, 32),
        Case("train", 8, 4, 1, 64, 64, 12, 32),
    ]


def build(case: Case, device: str, K: int) -> tuple[IRNO, PlainIRNO]:
    """The project model and the plain one with the same weights. The U-Net's output conv gets gain
    1 (not the paper's 0.1 init) so that every step changes h visibly, as a trained refiner does."""
    torch.manual_seed(0)
    base = FNO(
        n_modes=(case.modes, case.modes),
        in_channels=case.cx,
        out_channels=case.cy,
        hidden_channels=case.width,
        n_layers=4,
    )
    refiner = UNetRefiner(case.cx + case.cy, case.cy, depth=case.depth, width=case.uwidth, out_gain=1.0)
    model = IRNO(base, refiner, alpha=0.2, K=K).to(device)
    return model, PlainIRNO.from_irno(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for cuDNN convolutions and matmuls (cuDNN allows it by default): the agreement checks
    compare implementations, not TF32 rounding. Timings run with the defaults (recorded per row)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def gflop_infer(model: IRNO, case: Case, steps: int) -> float:
    """FLOPs of one inference call by irno.analysis.count_flops, on meta tensors (no compute)."""
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(case.B, case.cx, case.H, case.W, device="meta")
    return count_flops(lambda: meta(x, steps=steps)).total / 1e9


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
def with_bf16_refiner(model: IRNO) -> IRNO:
    """The same IRNO (shared modules and weights) with its refiner run in bf16, channels-last."""
    twin = copy.copy(model)
    twin.refiner_dtype = torch.bfloat16
    twin.channels_last = True
    return twin


def infer_fns(model: IRNO, plain: PlainIRNO, graphed: GraphedIRNO, graphed_bf16: GraphedIRNO):
    """variant -> fn(x, steps) returning h_steps."""

    def run_plain(x, s):
        with torch.no_grad():
            return plain(x, s)

    def run_irno(x, s):
        with torch.no_grad():
            return model(x, steps=s)

    def run_graphed(x, s):
        return graphed(x, s)

    def run_graphed_bf16(x, s):
        return graphed_bf16(x, s)

    return {"plain": run_plain, "irno": run_irno, "graphed": run_graphed, "graphed+bf16": run_graphed_bf16}


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def project_loss(model: IRNO, x, y, K: int, bf16: bool, device: str):
    """The IRNO objective on the project's ops (irno.IRNOLoss); bf16: the refiner runs in bf16 and
    channels-last (``model.refiner_dtype``, ``model.channels_last``), the trajectory and loss in fp32."""
    model.refiner_dtype = torch.bfloat16 if bf16 else None
    model.channels_last = bf16
    return IRNOLoss(K, beta_fp=BETA_FP)(model, x, y)[0]


def train_step_fn(loss_fn, params: list[torch.Tensor], capturable: bool = False):
    """fn() = one step: loss -> backward -> clip -> Adam; returns (fn, optimizer)."""
    opt = torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY, capturable=capturable)

    def step(zero: bool = True):
        if zero:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        return loss.detach()

    return step, opt


def check_train_agreement(model: IRNO, plain: PlainIRNO, x, y, K: int, tol: float) -> dict:
    """Loss, total grad norm and two layers' grads of the project's loss vs plain's, same weights."""
    H, W = y.shape[-2:]
    weights = [spectral_weight(H, W, spectral_lambda(k, K), device=y.device) for k in range(K)]
    m = copy.deepcopy(model).train()
    p = copy.deepcopy(plain).train()
    loss_m = IRNOLoss(K, beta_fp=BETA_FP)(m, x, y)[0]
    loss_m.backward()
    loss_p = plain_irno_loss(p, x, y, K, weights, beta_fp=BETA_FP)
    loss_p.backward()

    def gnorm(ps):
        return torch.sqrt(sum(q.grad.double().square().sum() for q in ps if q.grad is not None))

    errs = {
        "loss": rel_err(loss_m, loss_p),
        "grad_norm": rel_err(gnorm(m.refiner.parameters()), gnorm(p.phi.parameters())),
        "grad_out_conv": rel_err(m.refiner.out_conv.weight.grad, p.phi.out.weight.grad),
        "grad_first_conv": rel_err(m.refiner.down[0].net[0].weight.grad, p.phi.enc[0].conv1.weight.grad),
    }
    return {"err": max(errs.values()), "ok": max(errs.values()) <= tol, "parts": errs}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.a = args
        self.device = args.device
        self.env = environment(args.device)
        cuda = args.device == "cuda"
        self.env["tf32_conv"] = torch.backends.cudnn.allow_tf32 if cuda else ""
        self.env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32 if cuda else ""
        self.rows: list[dict] = []
        self.written = 0  # rows already appended to --csv
        self.failed: list[str] = []  # messages
        self.bad: set[tuple[str, str]] = set()  # (case, variant) that disagree with plain: not timed
        self.variants = [v for v in VARIANTS if args.device == "cuda" or v not in CUDA_ONLY]
        # rel. L2 error vs plain of the fp32 variants, checked with TF32 off (exact_fp32)
        self.tol = 1e-4 if args.device == "cpu" else 5e-4
        self.min_run = 0.05 if args.quick else 0.5

    def flush(self) -> None:
        """Append the rows not yet written to --csv: a run cut short by a timeout keeps what it measured."""
        if self.a.csv:
            write_csv(self.a.csv, self.rows[self.written:])
        self.written = len(self.rows)

    def time(self, fn) -> float | None:
        try:
            return time_fn(fn, self.device, min_run_time=self.min_run)
        except Exception as err:  # a variant that fails is reported, not fatal
            print(f"    FAILED {type(err).__name__}: {str(err)[:300]}")
            return None

    def row(
        self,
        case: Case,
        variant: str,
        steps: int,
        t: float | None,
        plain_t: float | None,
        gflop: float,
        err: float | str = "",
        ok: bool | str = "",
        what: str | None = None,
    ) -> dict:
        r = {
            **self.env,
            "bench": "irno",
            "kind": what or case.kind,
            "case": case.name,
            "model": case.model,
            "shape": f"B{case.B} C{case.cx}->{case.cy} {case.H}x{case.W}",
            "steps": steps,
            "variant": variant,
            "median_ms": round(t * 1e3, 4) if t else "",
            "ms_per_step": "",
            "GFLOP": round(gflop, 3),
            "TFLOP_s": round(gflop / t / 1e3, 3) if t else "",
            "speedup_vs_plain": round(plain_t / t, 3) if (t and plain_t) else "",
            "rel_err_vs_plain": f"{err:.2e}" if isinstance(err, float) else err,
            "agree": ok,
        }
        self.rows.append(r)
        ms = f"{t * 1e3:10.3f} ms" if t else "      (failed)"
        sp = f"x{plain_t / t:5.2f}" if (t and plain_t) else "      "
        e = f"err {err:.1e}" if isinstance(err, float) else ""
        print(f"  {r['kind']:5s} {case.name:22s} K={steps:<3d} {variant:13s} {ms} {sp} {e}")
        return r

    def skip_note(self) -> None:
        missing = [v for v in VARIANTS if v not in self.variants]
        if missing:
            print(
                f"skipping {', '.join(missing)}: they need CUDA (on CPU GraphedIRNO runs the eager IRNO, "
                f"which the 'irno' variant already times)"
            )

    # -----------------------------------------------------------------------------------------
    def infer(self, case: Case, sweep: list[int] | None = None) -> None:
        K = self.a.K
        model, plain = build(case, self.device, K)
        model.eval()
        graphed = GraphedIRNO(model, max_graphs=64)
        graphed_bf16 = GraphedIRNO(with_bf16_refiner(model), max_graphs=64)
        fns = infer_fns(model, plain, graphed, graphed_bf16)
        x = torch.randn(case.B, case.cx, case.H, case.W, device=self.device)
        errs, ok = {}, {}
        with exact_fp32():  # agreement before timing
            ref = fns["plain"](x, K)
            for v in self.variants[1:]:
                try:
                    errs[v] = rel_err(fns[v](x, K), ref)
                except Exception as err:
                    print(f"    {v}: FAILED {type(err).__name__}: {str(err)[:300]}")
                    errs[v], ok[v] = float("nan"), False
                    self.fail(case, v, f"raised {type(err).__name__}")
                    continue
                if v == "graphed+bf16":  # recorded, not checked (unless not finite)
                    ok[v] = "" if math.isfinite(errs[v]) else False
                else:
                    ok[v] = errs[v] <= self.tol
                if ok[v] is False:
                    self.fail(case, v, f"rel err {errs[v]:.2e} (tol {self.tol:.0e})")
        graphed_bf16.clear()
        graphed.clear()  # those graphs were captured with TF32 off: the timed ones are captured anew
        print(
            f"agreement with plain ({case.name}, K={K}, tol {self.tol:.0e} fp32): "
            + ", ".join(f"{v} {e:.1e}" for v, e in errs.items())
            + ("  ok" if all(o is not False for o in ok.values()) else "  FAILED")
        )
        gflop = gflop_infer(model, case, K)
        plain_t = self.time(lambda: fns["plain"](x, K))
        self.row(case, "plain", K, plain_t, plain_t, gflop, err=0.0, ok=True)
        for v in self.variants[1:]:
            if ok[v] is False:
                self.row(case, v, K, None, plain_t, gflop, errs[v], False)
                continue
            self.row(case, v, K, self.time(lambda v=v: fns[v](x, K)), plain_t, gflop, errs[v], ok[v])
        if sweep:
            self.sweep(case, model, fns, x, sweep)

    def sweep(self, case: Case, model: IRNO, fns: dict, x: torch.Tensor, steps_list: list[int]) -> None:
        print(f"time per call vs steps ({case.name})")
        base_g = gflop_infer(model, case, 0)
        step_g = gflop_infer(model, case, 1) - base_g
        for s in steps_list:
            plain_t = None
            for v in self.variants:
                if (case.name, v) in self.bad:
                    continue
                t = self.time(lambda v=v, s=s: fns[v](x, s))
                plain_t = t if v == "plain" else plain_t
                r = self.row(case, v, s, t, plain_t, base_g + s * step_g, what="sweep")
                r["ms_per_step"] = round(t * 1e3 / s, 4) if (t and s) else ""

    def fail(self, case: Case, variant: str, why: str) -> None:
        self.failed.append(f"{case.kind} {case.name} {variant}: {why}")
        self.bad.add((case.name, variant))

    # -----------------------------------------------------------------------------------------
    def train(self, case: Case) -> None:
        K, dev = self.a.K, self.device
        model, plain = build(case, dev, K)
        x = torch.randn(case.B, case.cx, case.H, case.W, device=dev)
        y = torch.randn(case.B, case.cy, case.H, case.W, device=dev) * 0.5 + model.base_forward(x)
        with exact_fp32():
            agree = check_train_agreement(model, plain, x, y, K, self.tol)
        print(
            f"agreement with plain (train {case.name}, K={K}, tol {self.tol:.0e}): "
            + ", ".join(f"{k} {v:.1e}" for k, v in agree["parts"].items())
            + ("  ok" if agree["ok"] else "  FAILED")
        )
        if not agree["ok"]:
            self.fail(case, "irno", f"rel err {agree['err']:.2e} (tol {self.tol:.0e})")
        # FLOPs: forward of the K unrolled steps + the fixed-point term, x3 for forward + backward
        step_g = gflop_infer(model, case, 1) - gflop_infer(model, case, 0)
        gflop = gflop_infer(model, case, 0) + 3 * (K + 1) * step_g
        weights = [spectral_weight(case.H, case.W, spectral_lambda(k, K), device=dev) for k in range(K)]

        p = copy.deepcopy(plain).train()
        plain_step, _ = train_step_fn(
            lambda: plain_irno_loss(p, x, y, K, weights, beta_fp=BETA_FP), [q for q in p.phi.parameters()]
        )
        plain_t = self.time(plain_step)
        self.row(case, "plain", K, plain_t, plain_t, gflop, 0.0, True)
        self.flush()
        for v in self.variants[1:]:
            if v == "irno" and not agree["ok"]:
                self.row(case, v, K, None, plain_t, gflop, agree["err"], False)
                continue
            m = copy.deepcopy(model).train()
            bf16 = v == "graphed+bf16"
            step, opt = train_step_fn(
                lambda m=m, bf16=bf16: project_loss(m, x, y, K, bf16, dev),
                list(m.refiner_parameters()),
                capturable=v in CUDA_ONLY,
            )
            err, ok = (agree["err"], agree["ok"]) if v == "irno" else ("", "")
            if v in CUDA_ONLY:
                try:
                    # the library's whole-step capture (3 warm-up steps, then one graph per shape)
                    graphed_step = GraphedTrainStep(lambda m=m, bf16=bf16: project_loss(m, x, y, K, bf16, dev),
                                                    list(m.refiner_parameters()), opt, clip=CLIP, warmup=3)
                    fn = graphed_step
                    fn()  # warm-up, capture, first replay
                    snap = copy.deepcopy(m)  # the weights the next replay starts from
                    err = rel_err(fn(), project_loss(snap, x, y, K, bf16, dev))
                    ok = err <= (self.tol if not bf16 else 5e-2)
                    print(
                        f"  {v}: replayed loss vs eager loss on the same weights: rel err {err:.1e}"
                        + ("" if ok else "  FAILED")
                    )
                    if not ok:
                        self.fail(case, v, f"replayed loss rel err {err:.2e}")
                        self.row(case, v, K, None, plain_t, gflop, err, False)
                        continue
                except Exception as exc:
                    print(f"  {v}: capture FAILED {type(exc).__name__}: {str(exc)[:300]}")
                    self.fail(case, v, f"capture raised {type(exc).__name__}")
                    self.row(case, v, K, None, plain_t, gflop, "", False)
                    continue
            else:
                fn = step
            self.row(case, v, K, self.time(fn), plain_t, gflop, err, ok)
            self.flush()  # one training variant takes seconds (graph capture): keep each as it comes


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in VARIANTS:
        pts = [
            (r["steps"], r["median_ms"])
            for r in rows
            if r["kind"] == "sweep" and r["variant"] == v and r["median_ms"] != ""
        ]
        if not pts:
            continue
        s, t = np.array(pts, dtype=float).T
        slope = np.polyfit(s, t, 1)[0] if len(s) > 1 else math.nan
        ax.plot(s, t, "o-", ms=3, label=f"{v} ({slope:.3g} ms/step)")
    ax.set_xlabel("refinement steps")
    ax.set_ylabel("ms per call (median)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads (pinned, reported)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run in well under a minute)")
    p.add_argument("--K", type=int, default=6, help="refinement steps (6)")
    p.add_argument("--no-sweep", action="store_true", help="skip the time-vs-steps sweep")
    p.add_argument("--csv", default="", help="append result rows to this CSV file")
    p.add_argument("--plot", default="", help="write the time-vs-steps plot (PNG) here")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if a.K < 1:
        p.error(f"--K: expected >= 1, got {a.K}")
    torch.set_num_threads(a.threads)
    bench = Bench(a)
    print("env:", bench.env)
    bench.skip_note()
    todo = cases(a.device, a.quick)
    if a.no_sweep:
        sweep = []
    elif a.quick:
        sweep = [0, 1, a.K, 2 * a.K]
    else:  # 0..2K, every step up to K/2, then every other one
        sweep = sorted(set(range(0, a.K // 2 + 1)) | set(range(0, 2 * a.K + 1, 2)))
    for i, case in enumerate(todo):
        if case.kind == "infer":
            bench.infer(case, sweep if i == 0 else None)
        else:
            bench.train(case)
        if a.device == "cuda":
            torch.cuda.empty_cache()  # the case's models and graphs are gone
        bench.flush()  # after every case (training: after every variant too)
        if i == 0 and a.plot and any(r["kind"] == "sweep" for r in bench.rows):
            plot(bench.rows, a.plot, f"IRNO ({case.model}) {case.name}, {bench.env['device_name']}")
    if a.csv:
        print(f"wrote {bench.written} rows to {a.csv}")
    if bench.failed:
        print("FAILED (disagrees with plain, or raised): " + "; ".join(bench.failed))
        return 1
    print("agreement with plain: all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
