"""Raw DP primitives: secure Gaussian noise, exact integer noise, L2 clipping, calibration.

Private: the package face (:mod:`flowerpets.dp`) exposes the mods built on
these. Each is tested against known answers in ``tests/dp``.
"""

from __future__ import annotations
