"""The hypothesis profiles eqx_curv's own suite runs under, for users' conftest files.

```python
# conftest.py
from eqx_curv.testing import load_profile, register_profiles

register_profiles()
load_profile()  # $HYPOTHESIS_PROFILE, else "dev"
```
"""

import os

import hypothesis
from hypothesis.errors import InvalidArgument


# name -> keyword arguments of `hypothesis.settings`. Every profile has no deadline:
# the first example of a property compiles, and compilation is slow.
PROFILES: dict[str, dict] = {
    # Quick local runs: few examples, random ones (a different draw each run).
    "dev": dict(max_examples=10, deadline=None, print_blob=True),
    # Continuous integration: derandomised, so that a run is reproducible and a
    # failure reappears on the next run.
    "ci": dict(
        max_examples=20,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    ),
    # Accelerators: more examples (the point there is how matmul precision moves the
    # results), still derandomised.
    "gpu": dict(max_examples=30, deadline=None, derandomize=True, print_blob=True),
}


def register_profiles(prefix: str = "") -> None:
    """Register eqx_curv's hypothesis profiles `dev`, `ci` and `gpu`.

    - `dev`: 10 random examples per property, no deadline.
    - `ci`: 20 examples, derandomised (the same examples every run), no deadline.
    - `gpu`: 30 examples, derandomised, no deadline.

    **Arguments:**

    - `prefix`: prepended to each name (e.g. `"eqx_curv-"` gives `"eqx_curv-ci"`),
        should a project already have profiles of these names.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be a string, not {type(prefix).__name__}.")
    for name, kwargs in PROFILES.items():
        hypothesis.settings.register_profile(prefix + name, **kwargs)


def load_profile(
    default: str = "dev", environment_variable: str = "HYPOTHESIS_PROFILE"
) -> str:
    """Load the profile named by an environment variable, else `default`.

    **Arguments:**

    - `default`: the profile to load when the variable is unset.
    - `environment_variable`: the variable to read (`HYPOTHESIS_PROFILE=ci pytest`).

    **Returns:**

    The name of the profile loaded.
    """
    name = os.environ.get(environment_variable, default)
    try:
        hypothesis.settings.load_profile(name)
    except InvalidArgument as error:
        raise ValueError(
            f"No hypothesis profile is named {name!r} (from `{environment_variable}` "
            f"or `default`). Call `register_profiles()` first, or pick one of "
            f"{sorted(PROFILES)}."
        ) from error
    return name
