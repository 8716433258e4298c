"""The job store: a SQLite queue of training jobs plus one run folder per job, and the worker that runs them.

    store = JobStore()                       # $STUDIO_HOME or ~/.diffusion-studio: jobs.db + runs/
    job = store.submit({"images": "...", "prompt": "a photo of sks bag", "method": "lora", "steps": 300})
    Worker(store).run_forever()              # or `studio jobs worker`; one job at a time

States: queued -> running -> done | failed | cancelled; a cancel of a running job goes through "stopping"
(the trainer polls the flag every step, writes a checkpoint and ends). cancelled and failed jobs are
resumable (`resume`: back to queued, continuing from the last checkpoint). State lives on disk, so a
browser refresh loses nothing; a job whose worker died (crash, kill -9, reboot) is found by `recover()`
(the worker calls it on start): running -> queued again with resume (at most MAX_ATTEMPTS times, then
failed), stopping -> cancelled. Nothing is ever left "running" without a live worker process.
"""
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

STATES = ("queued", "running", "stopping", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
MAX_ATTEMPTS = 3  # automatic resumes after a dead worker before a job is marked failed
# kind -> "module:function(config, progress=, stop=) -> run folder". HiPA adds a line here.
RUNNERS = {"train": "studio.train:train", "hipa": "studio.hipa:train_hipa"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    pid INTEGER,
    pid_start TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0
);
"""


def default_root() -> Path:
    return Path(os.environ.get("STUDIO_HOME", "~/.diffusion-studio")).expanduser()


@dataclass
class Job:
    id: int
    name: str
    kind: str
    config: dict
    run_dir: str
    state: str
    created: float
    started: float | None
    finished: float | None
    error: str | None
    pid: int | None
    pid_start: str | None
    attempts: int
    step: int
    steps: int

    @property
    def resumable(self) -> bool:
        return self.state in ("failed", "cancelled")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def process_start(pid: int):
    """The kernel's start time of a process (tells a live worker from a recycled pid), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid, start) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = process_start(int(pid))
    return start is None or now is None or now == start


class JobStore:
    def __init__(self, root=None):
        self.root = Path(root).expanduser() if root else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "jobs.db"
        self.runs = self.root / "runs"
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self):
        conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self):
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _job(row) -> Job:
        data = dict(row)
        data["config"] = json.loads(data["config"])
        return Job(**data)

    # --- queries
    def get(self, job_id) -> Job:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise ValueError(f"no job {job_id} (see `studio jobs list`)")
        return self._job(row)

    def list(self, states=None) -> list:
        with self._connect() as conn:
            if states:
                marks = ",".join("?" * len(states))
                rows = conn.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", tuple(states)).fetchall()
            else:
                rows = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [self._job(r) for r in rows]

    def stop_requested(self, job_id) -> bool:
        with self._connect() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        return row is None or row["state"] == "stopping"

    # --- changes
    def submit(self, config, name: str | None = None, kind: str = "train") -> Job:
        """Queue a job. The config is checked now (a bad one never reaches the queue); without "out" the run
        folder is runs/job-NNNN under the store."""
        if kind not in RUNNERS:
            raise ValueError(f"unknown job kind {kind!r}: choose one of {', '.join(RUNNERS)}")
        config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        steps = int(config.get("steps") or 0)
        if kind == "train":
            from studio.train import TrainConfig

            steps = TrainConfig.from_dict({**config, "out": config.get("out") or "placeholder"}).steps  # table default
        with self._transaction() as conn:
            cur = conn.execute("INSERT INTO jobs (name, kind, config, run_dir, state, created, steps) VALUES (?,?,?,?,?,?,?)",
                               (name or "", kind, "{}", "", "queued", time.time(), int(steps)))
            job_id = cur.lastrowid
            run_dir = str(Path(config.get("out") or self.runs / f"job-{job_id:04d}").expanduser().resolve())
            config["out"] = run_dir
            conn.execute("UPDATE jobs SET name = ?, config = ?, run_dir = ? WHERE id = ?",
                         (name or f"job-{job_id}", json.dumps(config), run_dir, job_id))
        return self.get(job_id)

    def cancel(self, job_id) -> Job:
        """queued -> cancelled; running -> stopping (the trainer checkpoints and ends as cancelled)."""
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
            if row is None:
                raise ValueError(f"no job {job_id} (see `studio jobs list`)")
            state = row["state"]
            if state in FINISHED:
                raise ValueError(f"job {job_id} is already {state}")
            if state == "queued":
                conn.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (time.time(), int(job_id)))
            elif state == "running":
                conn.execute("UPDATE jobs SET state = 'stopping' WHERE id = ?", (int(job_id),))
        return self.get(job_id)

    def resume(self, job_id) -> Job:
        """A cancelled or failed job goes back to the queue and continues from its last checkpoint."""
        with self._transaction() as conn:
            row = conn.execute("SELECT state, config FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
            if row is None:
                raise ValueError(f"no job {job_id} (see `studio jobs list`)")
            if row["state"] not in ("failed", "cancelled"):
                raise ValueError(f"job {job_id} is {row['state']}; only cancelled or failed jobs can be resumed")
            config = {**json.loads(row["config"]), "resume": True}
            conn.execute("UPDATE jobs SET state = 'queued', config = ?, error = NULL, finished = NULL, attempts = 0 "
                         "WHERE id = ?", (json.dumps(config), int(job_id)))
        return self.get(job_id)

    def mark_stopped(self, job_id) -> Job:
        """The escape hatch for a job that looks stuck in running/stopping: cancelled if no live worker holds it."""
        job = self.get(job_id)
        if job.state in ("running", "stopping") and process_alive(job.pid, job.pid_start):
            raise ValueError(f"job {job_id} is {job.state} in live process {job.pid}; use cancel")
        if job.state in ("running", "stopping"):
            with self._transaction() as conn:
                conn.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (time.time(), int(job_id)))
        return self.get(job_id)

    def claim_next(self):
        """Atomically take the oldest queued job for this process (None if the queue is empty)."""
        pid = os.getpid()
        with self._transaction() as conn:
            row = conn.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET state = 'running', started = ?, pid = ?, pid_start = ?, error = NULL "
                         "WHERE id = ?", (time.time(), pid, process_start(pid), row["id"]))
        return self.get(row["id"])

    def update_progress(self, job_id, step: int, steps: int):
        with self._connect() as conn:
            conn.execute("UPDATE jobs SET step = ?, steps = ? WHERE id = ?", (int(step), int(steps), int(job_id)))

    def finish(self, job_id, state: str, error: str | None = None):
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET state = ?, error = ?, finished = ?, pid = NULL WHERE id = ?",
                         (state, error, time.time() if state in FINISHED else None, int(job_id)))

    def requeue(self, job_id, error: str | None = None):
        """Back to the queue, resuming from the last checkpoint (worker interrupted)."""
        with self._transaction() as conn:
            row = conn.execute("SELECT config FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
            config = {**json.loads(row["config"]), "resume": True}
            conn.execute("UPDATE jobs SET state = 'queued', config = ?, pid = NULL, error = ? WHERE id = ?",
                         (json.dumps(config), error, int(job_id)))

    def recover(self) -> list:
        """Jobs left running/stopping by a dead worker: requeue (resume) or cancel them. Returns their ids."""
        found = []
        with self._transaction() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE state IN ('running', 'stopping')").fetchall()
            for row in rows:
                if process_alive(row["pid"], row["pid_start"]):
                    continue
                found.append(row["id"])
                if row["state"] == "stopping":
                    conn.execute("UPDATE jobs SET state = 'cancelled', pid = NULL, finished = ? WHERE id = ?",
                                 (time.time(), row["id"]))
                elif row["attempts"] + 1 >= MAX_ATTEMPTS:
                    conn.execute("UPDATE jobs SET state = 'failed', pid = NULL, finished = ?, error = ? WHERE id = ?",
                                 (time.time(), f"the worker died {row['attempts'] + 1} times while running this job; "
                                               f"resume it to try again", row["id"]))
                else:
                    config = {**json.loads(row["config"]), "resume": True}
                    conn.execute("UPDATE jobs SET state = 'queued', config = ?, pid = NULL, attempts = attempts + 1, "
                                 "error = 'interrupted: the worker stopped; resuming from the last checkpoint' "
                                 "WHERE id = ?", (json.dumps(config), row["id"]))
        return found


def runner_for(kind: str):
    module, name = RUNNERS[kind].split(":")
    return getattr(import_module(module), name)


class Worker:
    """Runs queued jobs one at a time in this process. Only one worker per store (a lock file says so)."""

    def __init__(self, store: JobStore, on_event=None):
        self.store = store
        self.on_event = on_event  # optional callback(job_id, event dict) for a UI
        self._lock = None

    def acquire(self):
        import fcntl

        handle = open(self.store.root / "worker.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ValueError(f"another worker is already running jobs from {self.store.root}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def release(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def run_job(self, job: Job) -> Job:
        from studio.train import run_status

        def progress(event):
            if event.get("type") == "step":
                self.store.update_progress(job.id, event["step"], event["steps"])
            if self.on_event is not None:
                self.on_event(job.id, event)

        try:
            run_dir = runner_for(job.kind)(job.config, progress=progress, stop=lambda: self.store.stop_requested(job.id))
        except KeyboardInterrupt:
            self.store.requeue(job.id, "interrupted: resuming from the last checkpoint")
            raise
        except Exception as exc:  # the job failed; the worker carries on with the next one
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.store.finish(job.id, "failed", f"{type(exc).__name__}: {message}")
            return self.store.get(job.id)
        state = run_status(run_dir).get("state")
        if state == "done":
            self.store.finish(job.id, "done")
        elif state == "stopped":
            self.store.finish(job.id, "cancelled", "stopped by request; resume to continue")
        else:
            self.store.finish(job.id, "failed", f"the run ended in state {state!r}")
        return self.store.get(job.id)

    def run_once(self):
        """Recover, then run the next queued job (None if there is none)."""
        self.store.recover()
        job = self.store.claim_next()
        return self.run_job(job) if job is not None else None

    def run_forever(self, poll: float = 2.0, should_exit=None, until_empty: bool = False):
        self.acquire()
        try:
            while should_exit is None or not should_exit():
                job = self.run_once()
                if job is None:
                    if until_empty:
                        return
                    time.sleep(poll)
        finally:
            self.release()
