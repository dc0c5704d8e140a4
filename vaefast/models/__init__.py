"""vaefast's VAEs: configurable MLP/conv VAE, β-VAE and β-TCVAE objectives, likelihoods, save/load, and
``as_vae`` for users' own encoder/decoder pairs. All implement the model protocol :class:`vaefast._checks.VAEModel`
(``input_shape``, ``latent_dim``, ``likelihood``, ``encode``, ``decode``, ``log_likelihood``, ``mean_encoder``).
"""

from vaefast.models.adapter import ForeignVAE, as_vae
from vaefast.models.config import VAEConfig
from vaefast.models.io import load, save
from vaefast.models.likelihoods import Likelihood, gaussian_kl, gaussian_log_density, make_likelihood
from vaefast.models.vae import VAE, BaseVAE, LossTerms

load_model = load

__all__ = [
    "VAE",
    "BaseVAE",
    "ForeignVAE",
    "Likelihood",
    "LossTerms",
    "VAEConfig",
    "as_vae",
    "gaussian_kl",
    "gaussian_log_density",
    "load",
    "load_model",
    "make_likelihood",
    "save",
]
