"""Lazy package imports (PEP 562): importing a package costs nothing, every public name still resolves."""

import subprocess
import sys
import textwrap

import pytest

import actpat.analysis
import actpat.callbacks
import actpat.recorder

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


def _imported_modules(package: str) -> dict[str, set[str]]:
    """Every module each file of ``package`` imports, at any depth (a lazy import inside a function too)."""
    import ast
    from pathlib import Path

    root = Path(getattr(actpat, package).__path__[0])
    found = {}
    for path in sorted(root.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from actpat import callbacks` too
                names.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
        found[path.name] = names
    return found


@pytest.mark.parametrize("package", ["recorder", "analysis"])
def test_data_flows_one_way_no_package_imports_the_callbacks(package):
    # The callback is a thin adapter over the recorder: neither the recorder nor the analysis reaches up to it.
    # The command line (analysis/cli.py, the console script) is the top: it imports each command's side lazily.
    reaching_up = {name: sorted(m for m in modules if m.startswith("actpat.callbacks"))
                   for name, modules in _imported_modules(package).items() if name != "cli.py"}
    assert {name: modules for name, modules in reaching_up.items() if modules} == {}
