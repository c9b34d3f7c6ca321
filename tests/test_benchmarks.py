"""benchmarks.gpu's step runner, exercised with CPU steps: a step's output goes to its log and
its JSON where asked, and a failing step is reported by its exit status, not raised."""

import json

from benchmarks import gpu


def test_gpu_steps_report_status_and_keep_output(monkeypatch, tmp_path):
    tiny = ["--max-len", "64", "--repeats", "1", "--width", "64"]
    monkeypatch.setitem(gpu.STEPS, "tiny", ("benchmarks.layer_speed", tiny, "t.json"))
    no_gpu = ["--device", "cuda"]
    monkeypatch.setitem(gpu.STEPS, "nogpu", ("benchmarks.layer_speed", no_gpu, "x.json"))
    status, _ = gpu.run_step("tiny", tmp_path)
    assert status == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["L"] for r in rows] == [64]  # the step's own arguments reached it
    assert "attention" in (tmp_path / "tiny.log").read_text()  # its table, teed to the log
    status, _ = gpu.run_step("nogpu", tmp_path)
    assert status == 2
    assert "no CUDA device" in (tmp_path / "nogpu.log").read_text()
    assert not (tmp_path / "x.json").exists()
