"""Time `make demo` on a fresh clone, stage by stage (issue: the demo fits 30 minutes).

Clones the repository (its committed HEAD) into an empty folder, runs ``make demo`` there
(which creates the virtual environment and installs the project first, as on a new machine),
then runs ``make demo`` a second time (every stage must skip its finished work). Each
cpgan-prep / cpgan-train / cpgan-eval command of the Makefile runs through this script's
``--stage-log`` wrapper, which passes the output through and records the wall seconds and the
stage's summary line (the last line it printed). Prints a markdown table::

    .venv/bin/python bench/demo.py --workdir /tmp/demo-clone [--results RESULTS.md]

With ``--results`` the table replaces the block between its markers in that file. Nothing
else runs meanwhile if the seconds are to mean anything: the machine's two cores are the
budget.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results_file import replace_block

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- demo timing: bench/demo.py writes between these markers -->"
END = "<!-- end of demo timing -->"
BUDGET_MINUTES = 30
RERUN_BUDGET_SECONDS = 60


def time_stage(log: Path, command: list[str]) -> int:
    """Run one Makefile stage, passing its output through; append its timing to ``log``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    last = ""
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            last = line.strip()
    code = process.wait()
    entry = {"command": shlex.join([Path(command[0]).name, *command[1:]]),
             "seconds": round(time.perf_counter() - start, 1), "rc": code, "summary": last}
    with log.open("a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")
    return code


def make_demo(clone: Path, log: Path) -> float:
    """``make demo`` in ``clone`` with every stage timed; its total wall seconds."""
    wrapper = [sys.executable, str(Path(__file__).resolve()), "--stage-log", str(log), "--"]
    overrides = {name: shlex.join(wrapper + [f".venv/bin/{tool}"])
                 for name, tool in (("PREP", "cpgan-prep"), ("TRAIN", "cpgan-train"),
                                    ("EVAL", "cpgan-eval"))}
    start = time.perf_counter()
    subprocess.run(["make", "demo", *(f"{k}={v}" for k, v in overrides.items())], cwd=clone,
                   check=True)
    return time.perf_counter() - start


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def table(first: list[dict], first_total: float, rerun_total: float, commit: str) -> str:
    stages = sum(entry["seconds"] for entry in first)
    command = shlex.join(["python", "bench/demo.py", *sys.argv[1:]])
    lines = [BEGIN, "", f"Made by `{command}` on commit `{commit}` (fresh clone, "
             f"{os.cpu_count()} cores, nothing else running).", "",
             "| stage | seconds | what it printed |", "|---|---|---|"]
    for entry in first:
        summary = entry["summary"].replace("|", "\\|")
        lines.append(f"| `{entry['command']}` | {entry['seconds']:.0f} | {summary} |")
    lines += ["", f"Stages {stages:.0f} s; the whole `make demo` including creating the virtual "
              f"environment and installing the project {first_total:.0f} s "
              f"({first_total / 60:.1f} min; budget {BUDGET_MINUTES} min). A second "
              f"`make demo` on the finished artifacts: {rerun_total:.0f} s (budget "
              f"{RERUN_BUDGET_SECONDS} s).", "", END]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--stage-log":
        separator = sys.argv.index("--")
        sys.exit(time_stage(Path(sys.argv[2]), sys.argv[separator + 1:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True,
                        help="empty (or missing) folder for the clone")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    clone = args.workdir.resolve() / "cpgan"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, check=True,
                            capture_output=True, text=True).stdout.strip()
    first_log, rerun_log = args.workdir.resolve() / "first.jsonl", args.workdir.resolve() / "rerun.jsonl"
    for log in (first_log, rerun_log):
        log.unlink(missing_ok=True)
    first_total = make_demo(clone, first_log)
    rerun_total = make_demo(clone, rerun_log)
    block = table(read_log(first_log), first_total, rerun_total, commit)
    print(block)
    if args.results is not None:
        replace_block(args.results, BEGIN, END, block)


if __name__ == "__main__":
    main()
