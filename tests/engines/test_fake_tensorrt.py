"""The TensorRT test double is held to the real bindings: every class, member, parameter name and
enum value defined in tests/support/fake_tensorrt.py must exist, the same, in tensorrt-stubs (the
machine-readable copy of pyCore.cpp, 10.13), and what the 8.6 fake adds must be gone from 10.x.

tensorrt-stubs is installed by .ci/run (`pip install --no-deps tensorrt-stubs`), which sets
EDGE_AGENT_REQUIRE_TRT_STUBS=1: there this test FAILS without them, since a fake that cannot be
checked proves nothing. Elsewhere (the README's test command on a fresh machine) it skips, saying
how to install them.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from functools import cache
from typing import Any

import pytest

from tests.support.fake_tensorrt import make_tensorrt
from tests.support.trt_stubs import find_stubs, repaired

# Members the 8.6 fake has that TensorRT 10 removed (the version switch of the fake).
ONLY_8_6 = {"ICudaEngine.num_bindings", "ICudaEngine.get_binding_index", "IExecutionContext.execute_async_v2",
            "Builder.max_batch_size", "Builder.build_engine", "IBuilderConfig.max_workspace_size",
            "NetworkDefinitionCreationFlag.EXPLICIT_PRECISION"}
ENUMS = ("BuilderFlag", "NetworkDefinitionCreationFlag", "DataType", "TensorIOMode", "MemoryPoolType", "DeviceType")


@cache
def stub_classes() -> dict[str, dict[str, Any]]:
    """class -> {member: parameter-name lists the method accepts (overloads, optional params) | "attr"}."""
    base = find_stubs()
    if base is None:
        why = "tensorrt-stubs is not installed: python3 -m pip install --no-deps tensorrt-stubs"
        if os.environ.get("EDGE_AGENT_REQUIRE_TRT_STUBS"):
            pytest.fail(why)
        pytest.skip(why)
    text = repaired((base / "tensorrt_bindings" / "tensorrt.pyi").read_text(encoding="utf-8"))
    tree = ast.parse(text)
    out: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members: dict[str, Any] = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    is_prop = any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list)
                    params = [a.arg for a in item.args.args[1:]]
                    required = len(params) - len(item.args.defaults)
                    if is_prop:
                        members[item.name] = "attr"
                    elif members.get(item.name) != "attr":
                        # every call shape the real method accepts: its required params, then each optional one
                        members.setdefault(item.name, []).extend(params[:n] for n in range(required, len(params) + 1))
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members[item.target.id] = "attr"
            out[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            out.setdefault("<module>", {})[node.name] = [[a.arg for a in node.args.args]]
    out["<enum values>"] = {f"{c}.{m}": int(v) for c, m, v in
                            re.findall(r"<(\w+)\.(\w+): (\d+)>", text)}
    return out


def fake_members(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property) or not callable(value):
            out[name] = "attr"
        else:
            out[name] = [p for p in inspect.signature(value).parameters if p != "self"]
    for slot in getattr(cls, "__slots__", ()):
        if not slot.startswith("_"):
            out[slot] = "attr"
    return out


@pytest.mark.parametrize("version", ["8.6.2.3", "10.3.0.26"])
def test_fake_matches_the_bindings(version: str) -> None:
    stubs = stub_classes()
    trt = make_tensorrt(version)
    problems: list[str] = []
    for name in dir(trt):
        obj = getattr(trt, name)
        if name.startswith("_") or not isinstance(obj, type) or name in ENUMS:
            continue
        if name not in stubs:
            problems.append(f"class {name} is not in the bindings")
            continue
        for member, kind in fake_members(obj).items():
            qual = f"{name}.{member}"
            real = stubs[name].get(member)
            if qual in ONLY_8_6:
                if version.startswith("10."):
                    problems.append(f"{qual} is 8.6-only but the 10.x fake has it")
                if real is not None:
                    problems.append(f"{qual} is still in the 10.x bindings")
                continue
            if name == "ILogger" and member in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"):
                continue  # ILogger.Severity's values, exported onto ILogger by pybind11 (export_values)
            if real is None:
                problems.append(f"{qual} is not in the bindings")
            elif kind == "attr":
                if real != "attr" and [] not in real:
                    problems.append(f"{qual} is a method in the bindings, an attribute in the fake")
            elif real == "attr" or kind not in real:
                problems.append(f"{qual}{tuple(kind)} does not match the bindings' {real}")
    values = stubs["<enum values>"]
    for enum in ENUMS:
        for member, value in getattr(trt, enum).__members__.items():
            qual = f"{enum}.{member}"
            if qual in ONLY_8_6:
                assert qual not in values
                continue
            if values.get(qual) != int(value):
                problems.append(f"{qual} = {int(value)} in the fake, {values.get(qual)} in the bindings")
    fn = stubs["<module>"]["init_libnvinfer_plugins"]
    if list(inspect.signature(trt.init_libnvinfer_plugins).parameters) not in fn:
        problems.append("init_libnvinfer_plugins signature differs")
    assert not problems, "\n".join(problems)


def test_fake_raises_on_anything_the_bindings_lack() -> None:
    trt = make_tensorrt("10.3.0.26")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1 << 30  # removed in 10.0
    with pytest.raises(AttributeError):
        config.set_timming_cache(None, False)  # misspelt
    with pytest.raises(AttributeError):
        _ = trt.IInt8EntropyCalibrator2  # the fake has no implicit calibrator: the agent must not use one
    assert not hasattr(make_tensorrt("8.6.2.3"), "IProgressMonitor")
