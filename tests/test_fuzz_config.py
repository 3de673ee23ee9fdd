"""Property tests of config loading (CI size of the fuzzing; long runs: scripts/fuzz_atheris.py config).

`load_config` and `parse_config` must answer any input with a config or a ConfigError naming the
problem: no other exception (a SIGHUP reload catches only ConfigError, `check-config` likewise), and
no file written.
"""

from __future__ import annotations

import datetime
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.config import load_config, parse_config
from agent.errors import ConfigError
from tests.support import fuzzing as fz

CI = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])
SEEDS = fz.config_seeds()
EXAMPLE_TEXT = SEEDS[0][0]
MINIMAL = "cameras:\n  - source: synthetic:64x64@5\n"


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config") / "agent.yaml"


def _clean(out: fz.Outcome) -> None:
    assert out.crash is None, out.crash
    assert not out.changed, out.changed


@CI
@given(data=st.binary(max_size=3000))
@example(data=b"\xff\xfe")  # not UTF-8
@example(data=b"cameras: [{source: x}]\nx: " + b"[" * 5000 + b"]" * 5000)  # past PyYAML's recursion
def test_load_config_any_bytes(cfg_path: Path, data: bytes) -> None:
    _clean(fz.run_config_file(cfg_path, data))


@CI
@given(edits=st.lists(st.tuples(st.integers(0, len(EXAMPLE_TEXT)), st.sampled_from(fz.YAML_TOKENS)), min_size=1,
                      max_size=4))
def test_load_config_yaml_tokens_spliced(cfg_path: Path, edits: list[tuple[int, str]]) -> None:
    text = EXAMPLE_TEXT
    for pos, tok in edits:
        text = text[:pos] + tok + text[pos:]
    _clean(fz.run_config_file(cfg_path, text.encode("utf-8", "surrogatepass")))


@CI
@given(section=st.sampled_from(["cameras", "model", "engine", "mqtt", "telemetry", "cache", "updates", "service"]),
       key=st.text(max_size=12), value=st.sampled_from(fz.YAML_TOKENS) | st.text(max_size=30))
def test_load_config_value_in_any_section(cfg_path: Path, section: str, key: str, value: str) -> None:
    text = MINIMAL + f"{section}:\n  {key!r}: {value}\n" if section != "cameras" else \
        f"cameras:\n  - source: synthetic:\n    {key!r}: {value}\n"
    _clean(fz.run_config_file(cfg_path, text.encode("utf-8", "surrogatepass")))


@CI
@given(seed=st.integers(0, 2**32 - 1))
def test_generated_config_files(cfg_path: Path, seed: int) -> None:
    data, _kind = fz.config_text_case(fz.Mutator(random.Random(seed)), SEEDS)
    _clean(fz.run_config_file(cfg_path, data))


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=8)
    | st.dates() | st.datetimes() | st.integers(4300, 4400).map(lambda d: -(10**d)),  # past int's repr limit
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | st.integers(), inner,
                                                                max_size=4),
    max_leaves=15)


@CI
@given(doc=YAML_VALUES)
@example(doc={"cameras": [{"source": "x"}], "mqtt": {"port": 10**5000}})  # regression: repr past 4300 digits
def test_parse_config_any_document(doc: Any) -> None:
    _clean(fz.run_config_data(doc))


@CI
@given(section=st.sampled_from(["device_id", "log_level", "cameras", "model", "engine", "mqtt", "telemetry", "cache",
                                "updates", "service"]), value=YAML_VALUES)
def test_parse_config_any_section_value(section: str, value: Any) -> None:
    _clean(fz.run_config_data({"cameras": [{"source": "synthetic:"}], section: value}))


@CI
@given(seed=st.integers(0, 2**32 - 1))
def test_generated_config_documents(seed: int) -> None:
    doc, _kind = fz.config_data_case(fz.Mutator(random.Random(seed)), SEEDS)
    _clean(fz.run_config_data(doc))


# ---- regressions found by the fuzzer: each was an uncaught exception from load_config -------------

@pytest.mark.parametrize(("text", "said"), [
    (b"cameras: [{source: x}]\nmodel: {version: 2024-13-45}\n", "month must be in 1..12"),  # ValueError
    (b"cameras: [{source: x}]\nx: 2024-02-30\n", "day is out of range"),  # ValueError
    (b"cameras: [{source: x}]\nx: 0000-01-01\n", "year 0 is out of range"),  # ValueError
    (b"cameras: [{source: x}]\nmqtt: {port: " + b"1" * 5000 + b"}\n", "4300"),  # ValueError: int digit limit
    (b"cameras: [{source: !!int x}]\n", "invalid literal for int"),  # ValueError
    (b"cameras: [{source: !!float x}]\n", "could not convert string to float"),  # ValueError
    (b"cameras: [{source: !!bool maybe}]\n", "KeyError"),
    (b"cameras: [{source: !!timestamp x}]\n", "AttributeError"),
    (b"x: " + b"[" * 1500 + b"]" * 1500, "RecursionError"),
    (b"cameras: [{source: caf\xe9}]\n", "not UTF-8"),  # UnicodeDecodeError
], ids=["month-13", "feb-30", "year-0", "int-5000-digits", "int-tag", "float-tag", "bool-tag", "timestamp-tag",
        "deep-nesting", "latin-1"])
def test_load_config_regressions(tmp_path: Path, text: bytes, said: str) -> None:
    p = tmp_path / "agent.yaml"
    p.write_bytes(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.errors[0].startswith("(file): ")
    assert said in ei.value.errors[0]


def test_huge_hex_integer_is_named_not_crashed(tmp_path: Path) -> None:
    """YAML's 0x integers have no digit limit; the error message's repr of the value then raised ValueError."""
    p = tmp_path / "agent.yaml"
    p.write_text("cameras: [{source: x}]\nmqtt: {host: 0x" + "f" * 4000 + "}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.errors == ["mqtt.host: Input should be a valid string (got an unprintable int of 16000 bits)"]


def test_yaml_dates_and_binaries_are_field_errors() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"cameras": [{"source": datetime.date(2024, 1, 1)}], "device_id": b"\xff"})
    assert {e.split(":")[0] for e in ei.value.errors} == {"cameras[0].source", "device_id"}


def test_a_valid_example_still_loads(cfg_path: Path) -> None:
    cfg_path.write_text(MINIMAL)
    assert load_config(cfg_path).cameras[0].source == "synthetic:64x64@5"
    assert yaml.safe_load(EXAMPLE_TEXT)["cameras"]
