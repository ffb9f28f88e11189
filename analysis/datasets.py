"""Small deterministic datasets for information-plane experiments (no download, no randomness)."""

from __future__ import annotations

import numpy as np

__all__ = ["tishby_12bit"]

_N_BITS = 12
# Threshold on the squared dipole length; the values of the 4096 inputs nearest to it are 8.845 and 11.578.
_THRESHOLD = 9.0


def _icosahedron() -> np.ndarray:
    """``(12, 3)`` unit vectors of the icosahedron's vertices in a fixed order."""
    phi = (1.0 + 5.0**0.5) / 2.0
    vertices = []
    for a in (-1.0, 1.0):
        for b in (-1.0, 1.0):
            vertices += [(0.0, a, b * phi), (a, b * phi, 0.0), (b * phi, 0.0, a)]
    v = np.array(vertices)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def tishby_12bit() -> tuple[np.ndarray, np.ndarray]:
    """All 4096 inputs of 12 bits with a binary, spherically symmetric label (the task of Shwartz-Ziv & Tishby).

    The original work describes its data as 12 binary inputs standing for 12 points spread uniformly on
    a sphere, labelled by thresholding a spherically symmetric function so that ``p(y = 1) ~ 0.5``; the
    exact function was not published as an algorithm. This construction follows that description and
    is stated in full so that it can be reproduced:

    1. Input ``i`` (``0 <= i < 4096``) has bits ``x[i, j] = (i >> j) & 1`` (bit ``j`` is unit ``j``, the
       little bit order of SPEC section 2).
    2. Unit ``j`` sits at vertex ``v_j`` of a regular icosahedron (the 12 points spread uniformly on the
       sphere): the normalized vectors ``(0, a, b phi), (a, b phi, 0), (b phi, 0, a)`` for
       ``a = -1, 1`` (outer loop) and ``b = -1, 1`` (inner loop), in that order, ``phi`` the golden ratio.
    3. Each bit becomes a spin ``s_j = 2 x_j - 1`` in ``{-1, 1}`` and
       ``f(x) = || sum_j s_j v_j ||^2``, the squared length of the spin-weighted sum of the vertices (the
       dipole, degree-1 spherical-harmonic power, of the pattern on the sphere). ``f`` is unchanged by
       every rotation or reflection of the sphere that maps the icosahedron onto itself (it permutes the
       units) and by flipping all bits.
    4. ``y = 1`` iff ``f(x) > 9``. ``f`` takes 20 distinct values; 9 lies between 8.845 and 11.578 and
       gives the split nearest to one half: 2036 inputs (``p(y = 1) = 0.497``) have ``y = 1``.

    Returns
    -------
    x : np.ndarray
        ``(4096, 12)`` float64 with values in ``{0, 1}`` (as the original data file), row ``i`` the binary
        digits of ``i``. Use ``2 * x - 1`` for ``{-1, 1}`` inputs.
    y : np.ndarray
        ``(4096,)`` int64 labels in ``{0, 1}``.

    Notes
    -----
    Deterministic: no download and no random numbers. With ``X`` uniform over the 4096 inputs,
    ``H(X) = 12`` bits and ``I(X;Y) = H(Y) = 0.99998`` bits, the upper limit of ``I(T;Y)`` for any layer.

    References
    ----------
    Shwartz-Ziv, R. & Tishby, N. (2017). Opening the black box of deep neural networks via information.
    arXiv:1703.00810.

    Examples
    --------
    >>> x, y = tishby_12bit()
    >>> x.shape, y.shape, int(y.sum())
    ((4096, 12), (4096,), 2036)
    >>> x[5, :4]
    array([1., 0., 1., 0.])
    """
    x = ((np.arange(1 << _N_BITS)[:, None] >> np.arange(_N_BITS)) & 1).astype(np.float64)
    dipole = (2.0 * x - 1.0) @ _icosahedron()
    f = np.einsum("ij,ij->i", dipole, dipole)
    return x, (f > _THRESHOLD).astype(np.int64)
