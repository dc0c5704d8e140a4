"""The one row schema of a results database: per table its columns, their SQL types, documentation and key.

Everything else is derived from :data:`TABLES`: the store's ``CREATE TABLE`` statements and strict inserts, the
canonical row order, which columns are blobs (dropped by exports and row reads unless asked for), the report's
loading and the column documentation in :mod:`vaefast.store`. Blobs are little-endian float32 arrays of shape
``models.input_shape``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = "5"
# 3: recon_clean / recon_adv dropped (recomputed by the report); 4: cert_global, cert_local; 5: units hold every radius
# (no r), the three-way clean decision (clean_decision, p_low), three margin numbers (margin = the estimate,
# margin_lower, margin_upper = the evidence), jac_whitened_spectral, jac_frobenius_upper, jac_method, jac_confidence,
# cert_reason

TEXT, INTEGER, REAL, BLOB = "TEXT", "INTEGER", "REAL", "BLOB"


@dataclass(frozen=True)
class Column:
    """One column: its name, SQL type (``TEXT``, ``INTEGER``, ``REAL`` or ``BLOB``), what it holds, and its group.

    ``group`` names columns that are filled (or left NULL) together, e.g. ``"evidence"`` in ``results``.
    """

    name: str
    type: str
    doc: str = ""
    group: str = ""


@dataclass(frozen=True)
class Table:
    """One table: its name, what a row is, its columns in order and its primary key (default: the first column)."""

    name: str
    doc: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", (self.columns[0].name,))

    @property
    def names(self) -> tuple[str, ...]:
        """The column names in table order."""
        return tuple(c.name for c in self.columns)

    @property
    def blobs(self) -> frozenset[str]:
        """The names of the blob columns."""
        return frozenset(c.name for c in self.columns if c.type == BLOB)

    def group(self, name: str) -> tuple[str, ...]:
        """The columns of one group.

        Args:
            name: the group, e.g. :data:`EVIDENCE`.

        Returns:
            The names of its columns, in table order.
        """
        return tuple(c.name for c in self.columns if c.group == name)

    def create_sql(self) -> str:
        """The ``CREATE TABLE IF NOT EXISTS`` statement (a one-column key inline, a composite key at the end).

        Returns:
            The SQL statement.
        """
        single = len(self.key) == 1
        cols = [
            f"{c.name} {c.type}" + (" PRIMARY KEY" if single and c.name == self.key[0] else "") for c in self.columns
        ]
        if not single:
            cols.append(f"PRIMARY KEY ({', '.join(self.key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(cols)})"

    def insert_sql(self, verb: str = "INSERT") -> str:
        """The insert statement that :meth:`values` fills.

        Args:
            verb: ``"INSERT"``, ``"INSERT OR IGNORE"`` or ``"INSERT OR REPLACE"``.

        Returns:
            ``<verb> INTO table (every column) VALUES (?, ...)``.
        """
        return f"{verb} INTO {self.name} ({', '.join(self.names)}) VALUES ({', '.join('?' * len(self.columns))})"

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """The values of ``row`` in column order, for :meth:`insert_sql`.

        Args:
            row: a dict with exactly this table's column names as keys.

        Returns:
            The values as a tuple.

        Raises:
            KeyError: ``row`` has an unknown or a missing key (naming both lists).
        """
        if row.keys() != set(self.names):
            unknown, missing = sorted(row.keys() - set(self.names)), sorted(set(self.names) - row.keys())
            raise KeyError(f"{self.name} row: unknown keys {unknown}, missing keys {missing}")
        return tuple(row[c] for c in self.names)

    def describe(self) -> str:
        """The table's documentation.

        Returns:
            ``name (col TYPE, ...)``, what a row is, and one line per documented column.
        """
        head = self.create_sql().removeprefix("CREATE TABLE IF NOT EXISTS ")
        lines = [f"``{head}``", f"    {self.doc}"]
        lines += [f"    - ``{c.name}``: {c.doc}" for c in self.columns if c.doc]
        return "\n".join(lines)


def _cols(*specs: tuple[str, ...]) -> tuple[Column, ...]:
    return tuple(Column(*s) for s in specs)


META = Table(
    "meta",
    "one row per key: ``spec`` (the sweep specification as JSON), ``fingerprint`` (SHA-256 of spec, model weights "
    "and points: resuming a different sweep is refused), ``points`` (where the points came from, JSON), "
    "``schema_version``, ``vaefast_version``, ``created``.",
    _cols(("key", TEXT), ("value", TEXT)),
)

MODELS = Table(
    "models",
    "one row per model.",
    _cols(
        ("name", TEXT, "the model's name in the sweep"),
        ("source", TEXT, "its run folder, or ``<memory>``"),
        ("config", TEXT, "the model's config as JSON (``{}`` without one)"),
        ("beta", REAL, "the KL weight (β-VAE / ELBO) or the TC weight (β-TCVAE)"),
        ("objective", TEXT, "the training objective of the config"),
        ("latent_dim", INTEGER, "latent dimension"),
        ("input_shape", TEXT, "the shape of one input as a JSON list (the shape of every blob)"),
        ("likelihood", TEXT, "the decoder's likelihood"),
        ("weights_sha256", TEXT, "SHA-256 of the state dict (checked by resume and verify)"),
    ),
)

POINTS = Table(
    "points",
    "one row per swept data point.",
    _cols(
        ("pos", INTEGER, "position in the sweep: the global point index that keys the random numbers"),
        ("dataset", TEXT, "dataset name"),
        ("split", TEXT, "dataset split"),
        ("idx", INTEGER, "index in the dataset split"),
        ("label", INTEGER, "class label, if the dataset has one"),
        ("x", BLOB, "the point"),
    ),
)

_SECONDS = "wall-clock seconds of the {} stage (non-deterministic)"

UNITS = Table(
    "units",
    "one row per completed work unit (one model, a block of points, every radius): the commit marker used by resume. "
    "Per-item time = ``seconds_total / (n_points * radii)``.",
    _cols(
        ("unit_id", TEXT, "``model|pos=A:B``"),
        ("model", TEXT, "model name"),
        ("first_pos", INTEGER, "first point position of the block"),
        ("n_points", INTEGER, "points in the block"),
        ("rank", INTEGER, "the process that computed it"),
        ("world_size", INTEGER, "the number of processes of that run"),
        *(
            (f"seconds_{s}", REAL, _SECONDS.format(s))
            for s in ("estimate", "bound", "margin", "evidence", "certify", "curve")
        ),
        ("seconds_total", REAL, "wall-clock seconds of the whole unit"),
        ("finished_at", TEXT, "UTC time of the commit"),
    ),
)

EVIDENCE = "evidence"  # the group of the margin's evidence columns: all NULL or all set
_EVIDENCE_NULL = "NULL without a decided break (margin 0, clean point undecided, or the search did not bracket)"

RESULTS = Table(
    "results",
    "one row per (model, point, r). The clean point is decided once, three-way, from its estimate "
    "(``clean_decision``); only items decided robust are ``certified`` and compared. Evidence columns (``adv_norm`` "
    "to ``delta``) are NULL without a decided break. Only what cannot be recomputed is stored: the reconstructions "
    "g(μ(x)) and g(μ(x + δ)) follow from the model, ``points.x`` and ``delta``.",
    _cols(
        ("item_id", TEXT, "``model|r=R|pos=P``"),
        ("unit_id", TEXT, "the unit that computed it"),
        ("model", TEXT, "model name"),
        ("pos", INTEGER, "point position"),
        ("r", REAL, "reconstruction radius"),
        ("seed", INTEGER, "the Monte-Carlo stream of the estimate and the margin search"),
        ("p_hat", REAL, "p̂_r(x) = hits / num_samples at the clean point"),
        ("ci_low", REAL, "lower end of its two-sided Clopper–Pearson interval at the sweep's confidence"),
        ("ci_high", REAL, "upper end of that interval"),
        ("p_low", REAL, "the one-sided Clopper–Pearson lower limit at the sweep's confidence"),
        ("hits", INTEGER, "samples whose reconstruction lies within r"),
        ("num_samples", INTEGER, "Monte-Carlo samples of the clean estimate"),
        ("robust", INTEGER, "p̂ > 1/2 (the point estimate)"),
        ("clean_decision", INTEGER, "1 robust (p_low > 1/2), -1 not robust (upper limit <= 1/2), 0 undecided"),
        ("certified", INTEGER, "clean_decision = 1: the one clean-point decision of bound, margin and certificate"),
        ("r_star", REAL, "the smallest robust radius r*(x)"),
        ("bound", REAL, "the margin bound min σ · Φ⁻¹(p̂) / ‖J‖_F (0 unless certified)"),
        ("certified_bound", REAL, "the bound at p_low"),
        ("spectral_bound", REAL, "the bound with the spectral norm of J"),
        ("whitened_bound", REAL, "the whitened bound Φ⁻¹(p̂) / ‖diag(σ)⁻¹ J‖₂"),
        ("latent_margin", REAL, "the margin in latent space min σ · Φ⁻¹(p̂)"),
        ("sigma_min", REAL, "the smallest encoder standard deviation"),
        ("jac_frobenius", REAL, "‖J_μ(x)‖_F (an unbiased estimate when randomized)"),
        ("jac_spectral", REAL, "‖J_μ(x)‖₂ (an upper confidence limit when randomized)"),
        ("jac_whitened_spectral", REAL, "‖diag(σ(x))⁻¹ J_μ(x)‖₂ (an upper confidence limit when randomized)"),
        ("jac_frobenius_upper", REAL, "upper confidence limit of ‖J_μ(x)‖_F (= jac_frobenius when exact)"),
        ("jac_method", TEXT, "how the Jacobian norms were computed: fused, exact or randomized"),
        ("jac_confidence", REAL, "the probability that the Jacobian limits hold together (1 when exact)"),
        ("cert_global", REAL, "sound certified radius from global Lipschitz constants (NULL: refused)"),
        ("cert_local", REAL, "sound certified radius from Lipschitz constants over the ball (NULL: refused)"),
        ("cert_reason", TEXT, "why a certificate was refused (NULL when both exist)"),
        ("max_radius", REAL, "the largest ‖δ‖₂ the data box allows at the point (NULL without a box)"),
        (
            "margin",
            REAL,
            "the margin estimate: where p̂ crosses 1/2 along the attack path (0: not robust; NULL: "
            "clean point undecided)",
        ),
        ("margin_lower", REAL, "the largest attacked radius decided r-robust at the sweep's confidence (0 if none)"),
        ("margin_upper", REAL, "the radius of the evidence: a δ decided to break r-robustness (NULL: none)"),
        ("bracketed", INTEGER, "whether there is evidence (a decided break, or a clean point decided not robust)"),
        ("margin_evals", INTEGER, "attacked inputs of the point's search (each decided for every radius)"),
        ("adv_norm", REAL, f"‖δ‖₂ of the evidence (= margin_upper); {_EVIDENCE_NULL}", EVIDENCE),
        ("p_hat_adv", REAL, "p̂ at x + δ the search saw, = hits_adv / num_samples_adv ≤ 1/2", EVIDENCE),
        ("ci_low_adv", REAL, "lower end of its interval", EVIDENCE),
        ("ci_high_adv", REAL, "upper end of its interval", EVIDENCE),
        ("hits_adv", INTEGER, "hits at x + δ (drawn with ``seed`` and ``pos``)", EVIDENCE),
        ("num_samples_adv", INTEGER, "samples at x + δ", EVIDENCE),
        ("ll_clean", REAL, "log p(x|z), z = μ(x)", EVIDENCE),
        ("ll_adv", REAL, "log p(x|z*), z* = μ(x + δ), of the clean x", EVIDENCE),
        ("ll_drop", REAL, "ll_clean − ll_adv in nats (negative: the likelihood rose)", EVIDENCE),
        ("rel_ll_degradation", REAL, "|ll_adv − ll_clean| / |ll_clean| (≥ 0)", EVIDENCE),
        ("delta", BLOB, "the perturbation that broke r-robustness at margin_upper (x + δ inside the box)", EVIDENCE),
    ),
)

CURVES = Table(
    "curves",
    "one row per (model, point, r, attack budget eps): the p̂-vs-attack-norm curves under the max-damage attack "
    "with ‖δ‖ ≤ eps, and the likelihood degradation at that budget.",
    _cols(
        ("item_id", TEXT, "``model|r=R|eps=E|pos=P``"),
        ("unit_id", TEXT, "the unit that computed it"),
        ("model", TEXT, "model name"),
        ("pos", INTEGER, "point position"),
        ("r", REAL, "reconstruction radius"),
        ("eps", REAL, "attack budget"),
        ("p_hat", REAL, "p̂_r at x + δ"),
        ("ci_low", REAL, "lower end of its interval"),
        ("ci_high", REAL, "upper end of its interval"),
        ("adv_norm", REAL, "‖δ‖₂"),
        ("ll_drop", REAL, "log-likelihood drop in nats"),
        ("rel_ll_degradation", REAL, "relative likelihood degradation"),
    ),
)

VERIFICATIONS = Table(
    "verifications",
    "one row per replayed claim of a results row, written by ``vaefast verify`` with a fresh estimate from an "
    "independent random stream.",
    _cols(
        ("item_id", TEXT, "the results row"),
        ("kind", TEXT, "``delta`` (x + δ is not r-robust) or ``clean`` (the certified point is r-robust at δ = 0)"),
        ("p_hat", REAL, "the fresh p̂"),
        ("ci_low", REAL, "lower end of its interval at ``confidence``"),
        ("ci_high", REAL, "upper end of its interval"),
        ("hits", INTEGER, "fresh hits"),
        ("num_samples", INTEGER, "fresh samples"),
        ("seed", INTEGER, "the replay's stream"),
        ("confidence", REAL, "confidence of the interval"),
        ("confirmed", INTEGER, "whether the claim was confirmed"),
        ("reason", TEXT, "why not (NULL when confirmed)"),
        ("checked_at", TEXT, "UTC time of the check"),
    ),
    key=("item_id", "kind"),
)

TABLES: dict[str, Table] = {t.name: t for t in (META, MODELS, POINTS, UNITS, RESULTS, CURVES, VERIFICATIONS)}
DETERMINISTIC_TABLES = ("models", "points", "results", "curves")


def table(name: str) -> Table:
    """The table called ``name``.

    Args:
        name: one of :data:`TABLES`.

    Returns:
        Its :class:`Table`.

    Raises:
        ValueError: an unknown name.
    """
    if name not in TABLES:
        raise ValueError(f"table must be one of {list(TABLES)}, got {name!r}")
    return TABLES[name]


def describe() -> str:
    """The documentation of every table.

    Returns:
        :meth:`Table.describe` of every table, as it appears in :mod:`vaefast.store`'s docstring.
    """
    return "\n".join(t.describe() for t in TABLES.values())


def markdown() -> str:
    """The schema as a Markdown page (``docs/results-database.md`` is this text; a test keeps them equal).

    Returns:
        A heading and one section per table: what a row is, its key and a table of its columns.
    """
    lines = [
        "# The results database",
        "",
        f"A sweep writes one SQLite file (schema {SCHEMA_VERSION}). "
        "This page is generated from `vaefast/schema.py`, the "
        'one definition of every table and column (`python -c "import vaefast.schema as s; print(s.markdown())"`). '
        "Blobs are little-endian float32 arrays of shape `models.input_shape`; NULL is a missing value.",
    ]
    for t in TABLES.values():
        lines += ["", f"## `{t.name}`", "", f"{t.doc} Key: `{', '.join(t.key)}`.", "", "| column | type | meaning |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| `{c.name}` | {c.type} | {c.doc.replace('|', '/')} |" for c in t.columns]
    return "\n".join(lines) + "\n"
