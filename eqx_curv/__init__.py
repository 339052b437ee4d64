"""eqx_curv: curvature matrices as lineax operators, and second-order optimizers."""

from ._linalg.cg import CG as CG
from ._operators.base import AbstractCurvatureOperator as AbstractCurvatureOperator


__version__ = "0.1.0"
