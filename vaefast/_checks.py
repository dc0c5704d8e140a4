"""The one place for validation: the model protocol (:class:`VAEModel`) and its check, the input validators shared by
every public entry point (clear ``TypeError``/``ValueError`` messages that name the argument), eval mode for every
analysis, and devices."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch.nn.utils import parametrize

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    finite: bool = True,
    nonempty: bool = True,
) -> torch.Tensor:
    """Return ``value`` if it is a tensor of the wanted rank/dtype with finite entries, else raise.

    Raises ``TypeError`` for a non-tensor or a wrong dtype and ``ValueError`` for a wrong rank, an empty
    tensor or NaN/Inf entries; every message starts with the argument's name.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a tensor without data); move it to 'cpu' or 'cuda'")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)})")
    if finite and value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it. Raises ``ValueError`` naming the odd one out."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.device


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """An ``int`` (not bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


MAX_SAMPLES = 2**32  # Monte-Carlo sample indices are Philox's 32-bit counter


def check_num_samples(name: str, value: object) -> int:
    """A Monte-Carlo sample count: an int in ``[1, 2**32]`` (the sample index is a 32-bit counter of the generator)."""
    value = check_positive_int(name, value)
    if value > MAX_SAMPLES:
        raise ValueError(f"{name} must be <= 2**32 (the sample index is a 32-bit counter), got {value}")
    return value


def check_positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    """A finite real number ``> 0`` (or ``>= 0`` with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_probability(name: str, value: object, *, open_interval: bool = True) -> float:
    """A number in (0, 1) (or [0, 1] when ``open_interval`` is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = 0 < value < 1 if open_interval else 0 <= value <= 1
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1)' if open_interval else '[0, 1]'}, got {value}")
    return value


def check_seed(name: str, value: object) -> int:
    """A non-negative int below 2**63 (seeds key the Philox generator)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def as_radii(name: str, value: object, *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """A float or sequence of floats (or 1-D tensor) of radii, all finite and ``> 0``, as a 1-D tensor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {type(value).__name__} {value!r}")
    try:
        t = torch.as_tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {value!r} ({exc})") from None
    if t.dim() != 1:
        raise ValueError(f"{name} must be a number or a 1-D sequence, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"{name} must be finite and > 0, got {t.tolist()}")
    return t


# --- the model protocol and its inputs --------------------------------------------------------------------------------
@runtime_checkable
class VAEModel(Protocol):
    """What every estimator, attack and sweep needs of a model (vaefast's ``VAE``, ``as_vae`` adapters and
    ``vaefast.testing.LinearGaussianVAE`` implement it).

    Attributes:
        input_shape: the shape of one input (an ``as_vae`` adapter may learn it from its first batch).
        latent_dim: d, the latent dimension.
        likelihood: the name of the observation model (``"bernoulli"``, ``"gaussian"``, ...).
    """

    input_shape: tuple[int, ...]
    latent_dim: int
    likelihood: str

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x[B, *input_shape] -> (mu[B, d], logvar[B, d])``: the encoder q(z|x) = N(mu, diag exp(logvar))."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z[N, d] -> g(z)[N, *input_shape]``: the likelihood mean (reconstructions are always means)."""

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``log p(x | z)`` per point ``[B]``."""

    def mean_encoder(self) -> torch.nn.Module:
        """``x -> mu(x)`` as a module (an ``nn.Sequential`` MLP gets the fused Jacobian kernel)."""


def _has_attribute(model: object, name: str) -> bool:
    """Whether ``model`` has ``name``; an attribute that exists but is not known yet (an ``as_vae`` adapter's
    ``input_shape`` before its first input raises ``ValueError``) counts as present."""
    try:
        getattr(model, name)
    except ValueError:
        return True
    except AttributeError:
        return False
    return True


def check_model(model: object, requires: Sequence[str] = ()) -> torch.nn.Module:
    """The one check of the model protocol (:class:`VAEModel`): callable ``encode``/``decode`` (and ``requires``),
    ``input_shape``/``latent_dim`` attributes.

    Args:
        model: the model; a lazy ``as_vae`` adapter passes (its shape comes from the first input).
        requires: further methods the caller needs, e.g. ``("log_likelihood",)``.

    Returns:
        ``model``.

    Raises:
        TypeError: naming the first missing member.
    """
    for attr in ("encode", "decode", *requires):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"model must implement the vaefast model protocol (missing {attr}())")
    for attr in ("input_shape", "latent_dim"):
        if not _has_attribute(model, attr):
            raise TypeError(f"model must implement the vaefast model protocol (missing {attr!r})")
    return model  # type: ignore[return-value]


def check_choice(name: str, value: object, options: Sequence[str]) -> str:
    """``value`` if it is one of ``options`` (a ``ValueError`` listing them otherwise)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def check_inputs(model: torch.nn.Module, x: object, name: str = "x") -> torch.Tensor:
    """``x[B, *input_shape]``: a finite float tensor of the model's input shape.

    Args:
        model: a protocol model; one that does not know its input shape yet (an ``as_vae`` adapter built without
            ``input_shape``) learns it from ``x`` (:func:`vaefast._checks.model_input_shape`), after which
            ``model.latent_dim`` is known too.
        x: the batch to check.
        name: the argument's name in error messages (e.g. ``"target"``).

    Returns:
        ``x``.

    Raises:
        TypeError / ValueError: naming ``name`` (not a float tensor, empty, NaN/Inf, wrong shape).
    """
    x = check_tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have a leading batch dimension [B, ...], got shape {tuple(x.shape)}")
    shape = model_input_shape(model, x)
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"{name} must have shape [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}")
    return x


def check_box(box: object) -> tuple[float, float] | None:
    """A data box ``(low, high)`` with finite ``low < high`` as floats, or None (unbounded inputs)."""
    if box is None:
        return None
    if not isinstance(box, (tuple, list)) or len(box) != 2:
        raise TypeError(f"box must be a (low, high) pair or None, got {box!r}")
    lo, hi = float(box[0]), float(box[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"box must satisfy low < high (finite), got {box!r}")
    return lo, hi


# --- the model under analysis ----------------------------------------------------------------------------------------
@contextmanager
def eval_mode(model: object) -> Iterator[object]:
    """Run ``model`` in eval mode (dropout off, batch-norm on running statistics) and restore afterwards.

    Every submodule gets its own ``training`` flag back, so a caller's mixed modes survive. Objects that are not
    ``nn.Module`` pass through unchanged. The weights are fixed meanwhile, so parametrized ones (e.g. orthonormal
    layers) are computed once, on entry, and served from ``torch.nn.utils.parametrize.cached()`` to every forward:
    the same values as computing them per forward.

    Args:
        model: the model (any object; only ``torch.nn.Module`` instances are switched).

    Yields:
        ``model`` itself.
    """
    if not isinstance(model, torch.nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with parametrize.cached():
            _compute_parametrized(model)
            yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def _compute_parametrized(model: torch.nn.Module) -> None:
    """Compute every parametrized tensor of ``model`` once, into ``parametrize.cached()``'s cache: outside autograd
    (an analysis differentiates with respect to inputs only) and outside any ``torch.func`` transform."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                getattr(module, name)


_F = TypeVar("_F", bound=Callable[..., Any])


def analysis(fn: _F) -> _F:
    """Decorator: run ``fn(model, ...)`` (or a method whose object has ``.model``) with the model in eval mode.

    Every estimator, attack and margin entry point is an analysis of a trained model: dropout and batch
    statistics must not change its answer, and the caller's training mode is restored afterwards.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else kwargs.get("model")
        model = getattr(first, "model", first) if not isinstance(first, torch.nn.Module) else first
        with eval_mode(model):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def model_input_shape(model: object, x: torch.Tensor) -> tuple[int, ...]:
    """``model.input_shape``, resolved from ``x`` when the model does not know it yet (an ``as_vae`` adapter built
    without ``input_shape``: one encode of ``x[:1]`` fixes it).

    Args:
        model: a protocol model (``encode``, ``decode``, ``input_shape``).
        x: a batch ``[B, *input_shape]``.

    Returns:
        The per-point input shape.
    """
    for attr in ("encode", "decode"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(
                f"model must implement the vaefast model protocol (missing {attr}()), got {type(model).__name__}"
            )
    try:
        shape = model.input_shape  # type: ignore[attr-defined]
    except ValueError:
        with torch.no_grad(), eval_mode(model):
            model.encode(x[:1])  # type: ignore[attr-defined]
        shape = model.input_shape  # type: ignore[attr-defined]
    return tuple(int(s) for s in shape)


def check_device(name: str, value: object) -> torch.device:
    """A CPU or CUDA device that exists on this machine.

    Args:
        name: the argument's name for error messages (e.g. ``"--device"`` or ``"device"``).
        value: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (CUDA when a GPU is visible, else CPU) or a
            ``torch.device`` of type cpu or cuda.

    Returns:
        The resolved ``torch.device``.

    Raises:
        TypeError: ``value`` is neither a str nor a ``torch.device``.
        ValueError: an unknown device, a CUDA request with no visible GPU, or a CUDA index past the device count.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be a str or torch.device, got {type(value).__name__}")
    try:
        device = torch.device(value.strip().lower() if isinstance(value, str) else value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"{name} must be one of ['cpu', 'cuda', 'cuda:N', 'auto'], got {str(value)!r}")
    if device.type == "cuda":
        hint = f"use {name} cpu" if name.startswith("-") else f"use {name}='cpu'"
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {value}: no CUDA GPU is visible (torch.cuda.is_available() is False); {hint}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} {value}: only {count} CUDA device(s) visible (indices 0..{count - 1})")
    return device


# --- the inputs of an analysis: x (and a perturbation) on the model's device, in its dtype -----------------------
def model_device_dtype(model: object, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first floating parameter or buffer.

    Args:
        model: a protocol model (a parameterless one, or one that is no ``nn.Module``, takes ``x``'s own).
        x: the batch the model is about to see.

    Returns:
        ``(device, dtype)``.
    """
    if isinstance(model, torch.nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    return x.device, x.dtype


def check_delta(delta: object, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A finite perturbation of every point of ``x`` or one perturbation for all, as a tensor of ``x``'s shape.

    Args:
        delta: ``[B, *shape]`` (one per point) or ``[*shape]`` (shared).
        x: the batch ``[B, *shape]`` it perturbs.
        shape: the per-point input shape.

    Returns:
        ``delta`` expanded to ``x``'s shape (a view, no copy), on its own device and dtype.

    Raises:
        TypeError / ValueError: naming ``delta`` (not a float tensor, NaN/Inf, or neither shape).
    """
    delta = check_tensor("delta", delta)
    if tuple(delta.shape) not in (tuple(x.shape), tuple(shape)):
        raise ValueError(
            f"delta must have the shape of x {tuple(x.shape)} or of one input {tuple(shape)}, got {tuple(delta.shape)}"
        )
    return delta.expand_as(x)


def check_analysis_inputs(
    model: object, x: object, delta: object | None = None, requires: Sequence[str] = ()
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """The one validation of an analysis' inputs: the model protocol, ``x`` (and ``delta``), device and dtype.

    Args:
        model: a protocol model (:func:`check_model`; a lazy ``as_vae`` adapter learns its shape from ``x``).
        x: ``[B, *input_shape]`` (:func:`check_inputs`), on the model's device.
        delta: None, or a perturbation accepted by :func:`check_delta`, on the model's device.
        requires: further model methods the caller needs.

    Returns:
        ``(x, delta, input_shape)`` with ``x`` and ``delta`` (expanded to ``x``'s shape) cast to the model's floating
        dtype (:func:`model_device_dtype`).

    Raises:
        TypeError / ValueError: naming the argument (``model``, ``x`` or ``delta``); a tensor on another device than
        the model is a ``ValueError``.
    """
    check_model(model, requires)
    x = check_inputs(model, x)  # type: ignore[arg-type]
    shape = model_input_shape(model, x)
    device, dtype = model_device_dtype(model, x)
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the model is on {device}")
    if delta is not None:
        delta = check_delta(delta, x, shape)
        if delta.device != device:
            raise ValueError(f"delta is on {delta.device} but the model is on {device}")
        delta = delta.to(dtype)
    x = x.to(dtype)
    check_model_outputs(model, x)
    return x, delta, shape


def check_model_outputs(model: object, x: torch.Tensor, name: str = "model") -> None:
    """One probe of a protocol model before any work: finite weights, and on ``x[:1]`` an encoder that returns
    ``(mu, logvar)`` of shape ``[1, latent_dim]`` and a decoder that returns ``g(mu)`` of shape ``[1, *input_shape]``,
    all finite.

    Args:
        model: a protocol model (its input shape known, e.g. after :func:`model_input_shape`).
        x: a validated batch on the model's device, in its dtype (only its first point is used).
        name: the model's name in error messages (e.g. ``"models['beta4']"``).

    Raises:
        TypeError / ValueError: naming ``name`` and what is wrong (a non-finite parameter by its name, a wrong shape
        with the expected one, NaN/Inf outputs).
    """
    if isinstance(model, torch.nn.Module):
        for pname, t in (*model.named_parameters(), *model.named_buffers()):
            if t.is_floating_point() and t.numel() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: parameter {pname!r} holds NaN or Inf")
    shape = tuple(int(s) for s in model.input_shape)  # type: ignore[attr-defined]
    with torch.no_grad(), eval_mode(model):
        try:
            out = model.encode(x[:1])  # type: ignore[attr-defined]
        except RuntimeError as exc:  # e.g. a shape mismatch inside the network
            raise ValueError(f"{name}.encode fails on x[0]: {' '.join(str(exc).split())}") from exc
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise TypeError(f"{name}.encode must return a pair of tensors (mu, logvar), got {type(out).__name__}")
        mu, logvar = out
        d = int(model.latent_dim)  # type: ignore[attr-defined]
        if tuple(mu.shape) != (1, d) or tuple(logvar.shape) != (1, d):
            raise ValueError(
                f"{name}.encode returned mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} for one input; "
                f"expected (1, {d}) each (latent_dim = {d})"
            )
        if not bool(torch.isfinite(mu).all() & torch.isfinite(logvar).all()):
            raise ValueError(f"{name}.encode returned NaN or Inf for x[0]")
        try:
            g = model.decode(mu)  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise ValueError(f"{name}.decode fails on the mean latent of x[0]: {' '.join(str(exc).split())}") from exc
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{name}.decode must return a tensor, got {type(g).__name__}")
        if tuple(g.shape) != (1, *shape):
            raise ValueError(
                f"{name}.decode returned shape {tuple(g.shape)} for one latent; expected {(1, *shape)} "
                "(the likelihood mean of one input)"
            )
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"{name}.decode returned NaN or Inf for the mean latent of x[0]")


# --- where results go --------------------------------------------------------------------------------------------
def check_path(name: str, value: object) -> Path:
    """A path argument: a non-empty ``str`` or ``os.PathLike``.

    Args:
        name: the argument's name for error messages (e.g. ``"--out"`` or ``"db"``).
        value: the value.

    Returns:
        It as a :class:`~pathlib.Path`.

    Raises:
        TypeError: not a str or os.PathLike.
        ValueError: empty, or holding a NUL character.
    """
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    text = os.fsdecode(os.fspath(value))
    if not text or "\x00" in text:
        raise ValueError(f"{name} must be a non-empty path without NUL characters, got {text!r}")
    return Path(text)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _check_creatable(name: str, path: Path, folder: Path) -> None:
    """``folder`` exists or can be created: its nearest existing ancestor is a folder this process may write in."""
    ancestor = folder.absolute()
    while not _exists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{name} {path}: cannot create it, {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path}: cannot write in the folder {ancestor} (permission denied or read-only)")


def check_output_file(name: str, value: object) -> Path:
    """A file a command will write: not a folder, writable if it exists, else creatable (its missing parent folders
    too). Checked before any work, so that a result is never computed only to be lost.

    Args:
        name: the argument's name (e.g. ``"--out"``).
        value: the path.

    Returns:
        The path.

    Raises:
        TypeError / ValueError: naming ``name`` and the path.
    """
    path = check_path(name, value)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder; give a file name")
    if _exists(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"{name} {path} is not writable (permission denied or read-only)")
        return path
    _check_creatable(name, path, path.parent)
    return path


def check_output_dir(name: str, value: object) -> Path:
    """A folder a command will write into: a writable folder if it exists, else creatable.

    Args:
        name: the argument's name (e.g. ``"--out"``).
        value: the path.

    Returns:
        The path.

    Raises:
        TypeError / ValueError: naming ``name`` and the path.
    """
    path = check_path(name, value)
    if _exists(path):
        if not path.is_dir():
            raise ValueError(f"{name} {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{name} {path}: cannot write in this folder (permission denied or read-only)")
        return path
    _check_creatable(name, path, path)
    return path
