"""Expected refusals: bad input stops a Prefect run with one line, not a traceback.

A refusal (``Refusal``: ``DataValidationError``, ``flows.config.ConfigError``; or
``dataio.DataError``) says the user's
input is wrong, and names file, row and rule; a traceback says the code is, and is kept for
that. Prefect logs an exception raised in a task or a flow with its traceback, once per level
(prefect 3.9 ``task_engine.handle_retry``: ``exc_info=True``; ``flow_engine.run_context``:
``logger.exception``), and puts ``str(exc)`` in each state message: a refused ``rlhf run``
printed two tracebacks and the validation report three times above the CLI's own message.

Refusals therefore never leave a task or a flow as exceptions:

- a task wrapped in ``refusals_returned`` returns the refusal as its value (``Refused``); the
  task run completes, having done its job, which was to judge the input;
- the flow takes it with ``accepted(task(...))``, which raises it again inside the flow;
- a flow wrapped in ``refusals_as_failed`` returns ``Failed(message=<one line>, data=<the
  exception>)`` for it: a flow may return its final state (Prefect's manage-states guide).
  Prefect logs one "Finished in state Failed('refused: ...')" line, the UI shows that line,
  and the flow's caller (the CLI, or a parent flow) gets the very exception raised back
  (``State.result()`` raises a failed state's exception).

Any other exception raises as before, traceback and all. (A task may not return a Failed
state the same way: prefect 3.9 logs that with ``exc_info=True`` and hands the caller the state
object, not its exception.)
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from dataio import DataError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Refusal(Exception):
    """Input the pipeline refuses, not a bug: ``headline`` is one line for logs and run states,
    ``str(e)`` the full message (file, row, rule) the CLI prints before exiting 2."""

    @property
    def headline(self) -> str:
        return str(self).splitlines()[0] if str(self) else type(self).__name__


REFUSALS = (Refusal, DataError)


def headline(e: BaseException) -> str:
    """One line saying what was refused (a DataError's message is one line already)."""
    return e.headline if isinstance(e, Refusal) else str(e).splitlines()[0]


@dataclass(frozen=True)
class Refused:
    """A task's refusal, returned as its value (``refusals_returned``); ``accepted`` raises it."""

    error: BaseException

    def __repr__(self) -> str:  # Prefect may log a task's result: one line, not the report
        return f"Refused({headline(self.error)!r})"


def accepted(value: T | Refused) -> T:
    """A task's result, or its refusal raised again (inside a ``refusals_as_failed`` flow)."""
    if isinstance(value, Refused):
        raise value.error
    return value


def refusals_returned(fn: F) -> F:
    """Wrap a task's function: a refusal becomes its return value (``Refused``), not an
    exception Prefect would log with its traceback. Put it under ``@task``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except REFUSALS as e:
            # A refusal is no result to cache (tasks.cache: a finished stage's record): the
            # next run must judge the input again, whatever was fixed since.
            from prefect.transactions import get_transaction

            txn = get_transaction()
            if txn is not None:
                txn.write_on_commit = False
            return Refused(e)

    return _with_signature(run, fn)


def refusals_as_failed(fn: F) -> F:
    """Wrap a flow's function: a refusal ends the flow run in a Failed state carrying it (one
    log line, no traceback); its caller gets the exception. Put it under ``@flow``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except REFUSALS as e:
            from prefect.states import Failed

            return Failed(message=f"refused: {headline(e)}", data=e)

    return _with_signature(run, fn)


def _with_signature(run: Callable[..., Any], fn: F) -> F:
    # Prefect validates flow parameters against the signature and resolves string annotations
    # (``from __future__ import annotations``) in the function's ``__globals__``: the wrapper's
    # would be this module's, so it carries the signature with annotations already evaluated.
    run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]
