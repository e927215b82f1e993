"""The typed schema of ``params.yaml``.

Every stage validates the whole file with :func:`load_params` before it does anything, so an unknown key,
a wrong type or an out-of-range value stops the stage with a message naming the key and what was
expected, and nothing is written. A stage then sees only the keys it declares under ``params`` in
``dvc.yaml`` (:func:`load_stage_params`; a declared section gives everything under it), so DVC's change
tracking and what the code reads cannot drift apart.

The sections live in :mod:`~weakseg.params.data` (``data``, ``split``, ``normalize``),
:mod:`~weakseg.params.training` (``classifier``, ``segmenter``), :mod:`~weakseg.params.pseudo_masks` (``cam``,
``refine``) and :mod:`~weakseg.params.evaluation` (``evaluate``); :mod:`~weakseg.params.schema` joins them and
reads the file, :mod:`~weakseg.params.stage_view` gives a stage its declared keys.
"""

from weakseg.params.base import ParamsError
from weakseg.params.data import (
    DataParams,
    FolderSourceParams,
    MhistSourceParams,
    NormalizeParams,
    SplitParams,
    SyntheticSourceParams,
    TissueParams,
)
from weakseg.params.evaluation import EvaluateParams
from weakseg.params.pseudo_masks import (
    BilateralPairwiseParams,
    CamParams,
    CrfParams,
    GaussianPairwiseParams,
    RefineParams,
)
from weakseg.params.schema import Params, load_params, parse_params
from weakseg.params.stage_view import DeclaredTree, StageParams, declared_params, declared_tree, load_stage_params
from weakseg.params.training import (
    AugmentParams,
    ClassifierParams,
    CurriculumParams,
    DistributedParams,
    FocalTverskyParams,
    ResNetName,
    SegmenterLossParams,
    SegmenterParams,
    UnfreezeParams,
)

__all__ = [
    "AugmentParams",
    "BilateralPairwiseParams",
    "CamParams",
    "ClassifierParams",
    "CrfParams",
    "CurriculumParams",
    "DataParams",
    "DeclaredTree",
    "DistributedParams",
    "EvaluateParams",
    "FocalTverskyParams",
    "FolderSourceParams",
    "GaussianPairwiseParams",
    "MhistSourceParams",
    "NormalizeParams",
    "Params",
    "ParamsError",
    "RefineParams",
    "ResNetName",
    "SegmenterLossParams",
    "SegmenterParams",
    "SplitParams",
    "StageParams",
    "SyntheticSourceParams",
    "TissueParams",
    "UnfreezeParams",
    "declared_params",
    "declared_tree",
    "load_params",
    "load_stage_params",
    "parse_params",
]
