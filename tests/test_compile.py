"""The target call with a ``torch.compile``d network (CPU).

The backend is ``aot_eager``: Dynamo traces the module and AOTAutograd functionalises its graph,
the layers that meet the sampler (guards, recompiles on the verify call's changing row counts,
``no_grad``, output buffers); the graph then runs torch's own kernels, so the samples must equal
the eager network's bit for bit. Inductor adds C++ code generation (correct here too: the same
samples, checked by hand) but takes minutes on a small shared CPU, too slow for the suite.
"""

import pytest
import torch

from specdiff import sample_baseline, speculative_sample
from specdiff.calibration import latency_key
from specdiff.testing import GaussianMixtureDDPM
from specdiff.window import AutoWindow


class Eps(torch.nn.Module):
    """A tiny time-conditioned network."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))
        with torch.no_grad():
            for p in self.body.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t):
        return self.body(torch.cat([x, t[:, None].to(x.dtype) / 100], 1))


class NetworkChain(GaussianMixtureDDPM):
    """The analytic mixture's DDPM whose prediction adds a network's output (the network is the target's cost)."""

    def __init__(self, net, num_steps=30):
        super().__init__(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), num_steps=num_steps)
        self.net = net

    def predict(self, x, step):
        return super().predict(x, step) + 0.1 * self.net(x, step.to(x.device))


@pytest.fixture(scope="module")
def networks():
    torch._dynamo.reset()
    eager = Eps()
    return eager, torch.compile(eager, backend="aot_eager")


def x_init(n=6):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


def gens(n=6):
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


def test_a_compiled_network_at_window_one_is_the_plain_loop_bit_for_bit(networks):
    _, compiled = networks
    chain = NetworkChain(compiled)
    out = speculative_sample(chain, x_init(), window=1, generator=gens())
    assert torch.equal(out.sample, sample_baseline(chain, x_init(), gens()))


def test_a_compiled_network_gives_the_eager_samples(networks):
    eager, compiled = networks
    spec = speculative_sample(NetworkChain(compiled), x_init(), window=8, generator=gens())
    reference = speculative_sample(NetworkChain(eager), x_init(), window=8, generator=gens())
    assert torch.equal(spec.sample, reference.sample)
    assert spec.stats.target_calls == reference.stats.target_calls < 30  # verify calls of changing row counts
    assert spec.stats.peak_rows > 6


def test_the_automatic_window_times_a_compiled_network_as_its_module(networks):
    eager, compiled = networks
    key, stable = latency_key(NetworkChain(compiled), x_init())
    assert stable and key.startswith(f"OptimizedModule:{sum(p.numel() for p in eager.parameters())}:")
    policy = AutoWindow(max_window=8, latency={b: 1e-3 * (1 + b / 16) for b in (6, 12, 54)}, outside=(1e-4, 1e-5))
    out = speculative_sample(NetworkChain(compiled), x_init(), window=policy, generator=gens())
    reference = speculative_sample(NetworkChain(eager), x_init(), window=AutoWindow(
        max_window=8, latency={b: 1e-3 * (1 + b / 16) for b in (6, 12, 54)}, outside=(1e-4, 1e-5)), generator=gens())
    assert torch.equal(out.sample, reference.sample) and out.stats.rounds < 30
