"""Fixes to moto 5.2.5's Step Functions engine: three so that the batch definition parses and can start its
child executions, two for speed.

- An execution started without a name gets a UUID, as in AWS; moto names it "None", so the second
  unnamed execution of a state machine fails with ExecutionAlreadyExists.
- The `states:startExecution` service integration converts between the definition's casing and boto3's
  through botocore's model of the Step Functions API, as AWS does. moto hands the task's `StateMachineArn`,
  `Input`, `Name` to boto3 unconverted (boto3 wants `stateMachineArn`, ...) and leaves the answer in
  boto3's casing (`executionArn`, `output`), where the definition reads `ExecutionArn`, `Output`, `Status`.
- moto's grammar takes a `ToleratedFailurePercentage` only with a decimal point (`5.0`) and refuses the
  integer (`5`) that CDK writes and AWS accepts; the parser gets integers there as `N.0`, the same JSON number.
  (moto does not apply the tolerance: it parses it and warns.)
- The engine parses the definition again for every execution, with ANTLR in pure Python: at 8 executions
  at a time that was most of the local AWS's CPU. Each definition is parsed once; an execution's state lives
  in its own Environment, the parsed program holds none (its components' heap keys, which name that state,
  are given out at parse time so that concurrent first executions cannot race for them).
- The engine builds a new boto3 client, with a new connection, for every task it runs (7 ms each here, three
  per classification, one more for a review's SQS message); each service's client is built once and shared,
  as boto3 clients are thread-safe. Its Lambda client runs the in-process handlers directly
  (`lambda_runtime.EngineLambdaClient`).
- The engine compiles every JSONPath (`$.Payload.body`, ...) each time it applies one, with a new jsonpath_ng
  parser whose construction builds its LALR tables (0.4 ms each, about ten per classification); each path is
  compiled once, as compiled paths hold no state of the data they are applied to.

Two more modules add what moto lacks, installed with these fixes: `local.engine_jsonata` evaluates JSONata
(`"QueryLanguage": "JSONata"`), `local.engine_result_writer` writes a Distributed Map's result files.

`install()` patches the engine in this process; the definitions it runs are not touched.
"""

from __future__ import annotations

import functools
import re
import uuid

import botocore.session
from moto.core.models import botocore_stubber
from moto.settings import moto_server_port
from moto.stepfunctions.parser.asl.component.common.path import result_path
from moto.stepfunctions.parser.asl.component.component import Component
from moto.stepfunctions.parser.asl.component.eval_component import EvalComponent
from moto.stepfunctions.parser.asl.component.state.exec.state_map.item_reader.eval import (
    resource_eval_s3 as item_reader_s3,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_map.result_writer.resource_eval import (
    resource_eval_s3 as result_writer_s3,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
    state_task_service_sfn,
    state_task_service_sqs,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_sfn import (
    StateTaskServiceSfn,
)
from moto.stepfunctions.parser.asl.parse.asl_parser import AmazonStateLanguageParser
from moto.stepfunctions.parser.asl.utils import json_path
from moto.stepfunctions.parser.asl.utils.boto_client import boto_client_for
from moto.stepfunctions.parser.models import StepFunctionsParserBackend

from local import engine_jsonata, engine_result_writer, lambda_runtime

_model = botocore.session.get_session().get_service_model("stepfunctions")
_operations = {name.lower(): name for name in _model.operation_names}
_INTEGER_PERCENTAGE = re.compile(r'("ToleratedFailurePercentage"\s*:\s*)(\d+)(?=\s*[,}])')


def _operation(task: StateTaskServiceSfn, action: str | None):
    return _model.operation_model(_operations[(action or task.resource.api_action).replace("_", "").lower()])


def _give_heap_keys(value, seen: set[int]) -> None:
    if isinstance(value, (list, tuple)):
        for item in value:
            _give_heap_keys(item, seen)
    elif isinstance(value, Component) and id(value) not in seen:
        seen.add(id(value))
        if isinstance(value, EvalComponent):
            value.heap_key  # noqa: B018 - assigned on first read
        for attribute in vars(value).values():
            _give_heap_keys(attribute, seen)


@functools.cache
def _shared_client(region, service, port, in_process):
    client = boto_client_for(region, service)
    return lambda_runtime.EngineLambdaClient(client, region) if service == "lambda" else client


def shared_client(region, service, state_credentials=None):
    # moto 5.2.5's boto_client_for ignores state_credentials, and answers a client for either the server at
    # MOTO_PORT or, inside `mock_aws`, moto in this process
    return _shared_client(region, service, moto_server_port(), botocore_stubber.enabled)


def install() -> None:
    engine_jsonata.install()
    engine_result_writer.install()
    if getattr(StepFunctionsParserBackend, "_scones_installed", False):
        return
    start_execution = StepFunctionsParserBackend.start_execution
    normalise_parameters = StateTaskServiceSfn._normalise_parameters
    parse = AmazonStateLanguageParser.parse

    def start_named_execution(self, state_machine_arn, name=None, execution_input=None, trace_header=None):
        return start_execution(self, state_machine_arn, name or str(uuid.uuid4()), execution_input, trace_header)

    def to_boto_request(self, parameters, boto_service_name=None, service_action_name=None):
        normalise_parameters(self, parameters, boto_service_name, service_action_name)
        self._to_boto_request(parameters, _operation(self, service_action_name).input_shape)

    def from_boto_response(self, response, boto_service_name=None, service_action_name=None):
        self._from_boto_response(response, _operation(self, service_action_name).output_shape)

    @functools.lru_cache(maxsize=256)
    def parse_once(definition):
        program, tree = parse(_INTEGER_PERCENTAGE.sub(r"\1\2.0", definition))
        _give_heap_keys(program, set())
        return program, tree

    AmazonStateLanguageParser.parse = staticmethod(parse_once)
    StepFunctionsParserBackend.start_execution = start_named_execution
    StateTaskServiceSfn._normalise_parameters = to_boto_request
    StateTaskServiceSfn._normalise_response = from_boto_response
    for module in (lambda_eval_utils, state_task_service_sfn, state_task_service_sqs, item_reader_s3, result_writer_s3):
        module.boto_client_for = shared_client
    for module in (json_path, result_path):
        module.parse = functools.lru_cache(maxsize=1024)(module.parse)
    StepFunctionsParserBackend._scones_installed = True
