"""EmulatorConfig validation and the RequestLog (memory + JSON lines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batch_upscaler.catalogue import BUILTIN
from batch_upscaler.emulator import EmulatorConfig, FaultKind, RequestLog, RequestRecord


def test_defaults() -> None:
    config = EmulatorConfig()
    assert (config.host, config.port, config.quota_rpm) == ("127.0.0.1", 0, None)
    assert (config.output_max_pixels, config.png_compress_level, config.slow_s) == (None, 1, 30.0)
    assert config.catalogue is BUILTIN
    assert dict(config.faults_by_image) == {} and dict(config.fault_rates) == {}


def test_fault_names_are_coerced_and_mappings_frozen() -> None:
    config = EmulatorConfig(fault_rates={"throttle": 0.5})  # type: ignore[dict-item]
    assert config.fault_rates == {FaultKind.THROTTLE: 0.5}
    with pytest.raises(TypeError):
        config.fault_rates[FaultKind.SLOW] = 1.0  # type: ignore[index]


@pytest.mark.parametrize("kwargs", [
    {"port": 70000}, {"latency_s": -1}, {"quota_rpm": 0}, {"quota_burst": 0}, {"output_max_pixels": 0},
    {"png_compress_level": 10}, {"fault_rates": {FaultKind.THROTTLE: 1.5}},
    {"fault_rates": {FaultKind.NONE: 0.1}},
])
def test_invalid_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid EmulatorConfig"):
        EmulatorConfig(**kwargs)


def test_unknown_fault_name_is_rejected() -> None:
    with pytest.raises(ValueError):
        EmulatorConfig(faults_by_image={"ab": ("explode",)})  # type: ignore[dict-item]


def _record(seq: int) -> RequestRecord:
    return RequestRecord(seq=seq, at=1.5, model_id="us.m", image_sha256="ab", input_size=(64, 64), status=200,
                         error_type=None, fault=None, output_size=(128, 128), duration_s=0.01)


def test_log_keeps_records_and_appends_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = RequestLog(path)
    assert [log.next_seq(), log.next_seq()] == [1, 2]
    log.append(_record(1))
    log.append(_record(2))
    assert [r.seq for r in log.records()] == [1, 2]
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["input_size"] == [64, 64]
    assert RequestLog.read_file(path) == [_record(1), _record(2)]
    assert RequestRecord.from_dict(_record(3).to_dict()) == _record(3)
