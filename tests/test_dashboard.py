"""A finished run's study, read through optuna-dashboard's own web API (its public `wsgi` app).

The dashboard's best trial is `storage.get_best_trial`: the best COMPLETE trial. A run records
each candidate's whole-pool mean as a COMPLETE trial and its minibatch scores as PRUNED ones, so
the best trial shown is the leaderboard's winner with its full-pool score; generated text lives
in a study of its own, not in the run's study attributes.
"""

from __future__ import annotations

import io
import json
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from conftest import SMALL_APE

import ape
from ape.generation_cache import GENERATIONS_ATTR

optuna_dashboard = pytest.importorskip("optuna_dashboard")

pytestmark = pytest.mark.usefixtures("single_thread")


def _get(app, path: str):
    """GET `path` from a WSGI app; the decoded JSON body."""
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda code, headers, *rest: status.append(code)))
    assert status[0].startswith("200"), (path, status, body[:200])
    return json.loads(body)


def _attrs(serialized) -> dict[str, str]:
    return {a["key"]: a["value"] for a in serialized["user_attrs"]}


def test_the_dashboards_best_trial_is_the_results_best_prompt(task_file, tiny_lm, tmp_path):
    storage = f"sqlite:///{tmp_path / 'run.db'}"
    options = {**SMALL_APE, "templates": "forward"}
    result = ape.optimize(
        task_file, model=tiny_lm, searcher="ape", storage=storage, seed=0, progress=False, **options
    )
    app = optuna_dashboard.wsgi(storage)
    studies = {s["study_name"]: s["study_id"] for s in _get(app, "/api/studies")["study_summaries"]}
    detail = _get(app, f"/api/studies/{studies[result.study]}")

    (best,) = detail["best_trials"]
    assert json.loads(_attrs(best)["prompt"])["instruction"] == result.best.instruction
    assert _attrs(best)["kind"] == "pool"
    assert int(_attrs(best)["n_examples"]) == result.best.val_examples
    assert best["values"] == [pytest.approx(result.best.val_score, abs=1e-9)]
    # Minibatch trials are there to read, but none of them is "best".
    states = {t["state"] for t in detail["trials"]}
    assert states == {"Complete", "Pruned"}
    minibatch = [t for t in detail["trials"] if t["state"] == "Pruned"]
    assert any(t["values"][0] > best["values"][0] for t in minibatch), "nothing was tested"
    # Every candidate complete on the pool has one trial with its leaderboard score.
    pooled = {
        json.loads(_attrs(t)["prompt"])["instruction"]: t["values"][0]
        for t in detail["trials"]
        if t["state"] == "Complete"
    }
    complete = [e for e in result.leaderboard if e.val_examples == result.best.val_examples]
    assert pooled == {e.instruction: pytest.approx(e.val_score, abs=1e-9) for e in complete}

    # Generated text is kept in a study of its own, which the run's study names.
    study_attrs = _attrs(detail)
    assert not any(key.startswith("generation") for key in study_attrs)
    side = study_attrs[GENERATIONS_ATTR]
    assert side in studies
    chunks = optuna.load_study(study_name=side, storage=storage).get_trials()
    assert chunks and all("texts" in t.user_attrs for t in chunks)
