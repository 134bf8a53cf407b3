"""The planted-structure study as data (issue 18): one table and one figure per scenario, apart from the paper's.

``python -m experiments.reproduce planted --scale planted`` (``make planted``) builds every entry of
:data:`PLANTED_ARTIFACTS` into ``results/planted/`` from the runs of ``conf/reproduce/planted.yaml``:
the scale's methods x seeds on ``dataset=planted`` with each scenario. The paper's artifacts
(``experiments.paper``, ``make paper``) are not among them and are unchanged.
"""

from __future__ import annotations

from experiments.planted_artifact import PlantedScenario

_ALL = (
    PlantedScenario("planted_noise", "Planted noise: a domain of word salad (25% of the text)", scenario="noise",
                    domain="noise",
                    right_answer="give the noise domain less weight than its natural share; the clean domains' loss "
                                 "should not suffer."),
    PlantedScenario("planted_duplicates", "Planted duplicates: books replaced by 8 of its documents repeated (20%)",
                    scenario="duplicates", domain="books-dup", fresh=True,
                    right_answer="give books-dup less weight than its natural share; the loss on fresh books "
                                 "documents says what the copies taught."),
    PlantedScenario("planted_hidden_split", "Planted hidden split: code and latex under one label",
                    scenario="hidden_split", domain="code+latex", leave_out_planted=False, clusters=True,
                    right_answer="for DoGraph's claim, its clusters separate code from latex inside code+latex "
                                 "(ARI within code+latex above 0, homogeneity above its chance level); the "
                                 "label-based methods cannot see the split."),
)
PLANTED_ARTIFACTS: dict[str, PlantedScenario] = {artifact.name: artifact for artifact in _ALL}
