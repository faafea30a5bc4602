"""The in-process runtime: a whole federation on one machine, with fault injection."""

from flowerpets.simulation.faults import Delay, Dropout, ErrorReply, Fault, FaultPlan
from flowerpets.simulation.grid import SimulationGrid
from flowerpets.simulation.run import SimulationResult, run_simulation

__all__ = [
    "Delay",
    "Dropout",
    "ErrorReply",
    "Fault",
    "FaultPlan",
    "SimulationGrid",
    "SimulationResult",
    "run_simulation",
]
