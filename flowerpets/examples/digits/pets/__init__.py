"""The PETs' switches for the digits demo, one module per PET (see ``features.py``)."""

from __future__ import annotations

from flowerpets.examples.digits.features import DemoFeature
from flowerpets.examples.digits.pets.dp import DpFeature
from flowerpets.examples.digits.pets.he import HEFeature
from flowerpets.examples.digits.pets.secagg import SecAggFeature

__all__ = ["FEATURES"]

# Update-flow order: privacy (DP) before protection (SecAgg+, HE); see features.compose.
FEATURES: list[DemoFeature] = [DpFeature(), SecAggFeature(), HEFeature()]
