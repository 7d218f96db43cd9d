"""Reflection vs Γ-maximal coupling on the analytic mixture chain, same seeds.

Run: ``python -m specdiff.workbench.measure_couplings`` (CPU, one thread, about two minutes). Prints a markdown table.
"""

import torch

from specdiff import speculative_sample
from specdiff.testing import GaussianMixtureDDPM


def main() -> None:
    torch.set_num_threads(1)
    print("| dim | drafter | window | coupling | batch calls | calls per sample | accepted / proposed | steps per call "
          "| residual draws | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dim in (2, 64):
        chain = GaussianMixtureDDPM.random(dim=dim, components=4, num_steps=200, seed=1)
        shifted = GaussianMixtureDDPM(chain.means + 0.1, chain.scale, chain.weights, chain.num_steps)
        x = chain.sample_prior(256, torch.Generator().manual_seed(0)).float()
        for name, drafter in (("frozen", "frozen"), ("shifted 0.1", shifted.predict)):
            for window in (4, 16):
                for coupling in ("reflection", "maximal"):
                    s = speculative_sample(chain, x, window=window, drafter=drafter, coupling=coupling,
                                           generator=torch.Generator().manual_seed(1)).stats
                    per = sum(s.per_sample_target_calls) / len(s.per_sample_target_calls)
                    print(f"| {dim} | {name} | {window} | {coupling} | {s.target_calls} | {per:.2f} | {s.accepted} / "
                          f"{s.proposed} ({s.accepted / s.proposed:.3f}) | {chain.num_steps / per:.2f} | "
                          f"{s.residual_draws} | {s.wall_clock:.2f} |")


if __name__ == "__main__":
    main()
