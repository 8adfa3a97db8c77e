"""irno.IRNO: the frozen base, the refinement recurrence, fused vs plain update, transfer,
super-resolution conditioning, gradient checkpointing, and a neuraloperator base."""

import irno
import pytest
import torch
import torch.nn.functional as F
from irno import FNO, IRNO, WDSR, FNORefiner, UNetRefiner
from irno.irno import resample
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _base():
    torch.manual_seed(0)
    return FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)


def _model(**kw):
    base = _base()
    if "refiner" not in kw:
        kw["refiner"] = UNetRefiner(3, 1, depth=2, width=4)
    return IRNO(base, **kw)


def _bump(refiner, scale=0.5):
    """Make the refiner's output O(1) so that steps differ visibly (it starts near 0 by design)."""
    with torch.no_grad():
        refiner.out_conv.weight.mul_(1 / 0.1 * scale)
        refiner.out_conv.bias.fill_(0.05)


def test_defaults_and_default_refiner():
    m = IRNO(_base())
    assert (m.alpha, m.K, m.freeze_base) == (0.2, 6, True)
    assert isinstance(m.refiner, UNetRefiner)
    assert (m.refiner.in_channels, m.refiner.out_channels, m.refiner.depth, m.refiner.width) == (3, 1, 4, 16)
    assert m.uses_fused_update
    m2 = IRNO(_base(), refiner_kwargs={"padding": "zero", "depth": 2})
    assert m2.refiner.padding == "zero" and m2.refiner.depth == 2
    with pytest.raises(ValueError, match="in_channels"):
        IRNO(nn.Identity())
    assert isinstance(IRNO(nn.Identity(), in_channels=1, out_channels=1).refiner, UNetRefiner)


def test_base_is_frozen_and_stays_in_eval():
    m = _model()
    assert not any(p.requires_grad for p in m.base.parameters())
    assert all(p.requires_grad for p in m.refiner.parameters())
    assert set(map(id, m.refiner_parameters())) == set(map(id, m.refiner.parameters()))
    m.train()
    assert m.training and m.refiner.training and not m.base.training
    assert not any(mod.training for mod in m.base.modules())
    h = m(torch.randn(2, 2, 16, 16), steps=2)
    assert h.requires_grad  # through the refiner
    h0 = m.base_forward(torch.randn(2, 2, 16, 16))
    assert not h0.requires_grad


def test_steps_zero_is_the_base_exactly():
    m = _model()
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        ref = m.base(x)
    torch.testing.assert_close(m(x, steps=0), ref, rtol=0, atol=0)
    traj = m(x, steps=0, return_trajectory=True)
    assert len(traj) == 1 and torch.equal(traj[0], ref)


def test_recurrence_and_trajectory():
    m = _model(alpha=0.3, K=3)
    _bump(m.refiner)
    x = torch.randn(2, 2, 12, 20)
    traj = m(x, return_trajectory=True)
    assert len(traj) == 4
    h = m.base(x)
    for k in range(3):
        h = h + 0.3 * m.refiner(torch.cat([x, h], dim=1))
        torch.testing.assert_close(traj[k + 1], h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(x), traj[-1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(traj[1], traj[0])
    torch.testing.assert_close(m(x, steps=5), m(x, steps=5, return_trajectory=True)[-1])


def test_fused_and_plain_updates_agree():
    fused = _model(K=3)
    _bump(fused.refiner)
    plain = _model(K=3, fused=False)
    plain.refiner.load_state_dict(fused.refiner.state_dict())
    assert fused.uses_fused_update and not plain.uses_fused_update
    x = torch.randn(2, 2, 16, 16)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    fused(x).square().sum().backward()
    plain(x).square().sum().backward()
    for a, b in zip(fused.refiner.parameters(), plain.refiner.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * b.grad.abs().max().item())


def test_any_module_refiner_uses_residual_update():
    torch.manual_seed(0)
    refiner = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 1, 3, padding=1))
    m = IRNO(_base(), refiner, K=2)
    assert not m.uses_fused_update
    x = torch.randn(1, 2, 8, 8)
    h0 = m.base(x)
    h1 = h0 + 0.2 * refiner(torch.cat([x, h0], 1))
    h2 = h1 + 0.2 * refiner(torch.cat([x, h1], 1))
    torch.testing.assert_close(m(x), h2, rtol=1e-5, atol=1e-6)


def test_inference_in_place_path_matches_autograd_path():
    m = _model(K=4)
    _bump(m.refiner)
    m.eval()
    x = torch.randn(2, 2, 16, 16)
    with_grad = m(x)
    with torch.no_grad():
        no_grad = m(x)
    with torch.inference_mode():
        inf = m(x)
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inf, no_grad)
    # refine() must not write into the caller's h0
    h0 = torch.randn(2, 1, 16, 16)
    keep = h0.clone()
    with torch.no_grad():
        m.refine(x, h0, steps=3)
    assert torch.equal(h0, keep)


def test_refine_any_initial_estimate_transfer():
    m = _model(K=2)
    _bump(m.refiner)
    x = torch.randn(2, 2, 16, 16)
    torch.testing.assert_close(m.refine(x, m.base(x)), m(x))
    other = FNO(n_modes=(3, 3), in_channels=2, out_channels=1, hidden_channels=4, n_layers=1)
    with torch.no_grad():
        h0 = other(x)
    traj = m.refine(x, h0, steps=2, return_trajectory=True)
    assert traj[0] is h0 and len(traj) == 3
    with pytest.raises(ValueError, match="steps"):
        m.refine(x, h0, steps=-1)


def test_super_resolution_base_and_resampled_input():
    torch.manual_seed(0)
    base = WDSR(in_channels=1, out_channels=1, scale=4, n_features=4, n_resblocks=1)
    m = IRNO(base, K=2, refiner_kwargs={"depth": 2, "width": 4})
    assert m.refiner.in_channels == 2
    x = torch.randn(2, 1, 6, 5)
    y = m(x)
    assert y.shape == (2, 1, 24, 20)
    xr = m.condition(x, y)
    torch.testing.assert_close(xr, F.interpolate(x, size=(24, 20), mode="bicubic", align_corners=False))
    m_bilinear = IRNO(base, m.refiner, K=2, resample_mode="bilinear")
    assert not torch.allclose(m_bilinear.condition(x, y), xr)
    assert resample(x, (6, 5)) is x
    nearest = x.repeat_interleave(2, -2).repeat_interleave(2, -1)
    torch.testing.assert_close(resample(x, (12, 10), mode="nearest"), nearest)
    torch.testing.assert_close(resample(x, (3, 3), mode=lambda t, s: t[..., : s[0], : s[1]]), x[..., :3, :3])


def _periodic_field(H, W, kmax, seed=0, dtype=torch.float64):
    """A real periodic field on an H x W grid made of the Fourier modes |ky|, kx <= kmax (the same
    function whatever the grid, for one seed)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(H, dtype=dtype)[:, None] / H
    j = torch.arange(W, dtype=dtype)[None, :] / W
    f = torch.zeros(H, W, dtype=dtype)
    for ky in range(-kmax, kmax + 1):
        for kx in range(kmax + 1):
            a, b = torch.randn(2, generator=g, dtype=dtype)
            phase = 2 * torch.pi * (ky * i + kx * j)
            f = f + a * torch.cos(phase) + b * torch.sin(phase)
    return f


@pytest.mark.parametrize("src, dst", [((9, 10), (27, 40)), ((16, 16), (64, 48)), ((12, 15), (7, 9)),
                                      ((33, 20), (11, 13)), ((8, 8), (8, 24))])
def test_fourier_resample_is_exact_on_band_limited_periodic_fields(src, dst):
    """Up and down, odd and even sizes: a field of modes |k| < min(n, n') / 2 is resampled exactly,
    where bicubic interpolation (clamped at the edges) is not."""
    k = (min(*src, *dst) - 1) // 2
    x = torch.stack([_periodic_field(*src, k, seed) for seed in (0, 1)])[:, None]  # (2, 1, H, W)
    want = torch.stack([_periodic_field(*dst, k, seed) for seed in (0, 1)])[:, None]
    got = resample(x, dst, "fourier")
    assert got.shape == (2, 1, *dst) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    if dst[0] > src[0]:
        assert (resample(x, dst, "bicubic") - want).abs().max() > 1e-3
    x32 = x.float()
    assert resample(x32, dst, "fourier").dtype == torch.float32
    assert resample(x.bfloat16(), dst, "fourier").dtype == torch.bfloat16


def test_resample_mode_is_checked_where_it_is_given():
    base = WDSR(in_channels=1, out_channels=1, scale=2, n_features=4, n_resblocks=1)
    with pytest.raises(ValueError, match=r"^resample_mode: expected one of .*'fourier'.* got 'bicubc'"):
        IRNO(base, K=1, refiner_kwargs={"depth": 1, "width": 4}, resample_mode="bicubc")
    with pytest.raises(ValueError, match="resample_mode"):
        resample(torch.zeros(1, 1, 4, 4), (8, 8), "cubic")
    m = IRNO(base, K=1, refiner_kwargs={"depth": 1, "width": 4}, resample_mode="fourier")
    x = torch.randn(2, 1, 6, 5)
    torch.testing.assert_close(m.condition(x, m(x)), resample(x, (12, 10), "fourier"))


def _saved_numel(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@pytest.mark.parametrize("fused", [True, False])
def test_checkpointing_same_gradients_flat_memory(fused):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 16, 16)
    y = torch.randn(2, 1, 16, 16)
    grads, saved = {}, {}
    for ckpt in (False, True):
        m = _model(K=4, checkpoint=ckpt, fused=fused)
        _bump(m.refiner)
        m.train()
        out, saved[ckpt, 4] = _saved_numel(lambda m=m: m(x))
        F.mse_loss(out, y).backward()
        grads[ckpt] = [p.grad.clone() for p in m.refiner.parameters()]
        _, saved[ckpt, 8] = _saved_numel(lambda m=m: m(x, steps=8))
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    h_numel = y.numel() + x.numel()
    # without checkpointing each step stores the U-Net's activations; with it, about h and x per step
    per_step_plain = (saved[False, 8] - saved[False, 4]) / 4
    per_step_ckpt = (saved[True, 8] - saved[True, 4]) / 4
    assert per_step_ckpt <= 2 * h_numel < per_step_plain / 5


def test_unfrozen_base_trains():
    m = _model(freeze_base=False, K=1)
    m.train()
    assert m.base.training
    m(torch.randn(1, 2, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in m.base.parameters())


def test_fno_refiner_fused():
    torch.manual_seed(0)
    r = FNORefiner(3, 1, n_modes=3, hidden_channels=4, n_layers=1)
    m = IRNO(_base(), r, K=2)
    assert m.uses_fused_update
    x = torch.randn(1, 2, 8, 8)
    plain = IRNO(m.base, r, K=2, fused=False)
    torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-6)


def test_public_names():
    for name in irno.__all__:
        assert hasattr(irno, name), name
    assert "IRNO" in repr(IRNO) and "fused=True" in _model().extra_repr()


def test_neuraloperator_fno_as_base():
    neuralop = pytest.importorskip("neuralop")
    torch.manual_seed(0)
    base = neuralop.models.FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    m = IRNO(base, K=2, refiner_kwargs={"depth": 2, "width": 4})
    assert m.refiner.in_channels == 3
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        ref = base(x)
    torch.testing.assert_close(m(x, steps=0), ref)
    out = m(x)
    assert out.shape == (2, 1, 16, 16)
    out.sum().backward()
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.grad is not None for p in m.refiner.parameters())


def test_tfno_base_reuses_its_cached_weight_during_training():
    torch.manual_seed(0)
    base = irno.TFNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    m = IRNO(base, UNetRefiner(3, 1, depth=2, width=4), K=2)
    m.train()
    x = torch.randn(1, 2, 8, 8)
    m(x).sum().backward()
    m(x).sum().backward()
    assert [c.n_reconstructions for c in base.convs] == [1, 1]  # frozen base: rebuilt once, then cached


# ---------------------------------------------------------------------------------------------
# the refiner under autocast (refiner_dtype) and pick_refiner_dtype
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_refiner_dtype_bf16_keeps_base_and_iterate_in_fp32(fused):
    torch.manual_seed(0)
    base = FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    ref = IRNO(base, UNetRefiner(3, 1, depth=2, width=8, out_gain=1.0), K=3, fused=fused)
    amp = IRNO(base, UNetRefiner(3, 1, depth=2, width=8, out_gain=1.0), K=3, fused=fused,
               refiner_dtype=torch.bfloat16)
    amp.refiner.load_state_dict(ref.refiner.state_dict())
    x = torch.randn(2, 2, 16, 12)
    traj_ref = ref(x, return_trajectory=True)
    traj = amp(x, return_trajectory=True)
    assert torch.equal(traj[0], traj_ref[0])  # h_0 is the base's fp32 answer, untouched by autocast
    assert all(h.dtype == torch.float32 for h in traj)
    for a, b in zip(traj[1:], traj_ref[1:]):
        assert not torch.equal(a, b)  # the refiner did run in bf16 ...
        torch.testing.assert_close(a, b, rtol=0, atol=0.05 * b.abs().max().item())  # ... close to fp32
    loss = traj[-1].square().mean() + amp.phi(x, traj[-1]).square().mean()
    loss.backward()
    grads = [p.grad for p in amp.refiner.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert amp.phi(x, traj[0]).dtype == torch.float32
    with torch.no_grad():  # the in-place inference path under autocast
        torch.testing.assert_close(amp(x), traj[-1].detach(), rtol=1e-5, atol=1e-6)
    assert "refiner_dtype=torch.bfloat16" in repr(amp)


@pytest.mark.parametrize("fused", [True, False])
def test_channels_last_refiner_input_changes_nothing_but_layout(fused):
    torch.manual_seed(0)
    base = FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    ref = IRNO(base, UNetRefiner(3, 1, depth=2, width=8, out_gain=1.0), K=3, fused=fused)
    cl = IRNO(base, UNetRefiner(3, 1, depth=2, width=8, out_gain=1.0), K=3, fused=fused, channels_last=True)
    cl.refiner.load_state_dict(ref.refiner.state_dict())
    x = torch.randn(2, 2, 16, 12)
    torch.testing.assert_close(cl(x), ref(x), rtol=1e-5, atol=1e-6)
    ref(x).square().mean().backward()
    cl(x).square().mean().backward()
    for a, b in zip(cl.refiner.parameters(), ref.refiner.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(cl(x), ref(x), rtol=1e-5, atol=1e-6)  # in-place inference path
    assert "channels_last=True" in repr(cl)


def test_contraction_estimate_runs_a_bf16_refiner_in_fp32():
    """Forward-mode AD (the contraction estimate's JVPs) bypasses the refiner's autocast."""
    from irno.analysis import contraction_factor

    torch.manual_seed(0)
    base = FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=8, n_layers=2)
    ref = IRNO(base, UNetRefiner(3, 1, depth=2, width=8, out_gain=1.0), K=3)
    amp = IRNO(base, UNetRefiner(3, 1, depth=2, width=8, out_gain=1.0), K=3, refiner_dtype=torch.bfloat16)
    amp.refiner.load_state_dict(ref.refiner.state_dict())
    x, h = torch.randn(2, 2, 16, 12), torch.randn(2, 1, 16, 12)
    for kind in ("norm", "radius"):
        q_ref = contraction_factor(ref, x, h, n_iter=5, kind=kind, method="forward")
        q_amp = contraction_factor(amp, x, h, n_iter=5, kind=kind, method="forward")
        torch.testing.assert_close(q_amp, q_ref, rtol=1e-2, atol=0)  # norm: its vjp half runs in bf16


def test_pick_refiner_dtype_and_bad_values():
    from irno import pick_refiner_dtype

    assert pick_refiner_dtype("cpu", "bf16") is torch.bfloat16
    assert pick_refiner_dtype("cpu", "fp16") is torch.float16
    assert pick_refiner_dtype("cpu", "off") is None and pick_refiner_dtype("cpu", None) is None
    assert pick_refiner_dtype("cpu", torch.bfloat16) is torch.bfloat16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert pick_refiner_dtype("cpu", "auto") is (torch.bfloat16 if amx else None)
    with pytest.raises(ValueError, match="refiner_dtype"):
        pick_refiner_dtype("cpu", "int8")
    with pytest.raises(ValueError, match="refiner_dtype"):
        IRNO(nn.Identity(), nn.Identity(), refiner_dtype=torch.float64)


def test_unet_positional_channels_are_periodic_and_checked():
    from irno.models.unet import periodic_coordinates

    torch.manual_seed(0)
    u = UNetRefiner(3, 1, depth=2, width=8, positional=True)
    assert u.down[0].net[0].in_channels == 3 + 4
    x = torch.randn(2, 3, 12, 20)
    assert u(x).shape == (2, 1, 12, 20)
    c = periodic_coordinates(x)
    assert c.shape == (2, 4, 12, 20)
    torch.testing.assert_close(c[0, 0, :, 0], torch.sin(2 * torch.pi * torch.arange(12) / 12))
    torch.testing.assert_close(c[0, 3, 0, :], torch.cos(2 * torch.pi * torch.arange(20) / 20))
    # a periodic shift of the input does not commute with the net any more (it sees where it is),
    # while without positional channels a periodic U-Net is shift-equivariant
    plain = UNetRefiner(3, 1, depth=2, width=8, out_gain=1.0)
    shift = (4, 8)  # multiples of 2^depth keep the pooling grid aligned
    torch.testing.assert_close(plain(x.roll(shift, (2, 3))), plain(x).roll(shift, (2, 3)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="x: expected"):
        u(torch.randn(2, 5, 12, 20))


def test_bad_inputs_name_the_argument():
    """Errors the base or the refiner would give obscurely (or not at all) name the argument."""
    base = FNO(n_modes=(4, 4), in_channels=2, out_channels=1, hidden_channels=4, n_layers=1)
    m = IRNO(base, K=2, refiner_kwargs={"width": 2, "depth": 1})
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"x: expected 2 channels along dim 1 .*got shape \(1, 3, 8, 8\)"):
        m(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor \(B, Cx, h, w\), got shape \(2, 8, 8\)"):
        m(torch.randn(2, 8, 8))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor, got torch.int64"):
        m(torch.ones(1, 2, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="steps: expected an int >= 0, got 1.5"):
        m(x, steps=1.5)
    with pytest.raises(ValueError, match="steps: expected an int >= 0, got -1"):
        m(x, steps=-1)
    assert m(x, steps=2.0).shape == m(x, steps=torch.tensor(2)).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"h0: expected 1 channels along dim 1 .*output channels"):
        m.refine(x, torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"h0: expected the batch size of x \(1\)"):
        m.refine(x, torch.randn(3, 1, 8, 8))
    for alpha in (float("nan"), 0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="alpha: expected a finite step size > 0"):
            IRNO(base, alpha=alpha)
    with pytest.raises(TypeError, match="K: expected an int >= 0"):
        IRNO(base, K=2.5)
    # channels are inferred from a custom refiner when the base does not say them
    plain = nn.Conv2d(2, 1, 1)
    custom = IRNO(plain, refiner=UNetRefiner(3, 1, depth=1, width=2), K=1)
    with pytest.raises(ValueError, match="x: expected 2 channels"):
        custom(torch.randn(1, 4, 8, 8))


@pytest.mark.skipif(not __import__("irno_kernels").available("periodic_pad2d", "triton", "cpu"),
                    reason="needs triton with TRITON_INTERPRET=1")
def test_every_triton_kernel_together_is_the_reference(monkeypatch):
    """The GPU's kernel path end to end, through triton's interpreter (IRNO_BACKEND=triton: the FNO's
    spectral layers, the fused U-Net blocks, pads, concatenations and upsampling, the fused update,
    the spectral loss): the IRNO objective and every trainable gradient equal the reference's in
    float64, and so does inference (its in-place update)."""
    from irno import IRNOLoss

    torch.manual_seed(0)
    base = FNO(n_modes=(4, 4), in_channels=3, out_channels=2, hidden_channels=8, n_layers=2)
    model = IRNO(base, refiner=UNetRefiner(5, 2, width=4, depth=2, out_gain=1.0), alpha=0.3, K=2).double()
    x, y = torch.randn(2, 3, 16, 24, dtype=torch.float64), torch.randn(2, 2, 16, 24, dtype=torch.float64)
    loss_fn = IRNOLoss(K=2, beta_s=1.0, beta_fp=0.1)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        loss, _ = loss_fn(model.train(), x, y, 1.0)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            return loss, grads, model.eval()(x, steps=3)

    monkeypatch.setenv("IRNO_BACKEND", "reference")
    want = run()
    monkeypatch.setenv("IRNO_BACKEND", "triton")
    got = run()
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12 * e.abs().max().item())
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)
