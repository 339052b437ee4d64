"""eqx_curv: curvature matrices as lineax operators, and second-order optimizers."""

from ._layers import (
    AbstractKFACRule as AbstractKFACRule,
    register_kfac_layer as register_kfac_layer,
)
from ._linalg.cg import CG as CG
from ._linalg.eigh import (
    eigh_with_retry as eigh_with_retry,
    EighRetryResult as EighRetryResult,
)
from ._linalg.newton_schulz import (
    CUBIC_COEFFICIENTS as CUBIC_COEFFICIENTS,
    MUON_COEFFICIENTS as MUON_COEFFICIENTS,
    newton_schulz as newton_schulz,
    newton_schulz_inverse_sqrt as newton_schulz_inverse_sqrt,
)
from ._linalg.power_iteration import (
    power_iteration as power_iteration,
    PowerIterationResult as PowerIterationResult,
)
from ._linalg.roots import (
    inverse_pth_root as inverse_pth_root,
    InverseRootResult as InverseRootResult,
    matrix_power as matrix_power,
    power_minus_identity as power_minus_identity,
)
from ._losses import (
    AbstractLoss as AbstractLoss,
    MeanSquaredError as MeanSquaredError,
    SigmoidBinaryCrossEntropy as SigmoidBinaryCrossEntropy,
    SoftmaxCrossEntropy as SoftmaxCrossEntropy,
)
from ._network_optimizers.adahessian import AdaHessian as AdaHessian
from ._network_optimizers.base import (
    AbstractNetworkOptimizer as AbstractNetworkOptimizer,
    StepInfo as StepInfo,
)
from ._network_optimizers.diagonal_newton import (
    StochasticDiagonalNewton as StochasticDiagonalNewton,
)
from ._network_optimizers.fisher_adam import FisherAdam as FisherAdam
from ._network_optimizers.gauss_newton import (
    GaussNewton as GaussNewton,
    NaturalGradient as NaturalGradient,
)
from ._network_optimizers.kfac import KFAC as KFAC
from ._network_optimizers.muon import hidden_matrices as hidden_matrices, Muon as Muon
from ._network_optimizers.sgd import SGD as SGD
from ._network_optimizers.shampoo import Shampoo as Shampoo
from ._network_optimizers.soap import SOAP as SOAP
from ._operators.base import AbstractCurvatureOperator as AbstractCurvatureOperator
from ._operators.block_diagonal import BlockDiagonalOperator as BlockDiagonalOperator
from ._operators.damped import DampedOperator as DampedOperator
from ._operators.diagonal import (
    exact_diagonal as exact_diagonal,
    hutchinson_diagonal as hutchinson_diagonal,
)
from ._operators.eigh import EighOperator as EighOperator
from ._operators.ggn import (
    EmpiricalFisherOperator as EmpiricalFisherOperator,
    FisherOperator as FisherOperator,
    GGNOperator as GGNOperator,
)
from ._operators.hessian import HessianOperator as HessianOperator
from ._operators.kfac import (
    KFACOperator as KFACOperator,
    KFACSpectralOperator as KFACSpectralOperator,
)
from ._operators.kronecker import (
    KroneckerEigenOperator as KroneckerEigenOperator,
    KroneckerOperator as KroneckerOperator,
)
from ._operators.woodbury import WoodburyOperator as WoodburyOperator
from ._optimizers.diagonal_newton import DiagonalNewton as DiagonalNewton
from ._optimizers.gradient_descent import GradientDescent as GradientDescent
from ._optimizers.line_search import (
    AbstractLineSearch as AbstractLineSearch,
    LineSearchResult as LineSearchResult,
    OptimistixSearch as OptimistixSearch,
    StrongWolfe as StrongWolfe,
)
from ._optimizers.minimiser import (
    AbstractLineSearchMinimiser as AbstractLineSearchMinimiser,
)
from ._optimizers.newton import (
    DampedNewton as DampedNewton,
    Newton as Newton,
    SaddleFreeNewton as SaddleFreeNewton,
)
from ._optimizers.quasi_newton import BFGS as BFGS, LBFGS as LBFGS
from ._sharding.data_parallel import (
    data_parallel as data_parallel,
    DataParallel as DataParallel,
    replicate as replicate,
    shard_batch as shard_batch,
)


__version__ = "0.1.0"
