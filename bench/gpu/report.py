"""Tables, summary and plot of a GPU benchmark result (the merged JSON of every part)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DESIGN_ORDER = ("batched", "per-session", "batched-direct", "per-session-direct")
COLOURS = ("tab:blue", "tab:red", "tab:cyan", "tab:orange")


def largest_within(steps: list[dict[str, Any]], design: str) -> int:
    return max(
        (s["devices"] for s in steps if s["design"] == design and s["within_target"]), default=0
    )


def summary(result: dict[str, Any]) -> dict[str, Any]:
    steps = result.get("steps", [])
    present = [d for d in DESIGN_ORDER if any(s["design"] == d for s in steps)]
    largest = {d: largest_within(steps, d) for d in present}

    def ratio(batched: str, baseline: str) -> float | None:
        if not largest.get(baseline):
            return None
        return round(largest.get(batched, 0) / largest[baseline], 2)

    return {
        "target_p95_processing_ms": result.get("target_ms"),
        "largest_devices_within_target": largest,
        "ratio_batched_to_per_session": ratio("batched", "per-session"),
        "ratio_direct": ratio("batched-direct", "per-session-direct"),
        "knee": {d: knee(steps, d, largest[d]) for d in present},
    }


def knee(steps: list[dict[str, Any]], design: str, within: int) -> dict[str, Any] | None:
    """Where the time goes in the first step past the largest N within target."""
    past = sorted(
        (s for s in steps if s["design"] == design and s["devices"] > within),
        key=lambda s: s["devices"],
    )
    if not past:
        return None
    step = past[0]
    busiest = sorted(step["cpu_per_s"].items(), key=lambda kv: -kv[1])[:3]
    return {
        "devices": step["devices"],
        "processing_p95_ms": step["processing_ms"].get("p95"),
        "gpu_utilisation_mean_pct": (step.get("gpu") or {}).get("utilisation_mean_pct"),
        "asr_batch_mean": step.get("asr_batch_mean"),
        "asr_queue_p95_ms": step["asr_queue_ms"].get("p95"),
        "asr_model_p95_ms": step["asr_model_ms"].get("p95"),
        "busiest_cpu_cores": dict(busiest),
        "late_packet_share": step["late_packet_share"],
        "error_share": step["error_share"],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def sweep_table(steps: list[dict[str, Any]]) -> str:
    head = (
        f"{'design':<19}{'N':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'utt/s':>8}{'err%':>7}"
        f"{'batch':>7}{'gpu%':>6}{'gpuMiB':>8}{'late%':>7}  cpu cores per service"
    )
    lines = [head, "-" * len(head)]
    for s in sorted(steps, key=lambda s: (DESIGN_ORDER.index(s["design"]), s["devices"])):
        p = s["processing_ms"]
        gpu = s.get("gpu") or {}
        cpu = " ".join(f"{k}={v:.2f}" for k, v in s["cpu_per_s"].items())
        mark = "" if s["within_target"] else " *"
        lines.append(
            f"{s['design']:<19}{s['devices']:>6}{_fmt(p.get('p50')):>8}{_fmt(p.get('p95')):>8}"
            f"{_fmt(p.get('p99')):>8}{s['utterances_per_s']:>8.1f}{s['error_share'] * 100:>7.2f}"
            f"{_fmt(s.get('asr_batch_mean')):>7}{_fmt(gpu.get('utilisation_mean_pct')):>6}"
            f"{_fmt(gpu.get('memory_peak_mib')):>8}{s['late_packet_share'] * 100:>7.2f}"
            f"  {cpu}{mark}"
        )
    lines.append(
        "processing latency in ms (VAD end decision -> stt sent; -direct: asr and speaker"
        " called -> both answered); * = outside the target"
    )
    return "\n".join(lines)


def model_table(table: dict[str, Any]) -> str:
    head = (
        f"{'model':<12}{'precision':<10}{'batch':>6}{'latency ms':>12}{'utt/s':>10}{'peak MiB':>10}"
    )
    lines = [head, "-" * len(head)]
    for row in table.get("rows", []):
        if "error" in row:
            lines.append(f"{row['model']:<12}{row['precision']:<10} failed: {row['error'][:60]}")
            continue
        lines.append(
            f"{row['model']:<12}{row['precision']:<10}{row['batch']:>6}{row['latency_ms']:>12.1f}"
            f"{row['utterances_per_s']:>10.1f}{_fmt(row['peak_gpu_memory_mib']):>10}"
        )
    lines.append(f"{table.get('utterance_s')} s utterances on {table.get('device')}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result.get("steps", [])
    target = float(result.get("target_ms") or 300)
    fig, ((lat, thr), (gpu, models)) = plt.subplots(2, 2, figsize=(13, 9))
    for design, colour in zip(DESIGN_ORDER, COLOURS, strict=True):
        rows = sorted((s for s in steps if s["design"] == design), key=lambda s: s["devices"])
        if not rows:
            continue
        n = [r["devices"] for r in rows]
        for pct, style in (("p50", ":"), ("p95", "-"), ("p99", "--")):
            values = [r["processing_ms"].get(pct, float("nan")) for r in rows]
            lat.plot(n, values, style, color=colour, marker="o", label=f"{design} {pct}")
        thr.plot(n, [r["utterances_per_s"] for r in rows], "-o", color=colour, label=design)
        util = [(r.get("gpu") or {}).get("utilisation_mean_pct", float("nan")) for r in rows]
        gpu.plot(n, util, "-o", color=colour, label=f"{design} GPU %")
    lat.axhline(target, color="grey", linewidth=0.8, label="p95 target")
    lat.set(
        xlabel="concurrent devices", ylabel="processing latency (ms)", yscale="log", xscale="log"
    )
    lat.legend(fontsize=7)
    thr.set(xlabel="concurrent devices", ylabel="utterances recognised / s", xscale="log")
    thr.legend(fontsize=8)
    gpu.set(xlabel="concurrent devices", ylabel="GPU utilisation (%)", xscale="log", ylim=(0, 105))
    if not any((s.get("gpu") or {}).get("utilisation_mean_pct") is not None for s in steps):
        gpu.text(0.5, 0.5, "no GPU on this machine", ha="center", transform=gpu.transAxes)
    gpu.legend(fontsize=8)
    table = result.get("model_table") or {}
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in table.get("rows", []):
        if "error" not in row:
            series.setdefault((row["model"], row["precision"]), []).append(
                (row["batch"], row["utterances_per_s"])
            )
    for (model, prec), points in sorted(series.items()):
        models.plot(*zip(*points, strict=True), "-o", label=f"{model} {prec}")
    models.set(
        xlabel="batch size", ylabel="utterances / s (model alone)", xscale="log", yscale="log"
    )
    if series:
        models.legend(fontsize=7)
    else:
        models.text(0.5, 0.5, "no model table in this run", ha="center", transform=models.transAxes)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    # Ticks at the sizes measured (250, 500, 1000), not at powers of ten.
    devices = sorted({s["devices"] for s in steps})
    batches = sorted({b for points in series.values() for b, _ in points})
    for ax, ticks in ((lat, devices), (thr, devices), (gpu, devices), (models, batches)):
        if ticks:
            ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(
        f"speechfront on {result.get('machine', {}).get('gpu') or 'CPU'}: RANDOM WEIGHTS "
        "(timing only), batched cluster vs per-session baseline"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
