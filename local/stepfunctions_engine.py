"""Three fixes to moto 5.2.5's Step Functions engine, so that the batch definition parses and can start its
child executions.

- An execution started without a name gets a UUID, as in AWS; moto names it "None", so the second
  unnamed execution of a state machine fails with ExecutionAlreadyExists.
- The `states:startExecution` service integration converts between the definition's casing and boto3's
  through botocore's model of the Step Functions API, as AWS does. moto hands the task's `StateMachineArn`,
  `Input`, `Name` to boto3 unconverted (boto3 wants `stateMachineArn`, ...) and leaves the answer in
  boto3's casing (`executionArn`, `output`), where the definition reads `ExecutionArn`, `Output`, `Status`.
- moto's grammar takes a `ToleratedFailurePercentage` only with a decimal point (`5.0`) and refuses the
  integer (`5`) that CDK writes and AWS accepts; the parser gets integers there as `N.0`, the same JSON number.
  (moto does not apply the tolerance: it parses it and warns.)

`install()` patches the engine in this process; the definitions it runs are not touched.
"""

from __future__ import annotations

import re
import uuid

import botocore.session
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_sfn import (
    StateTaskServiceSfn,
)
from moto.stepfunctions.parser.asl.parse.asl_parser import AmazonStateLanguageParser
from moto.stepfunctions.parser.models import StepFunctionsParserBackend

_model = botocore.session.get_session().get_service_model("stepfunctions")
_operations = {name.lower(): name for name in _model.operation_names}
_INTEGER_PERCENTAGE = re.compile(r'("ToleratedFailurePercentage"\s*:\s*)(\d+)(?=\s*[,}])')


def _operation(task: StateTaskServiceSfn, action: str | None):
    return _model.operation_model(_operations[(action or task.resource.api_action).replace("_", "").lower()])


def install() -> None:
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

    def parse_integer_percentages(definition):
        return parse(_INTEGER_PERCENTAGE.sub(r"\1\2.0", definition))

    AmazonStateLanguageParser.parse = staticmethod(parse_integer_percentages)
    StepFunctionsParserBackend.start_execution = start_named_execution
    StateTaskServiceSfn._normalise_parameters = to_boto_request
    StateTaskServiceSfn._normalise_response = from_boto_response
    StepFunctionsParserBackend._scones_installed = True
