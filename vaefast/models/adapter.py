"""``as_vae``: wrap any encoder/decoder ``nn.Module`` pair so that every estimator and attack accepts it."""

from __future__ import annotations

import math

import torch
from torch import nn

from vaefast._checks import check_positive_float, check_positive_int, eval_mode
from vaefast.models.likelihoods import make_likelihood
from vaefast.models.vae import BaseVAE

ADAPTER_LIKELIHOODS = ("bernoulli", "gaussian", "continuous_bernoulli")
DECODER_OUTPUTS = ("logits", "mean")
DECODER_OUTPUT_HELP = (
    "decoder_output says what the decoder returns, and it changes every distance and bound: "
    "'logits' = pre-activation logits (vaefast applies the likelihood's mean map, e.g. sigmoid for bernoulli), "
    "'mean' = the likelihood mean g(z) itself (e.g. probabilities in [0, 1] for bernoulli; gaussian decoders "
    "always return the mean)"
)


class _MeanOf(nn.Module):
    """``x -> encoder(x)[0]`` (shares the encoder's parameters)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]


class ForeignVAE(BaseVAE):
    """A user's encoder (``x -> (mu, logvar)``) and decoder (``z -> logits`` or ``z -> mean``) as a vaefast model.

    ``input_shape``/``latent_dim`` come from the arguments, are inferred from each other by one probe forward
    pass, or (if neither is given) from the first ``encode`` call. The pair is checked for consistency. Build it with
    :func:`as_vae`, which checks the arguments.

    Args:
        encoder: ``x -> (mu, logvar)``.
        decoder: ``z -> logits`` or ``z -> mean``.
        likelihood: the observation model's name.
        decoder_output: ``"logits"`` or ``"mean"``.
        input_shape: the per-point input shape, or None.
        latent_dim: ``d``, or None.
        gaussian_std: the Gaussian likelihood's fixed standard deviation.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: str,
        decoder_output: str,
        input_shape: tuple[int, ...] | None,
        latent_dim: int | None,
        gaussian_std: float,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.decoder_output_kind = decoder_output
        self.observation = make_likelihood(likelihood, (), gaussian_std=gaussian_std)
        self._input_shape: tuple[int, ...] | None = None
        self._latent_dim: int | None = latent_dim
        if input_shape is not None:
            self._resolve(tuple(input_shape))
        elif latent_dim is not None:
            z = torch.zeros(2, latent_dim, **self._probe_kwargs())
            out = self._probe(self.decoder, z, "decoder")
            if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != 2:
                raise ValueError(f"decoder must map z[N, {latent_dim}] to a tensor [N, ...], got {_describe(out)}")
            self._resolve(tuple(out.shape[1:]))

    # --- shape inference and the pair check ----------------------------------------------------------
    def _probe_kwargs(self) -> dict:
        for p in (*self.encoder.parameters(), *self.decoder.parameters()):
            if p.is_floating_point():
                return {"dtype": p.dtype, "device": p.device}
        return {"dtype": torch.float32}

    @staticmethod
    def _probe(module: nn.Module, arg: torch.Tensor, name: str) -> object:
        """``module(arg)`` in eval mode without gradients (every submodule's own mode is restored)."""
        try:
            with torch.no_grad(), eval_mode(module):
                return module(arg)
        except Exception as exc:  # noqa: BLE001  (re-raised with context)
            raise ValueError(f"{name} failed on an input of shape {tuple(arg.shape)}: {exc}") from exc

    def _resolve(self, input_shape: tuple[int, ...]) -> None:
        if not input_shape or any(not isinstance(s, int) or s < 1 for s in input_shape):
            raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape}")
        x = torch.zeros(2, *input_shape, **self._probe_kwargs())
        enc = self._probe(self.encoder, x, "encoder")
        if not (isinstance(enc, (tuple, list)) and len(enc) == 2 and all(isinstance(t, torch.Tensor) for t in enc)):
            raise ValueError(f"encoder must return (mu, logvar), got {_describe(enc)}")
        mu, logvar = enc
        if mu.dim() != 2 or mu.shape[0] != 2 or logvar.shape != mu.shape:
            raise ValueError(
                f"encoder must return mu, logvar of equal shape [B, d], got {tuple(mu.shape)} / {tuple(logvar.shape)}"
            )
        d = mu.shape[1]
        if self._latent_dim is not None and self._latent_dim != d:
            raise ValueError(f"latent_dim={self._latent_dim} but the encoder returns mu of size {d}")
        out = self._probe(self.decoder, torch.zeros(2, d, **self._probe_kwargs()), "decoder")
        if not isinstance(out, torch.Tensor) or out.shape[0] != 2 or out[0].numel() != math.prod(input_shape):
            raise ValueError(
                f"encoder/decoder mismatch: the encoder maps x{list(input_shape)} to a {d}-dim latent, but the decoder "
                f"maps z[N, {d}] to {_describe(out)}; it must return [N, *{list(input_shape)}] "
                f"(or [N, {math.prod(input_shape)}])"
            )
        self._input_shape, self._latent_dim = input_shape, d

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        """The shape of one input.

        Returns:
            ``input_shape``, given to :func:`as_vae` or learned from the first ``encode``.

        Raises:
            ValueError: not known yet.
        """
        if self._input_shape is None:
            raise ValueError(
                "input_shape is not known yet: pass input_shape= (or latent_dim=) to as_vae, or encode once"
            )
        return self._input_shape

    @property
    def latent_dim(self) -> int:  # type: ignore[override]
        """The latent dimension.

        Returns:
            ``d``, given to :func:`as_vae` or learned with the input shape.

        Raises:
            ValueError: not known yet.
        """
        if self._latent_dim is None or self._input_shape is None:
            raise ValueError(
                "latent_dim is not known yet: pass input_shape= (or latent_dim=) to as_vae, or encode once"
            )
        return self._latent_dim

    # --- the protocol --------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's posterior ``q(z|x) = N(mu, diag e^logvar)``; the first call fixes an unknown input shape.

        Args:
            x: ``[B, *input_shape]``.

        Returns:
            ``(mu [B, d], logvar [B, d])``.
        """
        if self._input_shape is None and isinstance(x, torch.Tensor) and x.dim() >= 2:
            self._resolve(tuple(x.shape[1:]))
        return super().encode(x)

    def _encode_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x)
        return mu, logvar

    def _raw_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).reshape(z.shape[0], *self.input_shape)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's natural output: the decoder's logits, or the logits of its mean (``"mean"``).

        Args:
            z: ``[N, d]``.

        Returns:
            ``[N, *input_shape]``.
        """
        out = self._raw_decoder(z)
        if self.decoder_output_kind == "mean":
            return self.observation.output_from_mean(out)
        return out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``g(z)``: the decoder's own mean (``decoder_output="mean"``) or the likelihood mean of its logits.

        Args:
            z: ``[N, d]``.

        Returns:
            ``[N, *input_shape]``.
        """
        z = self._check_z(z)
        if self.decoder_output_kind == "mean":
            return self._raw_decoder(z)
        return self.observation.mean(self._raw_decoder(z))

    def mean_encoder(self) -> nn.Module:
        """``x -> mu(x)``.

        Returns:
            A module computing ``encoder(x)[0]`` (sharing the encoder's parameters).
        """
        return _MeanOf(self.encoder)

    def extra_repr(self) -> str:
        """The likelihood and decoder output kind, for ``repr``.

        Returns:
            One line.
        """
        return f"likelihood={self.likelihood}, decoder_output={self.decoder_output_kind}"


def _check_decoder_output(likelihood: str, decoder_output: object) -> str:
    """The declared decoder output kind, consistent with ``likelihood``.

    Args:
        likelihood: one of :data:`ADAPTER_LIKELIHOODS` (already checked).
        decoder_output: ``"logits"`` or ``"mean"``; ``None`` (not given) is refused.

    Returns:
        ``decoder_output``.

    Raises:
        TypeError: ``decoder_output`` was not given (there is no safe default: a decoder returning probabilities
            read as logits gives silently wrong reconstructions ``sigmoid(p)``).
        ValueError: an unknown kind, or one the likelihood has no meaning for (gaussian logits, continuous
            Bernoulli means).
    """
    if decoder_output is None:
        raise TypeError(f"as_vae() needs decoder_output='logits' or 'mean': {DECODER_OUTPUT_HELP}")
    if decoder_output not in DECODER_OUTPUTS:
        raise ValueError(
            f"decoder_output must be one of {list(DECODER_OUTPUTS)}, got {decoder_output!r}: {DECODER_OUTPUT_HELP}"
        )
    if likelihood == "gaussian" and decoder_output == "logits":
        raise ValueError(
            "decoder_output='logits' is inconsistent with likelihood='gaussian': a Gaussian decoder returns the "
            "mean g(z) directly (no mean map is applied); pass decoder_output='mean'"
        )
    if likelihood == "continuous_bernoulli" and decoder_output == "mean":
        raise ValueError("decoder_output='mean' is not supported for likelihood='continuous_bernoulli'; return logits")
    return decoder_output


def _check_shape_args(
    input_shape: int | tuple[int, ...] | None, latent_dim: int | None
) -> tuple[tuple[int, ...] | None, int | None]:
    """``input_shape`` as a tuple of positive ints (an int is one dimension) and ``latent_dim`` a positive int."""
    if input_shape is not None:
        input_shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        for s in input_shape:
            check_positive_int("input_shape", s)
    if latent_dim is not None:
        check_positive_int("latent_dim", latent_dim)
    return input_shape, latent_dim


def as_vae(
    encoder: nn.Module,
    decoder: nn.Module,
    likelihood: str = "bernoulli",
    *,
    decoder_output: str | None = None,
    input_shape: int | tuple[int, ...] | None = None,
    latent_dim: int | None = None,
    gaussian_std: float = 1.0,
) -> ForeignVAE:
    """Wrap ``encoder: x -> (mu, logvar)`` and ``decoder: z -> logits | mean`` as a protocol model.

    Args:
        encoder: ``x[B, *input_shape] -> (mu[B, d], logvar[B, d])``, the Gaussian posterior ``q(z|x)``.
        decoder: ``z[N, d] -> out[N, *input_shape]`` (or ``[N, D]``).
        likelihood: ``"bernoulli"``, ``"gaussian"`` (``N(x; g(z), gaussian_std^2 I)``) or
            ``"continuous_bernoulli"``.
        decoder_output: required, keyword-only; what ``out`` is. ``"logits"``: pre-activation logits ``l``, and
            vaefast applies the likelihood's mean map, ``g(z) = sigmoid(l)`` (bernoulli) or the continuous
            Bernoulli mean. ``"mean"``: the likelihood mean ``g(z)`` itself (bernoulli: probabilities in [0, 1],
            scored as ``logit(p)``; gaussian: the mean, the only valid choice there). Inconsistent combinations
            (gaussian with "logits", continuous_bernoulli with "mean") are refused.
        input_shape: the per-point input shape; with ``latent_dim`` both may be omitted, then the first input
            seen (every vaefast entry point encodes ``x[:1]`` once) fixes them.
        latent_dim: ``d``; alone it fixes ``input_shape`` by one decoder probe.
        gaussian_std: the Gaussian likelihood's fixed standard deviation.

    Returns:
        A :class:`ForeignVAE` with ``encode``, ``decode`` (``g(z)``), ``log_likelihood``, ``elbo``, ``loss`` (plain
        ELBO, so ``vaefast.train`` works on it) and ``mean_encoder``.

    Raises:
        TypeError: a non-module encoder/decoder, or ``decoder_output`` not given.
        ValueError: an unknown likelihood/decoder_output, an inconsistent pair, or an encoder/decoder mismatch.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if not isinstance(decoder, nn.Module):
        raise TypeError(f"decoder must be an nn.Module, got {type(decoder).__name__}")
    if likelihood not in ADAPTER_LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {list(ADAPTER_LIKELIHOODS)}, got {likelihood!r}")
    decoder_output = _check_decoder_output(likelihood, decoder_output)
    input_shape, latent_dim = _check_shape_args(input_shape, latent_dim)
    check_positive_float("gaussian_std", gaussian_std)
    return ForeignVAE(encoder, decoder, likelihood, decoder_output, input_shape, latent_dim, gaussian_std)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"
