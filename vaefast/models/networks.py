"""Encoder and decoder networks: MLP (any input shape) and stride-2 convolutional (C x H x W images).

Encoders map ``x[B, *input_shape]`` to ``(mu[B, d], raw_logvar[B, d])``; decoders map ``z[N, d]`` to the
likelihood's natural output ``[N, *input_shape]`` (logits for Bernoulli-type likelihoods, the mean for
Gaussians). The MLP encoder's ``mean_module()`` is an ``nn.Sequential(Flatten, Linear, act, ..., Linear)``
built from the encoder's own modules, so it shares their parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaefast.models.config import VAEConfig
from vaefast.models.lipschitz import GroupSort, Scale, orthonormal_linear
from vaefast.reference import activation_module


def _dense_stack(sizes: list[int], config: VAEConfig, constrained: bool) -> list[nn.Module]:
    """The hidden layers of a network: an activation after every linear layer.

    Args:
        sizes: ``[s0, s1, ...]``, the widths from input to the last hidden layer.
        config: ``activation`` (and its parameter) of ordinary layers.
        constrained: orthonormal layers and GroupSort (each pair 1-Lipschitz) instead of ``Linear`` and ``act``.

    Returns:
        ``[Linear(s0, s1), act, Linear(s1, s2), act, ...]``.
    """
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        if constrained:
            layers += [orthonormal_linear(a, b), GroupSort(2)]
        else:
            layers += [nn.Linear(a, b), activation_module(config.activation, config.activation_param)]
    return layers


def _head(fan_in: int, fan_out: int, lipschitz: float | None) -> nn.Module:
    """The last linear layer of a network.

    Args:
        fan_in, fan_out: the sizes.
        lipschitz: the network's constant :meth:`VAEConfig.lipschitz_of`, or None.

    Returns:
        ``Linear``, or with ``lipschitz = L`` ``Scale(L) o W`` with ``W`` orthonormal (after a constrained stack the
        whole network is then L-Lipschitz).
    """
    if lipschitz is None:
        return nn.Linear(fan_in, fan_out)
    return nn.Sequential(orthonormal_linear(fan_in, fan_out), Scale(lipschitz))


def _encoder_constrained(config: VAEConfig) -> bool:
    """Whether the encoder trunk (shared by the two heads) is orthonormal + GroupSort: when either head has a
    Lipschitz constant."""
    return config.lipschitz_of("mu") is not None or config.lipschitz_of("logvar") is not None


class _GaussianEncoder(nn.Module):
    """A feature ``trunk`` and two linear heads: ``mu = W_mu h + b``, ``raw_logvar = W_s h + c``."""

    trunk: nn.Sequential
    mu: nn.Linear
    logvar: nn.Linear

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two heads on the trunk's features ``h``.

        Args:
            x: ``[B, *input_shape]``.

        Returns:
            ``(mu [B, d], raw_logvar [B, d])``.
        """
        h = self.trunk(x)
        return self.mu(h), self.logvar(h)

    def mean_module(self) -> nn.Sequential:
        """``x -> mu`` as ``nn.Sequential(*trunk, mu)`` sharing this encoder's parameters.

        Returns:
            For an MLP encoder ``Flatten, Linear, act, ..., Linear``, which the fused Jacobian kernel recognises.
        """
        return nn.Sequential(*self.trunk, self.mu)


class MLPEncoder(_GaussianEncoder):
    """``h = act(W_L ... act(W_1 flatten(x)))``; ``mu = W_mu h + b``, ``raw_logvar = W_s h + c``.

    Args:
        config: ``input_shape``, ``hidden`` widths, ``activation`` (and its parameter) and ``latent_dim``.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        sizes = [config.input_size, *config.hidden]
        self.trunk = nn.Sequential(nn.Flatten(), *_dense_stack(sizes, config, _encoder_constrained(config)))
        self.mu = _head(sizes[-1], config.latent_dim, config.lipschitz_of("mu"))
        self.logvar = _head(sizes[-1], config.latent_dim, config.lipschitz_of("logvar"))


class MLPDecoder(nn.Module):
    """``out = W_out act(... act(W_1 z)) + b``, reshaped to ``input_shape`` (the encoder's widths reversed).

    Args:
        config: ``input_shape``, ``hidden`` widths, ``activation`` (and its parameter) and ``latent_dim``.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        sizes = [config.latent_dim, *reversed(config.hidden)]
        lipschitz = config.lipschitz_of("decoder")
        self.net = nn.Sequential(
            *_dense_stack(sizes, config, lipschitz is not None), _head(sizes[-1], config.input_size, lipschitz)
        )
        self.output_shape = tuple(config.input_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The natural output of the likelihood.

        Args:
            z: ``[N, d]``.

        Returns:
            ``[N, *input_shape]``.
        """
        return self.net(z).reshape(z.shape[0], *self.output_shape)


class ConvEncoder(_GaussianEncoder):
    """Stride-2 ``4x4`` convolutions (each halving H and W), flatten, dense ``hidden`` layers, mu/logvar heads.

    Args:
        config: ``input_shape = (C, H, W)``, ``conv_channels``, ``hidden``, ``activation`` and ``latent_dim``.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = config.resolved_conv_channels()
        c, h, w = config.input_shape
        layers: list[nn.Module] = []
        for cin, cout in zip((c, *channels[:-1]), channels, strict=True):
            layers += [
                nn.Conv2d(cin, cout, 4, stride=2, padding=1),
                activation_module(config.activation, config.activation_param),
            ]
        factor = 2 ** len(channels)
        flat = channels[-1] * (h // factor) * (w // factor)
        sizes = [flat, *config.hidden]
        self.trunk = nn.Sequential(*layers, nn.Flatten(), *_dense_stack(sizes, config, constrained=False))
        self.mu = nn.Linear(sizes[-1], config.latent_dim)
        self.logvar = nn.Linear(sizes[-1], config.latent_dim)


class ConvDecoder(nn.Module):
    """Dense layers up to ``C_last x H/2^L x W/2^L``, then stride-2 ``4x4`` transposed convolutions.

    Args:
        config: ``input_shape = (C, H, W)``, ``conv_channels``, ``hidden``, ``activation`` and ``latent_dim``.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = config.resolved_conv_channels()
        c, h, w = config.input_shape
        factor = 2 ** len(channels)
        self.base_shape = (channels[-1], h // factor, w // factor)
        sizes = [config.latent_dim, *reversed(config.hidden), math.prod(self.base_shape)]
        self.dense = nn.Sequential(*_dense_stack(sizes, config, constrained=False))
        layers: list[nn.Module] = []
        rev = list(reversed(channels))
        for i, (cin, cout) in enumerate(zip(rev, [*rev[1:], c], strict=True)):
            layers.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            if i < len(rev) - 1:
                layers.append(activation_module(config.activation, config.activation_param))
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The natural output of the likelihood.

        Args:
            z: ``[N, d]``.

        Returns:
            ``[N, C, H, W]``.
        """
        return self.deconv(self.dense(z).reshape(z.shape[0], *self.base_shape))


def build_networks(config: VAEConfig) -> tuple[nn.Module, nn.Module]:
    """The networks described by ``config``.

    Args:
        config: ``architecture="mlp"`` or ``"conv"`` and the sizes.

    Returns:
        ``(encoder, decoder)``: ``x -> (mu, raw_logvar)`` and ``z -> natural output``.
    """
    if config.architecture == "mlp":
        return MLPEncoder(config), MLPDecoder(config)
    return ConvEncoder(config), ConvDecoder(config)
