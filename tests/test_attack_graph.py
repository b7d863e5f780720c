"""``PGD(cuda_graph=True)``: the steps captured once per shape and replayed.

On the CPU the capture is emulated (the captured function runs again on each replay), which
checks everything around the graph: the static inputs each call copies in, the keys, the
output copied out, the checks a replay still runs. The GPU tests capture for real."""

import pytest
import torch

from anchor_kernels import attack_graph
from anchor_kernels.attacks import PGD

from .test_attacks import SmallNet, assert_in_box_ball, deterministic_gpu_problem, trained  # noqa: F401


class EmulatedGraphs:
    """Stands in for ``warm_up`` and ``capture`` on the CPU, counting both."""

    def __init__(self, monkeypatch):
        self.captures = self.replays = 0
        monkeypatch.setattr(attack_graph, "warm_up", lambda fn, device: fn())
        monkeypatch.setattr(attack_graph, "capture", self.capture)

    def capture(self, fn):
        self.captures += 1
        out = fn()

        def replay():
            self.replays += 1
            out.copy_(fn())
        return replay, out


def attacks(model, **options):
    """The same attack with and without capture, each with its own generator of one seed."""
    return [PGD(model, steps=3, cuda_graph=graph, generator=torch.Generator().manual_seed(5),
                **options) for graph in (False, True)]


@pytest.mark.parametrize("options", [dict(), dict(eps="per-sample"), dict(random_start=False),
                                     dict(loss="supcon", positives="label", loss_backend="eager")],
                         ids=["ce", "per-sample-eps", "no-random-start", "supcon"])
def test_replays_equal_the_eager_attack(trained, monkeypatch, options):  # noqa: F811
    model, x, y = trained
    graphs = EmulatedGraphs(monkeypatch)
    options = dict(options)
    if options.get("eps") == "per-sample":
        options["eps"] = torch.linspace(2 / 255, 8 / 255, 16)
    if options.get("loss") == "supcon":
        options["embed"] = model.embed
    eager, graphed = attacks(model, **options)
    for batch in range(3):  # a fresh batch, start and (per-sample) budget copied in each call
        xb, yb = x[16 * batch:16 * (batch + 1)], y[16 * batch:16 * (batch + 1)]
        if isinstance(options.get("eps"), torch.Tensor):
            eager.eps = graphed.eps = options["eps"].flip(0) if batch == 1 else options["eps"]
        assert torch.equal(graphed(xb, yb), eager(xb, yb)), f"batch {batch}"
    assert (graphs.captures, graphs.replays) == (1, 2)


def test_normalised_inputs_replay_without_host_copies(trained, monkeypatch):  # noqa: F811
    """With set_normalization_used the captured steps read the statistics' device copies
    made once, outside the capture (a CUDA graph cannot capture a host-to-device copy)."""
    model, x, y = trained
    graphs = EmulatedGraphs(monkeypatch)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    eager, graphed = attacks(model)
    for attack in (eager, graphed):
        attack.set_normalization_used(mean, std)
    xn = (x[:16] - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for _ in range(2):
        assert torch.equal(graphed(xn, y[:16]), eager(xn, y[:16]))
    assert graphs.replays == 1 and list(graphed._stats_on) == [(x.device, x.dtype)]


def test_new_shapes_and_new_parameters_capture_anew(trained, monkeypatch):  # noqa: F811
    model, x, y = trained
    graphs = EmulatedGraphs(monkeypatch)
    net = SmallNet()
    net.load_state_dict(model.state_dict())
    net.eval()
    eager, graphed = attacks(net)
    graphed(x[:8], y[:8])
    graphed(x[:12], y[:12])  # another batch size
    assert graphs.captures == 2
    with torch.no_grad():  # an optimiser's in-place update: the same graph, new weights
        for p in net.parameters():
            p.mul_(0.9)
    eager(x[:8], y[:8]), eager(x[:12], y[:12])  # keep the two generators in step
    assert torch.equal(graphed(x[:8], y[:8]), eager(x[:8], y[:8]))
    assert graphs.captures == 2
    net.head.weight = torch.nn.Parameter(net.head.weight.detach().clone())  # a new tensor
    graphed(x[:8], y[:8])
    assert graphs.captures == 3


def test_at_most_max_graphs_are_kept(trained, monkeypatch):  # noqa: F811
    model, x, y = trained
    EmulatedGraphs(monkeypatch)
    monkeypatch.setattr(attack_graph, "MAX_GRAPHS", 2)
    attack = PGD(model, steps=1, cuda_graph=True)
    for n in (4, 5, 6):
        attack(x[:n], y[:n])
    assert [key[0][0] for key in attack._graphs.entries] == [5, 6]


def test_a_replay_still_checks_its_inputs(trained, monkeypatch):  # noqa: F811
    """The first call checks labels from its logits; a replay checks them before replaying,
    with the class count seen then, and x's range as the eager attack does."""
    model, x, y = trained
    graphs = EmulatedGraphs(monkeypatch)
    attack = PGD(model, steps=2, cuda_graph=True)
    attack(x[:8], y[:8])
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 4\)"):
        attack(x[:8], torch.full((8,), 4))
    with pytest.raises(ValueError, match="x must lie in"):
        attack(x[:8] + 2.0, y[:8])
    assert graphs.replays == 0


def test_needs_cuda_inputs_and_a_bool(trained):  # noqa: F811
    model, x, y = trained
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA inputs; x is on cpu"):
        PGD(model, steps=1, cuda_graph=True)(x[:4], y[:4])
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        PGD(model, cuda_graph=1)
    # zero steps: nothing to capture, the start is the result
    assert PGD(model, steps=0, random_start=False, cuda_graph=True)(x[:4], y[:4]).equal(x[:4])


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["ce", "supcon"])
def test_gpu_captured_attack_equals_eager(monkeypatch, loss):
    model, x, y = deterministic_gpu_problem(monkeypatch, 256)
    options = dict(loss="supcon", embed=model.embed, loss_backend="triton") if loss == "supcon" else {}
    eager, graphed = attacks(model, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for call in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours, ref = graphed(x, y), eager(x, y)
        assert torch.equal(ours, ref), f"call {call}"
        assert_in_box_ball(ours, x, 8 / 255)
        # an optimiser step between calls: the replay reads the updated weights
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(graphed._graphs.entries) == 1
