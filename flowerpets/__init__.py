"""flowerpets: privacy-enhancing technologies for federated learning.

The core (records, messages, apps, strategies) is re-exported here; the PETs
live in their own packages (``flowerpets.secagg``, ``flowerpets.dp``,
``flowerpets.he``) and the runtimes in ``flowerpets.simulation`` and
``flowerpets.transport``.
"""

from flowerpets.core import *  # noqa: F403 - the core is this package's face
from flowerpets.core import __all__ as _core_all

__version__ = "0.1.0.dev0"

__all__ = sorted(_core_all)
