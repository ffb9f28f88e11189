"""The one JSON line a benchmark of this folder prints, with the machine it ran on."""

from __future__ import annotations

import json
import os
import platform

import numpy as np


def emit(result: dict) -> None:
    """Add the numpy and Python versions, the machine and its core count to ``result``; print it as JSON."""
    result.update(
        numpy=np.__version__, python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count()
    )
    print(json.dumps(result))
