"""Lazy package imports (PEP 562): importing a package costs nothing, every public name still resolves."""

import subprocess
import sys
import textwrap

import pytest

import actpat.analysis
import actpat.callbacks

HEAVY = ("torch", "pytorch_lightning", "lightning", "pandas", "matplotlib", "scipy", "tensorboard", "sklearn")


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_importing_the_packages_loads_nothing_heavy():
    out = run_python(f"""
        import sys
        import actpat.analysis, actpat.callbacks, actpat.recorder
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert out.strip() == "[]"


def test_functions_win_over_submodules_of_the_same_name():
    # `entropy` and `summarize` are both a submodule and the function re-exported under that name.
    out = run_python("""
        import actpat.analysis.summarize, actpat.analysis.entropy
        import actpat.analysis as a
        from actpat.analysis import entropy, summarize
        print(callable(entropy) and entropy is a.entropy, summarize.__module__, a.summarize is summarize)
    """)
    assert out.split() == ["True", "actpat.analysis.summarize", "True"]


@pytest.mark.parametrize("name", actpat.analysis.__all__)
def test_every_public_name_resolves(name):
    assert getattr(actpat.analysis, name) is not None
    assert name in dir(actpat.analysis)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        actpat.analysis.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        actpat.callbacks.nope  # noqa: B018
