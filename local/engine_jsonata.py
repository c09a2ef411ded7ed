"""JSONata for moto 5.2.5's Step Functions engine, evaluated by the pure-Python `jsonata-python`.

moto took its JSONata support from LocalStack, which evaluates in a JVM; moto leaves that evaluator unset, so
every `{% ... %}` expression fails with States.Runtime ("'NoneType' object is not callable"). LocalStack also
passes `$states` and the workflow's variables by pasting them into the expression as JSON text, unescaped
(a string holding a quote or a backslash, such as an error's Cause, breaks the expression). Here each
expression is parsed once and evaluated with `$states` and the variables bound as values.

As in AWS:
- the functions Step Functions adds to JSONata: `$partition`, `$range`, `$hash`, `$random` (with an optional
  seed), `$uuid` and `$parse`;
- an expression that yields nothing (undefined), or a function, fails the state with
  States.QueryEvaluationError, and so does an expression that cannot be parsed or evaluated;
- numbers come out as JSON numbers (an integral result is an integer, as JavaScript prints it).

`install()` plugs the evaluator into the engine in this process.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import uuid
from collections.abc import Mapping
from typing import Any

import jsonata
from jsonata.functions import Functions
from jsonata.utils import Utils
from moto.stepfunctions.parser.api import EvaluationFailedEventDetails, HistoryEventType
from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
    FailureEvent,
    FailureEventException,
)
from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
    StatesErrorNameType,
)
from moto.stepfunctions.parser.asl.component.common.query_language import QueryLanguageMode
from moto.stepfunctions.parser.asl.component.common.string import string_expression
from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails
from moto.stepfunctions.parser.asl.jsonata import jsonata as moto_jsonata

HASH_ALGORITHMS = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512"}
MAX_RANGE_ITEMS = 1000  # as States.ArrayRange, which $range replaces


class JSONataError(ValueError):
    """An expression could not be evaluated, or one of Step Functions' functions was given bad arguments."""


def _plain(value: Any) -> Any:
    """jsonata-python's result as plain JSON values: its null marker as None, integral floats as ints."""
    if value is Utils.NULL_VALUE:
        return None
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _partition(array, size):
    if not isinstance(array, list) or isinstance(size, bool) or not isinstance(size, (int, float)) or size < 1:
        raise JSONataError("$partition takes an array and a chunk size of at least 1, e.g. $partition([1, 2, 3], 2)")
    size = int(size)
    return [list(array[start : start + size]) for start in range(0, len(array), size)]


def _range(start, end, step=1):
    numbers = (start, end, step)
    if any(isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) for n in numbers) or step == 0:
        raise JSONataError("$range takes integer start, end and a non-zero step, e.g. $range(0, 10, 2)")
    start, end, step = (int(n) for n in numbers)
    values = list(range(start, end + (1 if step > 0 else -1), step))
    if len(values) > MAX_RANGE_ITEMS:
        raise JSONataError(f"$range makes at most {MAX_RANGE_ITEMS} items; this one makes {len(values)}")
    return values


def _hash(data, algorithm):
    if not isinstance(data, str) or algorithm not in HASH_ALGORITHMS:
        raise JSONataError(f"$hash takes a string and one of {', '.join(HASH_ALGORITHMS)}, e.g. $hash('a', 'SHA-256')")
    return hashlib.new(HASH_ALGORITHMS[algorithm], data.encode()).hexdigest()


def _random(seed=None):
    if seed is None or seed is Utils.NULL_VALUE:
        return random.random()
    if isinstance(seed, bool) or not isinstance(seed, (int, float)):
        raise JSONataError("$random takes an optional integer seed, e.g. $random(42)")
    return random.Random(int(seed)).random()


def _parse(text):
    if not isinstance(text, str):
        raise JSONataError("$parse takes a string of JSON, e.g. $parse('{\"a\": 1}')")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise JSONataError(f"$parse could not read its argument as JSON: {error}") from None


STEP_FUNCTIONS_FUNCTIONS = {
    "partition": _partition,
    "range": _range,
    "hash": _hash,
    "random": _random,
    "uuid": lambda: str(uuid.uuid4()),
    "parse": _parse,
}


@functools.lru_cache(maxsize=1024)
def _compiled(expression: str) -> jsonata.Jsonata:
    compiled = jsonata.Jsonata(expression)
    compiled.set_output_convert_nulls(False)  # keep null (NULL_VALUE) apart from undefined (None)
    for name, function in STEP_FUNCTIONS_FUNCTIONS.items():
        compiled.register_lambda(name, function)
    return compiled


def _evaluate_raw(expression: str, bindings: Mapping[str, Any]) -> Any:
    try:
        # jsonata-python keeps its evaluation state on the expression object and finds it through a
        # thread-local: each evaluation gets its own shallow copy, which shares the parsed expression.
        instance = copy.copy(_compiled(expression))
        jsonata.Jsonata.CURRENT.jsonata = instance
        return instance.evaluate(None, dict(bindings))
    except JSONataError:
        raise
    except Exception as error:  # jsonata-python raises JException and, for some bad input, plain Python errors
        raise JSONataError(str(error) or type(error).__name__) from error


def evaluate(expression: str, bindings: Mapping[str, Any]) -> Any:
    """The value of `expression` with `bindings` as its variables (`{"states": ...}` is `$states`), as plain
    JSON values; None when the expression yields nothing. Raises JSONataError when it cannot be evaluated."""
    return _plain(_evaluate_raw(expression, bindings))


def _fail(env, cause: str) -> None:
    error_name = StatesErrorName(typ=StatesErrorNameType.StatesQueryEvaluationError)
    details = EvaluationFailedEventDetails(error=error_name.error_name, cause=cause)
    env.event_manager.add_event(
        context=env.event_history_context,
        event_type=HistoryEventType.EvaluationFailed,
        event_details=EventDetails(evaluationFailedEventDetails=details),
    )
    raise FailureEventException(
        failure_event=FailureEvent(
            env=env,
            error_name=error_name,
            event_type=HistoryEventType.EvaluationFailed,
            event_details=EventDetails(evaluationFailedEventDetails=details),
        )
    )


def _evaluate_in_state(env, expression: str, with_states: bool) -> Any:
    store = env.variable_store
    bindings = {**store._outer_scope, **store._inner_scope}
    if with_states:
        bindings["states"] = env.states._states_data
    try:
        result = _evaluate_raw(expression, bindings)
    except JSONataError as error:
        _fail(env, f"The JSONata expression '{expression}' could not be evaluated: {error}")
    if result is None:
        _fail(env, f"The JSONata expression '{expression}' returned nothing (undefined).")
    if Utils.is_function(result) or Functions.is_lambda(result):
        _fail(env, f"The JSONata expression '{expression}' returned a function, which JSON cannot hold.")
    return _plain(result)


def _eval_jsonata_string(self, env) -> None:
    env.stack.append(_evaluate_in_state(env, self.expression, with_states=True))


def _eval_variable_sample(self, env) -> None:
    with_states = self.query_language_mode == QueryLanguageMode.JSONata
    env.stack.append(_evaluate_in_state(env, self.expression, with_states))


def install() -> None:
    """Evaluate JSONata in moto's Step Functions engine in this process."""
    string_expression.StringJSONata._eval_body = _eval_jsonata_string
    string_expression.StringVariableSample._eval_body = _eval_variable_sample
    # What else in the engine evaluates an expression on its own (with its values pasted in) uses this.
    moto_jsonata._eval_jsonata = lambda expression: evaluate(expression, {})
