"""DoGraph's cluster-weight objectives (docs/design.md section 2.4): ``uncertainty`` (default), ``variance``,
``robust`` and ``alignment``, each with the shared floor, graph and proximal terms."""

from dograph.method.objectives.alignment import AlignmentObjective, alignment_fixed_point
from dograph.method.objectives.base import (
    Objective,
    ObjectiveInputs,
    ObjectiveResult,
    SolverFailure,
    project_to_feasible,
)
from dograph.method.objectives.robust import RobustObjective
from dograph.method.objectives.uncertainty import UncertaintyObjective
from dograph.method.objectives.variance import VarianceObjective

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
