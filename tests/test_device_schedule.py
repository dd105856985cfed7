"""DeviceOneCycle, the schedule a CUDA-graph training step runs on the device, against OneCycleLR step
by step (run here on the CPU: the same tensor ops)."""

import pytest
import torch

from training.device_schedule import DeviceOneCycle

CASES = {
    "the project's run (cos)": dict(pct_start=0.25, anneal="cos", div_factor=25.0, final_div_factor=1e4),
    "linear": dict(pct_start=0.3, anneal="linear", div_factor=10.0, final_div_factor=100.0),
    "three phase": dict(pct_start=0.2, anneal="cos", div_factor=25.0, final_div_factor=1e4, three_phase=True),
    "odd pct": dict(pct_start=0.2083, anneal="linear", div_factor=7.0, final_div_factor=3e3, three_phase=True),
}


def adam():
    return torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=1e-3)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("total_steps", [1, 7, 240])
def test_lr_and_beta1_follow_one_cycle_lr_step_by_step(case, total_steps):
    kw = dict(CASES[case])
    max_lr = float(torch.empty(()).uniform_(1e-3, 1e-1))
    ref_opt, dev_opt = adam(), adam()
    ref = torch.optim.lr_scheduler.OneCycleLR(
        ref_opt, max_lr=max_lr, total_steps=total_steps, anneal_strategy=kw.pop("anneal"), **kw
    )
    dev = DeviceOneCycle(dev_opt, max_lr=max_lr, total_steps=total_steps, anneal=CASES[case]["anneal"], **kw)
    for step in range(total_steps):
        ref_lr, ref_beta1 = ref_opt.param_groups[0]["lr"], ref_opt.param_groups[0]["betas"][0]
        lr, beta1 = dev_opt.param_groups[0]["lr"], dev_opt.param_groups[0]["betas"][0]
        assert isinstance(lr, torch.Tensor) and isinstance(beta1, torch.Tensor)
        assert lr.item() == pytest.approx(ref_lr, rel=1e-12, abs=0), f"lr at step {step}"
        assert beta1.item() == pytest.approx(ref_beta1, rel=1e-12, abs=0), f"beta1 at step {step}"
        ref_opt.step()
        dev_opt.step()
        ref.step()
        dev.step()


def test_constant_schedule_holds_max_lr_and_leaves_beta1():
    opt = adam()
    dev = DeviceOneCycle(opt, max_lr=0.02, total_steps=5, constant=True)
    for _ in range(5):
        assert opt.param_groups[0]["lr"].item() == 0.02 and opt.param_groups[0]["betas"][0] == 0.9
        dev.step()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_adam_with_the_device_schedule_matches_adam_with_one_cycle_lr(device):
    """Adam reading its lr and beta1 from the schedule's tensors takes the same steps as Adam with
    OneCycleLR, so the graph path trains as the eager one does (capturable, as a captured step has it,
    on a GPU; capturable Adam runs only there)."""
    torch.manual_seed(0)
    w0 = torch.randn(20, device=device)
    grads = [torch.randn(20, device=device) for _ in range(30)]
    ref_w, dev_w = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ref_opt = torch.optim.Adam([ref_w], lr=1e-3)
    dev_opt = torch.optim.Adam([dev_w], lr=1e-3, capturable=device == "cuda", foreach=False)  # as train.py's
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.05, total_steps=len(grads))
    dev = DeviceOneCycle(dev_opt, max_lr=0.05, total_steps=len(grads))
    for g in grads:
        ref_w.grad, dev_w.grad = g.clone(), g.clone()
        ref_opt.step(), dev_opt.step()
        ref.step(), dev.step()
        torch.testing.assert_close(dev_w.detach(), ref_w.detach(), rtol=1e-6, atol=1e-7)


def test_state_dict_resumes_at_the_same_step():
    opt_a, opt_b = adam(), adam()
    a = DeviceOneCycle(opt_a, max_lr=0.05, total_steps=50)
    for _ in range(17):
        a.step()
    b = DeviceOneCycle(opt_b, max_lr=0.05, total_steps=50)
    b.load_state_dict(a.state_dict())
    assert opt_b.param_groups[0]["lr"].item() == opt_a.param_groups[0]["lr"].item()
    assert opt_b.param_groups[0]["betas"][0].item() == opt_a.param_groups[0]["betas"][0].item()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="total_steps must be at least 1"):
        DeviceOneCycle(adam(), max_lr=0.1, total_steps=0)
    with pytest.raises(ValueError, match="anneal must be 'cos' or 'linear'"):
        DeviceOneCycle(adam(), max_lr=0.1, total_steps=3, anneal="exp")
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=0.1)
    with pytest.raises(ValueError, match="needs an optimiser with betas"):
        DeviceOneCycle(sgd, max_lr=0.1, total_steps=3)
