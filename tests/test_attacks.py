"""The PGD attack and robust evaluation on small models."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchor_kernels import pgd as P
from anchor_kernels.attacks import PGD, PRESETS, evaluate, pgd20, pgd20_trades


def cpu_backends():
    out = []
    for name in ("eager", "triton", "cpu"):
        reasons = P.available_backends(torch.zeros(1))[name]
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        out.append(pytest.param(name, marks=marks))
    return out


class SmallNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> embedding (16) -> logits (4); ``embed`` gives the
    embedding, ``forward`` the logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8 * 4 * 4, 16)
        self.head = nn.Linear(16, 4)
        self.seen_training = []

    def embed(self, x):
        self.seen_training.append(self.training)
        h = F.relu(self.bn(self.conv(x)))
        return self.proj(F.avg_pool2d(h, 2).flatten(1))

    def forward(self, x):
        return self.head(F.relu(self.embed(x)))


def synthetic(n, generator):
    """4 classes of 3x8x8 images in [0, 1], told apart by a class pattern plus noise."""
    y = torch.randint(0, 4, (n,), generator=generator)
    patterns = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    x = 0.6 * patterns[y] + 0.4 * torch.rand(n, 3, 8, 8, generator=generator)
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    """A SmallNet trained to high clean accuracy on the synthetic task (under a second on an idle core)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        x, y = synthetic(64, gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x, y = synthetic(128, gen)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9
    model.zero_grad(set_to_none=True)
    return model, x, y


def assert_in_box_ball(x_adv, x, eps):
    """|x_adv - x| <= eps per sample (up to the rounding of x +- eps: a float32 ulp, or half
    a bfloat16 ulp of the stored result) and x_adv in [0, 1]."""
    tol = 1e-6 if x.dtype == torch.float32 else 2.0 ** -8
    e = eps.view(-1, *([1] * (x.dim() - 1))) if isinstance(eps, torch.Tensor) else eps
    assert ((x_adv.float() - x.float()).abs() <= e + tol).all()
    assert (x_adv >= 0).all() and (x_adv <= 1).all()


def eager_pgd(model, x, y, eps, alpha, steps):
    """The textbook loop (Madry et al.; torchattacks' PGD without random start)."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.clamp(torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps), 0, 1)
    return x_adv


@pytest.mark.parametrize("backend", cpu_backends())
def test_equals_eager_loop_step_for_step(trained, backend):
    model, x, y = trained
    x, y = x[:32], y[:32]
    for steps in range(4):
        ours = PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=False, backend=backend)(x, y)
        assert torch.equal(ours, eager_pgd(model, x, y, 8 / 255, 2 / 255, steps)), f"step {steps}"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("random_start", [False, True])
def test_in_ball_and_box(trained, backend, random_start):
    model, x, y = trained
    eps = torch.linspace(0, 0.1, x.shape[0])
    x_adv = PGD(model, eps=eps, alpha=0.02, steps=3, random_start=random_start, backend=backend)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    e = eps.view(-1, 1, 1, 1)
    assert ((x_adv >= x - e) & (x_adv <= x + e)).all()  # the kernel's own float32 bounds
    assert_in_box_ball(x_adv, x, eps)


def test_l2_in_ball(trained):
    model, x, y = trained
    x_adv = PGD(model, eps=0.5, alpha=0.1, steps=3, norm="l2")(x, y)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert (x_adv >= 0).all() and (x_adv <= 1).all()


@pytest.mark.parametrize("attack", ["pgd20_trades", "pgd20"])
def test_raises_loss_of_trained_model(trained, attack):
    model, x, y = trained
    x_adv = PRESETS[attack](model, eps=0.1, alpha=0.02, steps=10)(x, y)
    with torch.no_grad():
        clean_loss, adv_loss = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
        adv_acc = (model(x_adv).argmax(1) == y).float().mean()
    assert adv_loss > clean_loss + 1.0 and adv_acc < 0.5, (clean_loss, adv_loss, adv_acc)


def test_parameter_grads_and_modes_untouched(trained):
    model, x, y = trained
    model.train()
    model.bn.eval()  # a module in its own mode must get it back
    marker = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = marker.clone()
    running = model.bn.running_mean.clone()
    model.seen_training.clear()
    PGD(model, steps=2)(x[:8], y[:8])
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert torch.equal(model.head.weight.grad, marker)
    assert model.training and not model.bn.training and model.conv.training
    assert model.seen_training and not any(model.seen_training), "the attack must run in eval mode"
    assert torch.equal(model.bn.running_mean, running), "eval mode: BN statistics untouched"
    model.seen_training.clear()
    PGD(model, steps=1, eval_mode=None)(x[:8], y[:8])
    assert all(model.seen_training)
    model.eval()
    model.head.weight.grad = None


def test_modes_restored_on_error(trained):
    model, x, y = trained
    model.train()

    def bad_loss(out, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        PGD(model, steps=1, loss=bad_loss)(x[:4], y[:4])
    assert model.training
    model.eval()


def test_parameters_frozen_while_attacking_and_restored(trained):
    """No weight gradient is computed during the attack: requires_grad is off for the
    parameters that had it, and each flag comes back, also when the attack raises."""
    model, x, y = trained
    model.conv.weight.requires_grad_(False)  # a frozen parameter stays frozen
    seen = []

    def loss(out, y):
        seen.append([p.requires_grad for p in model.parameters()])
        return F.cross_entropy(out, y, reduction="sum")

    def bad_loss(out, y):
        raise RuntimeError("boom")

    try:
        PGD(model, steps=2, loss=loss)(x[:4], y[:4])
        assert seen and not any(any(flags) for flags in seen)
        expected = {n: n != "conv.weight" for n, _ in model.named_parameters()}
        assert {n: p.requires_grad for n, p in model.named_parameters()} == expected
        with pytest.raises(RuntimeError, match="boom"):
            PGD(model, steps=1, loss=bad_loss)(x[:4], y[:4])
        assert {n: p.requires_grad for n, p in model.named_parameters()} == expected
    finally:
        model.conv.weight.requires_grad_(True)


def test_check_inputs_off_skips_the_synchronising_checks(trained, monkeypatch):
    """check_inputs=False: neither the value check of x nor the label check runs (each
    needs a device synchronisation); the default runs them once per call."""
    from anchor_kernels import attacks

    model, x, y = trained
    calls = []
    monkeypatch.setattr(attacks.PGD, "_check_inputs", lambda self, *a: calls.append("x"))
    monkeypatch.setattr(attacks, "_check_class_labels", lambda *a: calls.append("y"))
    PGD(model, steps=3)(x[:4], y[:4])
    assert calls == ["x", "y"]
    calls.clear()
    PGD(model, steps=3, check_inputs=False)(x[:4], y[:4])
    assert calls == []
    with pytest.raises(TypeError, match="check_inputs must be a bool"):
        PGD(model, check_inputs=1)


def test_random_start_kernel_is_not_specialised_on_the_seed():
    """A fresh seed must not compile a new variant (Triton specialises ints equal to 1 or
    divisible by 16), and a seed that varies can be captured in a CUDA graph."""
    import os
    import subprocess
    import sys

    code = ("from anchor_kernels.ops import pgd_triton as P\n"
            "print(sorted(p.name for p in P._pgd_random_start_linf_kernel.params "
            "if p.do_not_specialize))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the jit kernel
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['seed_hi', 'seed_lo']"


@pytest.mark.parametrize("positives", ["label", "instance"])
def test_supcon_objective_runs_the_fused_loss(trained, positives, monkeypatch):
    """loss="supcon" goes through supcon_loss with the backend asked for: the Triton kernel
    (interpreted on CPU) is called, and the attack moves the embeddings away from the clean ones."""
    model, x, y = trained
    if P.available_backends(torch.zeros(1))["triton"]:
        pytest.skip("Triton cannot run on CPU tensors here")
    from anchor_kernels.ops import supcon_triton

    calls = []
    real = supcon_triton.BACKEND.loss
    monkeypatch.setattr(supcon_triton.BACKEND, "loss", lambda p, *a: calls.append(p) or real(p, *a))
    x, y = x[:16], y[:16]
    attack = PGD(model, eps=0.1, alpha=0.02, steps=3, loss="supcon", embed=model.embed,
                 positives=positives, loss_backend="triton", supcon_kwargs={"temperature": 0.5})
    x_adv = attack(x, y if positives == "label" else None)
    assert len(calls) == 3, "one fused loss call per step"
    assert calls[0].f.shape == (32, 16)
    with torch.no_grad():
        cos_adv = F.cosine_similarity(model.embed(x_adv), model.embed(x)).mean()
    assert cos_adv < 0.99
    assert_in_box_ball(x_adv, x, 0.1)


def test_supcon_objective_eager_matches_triton(trained):
    model, x, y = trained
    if P.available_backends(torch.zeros(1))["triton"]:
        pytest.skip("Triton cannot run on CPU tensors here")
    x, y = x[:16], y[:16]
    runs = [PGD(model, steps=2, random_start=False, loss="supcon", embed=model.embed,
                loss_backend=b)(x, y) for b in ("eager", "triton")]
    # the float32 losses differ in the last bits; sign() of the gradient agrees almost everywhere
    assert (runs[0] != runs[1]).float().mean() < 0.01


def test_callable_loss_and_embed(trained):
    model, x, y = trained
    seen = []

    def margin(logits, labels):  # the CW margin: maximising it pushes the true class down
        seen.append(logits.shape)
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(labels, 4).bool(), -1e4).amax(1)
        return (other - true).sum()

    x_adv = PGD(model, eps=0.1, alpha=0.02, steps=5, loss=margin)(x, y)
    assert seen == [(x.shape[0], 4)] * 5
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < 0.5


def test_bf16_autocast(trained):
    model, x, y = trained
    x_adv = PGD(model, eps=0.05, alpha=0.01, steps=2, autocast_dtype=torch.bfloat16)(x, y)
    assert x_adv.dtype == torch.float32
    assert_in_box_ball(x_adv, x, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv2 = PGD(model, eps=0.05, alpha=0.01, steps=2, random_start=False)(x, y)
    assert x_adv2.dtype == torch.float32
    assert_in_box_ball(x_adv2, x, 0.05)
    assert not torch.equal(x_adv2, x)
    # bfloat16 inputs end to end
    xb = x.to(torch.bfloat16)
    model_b = SmallNet().to(torch.bfloat16)
    x_adv3 = PGD(model_b, eps=0.05, alpha=0.01, steps=2)(xb, y)
    assert x_adv3.dtype == torch.bfloat16
    assert_in_box_ball(x_adv3, xb, 0.05)


def test_random_start_reproducible(trained):
    model, x, y = trained
    a = PGD(model, steps=1, generator=torch.Generator().manual_seed(5))(x, y)
    b = PGD(model, steps=1, generator=torch.Generator().manual_seed(5))(x, y)
    c = PGD(model, steps=0)(x, y)
    assert torch.equal(a, b) and not torch.equal(c, x)
    assert torch.equal(PGD(model, steps=0, random_start=False)(x, y), x)


def test_bad_input(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        PGD(model, eps=-0.1)
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        PGD(model, alpha=0.0)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        PGD(model, steps=-1)
    with pytest.raises(TypeError, match="steps must be an int"):
        PGD(model, steps=2.5)
    with pytest.raises(ValueError, match="loss must be one of"):
        PGD(model, loss="kl")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        PGD(lambda t: t)
    attack = PGD(model, steps=1)
    with pytest.raises(ValueError, match=r"x must lie in \[lo, hi\]"):
        attack(x + 1.0, y)
    with pytest.raises(ValueError, match=r"x must lie in \[lo, hi\]"):
        attack(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match=r"y must have shape \(128,\)"):
        attack(x, y[:5])
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        attack(x, y.float())
    with pytest.raises(ValueError, match="eps must be finite and >= 0 for every sample"):
        PGD(model, eps=-torch.ones(x.shape[0]))(x, y)
    with pytest.raises(ValueError, match=r"eps as a tensor must have shape \(128,\)"):
        PGD(model, eps=torch.ones(3))(x, y)
    assert PGD(model)(x[:0], y[:0]).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="the loss must be a scalar"):
        PGD(model, steps=1, loss=lambda out, t: out)(x, y)


def test_evaluate(trained):
    model, x, y = trained
    data = [(x[i:i + 48], y[i:i + 48]) for i in range(0, 128, 48)]
    attack = pgd20_trades(model, eps=0.1, alpha=0.03, steps=3)
    model.train()
    result = evaluate(model, data, {"pgd3": attack}, progress=False)
    assert model.training
    model.eval()
    json.dumps(result)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).sum().item()
        robust = sum((model(attack(xb, yb)).argmax(1) == yb).sum().item() for xb, yb in data)
    assert result["n"] == 128
    assert result["clean_acc"] == clean / 128
    assert result["robust_acc"] == {"pgd3": robust / 128}
    assert result["attacks"]["pgd3"]["eps"] == 0.1 and result["attacks"]["pgd3"]["steps"] == 3
    assert result["robust_acc"]["pgd3"] < result["clean_acc"]
    limited = evaluate(model, data, [pgd20(model, steps=1), attack], max_samples=50, progress=True)
    assert limited["n"] == 50 and set(limited["robust_acc"]) == {"pgd20", "pgd20_trades"}
    with pytest.raises(ValueError, match="two attacks are named"):
        evaluate(model, data, [attack, attack])


def deterministic_gpu_problem(monkeypatch, n: int):
    """A SmallNet on the GPU in eval mode and n synthetic images, with deterministic cuDNN:
    the same gradients in every run, so that only what a test varies differs."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    model = SmallNet().cuda().eval()
    x, y = synthetic(n, torch.Generator().manual_seed(1))
    return model, x.cuda(), y.cuda()


@pytest.mark.gpu
def test_attack_gpu_fused_equals_eager(monkeypatch):
    model, x, y = deterministic_gpu_problem(monkeypatch, 512)
    runs = {b: PGD(model, steps=5, random_start=True, backend=b,
                   generator=torch.Generator().manual_seed(3))(x, y) for b in ("triton", "cuda", "eager")}
    assert torch.equal(runs["triton"], runs["eager"]) and torch.equal(runs["cuda"], runs["eager"])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x_adv = PGD(model, steps=3, loss="supcon", embed=model.embed, loss_backend="triton")(x, y)
    assert_in_box_ball(x_adv, x, 8 / 255)


_DDP_SCRIPT = """
import datetime, os, sys
import torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
from anchor_kernels.attacks import PGD
from tests.test_attacks import SmallNet, synthetic
# A collective that waits past the timeout raises instead of hanging the run.
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
x, y = synthetic(16, torch.Generator().manual_seed(0))
ddp = nn.parallel.DistributedDataParallel(SmallNet())
attack = PGD(ddp, eps=0.05, alpha=0.01, steps=2)
assert attack.model is ddp.module
for _ in range(2):
    x_adv = attack(x, y)
    F.cross_entropy(ddp(x_adv), y).backward()
assert all(p.grad is not None for p in ddp.parameters())
print("ok", flush=True)
# No teardown: gloo's can deadlock. The process group's destructor joins its worker thread
# while holding the GIL, and that thread may still need the GIL to free its last work's
# Python state.
os._exit(0)
"""


def test_ddp_model_is_attacked_through_its_module(tmp_path):
    """A DDP-wrapped model is attacked through its module, so the attack's forwards do not
    go through DDP's reducer (which expects a backward with parameter gradients), and
    training steps with the wrapped model still work after it. In a process of its own: a
    process group cannot leak into the other tests, nor its teardown hang the run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _DDP_SCRIPT, str(tmp_path / "pg")],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok"], proc.stderr[-3000:]
