"""Information plane of a recorded run: ``I(X;T)`` and ``I(T;Y)`` per site and step.

For a deterministic network and ``X`` uniform over the probe samples, the pattern ``T`` of a site is a
function of ``X``, so ``I(X;T) = H(T)`` and ``I(T;Y) = H(T) - H(T|Y)`` (SPEC section 5), both plug-in
from exact pattern counts (:mod:`actpat.analysis.counts`, :mod:`actpat.analysis.entropy`). ``X`` must be
the sample, so a site recorded with ``channel`` patterns (one row per sample and spatial position) is
first turned into one ``flat`` pattern per sample by concatenating its positions' patterns.

Sites recorded with their float16 pre-activations (``probe_values`` / ``store_values``) can instead be
measured with the continuous estimators of :mod:`actpat.analysis.mi` (binning, adaptive binning, KDE
bounds) on each sample's activation vector, gathered the same way.
"""

from __future__ import annotations

import logging
import math
import os

from dataclasses import dataclass

import numpy as np

from actpat.analysis import mi
from actpat.analysis._validation import NO_LABEL, check_bits, why_not_whole_samples
from actpat.analysis.driver import run_pass, tidy_table
from actpat.analysis.entropy import entropy, miller_madow, pattern_label_information
from actpat.analysis.measures import SATURATION
from actpat.recorder.reader import Patterns, Run, open_run

__all__ = ["InformationPlaneConsumer", "information_plane"]

log = logging.getLogger(__name__)

PATTERNS = ("flat", "channel")


def _sample_order(p: Patterns) -> tuple[np.ndarray | None, int]:
    """Row order that groups ``p``'s rows by sample, positions ascending, and the number of positions.

    The order is None for one position per sample (the rows are the samples as recorded).
    """
    n_positions = int(p.positions.max()) + 1
    if n_positions == 1:
        return None, 1
    # Rows of one sample are consecutive from position 0 in every record, which identifies samples
    # whose ids were not recorded.
    key = p.sample_ids if (p.sample_ids >= 0).all() else np.cumsum(p.positions == 0) - 1
    order = np.lexsort((p.positions, key))
    n_samples, rest = divmod(len(p), n_positions)
    blocks = key[order].reshape(n_samples, n_positions) if rest == 0 else None
    if (
        blocks is None
        or not np.array_equal(p.positions[order], np.tile(np.arange(n_positions), n_samples))
        or not (blocks == blocks[:, :1]).all()
        or not (np.diff(blocks[:, 0]) > 0).all()
    ):
        raise ValueError(
            f"Expected every sample of site {p.site!r} at step {p.step} to have each of its {n_positions} positions "
            f"exactly once, but got {len(p)} rows that do not form complete samples: "
            f"{why_not_whole_samples(p.sample_ids, p.positions)}; or call information_plane(..., pattern='channel') "
            "for per-observation (per-token) planes."
        )
    return order, n_positions


def _flat_patterns(p: Patterns) -> tuple[np.ndarray, int, np.ndarray]:
    """One packed pattern per sample (its positions' patterns concatenated), its width, and its label.

    Unit ``position * C + c`` of the sample's pattern is unit ``c`` at ``position``; the order does not
    change any entropy.
    """
    order, n_positions = _sample_order(p)
    if order is None:
        return p.bits, p.n_units, p.labels
    units = np.unpackbits(p.bits[order], axis=1, count=p.n_units, bitorder="little")
    flat = np.packbits(units.reshape(-1, n_positions * p.n_units), axis=1, bitorder="little")
    return flat, n_positions * p.n_units, p.labels[order][::n_positions]


def _flat_values(p: Patterns) -> tuple[np.ndarray, np.ndarray]:
    """``(n_samples, n_positions * k)`` stored values per sample, grouped as :func:`_flat_patterns`, and labels."""
    order, n_positions = _sample_order(p)
    if order is None:
        return p.values, p.labels
    return p.values[order].reshape(-1, n_positions * p.values.shape[1]), p.labels[order][::n_positions]


def _compute_binary(bits: np.ndarray, n_units: int, labels: np.ndarray, saturation: float) -> dict:
    pc, info = pattern_label_information(check_bits(bits, n_units), n_units, labels)
    m = {
        "input_information": entropy(pc),
        "input_information_mm": miller_madow(pc),
        "saturated": float(pc.k >= saturation * pc.n),
    }
    if info is not None:
        # Miller-Madow on each of H(T), H(Y), H(T, Y): I + (K_T - 1 + K_Y - 1 - (K_TY - 1)) / (2 n ln 2).
        correction = (info["k"] + info["n_labels"] - info["k_joint"] - 1) / (2.0 * info["n"] * math.log(2.0))
        m.update(mutual_information=info["mutual_information"],
                 mutual_information_mm=info["mutual_information"] + correction)
    return m


def _compute_binning(t: np.ndarray, y: np.ndarray, options: dict) -> dict:
    return mi.binning(t, y, **options)._asdict()


def _compute_adaptive(t: np.ndarray, y: np.ndarray, options: dict) -> dict:
    return mi.adaptive_binning(t, y, **options)._asdict()


def _compute_kde(t: np.ndarray, y: np.ndarray, options: dict) -> dict:
    b = mi.kde_bounds(t, y, **options)
    return {
        "input_information": b.input_information_upper,
        "input_information_lower": b.input_information_lower,
        "mutual_information": b.mutual_information_upper,
        "mutual_information_lower": b.mutual_information_lower,
    }


# Continuous estimators of the stored values, and the options each accepts (those of its mi function).
_CONTINUOUS = {
    "binning": (_compute_binning, ("n_bins", "range")),
    "adaptive": (_compute_adaptive, ("n_bins",)),
    "kde": (_compute_kde, ("noise_var", "chunk_size")),
}
ESTIMATORS = ("binary", *_CONTINUOUS)

# The parameter-free activations whose output is computed from the stored pre-activations.
_ACTIVATIONS = {
    "ReLU": lambda z: np.maximum(z, 0.0),
    "function:relu": lambda z: np.maximum(z, 0.0),
    "ReLU6": lambda z: np.clip(z, 0.0, 6.0),
    "function:relu6": lambda z: np.clip(z, 0.0, 6.0),
    "Tanh": np.tanh,
    "Sigmoid": lambda z: 0.5 * (1.0 + np.tanh(0.5 * z)),
}


def _compute_continuous(t: np.ndarray, labels: np.ndarray, estimator: str, options: dict) -> dict:
    """Metrics of one continuous estimator; its label metrics are absent where no sample has a label."""
    metrics = _CONTINUOUS[estimator][0](t, labels, options)
    if not (labels != NO_LABEL).any():
        metrics = {k: v for k, v in metrics.items() if not k.startswith("mutual_information")}
    return metrics


def _check_estimator(estimator: str, options: dict | None) -> dict:
    if estimator not in ESTIMATORS:
        raise ValueError(f"Expected `estimator` to be one of {ESTIMATORS}, but got {estimator!r}.")
    options = dict(options or {})
    allowed = _CONTINUOUS[estimator][1] if estimator in _CONTINUOUS else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"Expected `estimator_options` of estimator={estimator!r} to be among {allowed}, but got {unknown}."
        )
    if estimator == "kde" and "noise_var" not in options:
        raise ValueError(
            "Expected `estimator_options` to state the noise variance for estimator='kde' (the bounds depend on "
            "it), but got none; pass e.g. estimator_options={'noise_var': 0.1}."
        )
    return options


def _check_values_site(run: Run, site: str, estimator: str, apply_activation: bool) -> None:
    info = run.site_info(site)
    if info["value_units"] is None:
        raise ValueError(
            f"Expected site {site!r} to have stored values for estimator={estimator!r}, but it was recorded "
            "without them. Record with ActivationPatternCallback(probe_values='all') or "
            "ActivationRecorder(store_values='all'), or use estimator='binary'."
        )
    if apply_activation and info["module_type"] not in _ACTIVATIONS:
        raise ValueError(
            f"Expected site {site!r} to be one of the activations {tuple(_ACTIVATIONS)} to apply to its stored "
            f"pre-activations, but its module type is {info['module_type']!r}; pass apply_activation=False to "
            "estimate on the pre-activations."
        )
    if len(info["value_units"]) < info["n_units"]:
        log.warning(
            "actpat: site %r stores values of %d of its %d units; T is those units only.",
            site, len(info["value_units"]), info["n_units"],
        )


def _step_values(p: Patterns, pattern: str, module_type: str, apply_activation: bool) -> tuple[np.ndarray, np.ndarray]:
    if p.values is None:
        raise ValueError(
            f"Expected site {p.site!r} to have stored values at step {p.step}, but this step was recorded without "
            "them; record with probe_values='all' / store_values='all'."
        )
    t, labels = _flat_values(p) if pattern == "flat" else (p.values, p.labels)
    t = t.astype(np.float64)
    return (_ACTIVATIONS[module_type](t) if apply_activation else t), labels


@dataclass(frozen=True)
class InformationPlaneConsumer:
    """The consumer of :func:`~actpat.analysis.driver.run_pass` behind :func:`information_plane`.

    With ``strict=False`` a step whose rows do not form complete samples is left out with a warning
    (once per site and block) instead of stopping the pass: what a whole-run report wants.
    """

    pattern: str
    saturation: float
    estimator: str
    options: dict
    apply_activation: bool
    strict: bool = True

    def __post_init__(self) -> None:
        saturation = self.saturation
        if isinstance(saturation, bool) or not isinstance(saturation, (int, float)) or not 0 < saturation <= 1:
            raise ValueError(f"Expected `saturation` to be in (0, 1], but got {saturation!r}.")

    def metrics(self, p: Patterns, info: dict) -> dict:
        """The information-plane metrics of one step."""
        site, step, pattern, estimator = p.site, p.step, self.pattern, self.estimator
        if estimator == "binary":
            bits, n_units, labels = _flat_patterns(p) if pattern == "flat" else (p.bits, p.n_units, p.labels)
        else:
            t, labels = _step_values(p, pattern, info["module_type"], self.apply_activation)
            n_bad = int(np.count_nonzero(~np.isfinite(t)))
            if n_bad:
                raise ValueError(
                    f"Expected finite stored values for estimator={estimator!r}, but site {site!r} holds {n_bad} NaN or "
                    f"inf values at step {int(step)} (of split {p.split!r}; pre-activations that were not finite when "
                    "recorded). Use estimator='binary', which counts NaN as off, or leave the site out (`sites=`)."
                )
        n_unlabelled = int(np.count_nonzero(labels < 0))
        if 0 < n_unlabelled < labels.size:
            log.warning(
                "actpat: site %r step %d: %d of %d samples have no label; mutual_information uses the "
                "labelled ones.",
                site, int(step), n_unlabelled, labels.size,
            )
        if estimator == "binary":
            return _compute_binary(bits, n_units, labels, self.saturation)
        return _compute_continuous(t, labels, estimator, self.options)

    def open_block(self, site: str, info: dict, steps, start: int, load):
        skipped = []

        def feed(p: Patterns) -> tuple[int, dict] | None:
            if len(p) == 0 or skipped or p.lost_records:  # lost records: incomplete samples (the reader warned)
                return None
            try:
                return int(p.epoch), self.metrics(p, info)
            except ValueError as exc:
                if self.strict:
                    raise
                skipped.append(p.step)
                log.warning("actpat: information plane of site %r left out from step %d on: %s", site, p.step, exc)
                return None

        return feed

    def merge(self, results: list, split: str, infos: dict):
        return tidy_table(results, split, infos)


def information_plane(
    run_or_path: Run | str | os.PathLike,
    split: str | None = None,
    pattern: str = "flat",
    *,
    sites: list[str] | None = None,
    saturation: float = SATURATION,
    estimator: str = "binary",
    estimator_options: dict | None = None,
    apply_activation: bool = True,
    n_jobs: int = 1,
    client=None,
    progress: bool = False,
):
    """``I(X;T)`` and ``I(T;Y)`` of every site at every recorded step, as a tidy table.

    ``T`` is the site's binary pattern (``estimator="binary"``) or, for the continuous estimators, the
    site's activation vector computed from the float16 values stored with the patterns.

    Parameters
    ----------
    run_or_path : Run or path
        A run opened with :func:`actpat.recorder.reader.open_run`, or its directory.
    split : str or None, default None
        Recorded split; None means the run's only split (a run with several splits must name one, e.g.
        ``"probe"``). The probe protocol (the same samples at every step) is what makes ``X`` uniform
        over a fixed set.
    pattern : {"flat", "channel"}, default "flat"
        ``"flat"``: ``T`` is the pattern (or value vector) of the whole sample; a site recorded with
        ``channel`` patterns has its rows grouped by sample id (or, without ids, by consecutive rows from
        position 0), ordered by position and concatenated. ``"channel"``: the recorded rows as they are,
        each ``(sample, position)`` one observation; then ``X`` is not the sample and
        ``input_information`` is only the pattern entropy. A site recorded ``flat`` with spatial
        dimensions cannot be split into channels.
    sites : list of str or None, default None
        Sites to include (default all, in forward order).
    saturation : float, default 0.9 (:data:`actpat.analysis.measures.SATURATION`)
        ``estimator="binary"``: a point is flagged ``saturated = 1`` when its distinct patterns
        ``K >= saturation * n``; the figures mark those points.
    estimator : {"binary", "binning", "adaptive", "kde"}, default "binary"
        ``"binary"``: exact counts of the binary patterns. For sites recorded with stored values
        (``probe_values`` / ``store_values``): ``"binning"``, equal-width bins
        (:func:`actpat.analysis.mi.binning`); ``"adaptive"``, equal-mass bins
        (:func:`actpat.analysis.mi.adaptive_binning`); ``"kde"``, the pairwise-distance bounds of the
        layer plus Gaussian noise (:func:`actpat.analysis.mi.kde_bounds`).
    estimator_options : dict or None, default None
        Keyword options of the estimator's function: ``n_bins`` (default 30) and ``range`` for
        ``"binning"``; ``n_bins`` for ``"adaptive"``; ``noise_var`` (required: the bounds depend on it)
        and ``chunk_size`` for ``"kde"``; none for ``"binary"``.
    apply_activation : bool, default True
        Continuous estimators: ``T`` is the site's output, its activation function (ReLU, ReLU6, Tanh,
        Sigmoid, functional ``relu``/``relu6``) applied to the stored pre-activations. False: ``T`` is the
        pre-activations themselves (also the only choice for sites with a parametrized activation such as
        LeakyReLU or PReLU).
    n_jobs, client, progress
        Local worker processes (default 1; ``-1``: every core) or a ``distributed.Client`` to compute on a
        Dask cluster (see :mod:`actpat.analysis.driver`); a ``tqdm`` bar over the records (default off).

    Returns
    -------
    pandas.DataFrame
        Columns ``step, epoch, split, site, site_index, metric, value``; informations in **bits**; metric
        names of :mod:`actpat.analysis.metrics`. Per site and step, for ``"binary"``:
        ``input_information`` = I(X;T) = H(T), ``input_information_mm`` (Miller-Madow), ``saturated``
        (0/1), and where labels were recorded ``mutual_information`` = I(T;Y) = H(T) - H(T|Y) and
        ``mutual_information_mm``. For ``"binning"`` and ``"adaptive"``: ``input_information`` and
        ``mutual_information``. For ``"kde"``: the upper bounds as ``input_information`` and
        ``mutual_information``, the lower bounds as ``input_information_lower`` and
        ``mutual_information_lower``.

    Raises
    ------
    ValueError
        Unknown ``split`` (or None with several splits), ``pattern``, ``estimator``, option or site,
        ``saturation`` outside ``(0, 1]``,
        ``channel`` rows that do not form complete samples, a continuous estimator on a site recorded
        without values (or, with ``apply_activation``, with an activation not listed above), or
        ``"kde"`` without ``noise_var``.

    Notes
    -----
    Binary patterns: plug-in estimates from exact counts. Both saturate at ``log2 n`` (I(T;Y) at
    ``H(Y)``) when nearly every sample has its own pattern, which a wide layer reaches quickly: the
    ``saturated`` flag marks those points, where the plane says nothing about compression.
    ``mutual_information_mm``
    applies the Miller-Madow correction to each of ``H(T)``, ``H(Y)`` and ``H(T, Y)``; it is not clipped and
    may fall below 0.

    Continuous estimators work on the float16 values as stored (converted to float64). Binning depends on
    its bins: the default range is the layer's observed range at each step, ``range=(-1, 1)`` is the
    original tanh setting (see :func:`actpat.analysis.mi.binning`). When only some units' values were
    stored (``store_values=k``), ``T`` is those units, with a warning. The tidy columns do not name the
    estimator: the caller knows which one it asked for.

    ``mutual_information`` uses the labelled samples only (label ``-1`` means none recorded); a warning
    says how many were left out. ``input_information`` uses all samples.

    References
    ----------
    Shwartz-Ziv, R. & Tishby, N. (2017). Opening the black box of deep neural networks via information.
    arXiv:1703.00810.
    Saxe, A. M. et al. (2018). On the information bottleneck theory of deep learning. ICLR.
    Chelombiev, I., Houghton, C. & O'Donnell, C. (2019). Adaptive estimators show information compression
    in deep neural networks. ICLR.

    Examples
    --------
    >>> import tempfile
    >>> from actpat.recorder.shards import Record, ShardWriter, SiteMeta
    >>> tmp = tempfile.TemporaryDirectory()
    >>> writer = ShardWriter(tmp.name)
    >>> writer.start()
    >>> meta = SiteMeta("fc.relu", 0, "ReLU", (8,), 8, "flat", value_units=(0,))
    >>> bits = np.array([[0], [0], [1], [1]], dtype=np.uint8)
    >>> values = np.array([[-1.0], [-2.0], [1.0], [3.0]], dtype=np.float16)
    >>> labels = np.array([0, 0, 1, 1])
    >>> _ = writer.put(Record(meta, 0, 0, "probe", bits, 1, 4, 0, sample_ids=np.arange(4), labels=labels,
    ...                       values=values))
    >>> writer.close()
    >>> table = information_plane(tmp.name)
    >>> table.set_index("metric")["value"].round(3).to_dict()  # doctest: +NORMALIZE_WHITESPACE
    {'input_information': 1.0, 'input_information_mm': 1.18, 'saturated': 0.0, 'mutual_information': 1.0,
     'mutual_information_mm': 1.18}
    >>> binned = information_plane(tmp.name, estimator="binning", estimator_options={"n_bins": 3})
    >>> binned.set_index("metric")["value"].round(3).to_dict()
    {'input_information': 1.5, 'mutual_information': 1.0}
    >>> tmp.cleanup()
    """
    run = run_or_path if isinstance(run_or_path, Run) else open_run(run_or_path)
    if pattern not in PATTERNS:
        raise ValueError(
            f"Expected `pattern` to be one of {PATTERNS}, but got {pattern!r}: 'flat' makes one pattern of each sample, "
            "'channel' takes the recorded rows as they are (one per token of a site recorded with 'channel_last')."
        )
    split = run.resolve_split(split)
    options = _check_estimator(estimator, estimator_options)
    consumer = InformationPlaneConsumer(pattern, saturation, estimator, options, apply_activation)
    if sites is None:
        sites = run.sites
    unknown = [s for s in sites if s not in run.sites]
    if unknown:
        raise ValueError(f"Expected `sites` to be recorded sites {run.sites}, but got {unknown}.")
    for site in sites:
        info = run.site_info(site)
        if pattern == "channel" and info["pattern"] == "flat" and len(info["shape"]) > 1:
            raise ValueError(
                f"Expected site {site!r} to be recorded with channel patterns for pattern='channel', but it was "
                f"recorded flat with shape {info['shape']}."
            )
        if estimator != "binary":
            _check_values_site(run, site, estimator, apply_activation)
    result = run_pass(run, {"plane": consumer}, split, sites=sites, n_jobs=n_jobs, client=client, progress=progress,
                      desc="actpat information plane")
    return result["plane"]
