"""How robust is a latent-diffusion VAE? vaefast on a diffusers ``AutoencoderKL`` you have on disk.

For a few images at one reconstruction radius ``r`` (in [0, 1] pixel units, L2 over the whole image) it prints:
the Monte-Carlo probability ``p_hat`` that the reconstruction stays within ``r`` (with its interval), the smallest
robust radius ``r*``, the first-order margin bound (exact or randomized Jacobian norms, with what is an estimate and
what an upper limit), the numerical margin found by the maximum-damage attack with its evidence (the size of the
perturbation that broke r-robustness and ``p_hat`` there), and the sound certificate, or why there is none.

Nothing is downloaded: the VAE is read with ``AutoencoderKL.from_pretrained(PATH)`` from a local folder (one written
by ``save_pretrained``, or the ``vae/`` folder of a Stable Diffusion checkout).

    python examples/latent_diffusion_vae.py PATH/TO/vae --images my_pngs/ --size 256 --r 20
    python examples/latent_diffusion_vae.py PATH/TO/vae            # 2 random images

Cost grows with the image size: on a CPU keep ``--size`` small (64-256) and ``--samples`` / ``--steps`` modest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

import vaefast
from vaefast.models import from_diffusers


def load_images(folder: str | None, count: int, size: int, channels: int, seed: int) -> torch.Tensor:
    """``count`` images ``[N, channels, size, size]`` in [0, 1]: the folder's PNGs (sorted, resized), or random."""
    if folder is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(count, channels, size, size, generator=gen)
    import numpy as np
    from PIL import Image  # diffusers depends on Pillow

    files = sorted(Path(folder).glob("*.png"))[:count]
    if not files:
        raise SystemExit(f"no .png files in {folder}")
    mode = "RGB" if channels == 3 else "L"
    images = []
    for f in files:
        img = Image.open(f).convert(mode).resize((size, size), Image.Resampling.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        images.append(arr.permute(2, 0, 1) if arr.dim() == 3 else arr.unsqueeze(0))
    return torch.stack(images)


def report(args: argparse.Namespace) -> None:
    """Load the VAE and the images, run the four analyses at ``args.r`` and print one block per image."""
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).to(args.device).eval()
    model = from_diffusers(
        vae
    )  # x in [0, 1] -> 2x - 1; latent_dist.mean / .logvar flattened; decode(z).sample -> [0, 1]
    x = load_images(args.images, args.num_images, args.size, vae.config.in_channels, args.seed).to(args.device)
    print(f"{args.vae}: {sum(p.numel() for p in vae.parameters()):,} parameters; images {tuple(x.shape)}")
    t0 = time.perf_counter()
    est = vaefast.estimate_r_robustness(model, x, [args.r], num_samples=args.samples, seed=args.seed)
    bound = vaefast.margin_bound(model, x, args.r, estimate=est, seed=args.seed)
    margin = vaefast.numerical_margin(
        model, x, args.r, num_samples=args.samples, steps=args.steps, max_radius=args.max_radius, estimate=est,
        seed=args.seed, progress=False,
    )  # fmt: skip
    try:
        cert, why = vaefast.certify(model, x, args.r, estimate=est), ""
    except (ValueError, TypeError) as exc:  # an encoder the certificate cannot read is refused by name
        cert, why = None, str(exc)
    print(f"latent size d = {model.latent_dim}; Jacobian norms: {bound.jac_method} (limits at {bound.jac_confidence})")
    for b in range(x.shape[0]):
        print(f"\nimage {b}: r = {args.r:g}")
        print(f"  p_hat = {est.p_hat[b, 0]:.3f}  [{est.ci_low[b, 0]:.3f}, {est.ci_high[b, 0]:.3f}]"
              f"  (n = {est.num_samples}); r* = {est.r_star[b]:.4g}")  # fmt: skip
        if not bool(bound.certified[b]):
            print("  bound: none (p_hat <= 1/2: not r-robust at delta = 0)")
        else:
            print(f"  bound = {bound.bound[b]:.4g} (||J||_F ~ {bound.jac_frobenius[b]:.4g}); certified "
                  f"{bound.certified_bound[b]:.4g} (||J||_F <= {bound.jac_frobenius_upper[b]:.4g}); whitened "
                  f"{bound.whitened_bound[b]:.4g}")  # fmt: skip
        if bool(margin.bracketed[b]) and float(margin.margin[b]) > 0:
            print(f"  numerical margin = {margin.margin[b]:.4g}: a delta of norm {margin.upper[b]:.4g} gives p_hat = "
                  f"{margin.p_hat_delta[b]:.3f} [{margin.ci_low_delta[b]:.3f}, {margin.ci_high_delta[b]:.3f}] "
                  f"(n = {int(margin.samples_delta[b])}); robust up to {margin.lower[b]:.4g}")  # fmt: skip
        elif float(margin.margin[b]) == 0:
            print("  numerical margin = 0 (the clean image is not r-robust)")
        else:
            print(f"  numerical margin > {margin.max_radius[b]:.4g} (still r-robust at the search limit)")
        print(f"  certificate: radius {cert.radius[b]:.4g}" if cert is not None else f"  certificate: none ({why})")
    print(f"\n{x.shape[0]} images in {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vae", help="local folder of a diffusers AutoencoderKL (save_pretrained / a model's vae/ folder)")
    p.add_argument("--images", default=None, help="folder of .png images (default: random images)")
    p.add_argument("--num-images", type=int, default=2, help="images to analyse (default 2)")
    p.add_argument("--size", type=int, default=64, help="images are resized to size x size (default 64)")
    p.add_argument("--r", type=float, default=20.0, help="reconstruction radius in [0, 1] pixel units (default 20)")
    p.add_argument("--samples", type=int, default=128, help="Monte-Carlo samples per decision (default 128)")
    p.add_argument("--steps", type=int, default=10, help="attack steps per margin radius (default 10)")
    p.add_argument("--max-radius", type=float, default=None, help="margin search limit (default: the image box's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    report(p.parse_args(argv))


if __name__ == "__main__":
    main()
