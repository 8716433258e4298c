"""Crash test (issue #12, slow): a queued training job on the tiny model is SIGKILLed at random moments
(one of them while a checkpoint is being written, when that can be caught), the worker is restarted each
time, and the final adapter must equal an uninterrupted run bit for bit, with a clean run folder and an
intact SQLite store."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.jobs import JobStore
from studio.train import run_status, train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _subject(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _worker(home):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "studio", "jobs", "--home", str(home), "worker", "--until-empty"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc, condition, deadline_s=240):
    deadline = time.time() + deadline_s
    while proc.poll() is None and time.time() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return False


def test_sigkill_at_random_moments_loses_nothing(tiny_sd_dir, tmp_path):
    subject = _subject(tmp_path / "subject")
    settings = dict(base=str(tiny_sd_dir), images=str(subject), prompt="a photo of sks bag", method="lora", rank=2,
                    batch_size=1, prior_preservation=False, steps=12, lr=1e-3, validate_every=0, validation_seeds=[], checkpoint_every=1, keep_checkpoints=2,
                    device="cpu", quiet=True, cpu_threads=1)
    home = tmp_path / "home"
    store = JobStore(home)
    job = store.submit(settings, name="crash")
    run = Path(job.run_dir)
    rng = random.Random(12)
    kills = []

    def log_steps():
        try:
            return sum(1 for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line)
        except OSError:
            return 0

    # 1: during a checkpoint write (a .tmp-step-* folder exists), if we can catch one.
    proc = _worker(home)
    caught = _kill_when(proc, lambda: any((run / "checkpoints").glob(".tmp-*")) if (run / "checkpoints").is_dir() else False)
    kills.append(("checkpoint write", caught, log_steps()))
    # 2: after a random number of logged steps, plus a random delay.
    for _ in range(1):
        target = log_steps() + rng.randint(1, 3)
        proc = _worker(home)
        delay = rng.uniform(0.0, 0.3)
        caught = _kill_when(proc, lambda: log_steps() >= target and (time.sleep(delay) or True))
        kills.append(("random step", caught, log_steps()))
    store.resume(job.id) if store.get(job.id).state in ("failed", "stopped") else None
    proc = _worker(home)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
    final = store.get(job.id)
    assert final.state == "done", (final.state, final.error, kills)

    reference = tmp_path / "reference"
    train({**settings, "out": str(reference)})
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kills

    # The run folder: no temp files, every JSON parses, every safetensors loads.
    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".trash-"))]
    assert not leftovers, leftovers
    for path in run.rglob("*.json"):
        json.loads(path.read_text())
    for line in (run / "log.jsonl").read_text().splitlines():
        json.loads(line)
    for path in run.rglob("*.safetensors"):
        load_file(str(path))
    assert run_status(run)["state"] == "done"
    with sqlite3.connect(home / "jobs.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    print("kills:", kills)
