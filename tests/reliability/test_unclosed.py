"""A recorder or prober that is never closed: its shards are finalized at exit, and the process exits cleanly."""

import subprocess
import sys
import textwrap

import pytest

from actpat.recorder import open_run

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from actpat.recorder import ActivationRecorder, Prober

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    if sys.argv[1] == "prober":
        prober = Prober(model, TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), sys.argv[2], every=1,
                        batch_size=32)
        prober.probe(0)
    else:
        recorder = ActivationRecorder(model, sys.argv[2])
        recorder.open()
        for step in range(3):
            with recorder.capture(step):
                model(torch.randn(4, 8))
    print("end of script")  # no close(): the writer thread is still running
    """
)


@pytest.mark.parametrize("kind", ["recorder", "prober"])
def test_an_unclosed_writer_is_finalized_at_exit(tmp_path, kind):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), kind, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]  # it crashed (139) or hung before
    assert "was not closed; closing it at exit" in proc.stderr
    run = open_run(out)
    assert not run.losses and all(info.finalized for info in run.shard_infos)
    site = run.sites[0]
    expected = [0] if kind == "prober" else [0, 1, 2]
    split = "probe" if kind == "prober" else run.splits[0]
    assert run.steps(site, split).tolist() == expected
