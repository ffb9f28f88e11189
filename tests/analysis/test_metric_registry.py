"""The metric registry is the one list of what actpat emits: every emitted metric is registered, every
registered metric is emitted by a real producer, and the README's metric table is the registry's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from actpat.analysis import information_plane, metrics, summarize
from actpat.analysis.regions import pair_region_changes, region_table, segment_table
from actpat.analysis.width import width_controlled_table
from actpat.recorder.shards import Record, ShardWriter, SiteMeta

README = Path(__file__).resolve().parents[2] / "README.md"
N_SAMPLES = 48
CONV = SiteMeta("conv.relu", 0, "ReLU", (9, 2, 2), 9, "channel", value_units=tuple(range(9)))
DENSE = SiteMeta("fc.relu", 1, "ReLU", (12,), 12, "flat", value_units=tuple(range(12)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A probe run of two sites over four steps, with sample ids, labels and stored values."""
    path = tmp_path_factory.mktemp("registry_run")
    rng = np.random.default_rng(0)
    writer = ShardWriter(path)
    writer.start()
    labels = np.arange(N_SAMPLES) % 4
    for meta, n_positions in ((CONV, 4), (DENSE, 1)):
        z = rng.standard_normal((N_SAMPLES * n_positions, meta.n_units))
        for step in range(4):
            z = z + 0.3 * rng.standard_normal(z.shape)
            bits = np.packbits(z > 0, axis=1, bitorder="little")
            writer.put(Record(meta, step * 10, step, "probe", bits, n_positions, N_SAMPLES, int(step == 2),
                              sample_ids=np.arange(N_SAMPLES), labels=labels, values=z.astype(np.float16)))
    writer.close()
    return path


@pytest.fixture(scope="module")
def emitted(run_dir) -> dict[str, set[str]]:
    """Metrics emitted by each producer on the run."""
    out = {"summarize": set(summarize(run_dir, progress=False, n_classes=5).metric)}
    out["information_plane"] = set(information_plane(run_dir).metric)
    for estimator, options in (("binning", {}), ("adaptive", {}), ("kde", {"noise_var": 0.1})):
        out[f"information_plane/{estimator}"] = set(
            information_plane(run_dir, estimator=estimator, estimator_options=options).metric
        )
    out["width_controlled_table"] = set(width_controlled_table(run_dir, progress=False).metric)
    out["region_table"] = set(region_table(run_dir, progress=False).metric)
    rng = np.random.default_rng(1)
    weights, samples = rng.standard_normal((4, 3)), rng.standard_normal((6, 3))
    pairs = pair_region_changes(lambda x: x @ weights.T + 0.1, samples, n_pairs=2, progress=False)
    out["segment_table"] = set(segment_table(pairs, step=0).metric)
    return out


def test_every_emitted_metric_is_registered(emitted):
    for producer, names in emitted.items():
        assert names <= set(metrics.METRICS), (producer, sorted(names - set(metrics.METRICS)))


def test_every_registered_metric_is_emitted_by_something(emitted):
    everything = set().union(*emitted.values())
    assert set(metrics.METRICS) - everything == set()


def test_live_metrics_are_summarize_metrics_of_the_same_names(emitted):
    """The callback's live statistics are a registered subset, computed by the same pattern_measures."""
    live = metrics.metric_names(live=True)
    assert live and set(live) <= emitted["summarize"]
    from actpat.analysis.live import LIVE_METRICS

    assert tuple(LIVE_METRICS) == tuple(live)


def test_registry_declarations_are_consistent():
    for spec in metrics.METRICS.values():
        assert not (spec.constant and (spec.live or spec.headline)), spec.name
        if spec.saturates:
            assert spec.unit in ("bits", "fraction", "count", "ratio"), spec.name
    # One vocabulary: no second name for the same quantity.
    assert not [n for n in metrics.METRICS if re.search(r"(^|_)(I_|i_)(XT|TY|xt|ty)|mutual_information_label", n)]


def readme_table() -> str:
    text = README.read_text()
    match = re.search(r"<!-- metric-table:start -->\n(.*?)<!-- metric-table:end -->", text, re.S)
    assert match, "README lacks the <!-- metric-table:start --> ... <!-- metric-table:end --> section"
    return match.group(1)


def test_readme_metric_table_is_the_registry():
    """Regenerate with: python -c "from actpat.analysis.metrics import markdown_table; print(markdown_table())"."""
    assert readme_table() == metrics.markdown_table()
