"""The abstract/final pattern of STYLE.md, checked on every eqx_curv class.

Every Equinox module class defined in eqx_curv (the exported ones and the private ones
behind them) is enrolled automatically. The rules:

- a class is named `Abstract*` (or `_Abstract*`) exactly when it is abstract (abstract
  methods or `eqx.AbstractVar` attributes);
- a class only inherits from abstract classes: a concrete class is final;
- no method overrides a concrete method of a base class (only abstract ones are
  implemented); `__init__` and `__check_init__` are exempt, since final classes write
  them;
- no `super()` and no `hasattr` in a class body.

The checkers return a list of problems; the self-tests at the bottom show that each
catches what it is meant to.
"""

import ast
import inspect
import sys
import textwrap

import equinox as eqx
import lineax as lx
import pytest

import eqx_curv


_EXEMPT = {"__init__", "__check_init__", "__post_init__"}


def _package_classes() -> list[type]:
    """Every `eqx.Module` subclass defined in a loaded eqx_curv module."""
    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "eqx_curv" or name.startswith("eqx_curv.")):
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, eqx.Module) and obj.__module__.startswith("eqx_curv"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def _is_abstract(cls: type) -> bool:
    return (
        inspect.isabstract(cls)
        or bool(getattr(cls, "__abstractvars__", ()))
        or bool(getattr(cls, "__abstractclassvars__", ()))
    )


def _named_abstract(cls: type) -> bool:
    return cls.__name__.lstrip("_").startswith("Abstract")


def _module_bases(cls: type) -> list[type]:
    return [
        b for b in cls.__mro__[1:] if issubclass(b, eqx.Module) and b is not eqx.Module
    ]


def _methods(cls: type) -> dict[str, object]:
    out = {}
    for name, attr in vars(cls).items():
        if name in _EXEMPT:
            continue
        if isinstance(
            attr, (staticmethod, classmethod, property)
        ) or inspect.isfunction(attr):
            out[name] = attr
    return out


def name_problems(cls: type) -> list[str]:
    if _named_abstract(cls) and not _is_abstract(cls):
        return [f"{cls.__qualname__} is named Abstract* but has nothing abstract"]
    if not _named_abstract(cls) and _is_abstract(cls):
        return [f"{cls.__qualname__} is abstract but not named Abstract*"]
    return []


def final_problems(cls: type) -> list[str]:
    return [
        f"{cls.__qualname__} subclasses the concrete class {base.__qualname__}"
        for base in _module_bases(cls)
        if not _is_abstract(base)
    ]


def override_problems(cls: type) -> list[str]:
    problems = []
    for name in _methods(cls):
        for base in cls.__mro__[1:]:
            if base is object or name not in vars(base):
                continue
            if not getattr(vars(base)[name], "__isabstractmethod__", False):
                problems.append(
                    f"{cls.__qualname__}.{name} overrides the concrete "
                    f"{base.__qualname__}.{name}"
                )
            break
    return problems


def call_problems(cls: type) -> list[str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined interactively
        return []
    return [
        f"{cls.__qualname__} calls {node.func.id}() (line {node.lineno} of its body)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"super", "hasattr"}
    ]


_CLASSES = _package_classes()
_CHECKS = [name_problems, final_problems, override_problems, call_problems]


def test_every_export_is_enrolled():
    exported = [
        obj
        for obj in vars(eqx_curv).values()
        if inspect.isclass(obj) and issubclass(obj, eqx.Module)
    ]
    assert exported, "eqx_curv exports no classes"
    assert set(exported) <= set(_CLASSES)


@pytest.mark.parametrize("check", _CHECKS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("cls", _CLASSES, ids=lambda c: c.__qualname__)
def test_abstract_final_pattern(cls, check):
    assert check(cls) == []


# Self-tests: each checker flags a class that breaks its rule.


class _AbstractThing(eqx.Module):
    size: eqx.AbstractVar[int]

    def doubled(self):
        return 2 * self.size


class _Thing(_AbstractThing):
    size: int = 1


def test_checkers_accept_the_pattern():
    for check in _CHECKS:
        assert check(_AbstractThing) == [] and check(_Thing) == []


def test_checkers_catch_violations():
    class AbstractNothing(eqx.Module):
        x: int = 0

    class Halfway(_AbstractThing):
        pass

    class Sub(_Thing):
        pass

    class Overrider(_AbstractThing):
        size: int = 1

        def doubled(self):
            return 3 * self.size

    class Caller(_AbstractThing):
        size: int = 1

        def tripled(self):
            return hasattr(self, "size") and super().doubled()

    class SolverSubclass(lx.CG):
        pass

    assert name_problems(AbstractNothing) and name_problems(Halfway)
    assert final_problems(Sub) and final_problems(SolverSubclass)
    assert override_problems(Overrider)
    assert len(call_problems(Caller)) == 2


def subclassed_final_classes(source: str) -> list[str]:
    """Classes in `source` that inherit from a concrete (final) eqx_curv class."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for base in node.bases:
            if (
                isinstance(base, ast.Attribute)
                and isinstance(base.value, ast.Name)
                and base.value.id == "eqx_curv"
            ):
                cls = getattr(eqx_curv, base.attr, None)
                if isinstance(cls, type) and not _is_abstract(cls):
                    problems.append(
                        f"{node.name} subclasses final eqx_curv.{base.attr}"
                    )
    return problems


def test_no_test_subclasses_a_final_class():
    import pathlib

    problems = []
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        problems += [
            f"{path.name}: {p}" for p in subclassed_final_classes(path.read_text())
        ]
    assert not problems, problems
    # The checker itself catches one.
    assert subclassed_final_classes("class X(eqx_curv.BFGS): pass") == [
        "X subclasses final eqx_curv.BFGS"
    ]
    assert subclassed_final_classes("class X(eqx_curv.AbstractLoss): pass") == []
