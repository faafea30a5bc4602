"""Raw DP primitives: secure Gaussian noise, L2 clipping, and mechanism calibration.

Private: the package face (:mod:`flowerpets.dp`) exposes the mods built on
these. Each is tested against known answers in ``tests/dp``.
"""

from __future__ import annotations
