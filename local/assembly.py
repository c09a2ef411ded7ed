"""Read a synthesized cloud assembly (`cdk.out`) and resolve its templates' intrinsic functions locally."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCOUNT = "123456789012"
REGION = "us-east-1"
PSEUDO = {
    "AWS::AccountId": ACCOUNT,
    "AWS::Region": REGION,
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::NoValue": None,
}


class AssemblyError(Exception):
    """The cloud assembly cannot be read, or lacks stacks that are needed."""


class UnresolvedReference(KeyError):
    """A template refers to something the local deployment has not created."""


@dataclass
class Stack:
    name: str
    template: dict
    assets: dict[str, Path]  # S3 object key in the template -> the asset's file or folder in cdk.out
    tags: dict[str, str] = field(default_factory=dict)  # the stack's tags, e.g. {"environment": "dev"}

    @property
    def resources(self) -> dict[str, dict]:
        return self.template.get("Resources", {})


def read_assembly(outdir: Path) -> list[Stack]:
    """The stacks of a cloud assembly, in dependency order."""
    try:
        manifest = json.loads((outdir / "manifest.json").read_text())
    except json.JSONDecodeError as error:
        raise AssemblyError(f"{outdir / 'manifest.json'} is not JSON ({error}): run `make synth` again") from None
    artifacts = manifest["artifacts"]
    stacks = []
    for name, artifact in artifacts.items():
        if artifact["type"] != "aws:cloudformation:stack":
            continue
        assets = {}
        for dependency in artifact.get("dependencies", []):
            if artifacts[dependency]["type"] == "cdk:asset-manifest":
                asset_file = artifacts[dependency]["properties"]["file"]
                for entry in json.loads((outdir / asset_file).read_text()).get("files", {}).values():
                    for destination in entry["destinations"].values():
                        assets[destination["objectKey"]] = outdir / entry["source"]["path"]
        template = json.loads((outdir / artifact["properties"]["templateFile"]).read_text())
        stacks.append(Stack(name, template, assets, artifact["properties"].get("tags", {})))
    return stacks


@dataclass
class Resolver:
    """Resolves Ref, Fn::GetAtt, Fn::Join, Fn::Sub, Fn::ImportValue, Fn::Select, Fn::Split, Fn::FindInMap.

    `physical[stack][logical_id]` holds what the local deployment created: "Ref" and attribute names.
    """

    physical: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    exports: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, stack: Stack, logical_id: str, **attributes: Any) -> None:
        self.physical.setdefault(stack.name, {})[logical_id] = attributes

    def resolve(self, stack: Stack, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(stack, item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((function, argument),) = value.items()
            if function == "Ref" or function.startswith("Fn::"):
                return self._intrinsic(stack, function, argument)
        return {key: self.resolve(stack, item) for key, item in value.items()}

    def _attribute(self, stack: Stack, logical_id: str, attribute: str) -> Any:
        try:
            return self.physical[stack.name][logical_id][attribute]
        except KeyError:
            raise UnresolvedReference(f"{stack.name}/{logical_id}.{attribute} is not deployed locally") from None

    def _intrinsic(self, stack: Stack, function: str, argument: Any) -> Any:
        if function == "Ref":
            if argument in PSEUDO:
                return PSEUDO[argument]
            if argument in stack.template.get("Parameters", {}):
                return self.parameters.get(stack.name, {}).get(
                    argument, stack.template["Parameters"][argument].get("Default")
                )
            return self._attribute(stack, argument, "Ref")
        if function == "Fn::GetAtt":
            logical_id, attribute = argument if isinstance(argument, list) else argument.split(".", 1)
            return self._attribute(stack, logical_id, attribute)
        if function == "Fn::Join":
            separator, parts = argument
            return separator.join(str(self.resolve(stack, part)) for part in self.resolve(stack, parts))
        if function == "Fn::Sub":
            text, variables = (argument, {}) if isinstance(argument, str) else argument
            variables = {key: self.resolve(stack, item) for key, item in variables.items()}

            def substitute(match: re.Match) -> str:
                name = match.group(1)
                if name in variables:
                    return str(variables[name])
                if "." in name:
                    return str(self._intrinsic(stack, "Fn::GetAtt", name))
                return str(self._intrinsic(stack, "Ref", name))

            return re.sub(r"\$\{([^!}][^}]*)\}", substitute, text)
        if function == "Fn::ImportValue":
            name = self.resolve(stack, argument)
            if name not in self.exports:
                raise UnresolvedReference(f"export {name} is not deployed locally")
            return self.exports[name]
        if function == "Fn::Select":
            index, items = argument
            return self.resolve(stack, items)[int(self.resolve(stack, index))]
        if function == "Fn::Split":
            separator, text = argument
            return self.resolve(stack, text).split(separator)
        if function == "Fn::FindInMap":
            mapping, key, attribute = (self.resolve(stack, part) for part in argument)
            return stack.template["Mappings"][mapping][key][attribute]
        raise UnresolvedReference(f"{function} is not supported by the local resolver")

    def record_outputs(self, stack: Stack) -> None:
        for output in stack.template.get("Outputs", {}).values():
            if "Export" in output:
                self.exports[self.resolve(stack, output["Export"]["Name"])] = self.resolve(stack, output["Value"])
