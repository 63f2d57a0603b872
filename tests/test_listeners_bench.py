"""bench.listeners: what it compares, and that it runs both paths end to end."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def listeners() -> ModuleType:
    # bench/ is not an installed package.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.listeners")


def _step(
    listeners: ModuleType,
    path: str,
    run: int,
    gateway_ms: float,
    vad_ms: float,
    kept_up: bool = True,
) -> Any:
    return listeners.Step(
        path=path,
        run=run,
        devices=100,
        device_seconds=1000.0,
        gateway_ms_per_device_s=gateway_ms,
        vad_ms_per_stream_s=vad_ms,
        gateway_ms_per_device_s_over_idle=gateway_ms - 0.1,
        vad_ms_per_stream_s_over_idle=vad_ms - 0.1,
        gateway_kb_per_session=100.0,
        vad_kb_per_session=150.0,
        vad_mb_before=250.0,
        vad_mb_after_leave=252.0,
        vad_writes_per_s=100.0 if path == "current" else 400.0,
        libopus_ms_per_device_s=0.5,
        engine_ms_per_stream_s=1.2,
        pace=1.0,
        vad_processed=1.0 if kept_up else 0.5,
        kept_up=kept_up,
        gateway_vad_backlog=0.0,
    )


def test_ratios_compare_each_paths_best_run_that_kept_up(listeners: ModuleType) -> None:
    steps = [
        _step(listeners, "baseline", 0, 2.0, 3.0),
        _step(listeners, "baseline", 1, 2.2, 2.8),
        # Fell behind: it spent less per second sent, and must not count.
        _step(listeners, "baseline", 2, 0.5, 0.6, kept_up=False),
        _step(listeners, "current", 0, 1.1, 2.1),
        _step(listeners, "current", 1, 1.0, 2.2),
    ]
    row = listeners.summarise(steps, [100])["100"]
    ratio = row["ratio_current_to_baseline"]
    assert isinstance(ratio, dict)
    assert ratio["gateway_cpu"] == 0.5
    assert ratio["vad_cpu"] == 0.75
    assert ratio["vad_writes"] == 0.25
    assert ratio["from_runs_that_kept_up"] is True


def test_a_size_where_one_path_never_kept_up_is_compared_but_marked(
    listeners: ModuleType,
) -> None:
    steps = [
        _step(listeners, "baseline", 0, 2.0, 3.0, kept_up=False),
        _step(listeners, "current", 0, 1.0, 2.0),
    ]
    ratio = listeners.summarise(steps, [100])["100"]["ratio_current_to_baseline"]
    assert ratio["gateway_cpu"] == 0.5
    assert ratio["from_runs_that_kept_up"] is False


def test_steps_of_other_sizes_do_not_mix(listeners: ModuleType) -> None:
    steps = [
        _step(listeners, "baseline", 0, 2.0, 3.0),
        replace(_step(listeners, "current", 0, 1.0, 2.0), devices=200),
    ]
    summary = listeners.summarise(steps, [100, 200])
    assert "ratio_current_to_baseline" not in summary["100"]
    assert "ratio_current_to_baseline" not in summary["200"]


@pytest.mark.e2e
async def test_both_paths_run_against_the_cluster_and_report_figures(
    listeners: ModuleType,
) -> None:
    args = argparse.Namespace(devices="4", seconds=2.0, repeat=1, paths="baseline,current")
    report = await listeners.main_async(args)
    runs = report["runs"]
    assert isinstance(runs, list) and {r["path"] for r in runs} == {"baseline", "current"}
    for run in runs:
        # The audio reached the VAD and was stepped (whether all of it within the
        # bench's grace period depends on what else the machine runs: reported, not asserted).
        assert run["vad_processed"] > 0.5, run
        assert run["gateway_ms_per_device_s"] > 0 and run["vad_ms_per_stream_s"] > 0
        # The floors: the gateway decodes every packet with libopus and then some.
        assert 0 < run["libopus_ms_per_device_s"] < run["gateway_ms_per_device_s"], run
        assert run["engine_ms_per_stream_s"] > 0, run
    summary = report["summary"]
    assert isinstance(summary, dict) and "ratio_current_to_baseline" in summary["4"]
