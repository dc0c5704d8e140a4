"""A VAE written without vaefast, trained by its own loop, then analysed: the README's quickstart, runnable.

The encoder names its layers as most PyTorch VAEs do (``body``, ``fc_mu``, ``fc_var``) and returns ``(mu, logvar)``;
the decoder returns the likelihood's mean in [0, 1]. vaefast needs nothing else from them (``vaefast.as_vae``).

    python examples/your_own_vae.py            # train for a few seconds on the embedded 8x8 digits, then analyse
"""

from __future__ import annotations

import torch
from torch import nn

import vaefast
from vaefast.data import load


class Encoder(nn.Module):
    """x ``[B, 1, 8, 8]`` -> ``(mu, logvar)``, each ``[B, 8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU())
        self.fc_mu, self.fc_var = nn.Linear(128, 8), nn.Linear(128, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.fc_mu(h), self.fc_var(h)


def build_and_train(steps: int = 1500, seed: int = 0, std: float = 0.2) -> tuple[nn.Module, nn.Module]:
    """An encoder and a decoder trained on the digits' training split by the negative ELBO of a Gaussian likelihood.

    Args:
        steps: Adam steps of batch 128 (1,500: about 5 s on one CPU core).
        seed: seeds the initialisation and the batches.
        std: the likelihood's standard deviation.

    Returns:
        ``(encoder, decoder)``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = Encoder()
        decoder = nn.Sequential(
            nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8))
        )
    data = load("digits").x
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    for _ in range(steps):
        x = data[torch.randint(len(data), (128,), generator=gen)]
        mu, logvar = encoder(x)
        z = mu + torch.randn(mu.shape, generator=gen) * torch.exp(0.5 * logvar)
        rec = ((decoder(z) - x) ** 2).sum((1, 2, 3)) / (2 * std**2)
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        opt.zero_grad()
        (rec + kl).mean().backward()
        opt.step()
    return encoder.eval(), decoder.eval()


def main(steps: int = 1500) -> tuple:
    """Train, then print the estimate, the bound, the margin and the certificate of four test digits.

    Args:
        steps: training steps (:func:`build_and_train`).

    Returns:
        ``(estimate, bound, margin, certificate)``.
    """
    my_encoder, my_decoder = build_and_train(steps)
    x = load("digits", split="test").x[:4]
    model = vaefast.as_vae(my_encoder, my_decoder, likelihood="gaussian", decoder_output="mean")
    r = vaefast.auto_radii(model, x)[-1]
    est = vaefast.estimate_r_robustness(model, x, radii=[r], seed=0)
    bound = vaefast.margin_bound(model, x, r, estimate=est)
    margin = vaefast.numerical_margin(model, x, r, estimate=est)
    cert = vaefast.certify(model, x, r, estimate=est)
    print(est, bound, margin, cert, sep="\n\n")
    return est, bound, margin, cert


if __name__ == "__main__":
    main()
