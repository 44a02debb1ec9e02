"""Published MedMNIST baselines shown beside our numbers (not re-run here).

Only values we could read from a source reachable from this machine are listed, each with that
source. MedMNIST v2's paper tables could not be opened here (only their abstracts), so the
values come from copies that state they reproduce the paper or medmnist.com; the AdrenalMNIST3D
rows of ResNet-18/50 with 2.5D and ACS convolutions, RetinaMNIST's rows other than ResNet-50
(224), and the AutoML rows could not be confirmed and are left out rather than quoted from
memory. RetinaMNIST's AUC and ACC are the evaluator's multi-class ones (macro one-vs-rest AUC,
argmax ACC), which our tables report too.
"""

from __future__ import annotations

from dataclasses import dataclass

CITATION = (
    "Yang et al., MedMNIST v2, Scientific Data 10:41 (2023), "
    "https://doi.org/10.1038/s41597-022-01721-8; test split, trained with 100% of the labels"
)


@dataclass(frozen=True)
class Anchor:
    """One published result.

    Attributes:
        model: The paper's model name.
        auc: Test AUC.
        acc: Test ACC.
        source: Where we read the number (the paper's own table was not reachable here).
    """

    model: str
    auc: float
    acc: float
    source: str


_MEDMNIST_COM = (
    "medmnist.com/v2 values as copied in habib-analyst/MedMNIST_v2_Reproducibility_Benchmark"
)
_BIONICHAOS = "bionichaos.com/BreastMNIST (table of the paper's baselines)"

ANCHORS: dict[tuple[str, int], list[Anchor]] = {
    ("adrenalmnist3d", 28): [
        Anchor("ResNet-50 + 3D", 0.828, 0.745, _MEDMNIST_COM),
    ],
    ("breastmnist", 28): [
        Anchor(
            "ResNet-18 (28)",
            0.901,
            0.863,
            _BIONICHAOS + "; recomputed from the authors' released predictions in "
            "omariosc/research-with-ai",
        ),
        Anchor("ResNet-18 (224)", 0.891, 0.833, _BIONICHAOS),
        Anchor("ResNet-50 (28)", 0.857, 0.812, _BIONICHAOS),
        Anchor("ResNet-50 (224)", 0.866, 0.842, _MEDMNIST_COM),
    ],
    ("retinamnist", 28): [
        Anchor("ResNet-50 (224)", 0.716, 0.511, _MEDMNIST_COM),
    ],
}
