"""Traces on demand (smollm2/observe/profile.py): train.profile_steps writes one readable trace per rank and a summary
line; unset, nothing is created."""

import gzip
import json

import pytest
import torch

from smollm2.observe.profile import StepProfiler, make_profiler


def test_unset_creates_nothing(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a profiler was created")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    assert make_profiler(tmp_path, 0, torch.device("cpu"), [], None) is None
    assert not (tmp_path / "profile").exists()


def test_steps_start_to_end_are_traced_into_a_gzipped_chrome_trace(tmp_path):
    profiler = make_profiler(tmp_path, 3, torch.device("cpu"), [2, 3], None)
    a = torch.randn(64, 64)
    for step in range(1, 5):
        profiler.begin(step)
        (a @ a).sum()
        profiler.end(step)
        if step < 3:
            assert profiler.take_lines() == [] and not (tmp_path / "profile").exists()
    (line,) = profiler.take_lines()
    trace = tmp_path / "profile" / "rank-00003" / "trace-steps-000002-000003.json.gz"
    assert line.startswith(f"profile of steps 2-3: {tmp_path / 'profile'}/rank-*/{trace.name} (open in https://ui.perfetto.dev)")
    assert "top ops by host self time: " in line and "aten::mm" in line
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert sum(e.get("name") == "aten::mm" for e in events) == 2  # steps 2 and 3, not 1 or 4
    assert [p.name for p in trace.parent.iterdir()] == [trace.name]  # the plain JSON is gone


def test_a_memory_snapshot_is_cuda_only(tmp_path):
    profiler = StepProfiler(tmp_path, 0, torch.device("cpu"), [], 5)
    assert profiler.take_lines() == ["train.memory_snapshot=5: a CUDA memory snapshot; skipped on cpu"]
    profiler.end(5)
    assert not (tmp_path / "profile").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_memory_snapshot_on_cuda(tmp_path):
    profiler = StepProfiler(tmp_path, 0, torch.device("cuda"), [], 2)
    for step in (1, 2):
        profiler.begin(step)
        torch.randn(256, 256, device="cuda").sum()
        profiler.end(step)
    (line,) = profiler.take_lines()
    path = tmp_path / "profile" / "rank-00000" / "memory-step-000002.pickle"
    assert path.stat().st_size > 0 and line.startswith(f"memory snapshot after step 2: {path}")


@pytest.mark.e2e
def test_two_gloo_ranks_each_write_a_readable_trace(two_rank_run):
    """The session's two-rank run profiles steps 2-3 (tests/conftest.py): a trace per rank, the summary in rank 0's log."""
    for rank in (0, 1):
        trace = two_rank_run / "profile" / f"rank-{rank:05d}" / "trace-steps-000002-000003.json.gz"
        names = {e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
        assert {"aten::mm", "aten::addmm"} <= names
    log = (two_rank_run / "logs" / "rank-00000.log").read_text()
    assert f"profile of steps 2-3: {two_rank_run / 'profile'}/rank-*/trace-steps-000002-000003.json.gz" in log
    assert "profile of steps" not in (two_rank_run / "logs" / "rank-00001.log").read_text()  # said once, by rank 0


def test_a_run_that_starts_or_ends_inside_the_range_traces_what_it_runs(tmp_path):
    profiler = make_profiler(tmp_path, 0, torch.device("cpu"), [2, 9], None)
    for step in (4, 5):  # a resume at step 3 (steps 4 and 5 run), ending at its max_steps=5
        profiler.begin(step)
        torch.ones(3).sum()
        profiler.end(step, last=step == 5)
    (line,) = profiler.take_lines()
    assert line.startswith("profile of steps 4-5: ")
    assert (tmp_path / "profile" / "rank-00000" / "trace-steps-000004-000005.json.gz").is_file()


def test_a_run_that_stops_inside_the_range_still_writes_its_trace(tmp_path):
    profiler = make_profiler(tmp_path, 0, torch.device("cpu"), [1, 9], None)
    profiler.begin(1)
    torch.ones(3).sum()
    profiler.close(1)  # Run.close(): a stop request, or an error, at step 1
    assert profiler.take_lines()[0].startswith("profile of steps 1-1: ")
