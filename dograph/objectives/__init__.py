"""DoGraph's cluster-weight objectives (docs/design.md section 2.4): ``uncertainty`` (default), ``variance``,
``robust`` and ``alignment``, each with the shared floor, graph and proximal terms."""

from dograph.objectives.alignment import AlignmentObjective, alignment_fixed_point
from dograph.objectives.base import (
    Objective,
    ObjectiveInputs,
    ObjectiveResult,
    SolverFailure,
    project_to_feasible,
)
from dograph.objectives.robust import RobustObjective
from dograph.objectives.uncertainty import UncertaintyObjective
from dograph.objectives.variance import VarianceObjective

__all__ = [
    "AlignmentObjective",
    "Objective",
    "ObjectiveInputs",
    "ObjectiveResult",
    "RobustObjective",
    "SolverFailure",
    "UncertaintyObjective",
    "VarianceObjective",
    "alignment_fixed_point",
    "project_to_feasible",
]
