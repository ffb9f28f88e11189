"""Torch side of the linear-region analysis: a model's pre-activations as a numpy callable.

:func:`actpat.analysis.regions.segment_regions` walks a segment through a piecewise-linear network
given only ``preacts(points) -> (m, n_units)``. :func:`preactivation_fn` builds that callable from an
``nn.Module``: a float64 copy of the model in eval mode, whose every activation site (found by
:class:`~actpat.recorder.hooks.SiteHooks`, the same sites the recorder records) hands its
pre-activation to the callable.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from actpat.recorder.hooks import SiteFilter, SiteHooks

__all__ = ["PreactivationFunction", "preactivation_fn"]

# Nonlinearities with a kink the on/off pattern does not see: regions would be undercounted.
_OTHER_KINKS = (nn.ReLU6, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


class PreactivationFunction:
    """``f(points) -> (m, n_units)`` float64 pre-activations of every activation site of a model.

    Built by :func:`preactivation_fn`. Columns are the sites in forward order (:attr:`sites`), each
    flattened in C order of ``(C, *rest)``; :attr:`widths` gives the columns of each site.
    """

    def __init__(
        self, model: nn.Module, input_shape: Sequence[int], hooks_kwargs: dict, device, check_kinks: bool
    ) -> None:
        self.check_kinks = check_kinks
        self.input_shape = tuple(int(d) for d in input_shape)
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=torch.float64).eval()
        self._captured: list[tuple[str, str, torch.Tensor]] = []
        self._hooks = SiteHooks(self.model, self._capture, **hooks_kwargs)
        self.sites: list[str] | None = None
        self.widths: list[int] | None = None

    def _capture(self, site: str, module_type: str, z: torch.Tensor) -> None:
        # clone: an in-place ReLU overwrites its input after this returns
        self._captured.append((site, module_type, z.detach().reshape(z.shape[0], -1).clone()))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        d = int(np.prod(self.input_shape))
        if points.ndim != 2 or points.shape[1] != d:
            raise ValueError(
                f"Expected `points` of shape (m, {d}) (flattened inputs of shape {self.input_shape}), "
                f"but got {points.shape}."
            )
        x = torch.from_numpy(points).to(self.device).reshape(-1, *self.input_shape)
        self._captured.clear()
        self._hooks.attach()
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            self._hooks.detach()
        captured, self._captured = self._captured, []
        if not captured:
            raise ValueError(
                f"Expected activation sites in the model, but a forward found none; searched for "
                f"{self._hooks.describe_search()}."
            )
        names = [name for name, _, _ in captured]
        kinked = [name for name, kind, _ in captured if kind in ("ReLU6", "function:relu6")]
        if kinked and self.check_kinks:
            raise ValueError(
                f"Expected nonlinearities with a single kink at 0, but sites {kinked} are ReLU6 (a second kink at 6 "
                "that on/off patterns do not see). Pass `check_kinks=False` to count the pattern changes anyway."
            )
        if self.sites is None:
            self.sites = names
            self.widths = [int(z.shape[1]) for _, _, z in captured]
        elif names != self.sites:
            raise ValueError(
                f"Expected the same sites in every forward, but got {names} after {self.sites}: the model's "
                "forward depends on its input, so it has no fixed pattern layout."
            )
        return torch.cat([z for _, _, z in captured], dim=1).cpu().numpy()


def preactivation_fn(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    sites: SiteFilter = None,
    module_types: Iterable[type[nn.Module]] = (),
    functional: bool = True,
    device: str | torch.device = "cpu",
    check_kinks: bool = True,
) -> PreactivationFunction:
    """The pre-activations of every activation site of ``model`` as a numpy callable, in float64.

    Parameters
    ----------
    model : nn.Module
        Copied (deep copy, cast to float64, eval mode: BatchNorm uses its running statistics and is
        affine, dropout is off); the model itself is not touched.
    input_shape : sequence of int
        Shape of one input without the batch dimension, e.g. ``(1, 8, 8)``.
    sites, module_types, functional
        Which activation sites to include, as for :class:`~actpat.recorder.ActivationRecorder`. A
        region is a linear region only when every nonlinear site is included.
    device : str or torch.device, default "cpu"
    check_kinks : bool, default True
        Refuse models with max-pooling, ReLU6 or Hardtanh modules: their kinks do not show in the
        on/off patterns, so region changes would be undercounted.

    Returns
    -------
    PreactivationFunction
        ``f(points)`` with ``points`` of shape ``(m, prod(input_shape))`` returns ``(m, n_units)``
        float64, for :func:`actpat.analysis.regions.segment_regions`.

    Notes
    -----
    The walk of :func:`~actpat.analysis.regions.segment_regions` makes one forward of about 30 points
    per region change; on a CPU such small batches often run faster with ``torch.set_num_threads(1)``.

    Raises
    ------
    ValueError
        If the model has no activation site or a kink the patterns do not see (``check_kinks``), or,
        on a later call, sites that change between forwards.

    Examples
    --------
    >>> from actpat.analysis.regions import segment_regions
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> f = preactivation_fn(net, (2,))
    >>> f(np.zeros((3, 2))).shape, f.sites
    ((3, 8), ['1'])
    >>> segment_regions(f, [-5.0, -5.0], [5.0, 5.0]).changes <= 8
    True
    """
    if check_kinks:
        kinked = [name for name, m in model.named_modules() if isinstance(m, _OTHER_KINKS)]
        if kinked:
            raise ValueError(
                f"Expected a network whose only kinks are its activation sites' zeros, but modules {kinked} add "
                "kinks (max-pooling, ReLU6, Hardtanh) that on/off patterns do not see, so region changes would be "
                "undercounted. Pass `check_kinks=False` to count the pattern changes anyway."
            )
    hooks_kwargs = {"sites": sites, "module_types": tuple(module_types), "functional": functional}
    f = PreactivationFunction(model, input_shape, hooks_kwargs, device, check_kinks)
    f(np.zeros((1, int(np.prod(f.input_shape)))))  # fixes the site layout; a setup mistake fails here
    return f
