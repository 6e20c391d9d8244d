"""bench/bench_pipeline.py's accounting: every second of the main thread in one category."""

from __future__ import annotations

import pytest

from bench.bench_pipeline import breakdown, hotspots, memory


def worker_record() -> dict:
    # (category, name, stage, thread, start, end, self_s), as bench/pipeline_worker.py writes
    # them: the sft body ran 10..40 s; inside it an import of 2 s and an MLflow call of 3 s.
    events = [
        ["import", "import", "cli", "MainThread", 0.5, 4.5, 4.0],
        ["prefect_api", "server.start", "flow", "MainThread", 5.0, 9.0, 4.0],
        ["mlflow", "client.log_param", "flow", "MainThread", 9.0, 10.0, 1.0],
        ["import", "import", "sft", "MainThread", 11.0, 13.0, 2.0],
        ["mlflow", "log_artifacts", "sft", "MainThread", 36.0, 39.0, 3.0],
        ["stage", "sft", "sft", "MainThread", 10.0, 40.0, 25.0],
        ["stage", "validation", "validation", "MainThread", 41.0, 43.0, 2.0],
        ["stage", "gate", "gate", "MainThread", 44.0, 44.5, 0.5],
        ["import", "import", "cli", "GlobalEventLoopThread", 5.0, 6.0, 1.0],
    ]
    samples = [[t, 500_000 + (1_000_000 if 20 <= t <= 30 else 0), 200_000]
               for t in range(0, 46)]
    return {"events": events, "end_s": 45.0, "vm_hwm_kb": 1_600_000, "rss_samples": samples}


def test_breakdown_adds_up_to_wall_time():
    b = breakdown(worker_record(), wall_s=47.0)
    p = b["parts_s"]
    assert p["stage_compute"] == 25.0 and p["validation"] == 2.0
    assert p["imports"] == 6.0  # main thread only: the event-loop thread's import is apart
    assert p["mlflow"] == 4.0 and p["prefect_api_server"] == 4.0
    assert p["gate_report_bodies"] == 0.5
    # 45 s in the process, 41.5 s of it covered by wrapped calls
    assert p["prefect_engine_flow_cli"] == pytest.approx(3.5)
    assert p["interpreter_start_exit"] == pytest.approx(2.0)
    assert sum(p.values()) == pytest.approx(47.0)
    assert b["overhead_s"] == pytest.approx(22.0)
    assert b["overhead_share"] == pytest.approx(22.0 / 47.0)
    assert b["per_stage_s"]["sft"] == {"compute": 25.0, "import": 2.0, "mlflow": 3.0}
    assert b["other_threads"] == ["GlobalEventLoopThread"]


def test_memory_peaks_per_stage_window():
    m = memory(worker_record())
    gb = 1 / 2**20
    assert m["per_stage"]["sft"]["process_gb"] == round(1_500_000 * gb, 3)
    assert m["per_stage"]["validation"]["process_gb"] == round(500_000 * gb, 3)
    assert m["per_stage"]["sft"]["wall_s"] == 30.0
    assert m["process_peak_gb"] == round(1_600_000 * gb, 3)
    assert m["process_plus_children_peak_gb"] == round(1_700_000 * gb, 3)


def test_hotspots_count_top_level_imports_once():
    w = worker_record()
    w["events"][0][1] = "torch"  # 0.5..4.5 s, with torch._C loaded inside it
    w["events"].append(["import", "torch._C", "cli", "MainThread", 1.0, 2.0, 1.0])
    h = hotspots(w)
    assert h["top_level_imports"][0] == {"module": "torch", "stage": "cli", "s": 4.0}
    assert {"module": "torch._C", "stage": "cli", "s": 1.0} not in h["top_level_imports"]
    assert h["mlflow_calls"][0] == {"call": "log_artifacts", "s": 3.0, "count": 1}
