"""The paper's tables and figures as data: ``python -m experiments.reproduce NAME`` builds ``ARTIFACTS[NAME]``.

Each entry is a kind of artifact (``experiments.tables``, ``experiments.figures``) and its
parameters: the setting is the paper's setting whose stand-in model and dataset
``conf/reproduce/<scale>.yaml`` names. An artifact with logic of its own keeps its module
(:class:`~experiments.artifact.OwnModule`).
Adding one: an entry here and its name in the Makefile's ``ARTIFACTS``.
"""

from __future__ import annotations

from experiments.artifact import Artifact, OwnModule
from experiments.figures import ModelSizeFigure, MSweepFigure, TrainingTimeFigure
from experiments.tables import DomainLossTable, DownstreamTable, ProportionsTable

_ALL: tuple[Artifact, ...] = (
    DownstreamTable("table1", "Table 1: downstream accuracy per method (paper: GPT-2 Medium, SlimPajama-6B)",
                    setting="slimpajama_medium"),
    DomainLossTable("table2", "Table 2: validation loss per domain (paper: GPT-2 Medium, SlimPajama-6B)",
                    setting="slimpajama_medium"),
    DownstreamTable("table3", "Table 3: downstream accuracy and validation loss per method (paper: LLaMA-1.1B, the "
                    "Pile)", setting="pile_llama_1b", val_loss=True),
    DownstreamTable("table4", "Table 4: downstream accuracy and validation loss per method (paper: LLaMA-3B, the Pile)",
                    setting="pile_llama_3b", val_loss=True),
    DownstreamTable("table5", "Table 5: downstream accuracy and validation loss per method (paper: GPT-2 Small, "
                    "SlimPajama-6B)", setting="slimpajama_small", val_loss=True),
    ProportionsTable("table6", "Table 6: domain proportions of the training corpus (paper: SlimPajama-6B)",
                     setting="slimpajama_medium"),
    ProportionsTable("table7", "Table 7: domain proportions of the training corpus (paper: the Pile)",
                     setting="pile_llama_1b"),
    OwnModule("table8"),  # model shapes and parameter counts, from conf/model
    OwnModule("table9"),  # training settings, from conf/trainer/paper.yaml and conf/model
    OwnModule("table10"),  # DoGraph's objectives: solve time and loss, beside the paper's numbers
    OwnModule("figure1"),  # projected per-sample gradients, early vs late checkpoint (PCA)
    ModelSizeFigure("figure2", "Figure 2: validation loss against model size per method",
                    setting="slimpajama_medium"),  # the dataset of the scale's model-size sweep
    OwnModule("figure3"),  # model-centric clusters vs human domains
    MSweepFigure("figure4", "Figure 4: validation loss against m (DoGraph), uniform for reference", setting="ablation"),
    TrainingTimeFigure("figure5", "Figure 5: training time per method (main run + its earlier stages)",
                       setting="slimpajama_medium"),
)
ARTIFACTS: dict[str, Artifact] = {artifact.name: artifact for artifact in _ALL}

# The order in which a budgeted ``reproduce`` trains missing runs: the method comparison (Tables 1-2, Figure 5)
# first, then DoGraph's ablations, then the second model family; the other artifacts' runs after, in table order.
TRAINING_PRIORITY = ("table2", "table1", "figure5", "figure4", "table10", "figure1", "figure3", "table3", "table4",
                     "figure2")
