"""The short-run optimiser (train/optim.py): the schedule-free sign step against a plain reference,
its parameter groups (biases fixed, thresholds slower, unit decoder rows), the averaged weights."""

from __future__ import annotations

import copy

import pytest
import torch

from gemmascope.sae import SAEConfig, build_sae
from gemmascope.train.optim import ScheduleFreeSign, averaged, fixed_biases, make_optimizer


def test_schedule_free_sign_equals_the_written_rule() -> None:
    torch.manual_seed(0)
    target = torch.randn(5)
    p = torch.nn.Parameter(torch.randn(5))
    opt = ScheduleFreeSign([{"params": [p]}], lr=0.1, momentum=0.9)
    z, x = p.detach().clone(), p.detach().clone()  # the reference's two points
    lrs = [0.05, 0.1, 0.1, 0.02]  # a warm-up, then a drop: the average weighs steps by max-lr²
    weight_sum, lr_max = 0.0, 0.0
    for lr in lrs:
        y = p.detach().clone()
        loss = (p - target).pow(3).abs().sum()
        opt.zero_grad()
        loss.backward()
        grad = torch.sign(3 * (y - target).pow(2) * torch.sign(y - target))
        opt.param_groups[0]["lr"] = lr
        opt.step()
        lr_max = max(lr_max, lr)
        weight_sum += lr_max**2
        z = z - lr * grad
        x = x + (lr_max**2 / weight_sum) * (z - x)
        assert torch.allclose(p.detach(), 0.1 * z + 0.9 * x, atol=1e-6)
    with averaged(opt):
        assert torch.allclose(p.detach(), x, atol=1e-6)
    assert torch.allclose(p.detach(), 0.1 * z + 0.9 * x, atol=1e-6), "leaving averaged() restores y"


def test_the_average_converges_where_sign_steps_oscillate() -> None:
    p = torch.nn.Parameter(torch.tensor([3.0]))
    opt = ScheduleFreeSign([{"params": [p]}], lr=0.5, momentum=0.9)
    for _ in range(400):
        opt.zero_grad()
        (p - 0.2).pow(2).sum().backward()
        opt.step()
    with averaged(opt):
        averaged_error = abs(float(p.detach()) - 0.2)
    assert averaged_error < 0.1  # plain sign steps of 0.5 never get closer than 0.1..0.25 of 0.2


def test_a_groups_scale_sizes_each_columns_step() -> None:
    """The first step of z: lr times the sign times the column's scale (a CLT's decoders step in
    each output dimension by that dimension's spread)."""
    p = torch.nn.Parameter(torch.zeros(3, 4))
    scale = torch.tensor([1.0, 0.5, 0.0, 2.0])
    opt = ScheduleFreeSign([{"params": [p], "scale": scale}], lr=0.1, momentum=0.0)
    p.grad = -torch.ones(3, 4)
    opt.step()
    assert torch.allclose(p.detach(), 0.1 * scale.expand(3, 4))  # with β = 0, y is z
    saved = opt.state_dict()
    del saved["param_groups"][0]["scale"]  # a checkpoint written before groups had a scale
    opt.load_state_dict(saved)
    opt.step()  # resumes with plain steps
    assert torch.allclose(p.detach(), 0.1 * scale.expand(3, 4) + 0.1)


def test_no_step_while_the_average_is_in_place() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = ScheduleFreeSign([{"params": [p]}], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    opt.swap_in_average()
    with pytest.raises(RuntimeError, match="averaged"):
        opt.step()


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk", "relu"])
def test_groups_fix_the_biases_slow_the_thresholds_and_keep_decoder_rows_unit(arch: str) -> None:
    sae = build_sae(SAEConfig(arch, 8, 16, k=4 if arch in ("topk", "batchtopk") else None))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(16, 8), dim=-1))
        sae.b_dec.fill_(0.5)
    opt = make_optimizer(sae, "signum", 1e-2, 1e-3, (0.9, 0.999), 1e-8)
    trained = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert (id(sae.b_enc) in trained) == (arch == "relu") == (not fixed_biases(sae))
    assert (id(sae.b_dec) in trained) == (arch == "relu")
    if arch == "jumprelu":
        group = trained[id(sae.threshold)]  # type: ignore[arg-type]
        assert group["lr"] == pytest.approx(1e-3) and group["lr_scale"] == pytest.approx(0.1)
    x = torch.randn(32, 8)
    for _ in range(3):
        opt.zero_grad()
        (sae.decode(torch.relu(sae.pre_acts(x - sae.b_dec))) - x).pow(2).sum().backward()
        opt.step()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(16), atol=1e-5)
    with averaged(opt):
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(16), atol=1e-5)
    if arch != "relu":
        assert torch.equal(sae.b_dec, torch.full((8,), 0.5)) and torch.equal(sae.b_enc, torch.zeros(16))


def test_adam_is_the_published_optimiser_over_every_parameter() -> None:
    sae = build_sae(SAEConfig("jumprelu", 8, 16))
    opt = make_optimizer(sae, "adam", 2e-3, 2e-4, (0.0, 0.999), 1e-8)
    assert isinstance(opt, torch.optim.Adam)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(sae.parameters()))


def test_state_dict_round_trip_keeps_both_points() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = ScheduleFreeSign([{"params": [p]}], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        p.sum().backward()
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    other = ScheduleFreeSign([{"params": [q]}], lr=0.1)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint read from disk
    for o, param in ((opt, p), (other, q)):
        o.zero_grad()
        param.pow(2).sum().backward()
        o.step()
    assert torch.equal(p, q)


def test_a_floor_holds_at_every_point_so_the_average_keeps_it_too() -> None:
    theta = torch.nn.Parameter(torch.full((3,), 0.01))
    opt = ScheduleFreeSign([{"params": [theta], "floor": 1e-6}], lr=0.01)
    for _ in range(20):  # a gradient that pushes the thresholds below zero every step
        theta.grad = torch.ones(3)
        opt.step()
    state, floor = opt.state[theta], float(torch.tensor(1e-6))  # the floor as float32 holds it
    assert min(float(state["z"].min()), float(state["x"].min()), float(theta.detach().min())) >= floor
    with averaged(opt):
        assert float(theta.detach().min()) >= floor


def test_the_sign_step_is_the_same_whatever_the_parameters_layout() -> None:
    """A contiguous parameter, its latent-major transpose and a strided view (every other column of
    a wider tensor, which a flat scratch buffer cannot take) step to the same values."""
    from gemmascope.train.optim import _dense

    start, grad = torch.randn(6, 10), torch.randn(6, 10)
    params = [
        start.clone(),
        start.t().contiguous().t(),
        torch.zeros(6, 20)[:, ::2].copy_(start),  # a view of a leaf's storage, with gaps
    ]
    assert [_dense(p) for p in params] == [True, True, False]
    results = []
    for p in params:
        p.requires_grad_(True)
        p.grad = grad.clone()
        optimizer = ScheduleFreeSign([{"params": [p]}], lr=0.1)
        optimizer.step()
        optimizer.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch.testing.assert_close(results[2], results[0], rtol=0, atol=0)
