"""vaefast's VAEs: configurable MLP/conv VAE, β-VAE and β-TCVAE objectives, likelihoods, save/load, ``as_vae`` for
users' own encoder/decoder pairs, adapters for the ecosystem's VAEs (``from_diffusers`` for diffusers'
``AutoencoderKL``, ``from_encode_decode`` for the ``encode -> [mu, log_var]`` convention) and ``load_source`` (a run
folder, ``diffusers:PATH`` or ``module:function``). All implement the model protocol
:class:`vaefast._checks.VAEModel` (``input_shape``, ``latent_dim``, ``likelihood``, ``encode``, ``decode``,
``log_likelihood``, ``mean_encoder``).
"""

from vaefast.models.adapter import ForeignVAE, as_vae
from vaefast.models.config import VAEConfig
from vaefast.models.ecosystem import from_diffusers, from_encode_decode
from vaefast.models.io import load, save
from vaefast.models.likelihoods import Likelihood, gaussian_kl, gaussian_log_density, make_likelihood
from vaefast.models.sources import load_diffusers, load_source
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
    "from_diffusers",
    "from_encode_decode",
    "gaussian_kl",
    "gaussian_log_density",
    "load",
    "load_diffusers",
    "load_model",
    "load_source",
    "make_likelihood",
    "save",
]
