"""Device discipline in one place: every tensor factory in analysis code either takes the device of its inputs
(``device=``) or sits on a documented CPU-side path. The list below is that documentation; a new factory without
``device=`` fails this test until it is added here with its reason (two CUDA bugs, certify's and auddc's, were
factories that silently made CPU tensors beside device ones)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vaefast"
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "rand", "randn", "randint", "linspace", "eye",
             "as_tensor", "logspace", "randperm"}  # fmt: skip
# Modules that never touch device tensors: the command line, data loading (CPU, moved by the caller), the results
# database and what reads it.
NOT_ANALYSIS = ("cli/", "data/", "plots.py", "report.py", "analysis.py", "store.py", "schema.py")

CPU_SIDE: dict[str, int] = {
    # global point ids, radii and the search's bookkeeping live on the CPU (moved once per call where needed)
    "attacks/base.py:check_point_ids:arange": 1,
    "core/sampling.py:hits_and_kth:empty": 1,  # r* is returned on the CPU
    "core/sampling.py:_kth_in_passes:tensor": 1,  # a count for searchsorted on the CPU
    "core/search.py:__init__:full": 2,
    "core/search.py:__init__:zeros": 13,
    "core/search.py:_bracket:arange": 1,
    "core/search.py:_line:arange": 1,
    "core/search.py:_merge:ones": 1,
    "core/search.py:_merge:zeros": 2,
    "core/search.py:_rule_and_plan:tensor": 2,
    "core/search.py:append:arange": 2,
    "core/search.py:z:tensor": 1,
    "margin.py:_caps:full": 1,
    "margin.py:_one:arange": 1,
    "margin.py:numerical_margin:arange": 1,
    "robustness.py:_estimate:empty": 2,  # results gathered on the CPU
    "robustness.py:estimate_r_robustness:arange": 1,
    "robustness.py:is_r_robust:arange": 1,
    "sweep/stages.py:build:arange": 1,
    "sweep/stages.py:build:tensor": 1,
    "sweep/stages.py:curves:tensor": 1,
    "sweep/inputs.py:auto_radii:tensor": 1,
    "sweep/inputs.py:from_dataset:tensor": 1,
    "verify.py:_estimate:tensor": 1,
    "verify.py:_tensor:zeros": 1,
    # the lambda grid of the penalised attacks is a list of floats
    "attacks/targeted.py:_lambda_grid:as_tensor": 1,
    "attacks/targeted.py:_lambda_grid:logspace": 1,
    # the counter-based generator: ids and counters on the CPU, numbers moved to the device by the op's caller
    "reference.py:reparam_eps:arange": 3,
    "rng.py:normals:as_tensor": 1,
    "jacobian.py:_hutchinson:arange": 1,  # the probes' point ids key the generator
    "jacobian.py:jacobian_norms:arange": 1,
    "jacobian.py:_randomized_norms:arange": 1,
    "jacobian.py:_randomized_sums:zeros": 1,  # a count with no Lanczos steps; the sums come back to the CPU
    "jacobian.py:_limits:tensor": 1,  # the norms' limits are returned on the CPU
    # an adapter's constant latent scale and shift: made on the CPU, moved to the wrapped model's device
    "models/ecosystem.py:_diffusion_latents:full": 2,
    "models/ecosystem.py:_diffusion_latents:tensor": 2,
    "models/ecosystem.py:from_diffusers:ones": 1,
    "models/ecosystem.py:from_diffusers:zeros": 1,
    "models/ecosystem.py:from_encode_decode:ones": 1,
    "models/ecosystem.py:from_encode_decode:zeros": 1,
    # the certificates' activation tables: float64 scalars evaluated once on the CPU, read back with float()
    "certification/activations.py:_scalar:tensor": 1,
    "certification/activations.py:sup_derivative:tensor": 1,
    "certification/activations.py:interval:tensor": 2,
    "certification/activations.py:derivative_range:tensor": 1,
    # a global offset that is a Python float (0.0) where no rule applies; moved to the radii's device where used
    "certification/bounds.py:local:as_tensor": 1,
    # verify's re-derivations: stored columns (counts) are CPU statistics; point ids and radii are CPU tensors, as
    # the sweep's (UnitContext)
    "rederive.py:_derived:tensor": 3,
    "rederive.py:_counts_at:tensor": 2,
    "rederive.py:_certificates:zeros": 1,
    "rederive.py:search_discrepancies:tensor": 1,
    # weights made on the CPU, moved with the module (.to(device)); order-dependent generators are CPU generators
    "models/likelihoods.py:__init__:zeros": 1,
    "models/lipschitz.py:__init__:tensor": 1,
    "testing.py:__init__:rand": 1,
    "testing.py:__init__:randn": 3,
    "training.py:_train_epoch:randperm": 1,
    # the gloo channel of a distributed sweep carries CPU tensors only
    "sweep/transport.py:_send:tensor": 1,
    "sweep/transport.py:receive:empty": 1,
    "sweep/transport.py:receive:zeros": 1,
    "sweep/transport.py:release:ones": 1,
    "sweep/transport.py:wait_release:zeros": 1,
}


def _factories_without_device() -> Counter:
    """``file:function:factory`` -> count of ``torch.<factory>(...)`` calls without a ``device=`` keyword."""
    found: Counter = Counter()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(NOT_ANALYSIS):
            continue
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                f = node.func if isinstance(node, ast.Call) else None
                factory = isinstance(f, ast.Attribute) and f.attr in FACTORIES
                if factory and isinstance(f.value, ast.Name) and f.value.id == "torch":
                    if not {k.arg for k in node.keywords} & {"device", None}:  # None: a **kwargs that may hold it
                        found[f"{rel}:{fn.name}:{f.attr}"] += 1
    return found


def test_every_factory_without_a_device_is_a_documented_cpu_path():
    found = _factories_without_device()
    new = {k: v for k, v in found.items() if v > CPU_SIDE.get(k, 0)}
    assert new == {}, f"tensor factories without device= (give them the inputs' device, or document them): {new}"


def test_the_list_holds_no_stale_entries():
    found = _factories_without_device()
    stale = {k: v for k, v in CPU_SIDE.items() if found.get(k, 0) < v}
    assert stale == {}, f"entries whose factories are gone (remove them): {stale}"


def test_the_scanner_sees_factories():
    tree = ast.parse("def f(x):\n    a = torch.zeros(3)\n    b = torch.ones(3, device=x.device)\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert len(calls) == 2  # the scanner's own input: one bare factory, one with a device
