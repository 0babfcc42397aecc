"""Distributed workers: jobs queued in a shared study, scored once, retried when a worker dies.

The PostgreSQL tests start a throwaway server from the Debian postgresql binaries (initdb in a
temp dir, a loopback port) and skip with a message where the binaries or psycopg2 are missing.
"""

from __future__ import annotations

import collections
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from conftest import SMALL_APE

import ape
from ape.jobs import SCORED, SPEC_ATTR, STATE_ATTR, JobQueue
from ape.study import TrialStore, prompt_key_of
from ape.worker import shared_storage

APE_KNOBS = {**SMALL_APE, "rounds": 3}


def _pairs_scored(storage: str, study: str) -> collections.Counter:
    """How often each (prompt, example) pair was stored by a finished scoring trial."""
    handle = optuna.load_study(study_name=study, storage=storage)
    counts: collections.Counter = collections.Counter()
    for trial in handle.get_trials(deepcopy=False, states=(SCORED,)):
        if "scores" in trial.user_attrs:
            key = prompt_key_of(trial.user_attrs["prompt"])
            counts.update((key, example) for example in trial.user_attrs["examples"])
    return counts


def _optimize(task_file, model_dir, storage, workers, study="words"):
    return ape.optimize(
        task_file,
        model=str(model_dir),
        storage=storage,
        study=study,
        workers=workers,
        val_examples=15,
        progress=False,
        **APE_KNOBS,
    )


def _compare_with_one_process(task_file, model_dir, storage, tmp_path):
    pooled = _optimize(task_file, model_dir, storage, workers=2)
    counts = _pairs_scored(storage, "words")
    assert counts, "the workers stored nothing"
    assert max(counts.values()) == 1, "a (prompt, example) pair was scored twice"
    single = _optimize(task_file, model_dir, f"sqlite:///{tmp_path / 'single.db'}", workers=0)
    assert pooled.best.instruction == single.best.instruction
    assert [e.instruction for e in pooled.leaderboard] == [
        e.instruction for e in single.leaderboard
    ]
    assert pooled.best.val_score == pytest.approx(single.best.val_score, abs=1e-4)


def test_two_workers_on_sqlite_match_one_process(task_file, tiny_model_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'pool.db'}"
    _compare_with_one_process(task_file, tiny_model_dir, storage, tmp_path)


def test_two_workers_on_postgresql_match_one_process(
    task_file, tiny_model_dir, tmp_path, postgres_url
):
    _compare_with_one_process(task_file, tiny_model_dir, postgres_url, tmp_path)


def test_workers_need_a_database():
    for storage in (None, "memory", "runs/journal.log"):
        with pytest.raises(ValueError, match="workers share the run through a database"):
            shared_storage(storage)


def test_sigkilled_worker_loses_no_work(tiny_lm, tiny_model_dir, tmp_path, postgres_url):
    """A worker killed while it holds jobs: they are re-queued and another worker stores them."""
    task = ape.load_task(_many_words(tmp_path), seed=0)
    fingerprint = {"kill": "test"}
    store = TrialStore(postgres_url, "kill", fingerprint)
    store.study.set_user_attr(
        SPEC_ATTR,
        {
            "model": str(tiny_model_dir),
            "dtype": "float32",
            "evaluator": "loglik",
            "evaluator_options": {},
        },
    )
    store.study.set_user_attr(STATE_ATTR, "running")
    prompts = [ape.Prompt(f"Instruction number {i}.") for i in range(60)]
    jobs = {store.submit(p, task.val) for p in prompts}

    first = _start_worker(postgres_url, "kill", batch=1000)
    handle = optuna.load_study(study_name="kill", storage=postgres_url)
    deadline = time.monotonic() + 120  # a loaded machine can take a minute to start a worker
    running = []
    while time.monotonic() < deadline and not running:
        running = handle.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        time.sleep(0.05)
    assert running, "the worker never claimed a job"
    first.send_signal(signal.SIGKILL)
    first.wait()
    held = {t.user_attrs["job_id"] for t in running}
    completed = {
        t.user_attrs["job_id"] for t in handle.get_trials(deepcopy=False, states=(SCORED,))
    }
    assert held - completed, "the worker finished before it was killed; nothing was tested"

    second = _start_worker(postgres_url, "kill", batch=16)
    try:
        store.wait(jobs, poll=0.2)
    finally:
        store.study.set_user_attr(STATE_ATTR, "finished")
        second.wait(timeout=60)
    counts = _pairs_scored(postgres_url, "kill")
    assert len(counts) == len(prompts) * len(task.val)
    assert max(counts.values()) == 1
    failed = handle.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    assert {t.user_attrs["job_id"] for t in failed} >= held - completed
    # The stored scores are the model's: compare a few with scoring in this process.
    scorer = ape.evaluation.make_evaluator("loglik", task)
    local = scorer.score(tiny_lm, prompts[:3], task.val)
    for row, prompt in zip(local, prompts[:3], strict=True):
        stored = [store.scores[(prompt.key(), e.key())] for e in task.val]
        assert stored == pytest.approx(row.tolist(), abs=1e-4)


def _many_words(tmp_path):
    from conftest import WORDS, write_task_file

    return write_task_file(tmp_path / "words.jsonl", WORDS)


def _start_worker(storage: str, study: str, batch: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "ape",
        "worker",
        "--storage",
        storage,
        "--study",
        study,
        "--batch",
        str(batch),
        "--quiet",
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------- PostgreSQL server
def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    matches = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return matches[-1] if matches else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on a loopback port, for the session."""
    pytest.importorskip(
        "psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)"
    )
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not found (apt install postgresql)")
    # Not under pytest's tmp dir: its parents are private to root, and the server runs as
    # the 'postgres' user when the tests run as root.
    root = Path(tempfile.mkdtemp(prefix="ape-postgres-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            import pwd

            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(root, account.pw_uid, account.pw_gid)
        os.chown(sockets, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "ape", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run_as, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://ape@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def test_a_worker_killed_as_it_takes_a_job_leaves_the_job_to_be_requeued(tmp_path, monkeypatch):
    """Optuna never fails a RUNNING trial without a heartbeat: a job must beat before it runs."""
    from ape import storage as storage_module
    from ape.task import Example

    monkeypatch.setattr(storage_module, "GRACE_SECONDS", 1)
    storage = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = TrialStore(storage, "claim", {"claim": "test"})
    store.submit(ape.Prompt("p"), [Example("a", "b")])
    queue = JobQueue.join(storage, "claim")

    class KilledOnceRunning:
        """The storage, except that the worker dies right after its job becomes RUNNING."""

        def __getattr__(self, name):
            return getattr(queue.storage, name)

        def set_trial_state_values(self, trial_id, state, values=None):
            queue.storage.set_trial_state_values(trial_id, state, values)
            raise KeyboardInterrupt  # stands in for SIGKILL

    with pytest.raises(KeyboardInterrupt):
        JobQueue(queue.study, KilledOnceRunning()).claim(1)
    states = [t.state for t in queue.study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.RUNNING]
    time.sleep(2.5)  # past the grace period
    queue.requeue_stale()
    states = [t.state for t in queue.study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]


def test_a_worker_stores_its_scores_in_the_claimed_trial_and_the_coordinator_collects_them(
    tmp_path,
):
    """The protocol without a model: claim, complete, collect; no job is claimed twice."""
    from ape.task import Example

    storage = f"sqlite:///{tmp_path / 'jobs.db'}"
    store = TrialStore(storage, "proto", {"proto": "test"})
    store.jobs.open_for_workers({"model": "m"})
    examples = [Example("a", "b"), Example("c", "d")]
    job_id = store.submit(ape.Prompt("p"), examples, split="val")
    assert set(store.pending.values()) == {job_id}

    worker = JobQueue.join(storage, "proto")
    assert worker.spec() == {"model": "m"} and not worker.run_finished()
    claimed = worker.claim(batch=4)
    assert [job.attrs["job_id"] for job in claimed] == [job_id]
    assert JobQueue.join(storage, "proto").claim(batch=4) == []  # taken: no one else gets it
    worker.complete(claimed[0], [-1.0, -3.0])

    store.wait({job_id}, poll=0.01)
    key = ape.Prompt("p").key()
    assert store.scores == {(key, examples[0].key()): -1.0, (key, examples[1].key()): -3.0}
    assert store.pending == {}
    trial = store.study.get_trials(deepcopy=False)[-1]
    assert trial.state == SCORED and trial.value == -2.0
    store.jobs.close_for_workers()
    assert worker.run_finished()
    # A resumed coordinator replays the job's scores without queueing it again.
    again = TrialStore(storage, "proto", {"proto": "test"})
    assert again.scores == store.scores and again.pending == {}
