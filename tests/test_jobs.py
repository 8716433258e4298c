"""The job store: queue states, a worker that runs jobs one at a time, stop -> checkpoint -> resume,
recovery of jobs whose worker died, and the `studio jobs` commands."""
import json
import os
import subprocess
import sys

import pytest

from studio.cli import main
from studio.jobs import JobStore, Worker


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def subject(make_subject):
    return make_subject(2, seed=1)


def _settings(tiny_sd_dir, subject, **extra):
    return {"base": str(tiny_sd_dir), "images": str(subject), "prompt": "a photo of sks bag", "rank": 2, "steps": 4,
            "batch_size": 1, "prior_preservation": False, "checkpoint_every": 2, "validate_every": 0, "validation_seeds": [], "device": "cpu", "quiet": True, **extra}


def test_queue_states_and_cancel(tmp_path, tiny_sd_dir, subject):
    store = JobStore(tmp_path)
    a = store.submit(_settings(tiny_sd_dir, subject), name="first")
    b = store.submit(_settings(tiny_sd_dir, subject))
    assert (a.state, a.name, b.name) == ("queued", "first", f"job-{b.id}")
    assert a.run_dir == str((tmp_path / "runs" / f"job-{a.id:04d}").resolve())
    assert store.cancel(b.id).state == "cancelled"
    with pytest.raises(ValueError, match="already cancelled"):
        store.cancel(b.id)
    assert store.resume(b.id).state == "queued" and store.get(b.id).config["resume"] is True
    with pytest.raises(ValueError, match="only cancelled or failed"):
        store.resume(a.id)
    with pytest.raises(ValueError, match="unknown training setting"):
        store.submit({"images": str(subject), "stepz": 3})
    with pytest.raises(ValueError, match="no job 99"):
        store.get(99)
    assert [j.id for j in store.list(["queued"])] == [a.id, b.id]


def test_worker_runs_stops_and_resumes(tmp_path, tiny_sd_dir, subject):
    store = JobStore(tmp_path)
    job = store.submit(_settings(tiny_sd_dir, subject))
    bad = store.submit(_settings(tiny_sd_dir, tmp_path / "no-such-folder"))

    def cancel_at_step_2(job_id, event):  # what the UI's Stop button does, mid-run
        if event["type"] == "step" and event["step"] == 2:
            store.cancel(job_id)
            assert store.get(job_id).state == "stopping"

    worker = Worker(store, on_event=cancel_at_step_2)
    done = worker.run_once()
    assert done.id == job.id and done.state == "cancelled" and done.step == 2
    assert (tmp_path / "runs" / f"job-{job.id:04d}" / "checkpoints" / "step-000002").is_dir()
    failed = worker.run_once()  # the worker carries on with the next job
    assert failed.id == bad.id and failed.state == "failed" and "image folder not found" in failed.error
    store.resume(job.id)
    worker.on_event = None
    finished = worker.run_once()
    assert finished.state == "done" and finished.step == 4 and finished.error is None
    run_dir = tmp_path / "runs" / f"job-{job.id:04d}"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert worker.run_once() is None  # queue empty


def test_jobs_of_a_dead_worker_are_recovered(tmp_path):
    store = JobStore(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    ids = [store.submit({"images": "x", "steps": 3}).id for _ in range(3)]
    with store._connect() as conn:
        conn.execute("UPDATE jobs SET state = 'running', pid = ? WHERE id = ?", (pid, ids[0]))
        conn.execute("UPDATE jobs SET state = 'stopping', pid = ? WHERE id = ?", (pid, ids[1]))
        conn.execute("UPDATE jobs SET state = 'running', pid = ?, attempts = 2 WHERE id = ?", (pid, ids[2]))
    assert sorted(store.recover()) == ids
    first, second, third = (store.get(i) for i in ids)
    assert first.state == "queued" and first.config["resume"] is True and "interrupted" in first.error
    assert second.state == "cancelled" and second.resumable
    assert third.state == "failed" and "died 3 times" in third.error
    # a job held by a live worker is left alone
    with store._connect() as conn:
        conn.execute("UPDATE jobs SET state = 'running', pid = ?, pid_start = NULL WHERE id = ?", (os.getpid(), ids[0]))
    assert store.recover() == []
    with pytest.raises(ValueError, match="live process"):
        store.mark_stopped(ids[0])


def test_one_worker_per_store(tmp_path):
    store = JobStore(tmp_path)
    first, second = Worker(store), Worker(store)
    first.acquire()
    try:
        with pytest.raises(ValueError, match="another worker"):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


def test_jobs_cli(tmp_path, tiny_sd_dir, subject, capsys):
    home = str(tmp_path)
    assert main(["jobs", "--home", home, "list"]) == 0
    assert "no jobs" in capsys.readouterr().out
    assert main(["jobs", "--home", home, "submit", "--name", "bag", "--base", str(tiny_sd_dir), "--images", str(subject),
                 "--prompt", "a photo of sks bag", "--steps", "2", "--rank", "2", "--device", "cpu", "--quiet"]) == 0
    assert "queued" in capsys.readouterr().out
    assert main(["jobs", "--home", home, "cancel", "1"]) == 0
    assert "cancelled" in capsys.readouterr().out
    assert main(["jobs", "--home", home, "cancel", "1"]) == 2
    assert "already cancelled" in capsys.readouterr().err
    assert main(["jobs", "--home", home, "resume", "1"]) == 0
    assert main(["jobs", "--home", home, "submit", "--steps", "0"]) == 2
    assert "steps must be a positive" in capsys.readouterr().err
