"""``VAEConfig``: everything needed to rebuild a :class:`~vaefast.models.VAE`, with a JSON round trip."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vaefast.reference import MLP_ACTIVATIONS

ARCHITECTURES = ("mlp", "conv")
ACTIVATIONS = tuple(MLP_ACTIVATIONS)  # the activations of csrc/common/activations.h
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned", "continuous_bernoulli")
OBJECTIVES = ("elbo", "beta_vae", "beta_tcvae")
LEARNED_VARIANCE = ("pixel", "scalar")
LIPSCHITZ_NETWORKS = ("mu", "logvar", "decoder")  # the keys of a per-network ``lipschitz`` dict


def default_conv_channels(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Channels of the stride-2 conv stack for the supported image sizes (28x28, 32x32, 64x64, or any even size).

    Each layer halves the spatial size; the stack stops once the feature map is at most 7x7 or odd (at most four
    layers of widths 32, 64, 64, 128).

    Args:
        input_shape: ``(C, H, W)``.

    Returns:
        The channels per layer (empty when ``H`` or ``W`` is odd or at most 7).
    """
    _, h, w = input_shape
    widths = (32, 64, 64, 128)
    channels: list[int] = []
    while h % 2 == 0 and w % 2 == 0 and min(h, w) > 7 and len(channels) < len(widths):
        channels.append(widths[len(channels)])
        h, w = h // 2, w // 2
    return tuple(channels)


@dataclass
class VAEConfig:
    """Architecture, likelihood and training objective of a VAE.

    - ``architecture="mlp"``: ``Flatten -> [Linear, act] * len(hidden) -> Linear`` heads for mu and logvar;
      the decoder mirrors it. Works for any ``input_shape``.
    - ``architecture="conv"``: stride-2 ``4x4`` convolutions (``conv_channels``, default chosen from the image
      size), then the ``hidden`` dense layers; ``input_shape`` must be ``(C, H, W)`` with H, W divisible by
      ``2**len(conv_channels)``. Covers 28x28x1, 32x32x3 and 64x64x1.
    - likelihood: ``bernoulli`` (decoder outputs logits, mean = sigmoid), ``gaussian`` (fixed std
      ``gaussian_std``), ``gaussian_learned`` (learned log-variance, per pixel or one scalar), or
      ``continuous_bernoulli`` (Loaiza-Ganem & Cunningham 2019; mean is the CB mean, not lambda).
    - objective: ``elbo``; ``beta_vae`` (``recon - beta * KL``); ``beta_tcvae`` (Chen et al. 2018:
      ``recon - mi_weight * MI - tc_weight * TC - dimkl_weight * dimwise-KL``, minibatch-weighted sampling).
    - ``logvar_bound``: encoder log-variances are soft-clamped as ``b * tanh(raw / b)`` (identity near 0,
      smooth, keeps sigma in ``[exp(-b/2), exp(b/2)]`` so no NaN/overflow; ``0`` disables).
    - ``lipschitz``: Lipschitz-constrained networks (MLP only; hidden widths must be even) for
      :func:`vaefast.certify`. A number ``L > 0`` makes every network (the encoder's mean, its log-variance head,
      the decoder) L-Lipschitz: orthonormal linear layers (:func:`vaefast.models.lipschitz.orthonormal_linear`)
      with GroupSort activations and a final scale ``L``. A dict with keys among ``"mu"``, ``"logvar"``,
      ``"decoder"`` chooses a constant per network (a missing key or None: an ordinary network), e.g.
      ``{"mu": 4, "logvar": 4}`` constrains the encoder only (all ``certify`` needs) and keeps an ordinary decoder.
      The encoder trunk (shared by mu and logvar) is orthonormal + GroupSort when either head is constrained; an
      unconstrained head on it is an ordinary ``Linear``. None: ordinary layers everywhere. Read it through
      :meth:`lipschitz_of`.
    """

    input_shape: tuple[int, ...] = (1, 8, 8)
    architecture: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    activation_param: float | None = None
    latent_dim: int = 8
    likelihood: str = "bernoulli"
    gaussian_std: float = 0.1
    learned_variance: str = "pixel"
    objective: str = "elbo"
    beta: float = 1.0
    mi_weight: float = 1.0
    tc_weight: float = 1.0
    dimkl_weight: float = 1.0
    conv_channels: tuple[int, ...] | None = None
    logvar_bound: float = 10.0
    lipschitz: float | dict[str, float | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_shape = _int_tuple("input_shape", self.input_shape, allow_empty=False)
        self.hidden = _int_tuple("hidden", self.hidden, allow_empty=True)
        if self.conv_channels is not None:
            self.conv_channels = _int_tuple("conv_channels", self.conv_channels, allow_empty=False)
        self.validate()

    # --- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the offending field."""
        _choice("architecture", self.architecture, ARCHITECTURES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("likelihood", self.likelihood, LIKELIHOODS)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("learned_variance", self.learned_variance, LEARNED_VARIANCE)
        if isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int):
            raise TypeError(f"latent_dim must be an int, got {type(self.latent_dim).__name__}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        for name in ("gaussian_std", "beta", "mi_weight", "tc_weight", "dimkl_weight", "logvar_bound"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            positive = name == "gaussian_std"
            if value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
            setattr(self, name, float(value))
        if self.activation_param is not None:
            if not isinstance(self.activation_param, (int, float)) or not math.isfinite(self.activation_param):
                raise ValueError(f"activation_param must be a finite number or None, got {self.activation_param!r}")
            self.activation_param = float(self.activation_param)
        if self.architecture == "conv":
            if len(self.input_shape) != 3:
                raise ValueError(f"input_shape must be (C, H, W) for architecture='conv', got {self.input_shape}")
            channels = self.resolved_conv_channels()
            if not channels:
                raise ValueError(f"input_shape {self.input_shape} is too small or odd for a conv encoder; use 'mlp'")
            factor = 2 ** len(channels)
            _, h, w = self.input_shape
            if h % factor or w % factor:
                raise ValueError(
                    f"input_shape {self.input_shape}: H and W must be divisible by 2**len(conv_channels) = {factor}"
                )
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")
        self._validate_lipschitz()

    def _validate_lipschitz(self) -> None:
        """``lipschitz``: None, a finite ``L > 0``, or a dict ``{network: L or None}`` over
        :data:`LIPSCHITZ_NETWORKS`; any constrained network needs an MLP whose hidden widths are even (GroupSort
        pairs)."""
        value = self.lipschitz
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(LIPSCHITZ_NETWORKS), key=str)
            if unknown:
                raise ValueError(f"lipschitz: unknown network(s) {unknown}; known: {list(LIPSCHITZ_NETWORKS)}")
            self.lipschitz = {
                key: None if value[key] is None else _positive(f"lipschitz[{key!r}]", value[key])
                for key in LIPSCHITZ_NETWORKS
                if key in value
            }
        elif value is not None:
            self.lipschitz = _positive("lipschitz", value, "None, a finite number > 0 or a dict {network: L}")
        if all(self.lipschitz_of(key) is None for key in LIPSCHITZ_NETWORKS):
            return
        if self.architecture != "mlp":
            raise ValueError("lipschitz requires architecture='mlp' (no Lipschitz-constrained convolutions yet)")
        if any(h % 2 for h in self.hidden):
            raise ValueError(f"lipschitz: hidden widths must be even (GroupSort pairs), got {self.hidden}")

    def lipschitz_of(self, network: str) -> float | None:
        """The Lipschitz constant asked for one network.

        Args:
            network: ``"mu"`` (the encoder's mean), ``"logvar"`` (its log-variance head) or ``"decoder"``.

        Returns:
            ``L`` (the network is built L-Lipschitz), or None (an ordinary network).
        """
        if network not in LIPSCHITZ_NETWORKS:
            raise ValueError(f"network must be one of {list(LIPSCHITZ_NETWORKS)}, got {network!r}")
        if isinstance(self.lipschitz, dict):
            return self.lipschitz.get(network)
        return self.lipschitz

    def resolved_conv_channels(self) -> tuple[int, ...]:
        """The channels of the conv stack.

        Returns:
            ``conv_channels``, or :func:`default_conv_channels` of ``input_shape`` when None.
        """
        return self.conv_channels if self.conv_channels is not None else default_conv_channels(self.input_shape)

    @property
    def input_size(self) -> int:
        """The number of input numbers.

        Returns:
            ``D = prod(input_shape)``.
        """
        return math.prod(self.input_shape)

    # --- JSON round trip -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values.

        Returns:
            Every field, tuples as lists.
        """
        d = asdict(self)
        for key in ("input_shape", "hidden", "conv_channels"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        """The config of :meth:`to_dict`'s output.

        Args:
            data: field values (unknown fields are an error; missing ones take their defaults).

        Returns:
            The validated config.
        """
        if not isinstance(data, dict):
            raise TypeError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VAEConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, indent: int | None = 2) -> str:
        """The config as JSON text.

        Args:
            indent: ``json.dumps``' indent.

        Returns:
            :meth:`to_dict` as JSON with sorted keys.
        """
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VAEConfig:
        """The config of :meth:`to_json`'s output.

        Args:
            text: JSON text.

        Returns:
            The validated config (invalid JSON is a ``ValueError``).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _positive(name: str, value: object, expected: str = "None or a finite number > 0") -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` (and what it ``expected``) unless it is a finite
    number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _choice(name: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")


def _int_tuple(name: str, value: object, *, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}")
    out = tuple(value)  # type: ignore[arg-type]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name} must contain positive ints, got {list(out)}")
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return out
