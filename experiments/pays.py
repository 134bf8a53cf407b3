"""When DoGraph's reweighting pays (issue 19) as data: its artifacts, apart from the paper's and the planted study's.

``python -m experiments.reproduce pays --scale pays`` (``make pays``) builds every entry of
:data:`PAYS_ARTIFACTS` into ``results/pays/`` from the runs of ``conf/reproduce/pays.yaml`` (its ``study``
holds the design: batch sizes, m, the variants of the sample weights, the longer pair), reading the cpu
and planted scales' Uniform and DoGraph runs where they are the same runs. In training order.
"""

from __future__ import annotations

from experiments.pays_artifact import EssCost, EssRules, Isolation, Longer, Variants

_ALL = (
    EssCost("pays_ess_cost", "What DoGraph's sample weights cost: Δ val loss vs Uniform against the weights' ESS"),
    EssRules("pays_ess_rules", "What the paper's update's ESS is made of, and our rules at the same cluster weights"),
    Variants("pays_variants", "DoGraph's update and our variants of its sample weights, against Uniform"),
    Isolation("pays_isolation", "Can K-means on projected gradients isolate the planted noise domain?"),
    Longer("pays_longer", "Uniform against DoGraph for 4x the steps"),
)
PAYS_ARTIFACTS = {artifact.name: artifact for artifact in _ALL}
