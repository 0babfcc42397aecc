"""The default `ape optimize` end to end, before and after a change, side by side in one run.

Usage:
    python benchmarks/end_to_end/run.py [--tasks antonyms,first_word_letter,negation]
        [--before 698b591] [--after REV] [--searcher ape] [--repeats 1] [--seeds 0]
        [--no-prefix-cache] [--out benchmarks/results/end_to_end]

`--before` is a git revision: it is installed (no dependencies, the same site-packages) into a
folder of its own under /tmp and run from there, so both versions run on the same machine, the
same interpreter and the same libraries, one after the other; after it, this working tree.
Each run is `python -m ape optimize TASK --seed S --storage memory` in a fresh process (model
load included in the wall time), with `--searcher NAME` when one is given (both versions'
default is `whole`, the whole-prompt search). The result's own timings give the phases: generation,
scoring, the search as a whole and the test evidence (total minus search), and of the
evidence, the metric's greedy answers (versions from 14bed63 on time them). Units/s is the
scored (prompt, example) pairs the model computed per second of scoring. Peak RSS is the run's
own (wait4's ru_maxrss). `--no-prefix-cache` adds a run of this tree with the cross-call prefix
cache off ($APE_PREFIX_CACHE_MB=0): the difference in peak RSS is what the cache costs in memory.
Medians over `--repeats`. `--seeds 0,1,2` runs each seed as its own row and adds, per task and
version, the mean test score over the seeds: one seed's best prompt is one draw of the search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ape.prefix_cache import ENV_MB

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data" / "instruction_induction"
OUT = REPO / "benchmarks" / "results" / "end_to_end"
BEFORE = "698b591"  # main before the speed work of issue 15
TASKS = ("antonyms", "first_word_letter", "negation")


def install(revision: str) -> Path:
    """`revision` installed into a folder of its own; the folder goes first on PYTHONPATH."""
    target = Path(tempfile.gettempdir()) / f"ape-e2e-{revision}"
    if (target / "ape").is_dir():
        return target
    tree = Path(tempfile.mkdtemp(prefix="ape-e2e-src-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision], check=True
    )
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(target),
                str(tree),
            ],
            check=True,
        )
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True
        )
    return target


def run_once(
    version: str,
    path: Path | None,
    task: str,
    out: Path,
    searcher: str | None,
    extra_env: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One run of `task` by the code at `path` (None: this working tree)."""
    env = dict(os.environ, **(extra_env or {}))
    if path is not None:
        env["PYTHONPATH"] = str(path)
    result_file = out / "runs" / f"{task}-{version}-seed{seed}.json"
    command = [
        sys.executable,
        "-m",
        "ape",
        "optimize",
        str(DATA / task),
        "--seed",
        str(seed),
        "--storage",
        "memory",
        "--quiet",
        "--out",
        str(result_file),
        *(["--searcher", searcher] if searcher else []),
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise subprocess.CalledProcessError(code, command)
    result = json.loads(result_file.read_text())
    timings = result["timings"]
    computed = result["budget_detail"].get("pairs_computed", 0)
    best = result["best"]
    return {
        "version": version,
        "task": task,
        "seed": seed,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux reports kilobytes
        "generate_s": timings.get("generate_s", 0.0),
        "score_s": timings.get("score_s", 0.0),
        "search_s": timings.get("search_s", 0.0),
        "evidence_s": round(timings.get("total_s", 0.0) - timings.get("search_s", 0.0), 1),
        # Of the evidence, the metric's greedy answers (None: a version that does not time them).
        "metric_s": timings.get("metric_evidence_s"),
        "units_per_s": round(computed / timings["score_s"], 1) if timings.get("score_s") else None,
        "best": best["instruction"],
        "best_demos": len(best.get("demos", [])),
        "test_loglik": best.get("test_score"),
        "test_metric": best.get("test_metric"),
    }


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each timing over repeats; the prompt and scores of the first repeat (a
    seeded run chooses the same prompt every time)."""
    out = dict(rows[0])
    timed = ("wall_s", "generate_s", "score_s", "search_s", "evidence_s", "metric_s", "units_per_s")
    for key in (*timed, "peak_rss_mb"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = round(statistics.median(values), 1) if values else None
    out["repeats"] = len(rows)
    return out


def table(rows: list[dict[str, Any]], machine: str, searcher: str | None) -> str:
    which = f"--searcher {searcher}" if searcher else "each version's default searcher"
    lines = [
        f"Measured on {machine}; SmolLM2-135M-Instruct, float32; `ape optimize TASK --seed S "
        f"--storage memory`, {which}, medians over repeats.",
        "",
        "| task | seed | version | wall s | generation s | scoring s | search s | evidence s "
        "| of which metric s | units/s | peak RSS MB | test loglik | test metric | best prompt |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        prompt = (r["best"] or "(no instruction)")[:60] + f" + {r['best_demos']} demos"
        metric = "" if r["test_metric"] is None else f"{r['test_metric']:.3f}"
        answers = "–" if r.get("metric_s") is None else r["metric_s"]
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['version']} | {r['wall_s']} | "
            f"{r['generate_s']:.1f} | {r['score_s']:.1f} | {r['search_s']:.1f} | "
            f"{r['evidence_s']} | {answers} | {r['units_per_s']} | {r['peak_rss_mb']} | "
            f"{r['test_loglik']:.4f} | {metric} | {prompt} |"
        )
    lines += comparisons(rows)
    return "\n".join(lines)


def comparisons(rows: list[dict[str, Any]]) -> list[str]:
    """Per task and seed, the speed-up and the prefix cache's memory; per task over several
    seeds, each version's mean test scores."""
    lines = []
    seeds = sorted({r["seed"] for r in rows})
    for task in dict.fromkeys(r["task"] for r in rows):
        for seed in seeds:
            runs = {
                r["version"].split()[0]: r for r in rows if r["task"] == task and r["seed"] == seed
            }
            on = f"{task} (seed {seed})"
            if "before" in runs and "after" in runs:
                before, after = runs["before"]["wall_s"], runs["after"]["wall_s"]
                lines.append(f"\n{on}: {before / after:.2f}x faster end to end.")
            if "after" in runs and "no-cache" in runs:
                extra = runs["after"]["peak_rss_mb"] - runs["no-cache"]["peak_rss_mb"]
                lines.append(f"\n{on}: the prefix cache adds {extra:+d} MB of peak RSS.")
        if len(seeds) < 2:
            continue
        for version in dict.fromkeys(r["version"] for r in rows if r["task"] == task):
            mine = [r for r in rows if r["task"] == task and r["version"] == version]
            loglik = statistics.mean(r["test_loglik"] for r in mine)
            metrics = [r["test_metric"] for r in mine if r["test_metric"] is not None]
            metric = f", test metric {statistics.mean(metrics):.3f}" if metrics else ""
            lines.append(
                f"\n{task}, {version}, mean over seeds {','.join(map(str, seeds))}: "
                f"test loglik {loglik:.4f}{metric}."
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--before", default=BEFORE, help="git revision ('' to skip)")
    parser.add_argument("--after", default="", help="git revision (default: this working tree)")
    parser.add_argument("--searcher", default=None, help="a searcher both versions run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each its own row")
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="also run this tree with the prefix cache off (its cost in peak RSS)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the runs start in another directory
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    versions: list[tuple[str, Path | None, dict[str, str]]] = []
    if args.before:
        versions.append((f"before ({args.before})", install(args.before), {}))
    head = (
        args.after
        or subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    after = install(args.after) if args.after else None
    versions.append((f"after ({head})", after, {}))
    if args.no_prefix_cache:
        versions.append((f"no-cache ({head}, APE_PREFIX_CACHE_MB=0)", after, {ENV_MB: "0"}))
    rows = []
    for task in args.tasks.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for version, path, env in versions:
                tag = version.split()[0]
                print(f"== {task} seed {seed} {version}", file=sys.stderr, flush=True)
                repeats = [
                    run_once(tag, path, task, args.out, args.searcher, env, seed)
                    for _ in range(args.repeats)
                ]
                row = median_row(repeats)
                row["version"] = version
                rows.append(row)
    from ape.device import describe_machine, machine_line

    text = table(rows, machine_line(describe_machine("cpu")), args.searcher)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
