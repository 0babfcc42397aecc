"""Chaos: every searcher's CLI run, SIGKILLed at 5 seeded random moments and resumed each time,
ends as an uninterrupted run does, and scores again only what was in flight at the kills.

This is the README's promise ("a run interrupted at any moment resumes from what it stored"),
held at five random moments instead of one.

How it is measured:

- Each run is `ape optimize ... --storage sqlite:///...` in a process of its own: `ape.cli.main`
  in a child forked from a server that has already imported torch, transformers and ape
  (importing them costs about 10 s of CPU per process, more than most runs on the tiny model).
  Two servers with different hash seeds take turns, as separate `python -m ape` processes would
  differ.
- Pairs are counted at the scorer: the runs use the ``counted`` evaluator of the test plugin
  package (tests/toy_plugin), which wraps the evaluator the searcher would use and appends
  ``PID TIME PAIRS`` per scoring call to a file. A killed process saves no result; its lines are
  on disk.
- What a kill may cost: the pairs a killed process scored that its study does not hold after the
  kill (read from the study, through Optuna's public API). Each is at most one batch: the pairs
  the uninterrupted run scored between two of its commits.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import optuna
import pytest
from ape.search.base import available_searchers, searcher_class
from conformance import cli_flags, evaluator_for, same_leaderboard, small_options

from ape.result import Result

KILLS = 5
STUDY = "chaos"
TOY_PLUGIN = Path(__file__).parent / "toy_plugin"

# A fork server: imports once, then runs each job (`ape.cli.main(argv)`) in a forked child,
# killed with SIGKILL at the job's moment if it has not ended by then.
SERVER = r"""
import json, os, signal, sys, time, traceback
import transformers
import ape.api, ape.cli
from ape.evaluators.base import EVALUATORS
from ape.search.base import SEARCHERS
for registry in (SEARCHERS, EVALUATORS):
    for name in registry.names():
        registry.load(name)
# Warm up: what loading a model and opening a storage import on first use (no forward pass).
import optuna
from ape.models import load_model
load_model(sys.argv[1])
optuna.storages.RDBStorage("sqlite:///" + sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    started = time.time()
    pid = os.fork()
    if pid == 0:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(job["env"])
        code = 1
        try:
            code = ape.cli.main(job["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    # The kill: `delay` seconds after this child's `after_calls`-th scoring call (0: its start).
    killed, timer = False, started if job["after_calls"] == 0 else None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.time()
        if timer is None and job["after_calls"] is not None:
            with open(job["env"]["APE_COUNT_PAIRS"], "a+") as counts:
                counts.seek(0)
                calls = sum(line.split()[0] == str(pid) for line in counts.read().splitlines())
            timer = now if calls >= job["after_calls"] else None
        if (timer is not None and now >= timer + job["delay"]) or now >= started + job["timeout"]:
            os.kill(pid, signal.SIGKILL)
            killed = True
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status)
    reply = {"pid": pid, "killed": killed, "code": code, "started": started,
             "seconds": time.time() - started}
    print(json.dumps(reply), flush=True)
"""


class ForkServer:
    def __init__(self, hash_seed: int, model: Path, scratch: Path) -> None:
        paths = [str(TOY_PLUGIN), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "PYTHONHASHSEED": str(hash_seed),
            "OMP_NUM_THREADS": "1",  # the tiny model gains nothing from threads; no pool to fork
            "TOKENIZERS_PARALLELISM": "false",
        }
        warm = scratch / f"warm-{hash_seed}.db"
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(model), str(warm)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def ready(self) -> None:
        assert self.process.stdout.readline().strip() == "ready", "the fork server did not start"

    def run(self, argv: list[str], env: dict, log: Path, kill: tuple[int, float] | None) -> dict:
        """Run `ape` with `argv` in a forked child; `kill`: (after_calls, delay), see SERVER."""
        after_calls, delay = kill or (None, 0.0)
        job = {"argv": argv, "env": env, "log": str(log), "timeout": 400}
        job.update(after_calls=after_calls, delay=delay)
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        assert reply, "the fork server died"
        return json.loads(reply)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("forkservers")
    pair = [ForkServer(seed, tiny_model_dir, scratch) for seed in (1, 2)]
    try:
        for server in pair:  # both import at once
            server.ready()
        yield pair
    finally:
        for server in pair:
            server.close()


def scoring_calls(path: Path) -> list[tuple[int, float, int]]:
    """(pid, time, pairs) per scoring call, as the counted evaluator wrote them."""
    if not path.exists():
        return []
    return [
        (int(p), float(t), int(n)) for p, t, n in map(str.split, path.read_text().split("\n")[:-1])
    ]


def study_trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    """The run's trials ([] while no run has created its study)."""
    if STUDY not in optuna.get_all_study_names(storage):
        return []
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def stored_pairs(storage: str) -> int:
    """Distinct (prompt, example) pairs whose scores the study holds (ape/study.py's scoring
    trials: a prompt, its examples' keys and their scores as user attributes)."""
    pairs = set()
    for trial in study_trials(storage):
        attrs = trial.user_attrs
        if "prompt" in attrs and "scores" in attrs:
            prompt = json.dumps(attrs["prompt"], sort_keys=True)
            pairs.update((prompt, example) for example in attrs["examples"])
    return len(pairs)


def largest_batch(calls: list[tuple[int, float, int]], storage: str) -> int:
    """The most pairs scored between two commits of a run: what one kill can lose."""
    commits = sorted(t.datetime_complete.timestamp() for t in study_trials(storage))
    batches = Counter()
    for _, when, pairs in calls:
        batches[sum(1 for c in commits if c < when)] += pairs
    return max(batches.values(), default=0)


@pytest.mark.parametrize("name", available_searchers())
def test_killed_and_resumed_run_ends_as_an_uninterrupted_one(
    name, servers, tiny_model_dir, task_file, tmp_path
):
    cls = searcher_class(name)
    flags = ["--searcher", name, "--evaluator", "counted", "--study", STUDY, "--quiet"]
    argv = ["optimize", str(task_file), "--model", str(tiny_model_dir), *flags]
    argv += cli_flags(cls, small_options(cls))

    def launch(server: ForkServer, run: str, kill: tuple[int, float] | None = None) -> dict:
        env = {
            "APE_COUNT_PAIRS": str(tmp_path / f"{run}.count"),
            "APE_COUNT_INNER": evaluator_for(cls),
        }
        storage = [
            "--storage",
            f"sqlite:///{tmp_path / run}.db",
            "--out",
            str(tmp_path / f"{run}.json"),
        ]
        return server.run(argv + storage, env, tmp_path / f"{run}.log", kill)

    whole = launch(servers[0], "whole")
    assert whole["code"] == 0, (tmp_path / "whole.log").read_text()[-3000:]
    calls = scoring_calls(tmp_path / "whole.count")
    reference = Result.load(tmp_path / "whole.json")
    assert sum(n for _, _, n in calls) == reference.budget_detail["pairs_computed"]
    batch = largest_batch(calls, f"sqlite:///{tmp_path / 'whole'}.db")

    # Kill moments: each a seeded number of the child's own scoring calls (cut points spread
    # over the uninterrupted run's calls, so the kills fall through the whole run) plus a seeded
    # delay of up to one gap between calls (so a kill may land while scoring, storing or
    # generating, and with no call yet, during start-up).
    rng = random.Random(zlib.crc32(name.encode()))
    gap = (calls[-1][1] - whole["started"]) / len(calls)
    cuts = sorted(rng.randrange(len(calls)) for _ in range(KILLS))
    storage = f"sqlite:///{tmp_path / 'chaos'}.db"
    lost, launches = [], []
    for i, (start, cut) in enumerate(zip([0, *cuts[:-1]], cuts, strict=True)):
        before = stored_pairs(storage)
        done = launch(servers[(i + 1) % 2], "chaos", (cut - start, rng.uniform(0, gap)))
        mine = sum(n for pid, _, n in scoring_calls(tmp_path / "chaos.count") if pid == done["pid"])
        lost.append(mine - (stored_pairs(storage) - before))
        launches.append(done)
    final = launch(servers[0], "chaos")
    assert final["code"] == 0, (tmp_path / "chaos.log").read_text()[-3000:]
    killed = [d["killed"] for d in launches]
    story = f"kills landed: {killed}; pairs lost per launch: {lost}; largest batch: {batch}"
    assert sum(killed) >= 3, f"most kills should land before the run ends; {story}"

    resumed = Result.load(tmp_path / "chaos.json")
    assert same_leaderboard(resumed.leaderboard, reference.leaderboard), story
    scored = sum(n for _, _, n in scoring_calls(tmp_path / "chaos.count"))
    extra = scored - reference.budget_detail["pairs_computed"]
    assert 0 <= extra <= sum(lost), f"{extra} pairs scored again; {story}"
    # A kill loses at most the batch in flight; a run that ended stored all it scored.
    assert all(0 <= n <= (batch if k else 0) for n, k in zip(lost, killed, strict=True)), story
