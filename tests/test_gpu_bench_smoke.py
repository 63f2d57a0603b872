"""The GPU benchmark's one command, run on the CPU at the smallest scale so it cannot rot.

`python -m bench.gpu` runs here as it would on a GPU machine, only with a tiny
SenseVoice (ERes2NetV2 stays full size), two devices split over two
load-generator processes, and one short step per mode (devices through the
gateways, and their utterances sent straight to asr and speaker). To stay
within a minute it runs the batched design only: the per-session baseline is
the same code with `make bench`'s per-session settings; the summary that
compares the two is checked on made-up steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support.tiny_models import SENSEVOICE_BPE

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], Path]:
    """(printed output, merged JSON, output folder) of one small run of every part."""
    base = tmp_path_factory.mktemp("gpu-bench")
    out = base / "out"
    cmd = [
        sys.executable, "-m", "bench.gpu",
        "--parts", "model,batched", "--size", "tiny", "--device", "cpu",
        "--devices", "2", "--baseline-devices", "2", "--seconds", "4", "--warmup-s", "0",
        "--load-procs", "2", "--gateways", "1", "--vad-replicas", "1",
        "--batches", "1,2", "--precisions", "fp32", "--repeats", "1", "--utterance-s", "0.5",
        "--work", str(base / "work"), "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout, json.loads((out / "gpu_bench.json").read_text()), out


def test_output_says_the_weights_are_random(smoke: tuple[str, dict[str, Any], Path]) -> None:
    stdout, result, _ = smoke
    assert "RANDOM WEIGHTS" in stdout and "only timing" in stdout
    assert result["weights"] == "random"


def test_model_table_has_both_models_at_every_batch(
    smoke: tuple[str, dict[str, Any], Path],
) -> None:
    rows = smoke[1]["model_table"]["rows"]
    timed = {(r["model"], r["precision"], r["batch"]) for r in rows if "error" not in r}
    assert timed == {(m, "fp32", b) for m in ("sensevoice", "eres2netv2") for b in (1, 2)}
    assert all(r["utterances_per_s"] > 0 for r in rows)


def test_each_design_step_reports_latency_throughput_and_cpu(
    smoke: tuple[str, dict[str, Any], Path],
) -> None:
    steps = {s["design"]: s for s in smoke[1]["steps"]}
    assert set(steps) == {"batched", "batched-direct"}
    for step in steps.values():
        assert step["utterances_recognised"] > 0
        assert set(step["processing_ms"]) == {"p50", "p95", "p99"}
        assert step["utterances_per_s"] > 0
        assert {"gateway", "vad", "asr", "speaker", "load-generator"} <= set(step["cpu_per_s"])


def test_both_load_generator_processes_drove_their_device(
    smoke: tuple[str, dict[str, Any], Path],
) -> None:
    for step in smoke[1]["steps"]:
        assert step["failed_connections"] == 0
        assert step["utterances_sent"] >= 2


def test_summary_is_printed_with_the_largest_n_of_each_design(
    smoke: tuple[str, dict[str, Any], Path],
) -> None:
    stdout, result, _ = smoke
    assert set(result["summary"]["largest_devices_within_target"]) == {"batched", "batched-direct"}
    assert "largest_devices_within_target" in stdout


def _step(design: str, devices: int, within: bool) -> dict[str, Any]:
    return {
        "design": design,
        "devices": devices,
        "within_target": within,
        "processing_ms": {"p95": 200.0 if within else 900.0},
        "asr_queue_ms": {"p95": 5.0},
        "asr_model_ms": {"p95": 50.0},
        "cpu_per_s": {"gateway": 0.9, "asr": 0.4},
        "late_packet_share": 0.0,
        "error_share": 0.0,
    }


def test_summary_ratio_compares_largest_n_within_target_of_both_designs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is not an installed package
    from bench.gpu.report import summary

    steps = [
        _step("batched", 100, True),
        _step("batched", 400, True),
        _step("batched", 800, False),
        _step("per-session", 10, True),
        _step("per-session", 20, True),
        _step("per-session", 40, False),
        _step("batched-direct", 1000, True),
    ]
    result = summary({"steps": steps, "target_ms": 300})
    assert result["largest_devices_within_target"] == {
        "batched": 400,
        "per-session": 20,
        "batched-direct": 1000,
    }
    assert result["ratio_batched_to_per_session"] == 20.0
    assert result["ratio_direct"] is None


def test_summary_knee_is_the_first_step_past_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is not an installed package
    from bench.gpu.report import summary

    steps = [
        _step("batched", 100, True),
        _step("batched", 400, False),
        _step("batched", 800, False),
    ]
    knee = summary({"steps": steps})["knee"]["batched"]
    assert knee["devices"] == 400
    assert knee["busiest_cpu_cores"] == {"gateway": 0.9, "asr": 0.4}


def test_png_plot_is_written(smoke: tuple[str, dict[str, Any], Path]) -> None:
    png = smoke[2] / "gpu_bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_sensevoice_tokenizer_and_ctc_head_are_widened_together(
    smoke: tuple[str, dict[str, Any], Path],
) -> None:
    from sentencepiece import SentencePieceProcessor

    model_dir = smoke[2].parent / "work" / "sensevoice-tiny-random"
    tokenizer = SentencePieceProcessor(model_file=str(model_dir / SENSEVOICE_BPE))
    state = torch.load(model_dir / "model.pt", weights_only=True)
    assert tokenizer.get_piece_size() == 500
    assert state["ctc.ctc_lo.weight"].shape[0] == 500
