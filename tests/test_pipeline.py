"""The main job end to end on a tiny configuration: CLI, checkpoints, evaluation and report."""

import json

import pytest
import torch
from irno import cli, pipeline

TINY = [
    "data.navier_stokes.n_train=2", "data.navier_stokes.n_valid=1", "data.navier_stokes.n_test=1",
    "data.navier_stokes.n_frames=10", "data.navier_stokes.spinup_time=0.5", "data.navier_stokes.resolution=16",
    "data.navier_stokes.sim_resolution=16", "base.kwargs.hidden_channels=4", "base.kwargs.n_modes=[4,4]",
    "base.kwargs.n_layers=1", "base.train.epochs=1", "base.train.batch_size=4", "irno.K=2",
    "irno.train.epochs=1", "irno.train.batch_size=4", "irno.refiner.width=2", "irno.refiner.depth=1",
    "evaluate.extra_steps=2", "threads=1",
]


def _args(tmp_path, *extra):
    out = ["--config", "configs/demo.yaml", "--set", f"run_dir={tmp_path / 'run'}",
           "--set", f"data.root={tmp_path / 'data'}"]
    for o in (*TINY, *extra):
        out += ["--set", o]
    return out


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)


def test_demo_then_evaluate_and_resume(tmp_path, capsys):
    assert cli.main(["demo", *_args(tmp_path)]) == 0
    run = tmp_path / "run"
    for ck in ("base/best", "base/last", "irno/best", "control/best"):
        assert (run / ck / "complete").exists(), ck
    metrics = json.loads((run / "metrics.json").read_text())
    assert (run / "report.md").read_text().startswith("#")
    assert (run / "figures" / "error_vs_step.png").stat().st_size > 1000
    text = json.dumps(metrics)
    assert "vrmse" in text and "controls" in text
    # the control trains the base for at least IRNO's training time (no epoch cap stops it short)
    train_s, ctrl = metrics["run_info"]["train_s"], metrics["controls"]
    assert ctrl["base + more training (IRNO's time)"]["train_s"] - ctrl["base"]["train_s"] >= train_s["irno"]
    # irno.load: the run folder gives the trained IRNO, a base checkpoint the base, both in eval mode
    import irno

    model, meta = irno.load(run)
    assert isinstance(model, irno.IRNO) and not model.training and meta["kind"] == "irno"
    base, bmeta = irno.load(run / "base" / "best")
    assert not isinstance(base, irno.IRNO) and not base.training and bmeta["kind"] == "base"
    x = torch.randn(1, meta["in_channels"], 16, 16)
    assert model(x).shape == (1, meta["out_channels"], 16, 16)
    torch.testing.assert_close(model(x, steps=0), model.base(x))
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        irno.load(tmp_path)
    # irno.predict / `irno predict`: raw fields in, physical units out, with the run's statistics
    import numpy as np
    from irno.data import Normalization

    norm = Normalization.from_dict(meta["normalization"])
    raw = torch.randn(3, meta["in_channels"], 16, 16) * 3 + 2
    got = irno.predict(run, raw, steps=2, batch_size=2, progress=False)
    with torch.no_grad():  # in predict's batches: a CPU conv's rounding may depend on the batch size
        xn = norm.normalize(raw, channel_dim=1)
        want = norm.denormalize(torch.cat([model(xn[:2], steps=2), model(xn[2:], steps=2)]), channel_dim=1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(irno.predict(base, raw, normalization=meta["normalization"], progress=False),
                               norm.denormalize(base(norm.normalize(raw, channel_dim=1)), channel_dim=1))
    np.save(tmp_path / "x.npy", raw.numpy())
    assert cli.main(["predict", "--model", str(run), "--input", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "out" / "y.npy"), "--steps", "2"]) == 0
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out" / "y.npy")),
                               irno.predict(run, raw, steps=2, progress=False))  # the same (default) batches
    np.save(tmp_path / "bad.npy", raw[:, :1].numpy())  # one input channel too few
    assert cli.main(["predict", "--model", str(run), "--input", str(tmp_path / "bad.npy"),
                     "--out", str(tmp_path / "y2.npy")]) == 2
    assert "x: expected" in capsys.readouterr().err and not (tmp_path / "y2.npy").exists()
    with pytest.raises(ValueError, match="steps: the model is a base operator"):
        irno.predict(base, raw, steps=2)
    # the CLI's other commands work on the same run folder; evaluate keeps what the demo recorded
    # and it does not recompute (the controls, the run's histories)
    capsys.readouterr()
    assert cli.main(["evaluate", *_args(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert "other normalisation statistics" not in cap.err and "change at K" in cap.out
    again = json.loads((run / "metrics.json").read_text())
    assert again["controls"] == metrics["controls"] and again["controls"]
    assert again["run_info"]["irno_history"] == metrics["run_info"]["irno_history"]
    assert cli.main(["train", *_args(tmp_path, "irno.train.epochs=2"), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # checkpoints of the wrong kind, a run folder for --model, a wrong split: one line each, exit 2
    capsys.readouterr()
    for argv, says in (
            (["evaluate", *_args(tmp_path), "--model", str(run / "base" / "best")], "is not an IRNO checkpoint"),
            (["evaluate", *_args(tmp_path), "--model", str(run)], "is not a checkpoint folder"),
            (["train", *_args(tmp_path), "--base", str(run / "irno" / "best")], "is not a base checkpoint"),
            (["evaluate", *_args(tmp_path, "evaluate.split=tset")], "evaluate.split: expected one of"),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (argv, err)
    # a config whose data differ from the model's training data: evaluated, with a warning
    assert cli.main(["evaluate", *_args(tmp_path, "data.navier_stokes.n_train=3")]) == 0
    assert "other normalisation statistics" in capsys.readouterr().err
    # predict into a folder, or under a file: one line, nothing left behind
    (tmp_path / "somedir.npy").mkdir()
    assert cli.main(["predict", "--model", str(run), "--input", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "somedir.npy")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_bad_override_and_missing_config_are_clear(capsys):
    assert cli.main(["generate", "--set", "nonsense"]) == 2
    assert "expected key.path=value" in capsys.readouterr().err
    assert cli.main(["generate", "--config", "no/such.yaml"]) == 2
    err = capsys.readouterr().err
    assert "no such file no/such.yaml" in err and "built-in: " in err and "demo" in err
    assert cli.main(["generate", "--config", "nosuchname"]) == 2
    assert "no built-in config of that name" in capsys.readouterr().err
    with pytest.raises(ValueError, match="base.model"):
        pipeline.build_base({"model": "resnet"}, 1, 1)


def test_bad_config_values_and_misspelt_keys_are_one_line(tmp_path, capsys):
    """A misspelt key is refused (it used to become a setting nothing reads) and a bad value is one
    line on stderr with exit status 2, not a traceback."""
    for override, says in (
            ("base.trian.epochs=2", "no key 'trian' under 'base'"),
            ("irno.kk=3", "no key 'kk' under 'irno'"),
            ("base.train.epochz=2", "no key 'epochz' under 'base.train'"),
            ("base.kwargs.n_modes=[4,4", "cannot read the value"),
            ("base.model=resnet", "base.model"),  # after the (tiny) data: building the model
            ("run_dir=", "run_dir: expected a folder name"),
    ):
        assert cli.main(["train-base", *_args(tmp_path, override)]) == 2, override
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (override, err)
    # TrainConfig fields absent from the defaults and free sections (model kwargs) are accepted
    cfg = pipeline.load_config(None, ["base.train.max_steps=5", "base.kwargs.anything=1",
                                      "data.navier_stokes.resolution=32"])
    assert cfg["base"]["train"]["max_steps"] == 5 and cfg["base"]["kwargs"]["anything"] == 1
    assert pipeline.load_config(None, ["irno.K=010"])["irno"]["K"] == 10  # not YAML 1.1's octal 8


def test_irno_resample_mode_from_the_config():
    """irno.resample_mode reaches the model (super-resolution: how x meets h's grid); a checkpoint's
    settings written before the key existed build with the default, bicubic."""
    from irno.models import WDSR

    cfg = pipeline.load_config(None, ["irno.resample_mode=fourier"])
    base = WDSR(in_channels=1, out_channels=1, scale=2, n_features=4, n_resblocks=1)
    spec = {**cfg["irno"], "refiner": {"kind": "unet", "width": 4, "depth": 1}}
    assert pipeline.build_irno(spec, base, 1, 1).resample_mode == "fourier"
    old = {k: v for k, v in spec.items() if k != "resample_mode"}
    assert pipeline.build_irno(old, base, 1, 1).resample_mode == "bicubic"
    with pytest.raises(ValueError, match="resample_mode"):
        pipeline.build_irno({**spec, "resample_mode": "cubic"}, base, 1, 1)


def test_commands_without_their_checkpoints_say_what_to_run(tmp_path, capsys):
    """train without a base and evaluate without a trained IRNO: one line naming the command that
    writes the missing checkpoint (and the flag that names another), exit code 2, no traceback."""
    assert cli.main(["evaluate", *_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "irno/best" in err and "irno train --config configs/demo.yaml" in err and "--model" in err
    assert cli.main(["train", *_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "base/best" in err and "irno train-base --config configs/demo.yaml" in err and "--base" in err
    assert cli.main(["evaluate", *_args(tmp_path), "--model", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def _tiny_irno():
    """A seeded two-step IRNO on 8x8 fields and one batch (x, y) for the loss tests."""
    from irno import FNO, IRNO

    torch.manual_seed(0)
    model = IRNO(FNO(n_modes=(3, 3), in_channels=2, out_channels=1, hidden_channels=4, n_layers=1), K=2,
                 refiner_kwargs={"width": 2, "depth": 1})
    return model, torch.randn(2, 2, 8, 8), torch.randn(2, 1, 8, 8)


def test_deep_state_loss_trains_only_the_last_step():
    model, x, y = _tiny_irno()
    hK = model(x).detach().requires_grad_()  # a leaf, so a gradient reaching it would show
    loss = pipeline.deep_state_loss(model, x, y, hK, extra_steps=3)
    loss.backward()
    assert hK.grad is None  # the extra steps run without gradients, from a detached h_K
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.refiner.parameters())


def test_deep_steps_range_and_its_errors():
    assert pipeline.deep_steps_range(0) == (0, 0)
    assert pipeline.deep_steps_range(4) == (4, 4)
    assert pipeline.deep_steps_range([1, 8]) == (1, 8)
    for bad in (-1, 2.5, True, [3, 1], [1, 2, 3], "4", [1, -2]):
        with pytest.raises(ValueError, match="irno.loss.deep_steps"):
            pipeline.deep_steps_range(bad)


def test_irno_loss_draws_deep_steps_from_the_range(monkeypatch):
    """With deep_steps [lo, hi] each batch's deep term runs a number of extra steps drawn from lo..hi."""
    model, x, y = _tiny_irno()
    seen = []
    real = pipeline.deep_state_loss
    monkeypatch.setattr(pipeline, "deep_state_loss", lambda m, x, y, h, n: seen.append(n) or real(m, x, y, h, n))
    spec = {"K": 2, "loss": {"deep_steps": [1, 3], "beta_deep": 0.5}}
    loss_fn = pipeline._irno_loss(spec)
    for _ in range(40):
        total, parts = loss_fn(model, x, y, 0.0)
        assert "deep" in parts and torch.isfinite(total)
    assert set(seen) == {1, 2, 3}
    seen.clear()
    pipeline._irno_loss({"K": 2, "loss": {"deep_steps": 2, "beta_deep": 0.5}})(model, x, y, 0.0)
    assert seen == [2]
    with pytest.raises(ValueError, match="deep_steps"):
        pipeline._irno_loss({"K": 2, "loss": {"deep_steps": [2, 1], "beta_deep": 0.5}})


def test_perturb_start_levels_and_bands():
    torch.manual_seed(0)
    h = torch.randn(256, 2, 15, 22) * 3 + 1
    d = pipeline.perturb_start(h, 0.4) - h
    ratio = d.flatten(2).std(dim=2) / h.flatten(2).std(dim=2)
    assert 0.15 < ratio.mean() < 0.25 and ratio.max() < 0.4 * 1.3  # u * sigma, u ~ U(0, 1)
    power = torch.fft.rfft2(d).abs().square().mean(dim=(0, 1))
    low, high = power[1:3, 1:3].mean(), power[6:9, 8:11].mean()
    assert low > 2 * high  # the smooth part adds to the low wavenumbers on top of the white part
    assert torch.equal(pipeline.perturb_start(h, 0.0), h)


def test_irno_loss_starts_from_a_perturbed_base_output(monkeypatch):
    model, x, y = _tiny_irno()
    starts = []
    real = model.refine
    monkeypatch.setattr(model, "refine", lambda x, h0, **kw: starts.append(h0) or real(x, h0, **kw))
    total, _ = pipeline._irno_loss({"K": 2, "loss": {"start_noise": 0.5}})(model, x, y, 0.0)
    total.backward()
    assert len(starts) == 1 and not torch.allclose(starts[0], model.base_forward(x).detach())
    assert any(p.grad is not None for p in model.refiner.parameters())
    with pytest.raises(ValueError, match="irno.loss.start_noise"):
        pipeline._irno_loss({"K": 2, "loss": {"start_noise": -1}})


def test_super_resolution_base_upsamples():
    base = pipeline.build_base({"model": "fno", "kwargs": {"n_modes": [4, 4], "hidden_channels": 4}}, 1, 1, scale=4)
    assert base(torch.randn(2, 1, 8, 8)).shape == (2, 1, 32, 32)
    wdsr = pipeline.build_base({"model": "wdsr", "kwargs": {"n_resblocks": 1, "n_features": 4}}, 1, 1, scale=4)
    assert wdsr(torch.randn(2, 1, 8, 8)).shape == (2, 1, 32, 32)


def test_builtin_configs_by_name(tmp_path, monkeypatch):
    """`--config demo` (or demo.yaml) finds the shipped configs from any folder; a file given by
    path wins over a built-in name; `irno demo` defaults to the demo config."""
    import yaml

    known = pipeline.builtin_configs()
    assert {"demo", "navier_stokes", "super_resolution"} <= set(known)
    demo = yaml.safe_load(known["demo"].read_text())
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for name in ("demo", "demo.yaml"):
        cfg = pipeline.load_config(name)
        assert cfg["irno"]["K"] == demo["irno"]["K"] and cfg["run_dir"] == demo["run_dir"]
    (tmp_path / "demo").write_text("run_dir: mine\n")
    assert pipeline.load_config("demo")["run_dir"] == "mine"
    assert cli._parser().parse_args(["demo"]).config == "demo"
    assert cli._parser().parse_args(["generate"]).config is None


def test_overrides_parse_numbers_and_lists():
    cfg = pipeline.load_config(None, ["irno.train.lr=2e-3", "base.kwargs.n_modes=[8, 8]", "irno.K=3"])
    assert cfg["irno"]["train"]["lr"] == 2e-3 and cfg["irno"]["K"] == 3
    assert cfg["base"]["kwargs"]["n_modes"] == [8, 8]


def test_predict_replays_cuda_graphs_where_they_pay(monkeypatch):
    """predict replays an IRNO from CUDA graphs (graphs=True, or "auto" on CUDA from
    GRAPH_MIN_BATCHES full batches): the same predictions as eager, one capture per batch shape (here
    with a simulated graph on CPU); a failed capture under "auto" warns and runs eagerly, under True
    it raises; the argument is checked."""
    import irno
    from irno.graphed import GraphedIRNO

    torch.manual_seed(0)
    base = irno.FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    model = irno.IRNO(base, refiner=irno.UNetRefiner(3, 1, width=4, depth=2), K=2)
    raw = torch.randn(9, 2, 16, 16)
    want = irno.predict(model, raw, batch_size=2, graphs=False, progress=False)

    class SimGraph:  # a replay re-runs the captured function into the tensors the capture returned
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            for o, n in zip(self.out if isinstance(self.out, tuple) else [self.out],
                            (lambda r: r if isinstance(r, tuple) else [r])(self.fn())):
                if o is not n:
                    o.copy_(n)

    def capture(self, fn, device):
        out = fn()
        self.n_captures += 1
        made.append(self)
        return SimGraph(fn, out), out

    made = []
    monkeypatch.setattr(GraphedIRNO, "_use_graphs", staticmethod(lambda x: True))
    monkeypatch.setattr(GraphedIRNO, "_capture", capture)
    got = irno.predict(model, raw, batch_size=2, graphs=True, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(made) == 2 and made[0] is made[1] and made[0].n_captures == 2  # batches of 2, then the last 1
    made.clear()
    irno.predict(model, raw, batch_size=2, progress=False)  # "auto" on CPU: eager
    assert made == []

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not pipeline._predict_graphs("auto", model, cpu, 100)
    assert pipeline._predict_graphs("auto", model, cuda, pipeline.GRAPH_MIN_BATCHES)
    assert not pipeline._predict_graphs("auto", model, cuda, pipeline.GRAPH_MIN_BATCHES - 1)
    assert not pipeline._predict_graphs(True, base, cuda, 100)  # a base operator: no steps to replay

    def fail(self, fn, device):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(GraphedIRNO, "_capture", fail)
    with pytest.raises(RuntimeError, match="not permitted"):
        irno.predict(model, raw, batch_size=2, graphs=True, progress=False)
    monkeypatch.setattr(pipeline, "_predict_graphs", lambda graphs, *a: graphs in (True, "auto"))
    with pytest.warns(UserWarning, match="CUDA-graph capture failed .*not permitted.*running eagerly"):
        got = irno.predict(model, raw, batch_size=2, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="graphs: expected True, False or 'auto'"):
        irno.predict(model, raw, graphs="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_predict_with_graphs_equals_eager():
    import irno

    torch.manual_seed(0)
    base = irno.FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    model = irno.IRNO(base, refiner=irno.UNetRefiner(3, 1, width=4, depth=2), K=2).cuda()
    raw = torch.randn(9, 2, 32, 24)
    want = irno.predict(model, raw, batch_size=2, graphs=False, progress=False)
    got = irno.predict(model, raw, batch_size=2, graphs=True, progress=False)
    assert got.device.type == "cpu" and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_more_bad_values_are_one_line(tmp_path, capsys):
    """Settings of a wrong type or range, and ones that would train nothing, are refused by name with
    exit status 2 (they used to be tracebacks, or an exit 0 that named a checkpoint never written)."""
    for override, says in (
            ("base.train.epochs=0", "train.epochs: expected an int >= 1"),
            ("base.train.epochs=two", "train.epochs: expected an int >= 1"),
            ("base.train.epochs=2.5", "train.epochs: expected an int >= 1"),
            ("base.train.patience=0", "train.patience: expected an int >= 1"),
            ("base.train.max_steps=-5", "train.max_steps: expected an int >= 1"),
            ("base.train.time_budget_s=-1", "train.time_budget_s: expected a number of seconds > 0"),
            ("base.train.lr=0", "train.lr: expected a number > 0"),
            ("base.train.checkpoint_every=-1", "train.checkpoint_every: expected an int >= 0"),
            ("base.train.monitor=val_loss", "train.monitor: the pipeline chooses"),
            ("data=5", "override 'data': that is a section"),
            ("device=gpu", "device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
            ("threads=-1", "threads: expected an int >= 0"),
            ("seed=abc", "seed: expected an int >= 0"),
            ("irno.refiner.width=0", "width: expected an int >= 1"),
            ("data.task=super_resolution", "data.scale: expected an int >= 1"),
    ):
        extra = ("data.scale=0",) if override.startswith("data.task") else ()
        command = "train" if override.startswith("irno.") else "train-base"
        if command == "train":  # needs a base first
            assert cli.main(["train-base", *_args(tmp_path)]) == 0
            capsys.readouterr()
        assert cli.main([command, *_args(tmp_path, override, *extra)]) == 2, override
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (override, err)
    # the demo names a bad IRNO setting before it generates data or trains the base
    (tmp_path / "fresh").mkdir()
    assert cli.main(["demo", *_args(tmp_path / "fresh", "irno.refiner.width=0")]) == 2
    assert "width: expected an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / "data").exists() and not (tmp_path / "fresh" / "run" / "base").exists()
    if not torch.cuda.is_available():
        assert cli.main(["train-base", *_args(tmp_path, "device=cuda")]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    # a train.seed overrides the run's seed (it raised a TypeError: seed given twice)
    assert pipeline._train_config({"seed": 3, "epochs": 1}, 0).seed == 3
    # YAML reads an unquoted `off` as false: the refiner's autocast is off
    from irno.irno import pick_refiner_dtype

    assert pick_refiner_dtype("cpu", False) is None


def test_broken_configs_paths_and_damaged_files_are_one_line(tmp_path, capsys, monkeypatch):
    import os

    import numpy as np

    broken = tmp_path / "broken.yaml"
    broken.write_text("run_dir: [unclosed\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("irno:\n  train: {epoch: 50}\n")
    for cfg, says in ((broken, "is not valid YAML"), (listed, "must hold a mapping"),
                      (typo, "typo.yaml: no key 'epoch' under 'irno.train'")):
        assert cli.main(["generate", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    # a run folder that cannot be written: named before any training (here: a path under a file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["train-base", *_args(tmp_path), "--set", f"run_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "run_dir: cannot write to" in err and "Traceback" not in err
    # files written atomically get the permissions of a plain write (mkstemp's are private)
    assert cli.main(["train-base", *_args(tmp_path)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    weights = tmp_path / "run" / "base" / "best" / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~mask
    data_set = next(p for p in (tmp_path / "data").iterdir() if p.is_dir())
    assert data_set.stat().st_mode & 0o777 == 0o777 & ~mask
    # an IRNO trained on a base of other settings than the config's records the base's own: it loads
    assert cli.main(["train", *_args(tmp_path, "base.kwargs.hidden_channels=6")]) == 0
    capsys.readouterr()
    raw = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", raw)
    out = tmp_path / "y.npy"
    assert cli.main(["predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "x.npy"),
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", *_args(tmp_path, "evaluate.extra_steps=-1")]) == 2
    assert "evaluate.extra_steps: expected an int >= 0" in capsys.readouterr().err
    # resuming with changed model or loss settings says which (only training settings were named)
    with pytest.warns(UserWarning, match=r"model, loss or data settings changed .*irno\.alpha: 0\.12 -> 0\.3"):
        assert cli.main(["train", *_args(tmp_path, "base.kwargs.hidden_channels=6", "irno.alpha=0.3",
                                          "irno.train.epochs=2"), "--resume"]) == 0
    capsys.readouterr()
    # damaged inputs and checkpoints: one line each
    (tmp_path / "garbage.pt").write_bytes(b"not a tensor file")
    np.save(tmp_path / "c.npy", raw.astype(np.complex64))
    np.save(tmp_path / "be.npy", raw.astype(">f4"))
    for name, says in (("garbage.pt", "input: cannot read"), ("c.npy", "expected a real numeric array")):
        assert cli.main(["predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / name),
                         "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert cli.main(["predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "be.npy"),
                     "--out", str(out)]) == 0  # big-endian is read as its values
    capsys.readouterr()
    weights = tmp_path / "run" / "irno" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert cli.main(["predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "x.npy"),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "Traceback" not in err, err
    monkeypatch.setenv("IRNO_DEBUG", "1")  # predict's errors show their traceback too
    with pytest.raises(ValueError, match="is damaged"):
        cli.main(["predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "x.npy"), "--out", str(out)])
    monkeypatch.delenv("IRNO_DEBUG")

    # a second training process on the same run folder is refused by name (the lock of another one)
    import fcntl

    with open(tmp_path / "run" / ".irno.lock", "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)
        other.write("4242")
        other.flush()
        assert cli.main(["train-base", *_args(tmp_path)]) == 2
        assert "is in use by another irno process (pid 4242)" in capsys.readouterr().err
    assert cli.main(["generate", *_args(tmp_path)]) == 0  # commands that write no checkpoint take no lock
    capsys.readouterr()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_base", interrupted)
    assert cli.main(["train-base", *_args(tmp_path)]) == 130
    assert "interrupted (`--resume` continues" in capsys.readouterr().err


def test_well_splits_share_the_training_field_order(tmp_path):
    """Without data.fields, valid and test get train's channel order even when their files list
    the fields in another order (normalisation is matched by name, so a permutation went unseen)."""
    import numpy as np
    from irno.data import write_well_file

    coords = {"x": np.arange(8.0), "y": np.arange(8.0)}
    rng = np.random.default_rng(0)
    rho = (1 + 0.1 * rng.standard_normal((1, 4, 8, 8))).astype(np.float32)
    p = (100 + 10 * rng.standard_normal((1, 4, 8, 8))).astype(np.float32)
    for split, fields in (("train", {"density": rho, "pressure": p}), ("valid", {"pressure": p, "density": rho}),
                          ("test", {"pressure": p, "density": rho})):
        write_well_file(tmp_path / "data" / split / "a.hdf5", dataset_name="d", time=np.arange(4.0), coords=coords,
                        t0_fields=fields)
    cfg = pipeline.load_config(None, ["data.kind=well", f"data.root={tmp_path}", "data.n_steps_input=1"])
    data = pipeline.datasets(cfg, progress=False)
    for split in ("train", "valid", "test"):
        assert data[split].channel_names == ["density", "pressure"], split
        x, _ = data[split][0]
        torch.testing.assert_close(data[split].denormalize(x, 0)[0], torch.from_numpy(rho[0, 0]), rtol=1e-5, atol=1e-5)
