"""Information plane of the binary patterns of a recorded run: ``I(X;T)`` and ``I(T;Y)`` per site and step.

For a deterministic network and ``X`` uniform over the probe samples, the pattern ``T`` of a site is a
function of ``X``, so ``I(X;T) = H(T)`` and ``I(T;Y) = H(T) - H(T|Y)`` (SPEC section 5), both plug-in
from exact pattern counts (:mod:`actpat.analysis.counts`, :mod:`actpat.analysis.entropy`). ``X`` must be
the sample, so a site recorded with ``channel`` patterns (one row per sample and spatial position) is
first turned into one ``flat`` pattern per sample by concatenating its positions' patterns.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pandas as pd

from actpat.analysis.counts import _check_bits, _counts_and_codes
from actpat.analysis.entropy import _compute_label_information, entropy, miller_madow
from actpat.recorder.reader import Patterns, Run, open_run

__all__ = ["information_plane"]

log = logging.getLogger(__name__)

PATTERNS = ("flat", "channel")
COLUMNS = ("step", "epoch", "split", "site", "site_index", "metric", "value")


def _flat_patterns(p: Patterns) -> tuple[np.ndarray, int, np.ndarray]:
    """One packed pattern per sample (its positions' patterns concatenated), its width, and its label.

    Unit ``position * C + c`` of the sample's pattern is unit ``c`` at ``position``; the order does not
    change any entropy.
    """
    n_positions = int(p.positions.max()) + 1
    if n_positions == 1:
        return p.bits, p.n_units, p.labels
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
            f"exactly once, but got {len(p)} rows that do not form complete samples (subsampled observations or "
            "repeated sample ids); record the probe split without subsampling, or use pattern='channel'."
        )
    units = np.unpackbits(p.bits[order], axis=1, count=p.n_units, bitorder="little")
    flat = np.packbits(units.reshape(n_samples, n_positions * p.n_units), axis=1, bitorder="little")
    return flat, n_positions * p.n_units, p.labels[order][::n_positions]


def _step_metrics(bits: np.ndarray, n_units: int, labels: np.ndarray, saturation: float) -> dict:
    pc, codes = _counts_and_codes(_check_bits(bits, n_units), n_units)
    m = {
        "I_XT": entropy(pc),
        "I_XT_mm": miller_madow(pc),
        "saturated": float(pc.k >= saturation * pc.n),
    }
    labelled = labels >= 0
    if labelled.any():
        codes, labels = codes[labelled], labels[labelled]
        info = _compute_label_information(codes, pc.k, labels, "empirical")
        _, label_codes = np.unique(labels, return_inverse=True)
        k_t = np.unique(codes).size
        k_ty = np.unique(codes * info["n_labels"] + label_codes.reshape(-1)).size
        # Miller-Madow on each of H(T), H(Y), H(T, Y): I + (K_T - 1 + K_Y - 1 - (K_TY - 1)) / (2 n ln 2).
        correction = (k_t + info["n_labels"] - k_ty - 1) / (2.0 * info["n"] * math.log(2.0))
        m.update(I_TY=info["i_al"], I_TY_mm=info["i_al"] + correction)
    return m


def information_plane(
    run_or_path: Run | str | os.PathLike,
    split: str = "probe",
    pattern: str = "flat",
    *,
    sites: list[str] | None = None,
    saturation: float = 0.9,
) -> pd.DataFrame:
    """``I(X;T)`` and ``I(T;Y)`` of the binary patterns of every site at every recorded step, as a tidy table.

    Parameters
    ----------
    run_or_path : Run or path
        A run opened with :func:`actpat.recorder.reader.open_run`, or its directory.
    split : str, default "probe"
        Recorded split; the probe protocol (the same samples at every step) is what makes ``X`` uniform
        over a fixed set.
    pattern : {"flat", "channel"}, default "flat"
        ``"flat"``: ``T`` is the pattern of the whole sample; a site recorded with ``channel`` patterns
        has its rows grouped by sample id (or, without ids, by consecutive rows from position 0), ordered
        by position and concatenated. ``"channel"``: the recorded rows as they are, each
        ``(sample, position)`` one observation; then ``X`` is not the sample and ``I_XT`` is only the
        pattern entropy. A site recorded ``flat`` with spatial dimensions cannot be split into channels.
    sites : list of str or None, default None
        Sites to include (default all, in forward order).
    saturation : float, default 0.9
        A point is flagged ``saturated = 1`` when its distinct patterns ``K >= saturation * n``.

    Returns
    -------
    pandas.DataFrame
        Columns ``step, epoch, split, site, site_index, metric, value``; per site and step the metrics
        ``I_XT`` = H(T), ``I_XT_mm`` (Miller-Madow), ``saturated`` (0/1), and where labels were recorded
        ``I_TY`` = H(T) - H(T|Y) and ``I_TY_mm``. Informations in **bits**.

    Raises
    ------
    ValueError
        Unknown ``split``, ``pattern`` or site, ``saturation`` outside ``(0, 1]``, or ``channel`` rows
        that do not form complete samples.

    Notes
    -----
    Plug-in estimates from exact counts. Both saturate at ``log2 n`` (``I_TY`` at ``H(Y)``) when nearly
    every sample has its own pattern, which a wide layer reaches quickly: the ``saturated`` flag marks
    those points, where the plane says nothing about compression. ``I_TY_mm`` applies the Miller-Madow
    correction to each of ``H(T)``, ``H(Y)`` and ``H(T, Y)``; it is not clipped and may fall below 0.
    ``I_TY`` uses the labelled samples only (label ``-1`` means none recorded); a warning says how many
    were left out.

    References
    ----------
    Shwartz-Ziv, R. & Tishby, N. (2017). Opening the black box of deep neural networks via information.
    arXiv:1703.00810.

    Examples
    --------
    >>> import tempfile
    >>> from actpat.recorder.shards import Record, ShardWriter, SiteMeta
    >>> tmp = tempfile.TemporaryDirectory()
    >>> writer = ShardWriter(tmp.name)
    >>> writer.start()
    >>> meta = SiteMeta("fc.relu", 0, "ReLU", (8,), 8, "flat")
    >>> bits = np.array([[0], [0], [1], [1]], dtype=np.uint8)
    >>> labels = np.array([0, 0, 1, 1])
    >>> _ = writer.put(Record(meta, 0, 0, "probe", bits, 1, 4, 0, sample_ids=np.arange(4), labels=labels))
    >>> writer.close()
    >>> table = information_plane(tmp.name)
    >>> table.set_index("metric")["value"].round(3).to_dict()
    {'I_XT': 1.0, 'I_XT_mm': 1.18, 'saturated': 0.0, 'I_TY': 1.0, 'I_TY_mm': 1.18}
    >>> tmp.cleanup()
    """
    run = run_or_path if isinstance(run_or_path, Run) else open_run(run_or_path)
    if pattern not in PATTERNS:
        raise ValueError(f"Expected `pattern` to be one of {PATTERNS}, but got {pattern!r}.")
    if split not in run.splits:
        raise ValueError(f"Expected `split` to be one of the recorded splits {run.splits}, but got {split!r}.")
    if isinstance(saturation, bool) or not isinstance(saturation, (int, float)) or not 0 < saturation <= 1:
        raise ValueError(f"Expected `saturation` to be in (0, 1], but got {saturation!r}.")
    if sites is None:
        sites = run.sites
    unknown = [s for s in sites if s not in run.sites]
    if unknown:
        raise ValueError(f"Expected `sites` to be recorded sites {run.sites}, but got {unknown}.")
    rows = []
    for site in sites:
        info = run.site_info(site)
        if pattern == "channel" and info["pattern"] == "flat" and len(info["shape"]) > 1:
            raise ValueError(
                f"Expected site {site!r} to be recorded with channel patterns for pattern='channel', but it was "
                f"recorded flat with shape {info['shape']}."
            )
        for step in run.steps(site, split):
            p = run.read(site, int(step), split)
            if len(p) == 0:
                continue
            if pattern == "flat":
                bits, n_units, labels = _flat_patterns(p)
            else:
                bits, n_units, labels = p.bits, p.n_units, p.labels
            n_unlabelled = int(np.count_nonzero(labels < 0))
            if 0 < n_unlabelled < labels.size:
                log.warning(
                    "actpat: site %r step %d: %d of %d samples have no label; I_TY uses the labelled ones.",
                    site, int(step), n_unlabelled, labels.size,
                )
            metrics = _step_metrics(bits, n_units, labels, saturation)
            rows.extend(
                (int(step), int(p.epoch), split, site, info["site_index"], metric, float(value))
                for metric, value in metrics.items()
            )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.astype(
        {"step": np.int64, "epoch": np.int64, "split": str, "site": str, "site_index": np.int64, "metric": str,
         "value": np.float64}
    )
