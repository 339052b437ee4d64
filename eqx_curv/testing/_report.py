"""Running a battery of named properties and reporting every failure at once."""

from collections.abc import Callable


class Skip(Exception):
    """Raised by a property that does not apply; its message says why."""


class ConformanceError(AssertionError):
    """Some properties of a conformance suite failed.

    The message lists each failing property by name with what went wrong.

    **Attributes:**

    - `failures`: a dict, property name -> what went wrong.
    - `report`: a dict, property name -> `"passed"`, `"skipped: <why>"` or
        `"FAILED"`, for every property the suite ran.
    """

    def __init__(self, subject: str, failures: dict[str, str], report: dict[str, str]):
        self.failures = dict(failures)
        self.report = dict(report)
        lines = [
            f"{subject} fails {len(failures)} of {len(report)} properties: "
            f"{', '.join(failures)}."
        ]
        for name, message in failures.items():
            lines.append(f"\n[{name}] {message}")
        super().__init__("\n".join(lines))


class Battery:
    """Runs named properties, each a function that returns (passed), raises `Skip`
    (does not apply) or raises anything else (failed: the message is kept)."""

    def __init__(self):
        self.report: dict[str, str] = {}
        self.failures: dict[str, str] = {}

    def run(self, name: str, check: Callable[[], None]) -> bool:
        try:
            check()
        except Skip as skip:
            self.report[name] = f"skipped: {skip}"
            return True
        except AssertionError as error:
            self.fail(name, str(error))
            return False
        except Exception as error:  # a property that crashes is a failed property
            self.fail(name, f"raised {type(error).__name__}: {error}")
            return False
        self.report[name] = "passed"
        return True

    def fail(self, name: str, message: str) -> None:
        self.report[name] = "FAILED"
        self.failures[name] = message

    def skip(self, name: str, why: str) -> None:
        self.report[name] = f"skipped: {why}"

    def finish(self, subject: str) -> dict[str, str]:
        if self.failures:
            raise ConformanceError(subject, self.failures, self.report)
        return self.report
