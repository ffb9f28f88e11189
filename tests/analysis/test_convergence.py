"""Convergence steps and dips against brute force; width control on two layers of one random process."""

import math

import numpy as np
import pandas as pd
import pytest

from actpat.analysis.convergence import convergence_step, convergence_table, depth_order, dip, dip_table
from actpat.analysis.summarize import summarize
from actpat.analysis.width import width_controlled_table
from actpat.recorder.shards import Record, ShardWriter, SiteMeta


def brute_first_above(values, steps, threshold):
    for v, s in zip(values, steps):
        if v > threshold:
            return s
    return math.nan


def brute_stays_above(values, steps, threshold):
    for i, s in enumerate(steps):
        if all(v > threshold for v in values[i:]):
            return s
    return math.nan


def brute_dip_ends(values):
    lowest = min(values)
    return max(0.0, min(values[0], values[-1]) - lowest)


def brute_dip_peaks(values):
    return max(min(max(values[: i + 1]), max(values[i:])) - values[i] for i in range(len(values)))


@pytest.mark.parametrize("seed", range(20))
def test_steps_and_dips_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 15))
    values = rng.random(n).round(2).tolist()
    steps = np.cumsum(rng.integers(1, 5, n)).tolist()
    for threshold in (0.3, 0.5, 0.9):
        assert convergence_step(values, steps, threshold=threshold) == pytest.approx(
            brute_first_above(values, steps, threshold), nan_ok=True)
        assert convergence_step(values, steps, threshold=threshold, stay=True) == pytest.approx(
            brute_stays_above(values, steps, threshold), nan_ok=True)
    d = dip(values, steps)
    assert d.depth == pytest.approx(brute_dip_ends(values), abs=1e-12)
    if d.depth > 0:
        assert values[steps.index(int(d.step))] == min(values)
    assert dip(values, steps, relative_to="peaks").depth == pytest.approx(brute_dip_peaks(values), abs=1e-12)


def test_argument_errors():
    with pytest.raises(ValueError, match="relative_to"):
        dip([1, 0, 1], relative_to="middle")
    with pytest.raises(ValueError, match="strictly increasing"):
        convergence_step([0, 1], [5, 5])
    with pytest.raises(ValueError, match="shape"):
        convergence_step([0, 1, 2], [0, 1])


def test_depth_order():
    assert depth_order([1, 2, 3, 4]) == 1.0
    assert depth_order([4, 3, 2, 1]) == -1.0
    assert depth_order([1, np.nan, 3]) == pytest.approx(1.0)
    assert math.isnan(depth_order([2, 2, 2]))
    assert depth_order([1, 3, 2, 4]) == pytest.approx(0.8)


def test_tables_per_run_and_site():
    rows = []
    for run, curve_a, curve_b in (("r0", [0.5, 0.95, 1.0], [0.2, 0.5, 1.0]), ("r1", [0.1, 0.2, 1.0], [0.92, 0.93, 1.0])):
        for site, index, curve in (("a", 0, curve_a), ("b", 1, curve_b)):
            for step, v in zip((0, 5, 10), curve):
                rows.append(dict(run=run, group="g", step=step, epoch=step // 5, split="probe", site=site,
                                 site_index=index, metric="weighted_jaccard_final", value=v))
    table = convergence_table(pd.DataFrame(rows))
    got = {(r.run, r.site): (r.step, r.censored) for r in table.itertuples()}
    assert got == {("r0", "a"): (5, False), ("r0", "b"): (10, True), ("r1", "a"): (10, True), ("r1", "b"): (0, False)}
    assert table.loc[(table["run"] == "r0") & (table["site"] == "a"), "epoch"].item() == 1
    dips = dip_table(pd.DataFrame(rows), "weighted_jaccard_final")
    assert dips["depth"].tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="Expected metric 'entropy' in the table"):
        convergence_table(pd.DataFrame(rows), "entropy")


# ------------------------------------------------------------------------ same process, two widths
# Probability that 16 units of an observation all keep their final state at each step; units flip
# independently, so a 64-unit pattern stays whole with probability keep**4.
KEEP16 = [0.3, 0.6, 0.85, 0.97, 0.975, 0.98, 0.995, 0.998, 0.999, 1.0]
STEPS = list(range(0, 100, 10))
N = 4096


def test_width_control_removes_the_width_confound(tmp_path):
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path)
    writer.start()
    for index, width in enumerate((16, 64)):
        meta = SiteMeta(f"layer{index}", index, "ReLU", (width,), width, "flat")
        final = rng.integers(0, 2, (N, width)).astype(bool)
        for step, keep in zip(STEPS, KEEP16):
            flip = rng.random((N, width)) < 1 - keep ** (1 / 16)
            writer.put(Record(meta, step, step // 10, "probe", np.packbits(final ^ flip, axis=1, bitorder="little"),
                              1, N, 0, sample_ids=np.arange(N)))
    writer.close()
    table = pd.concat([summarize(tmp_path, progress=False, references=("final",)),
                       width_controlled_table(tmp_path, n_subsets=5, progress=False, references=("final",))])
    raw = convergence_table(table, "weighted_jaccard_final").set_index("site")["step"]
    wc = convergence_table(table, "weighted_jaccard_wc_final").set_index("site")["step"]
    # wJI of independent flips is about keep / (2 - keep): 16 units exceed 0.9 at keep = 0.97 (step
    # 30); 64 units, at keep**4 / (2 - keep**4), only at keep = 0.995 (step 60).
    assert raw.to_dict() == {"layer0": 30, "layer1": 60}
    assert wc.to_dict() == {"layer0": 30, "layer1": 30}
