"""What an opt-in feature of the matrix is: one object (`Feature`) that holds
all of it.

A feature is work no default run pays for (an export, a training run, every
layer's output), asked for by a flag of `mhsa-core matrix` or a keyword of
`run_matrix` / `assert_backends_agree`. Its three parts:

- options: one frozen dataclass (`Options`) whose fields are its keywords,
  `Options()` being the feature off; built from keywords (`options`: a
  ValueError naming the argument) or from the parsed command line (it
  declares its own arguments, `add_arguments`, and reads them,
  `options_from_args`);
- a worker half: its tasks (`tasks`: {task name: task(ctx, options, timings)
  -> {result key: array}}) on the `task_context.TaskContext` the worker gives
  every task; `apply` adds them to a case that asks for the feature, and the
  case's `features` carries the options to the worker;
- a parent half: its checks (report rows, `checks.Check`), its section of the
  report and JSON (`section`), its text after the table (`tables`) and after
  the errors (`notes`), and the files it writes for the command line
  (`write_outputs`, e.g. a plot).

The table of features is `features.FEATURES`: what adding one touches is its
module and that table. Everything that enumerates them (the CLI's arguments,
the keywords, the tasks, the rows, the sections, the text) reads the table.

A feature module imports no framework at import: its worker half imports
what it needs inside its functions.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from mhsa_core.consistency.cases import Case
    from mhsa_core.consistency.checks import Check
    from mhsa_core.consistency.report import Report

__all__ = ["Feature"]


class Feature:
    """An opt-in feature of the matrix (module docstring).

    Attributes:
        name: its key in `Case.features`, job.json and the report's sections
            (the JSON key of its section).
        Options: a frozen dataclass; its fields are the feature's keywords.
        tasks: {task name: function(ctx, options, timings)}, its worker half.
        inference_tasks: those of `tasks` that a backend without training
            (numpy) runs too.
        checks: its rows of the report (`checks.Check`), after the matrix's
            own, in this order.
        model_flag: for a feature of model cases only, its flag ("--locate"):
            the command line refuses it without --model.
        examples: lines of `mhsa-core matrix --help`'s examples.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Any]]  # every feature sets it
    tasks: ClassVar[dict[str, Callable[..., Any]]] = {}
    inference_tasks: ClassVar[tuple[str, ...]] = ()
    checks: ClassVar[tuple[Check, ...]] = ()
    model_flag: ClassVar[str | None] = None
    examples: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------ options
    @property
    def keywords(self) -> tuple[str, ...]:
        """Its keywords of `run_matrix` / `assert_backends_agree`."""
        return tuple(f.name for f in dataclasses.fields(self.Options))

    # A feature's `options` takes its own keywords, by name: `features.options`
    # passes each feature only those (the subclasses' overrides name them).
    def options(self, *, rtol: float | None = None, **keywords: Any) -> Any:
        """Its `Options` from keywords (omitted ones: off), checked against
        the run's `rtol`.

        Raises:
            ValueError: a bad value, naming the argument and the value.
        """
        return self.Options(**keywords)

    def enabled(self, options: Any) -> bool:
        """Whether `options` ask for the feature."""
        return options != self.Options()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Adds its arguments to `mhsa-core matrix`'s parser."""

    def options_from_args(self, args: argparse.Namespace) -> Any:
        """Its `Options` from the parsed command line.

        Raises:
            ValueError: bad usage, as the one line the command prints.
        """
        return self.Options()

    def options_from_json(self, data: Mapping[str, Any] | None) -> Any:
        """Its `Options` from a case's job.json entry (None: the defaults)."""
        fields = {f.name for f in dataclasses.fields(self.Options)}
        return self.Options(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in (data or {}).items()
                if k in fields
            }
        )

    # -------------------------------------------------------------- cases
    def apply(self, case: Case, options: Any) -> Case:
        """`case` asking for the feature: its tasks added, its options in
        `case.features`."""
        tasks = tuple(case.tasks) + tuple(t for t in self.tasks if t not in case.tasks)
        return dataclasses.replace(
            case, tasks=tasks, features={**case.features, self.name: options}
        )

    def reads(self, case: Case) -> tuple[str, ...]:
        """The tasks of `case` that its parent half reads itself, besides its
        checks' (they are run when the case has them)."""
        return ()

    # ------------------------------------------------------------- parent
    def section(
        self, report: Report, cases: Sequence[Case], rtol: float | None = None
    ) -> dict[str, Any] | None:
        """Its JSON-ready section of `report` (`Report.sections[name]`), or
        None: nothing to show."""
        return None

    def tables(self, report: Report, options: Any) -> list[str]:
        """Texts printed after the report's table (each after a blank line)."""
        return []

    def notes(self, report: Report, options: Any) -> list[str]:
        """Texts printed after the errors (each after a blank line), also in
        `assert_backends_agree`'s message."""
        return []

    def write_outputs(
        self, report: Report, args: argparse.Namespace, out: IO[str]
    ) -> None:
        """Writes the files its command-line arguments ask for (also with
        --quiet), saying so on `out`.

        Raises:
            ValueError: a file that cannot be written, as one line.
        """
