"""Experiments: data loading, the comparison runners and the `eqx-curv` command line."""
