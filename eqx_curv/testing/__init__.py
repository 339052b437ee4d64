"""Test your own curvature code the way eqx_curv tests itself.

hypothesis strategies for matrices, models, vectors and quasi-Newton pairs; assertions
with tolerances from dtype and conditioning whose messages show the worst violation;
the conformance suites `check_operator` and `check_optimizer`; and the hypothesis
profiles eqx_curv's own suite runs under. See the documentation page "Testing your own
curvature code".

This subpackage needs hypothesis (`pip install eqx_curv[testing]`); `import eqx_curv`
itself does not import it.
"""

try:
    import hypothesis as _hypothesis  # noqa: F401
except ImportError as _error:  # pragma: no cover - exercised without hypothesis only
    raise ImportError(
        "eqx_curv.testing needs hypothesis: install it with "
        "`pip install 'eqx_curv[testing]'` (or `pip install hypothesis`)."
    ) from _error

from ._assertions import (
    assert_inverse_root as assert_inverse_root,
    assert_matches_dense as assert_matches_dense,
    assert_psd as assert_psd,
    assert_secant as assert_secant,
    assert_symmetric as assert_symmetric,
    inverse_root_tolerance as inverse_root_tolerance,
)
from ._check_operator import check_operator as check_operator
from ._check_optimizer import check_optimizer as check_optimizer
from ._models import (
    model_problem as model_problem,
    ModelProblem as ModelProblem,
    NUM_OUTPUTS as NUM_OUTPUTS,
)
from ._profiles import (
    load_profile as load_profile,
    PROFILES as PROFILES,
    register_profiles as register_profiles,
)
from ._report import ConformanceError as ConformanceError
from ._strategies import (
    kronecker_factors as kronecker_factors,
    model_problems as model_problems,
    psd_matrices as psd_matrices,
    secant_pairs as secant_pairs,
    spd_matrices as spd_matrices,
    spd_matrix as spd_matrix,
    vectors as vectors,
)
