"""``make gpu-check``: one call on a GPU machine measures the torch CUDA engine and training, into one report.

Sections, each time-boxed and each surviving the failure of another:

1. parity: greedy captions of the bundled models on the GPU in fp32, bf16 and fp16 against CPU fp32;
2. throughput: blip-base-shape images/s at batch 1-256 in bf16 and fp16, peak memory, fraction of the roof;
3. training: DAMF stage-1 and stage-2 optimizer steps on blip-base-shape, bf16 autocast, batch 32;
4. ``pytest -m gpu``.

This process imports no torch: it runs sections 1-3 in a worker (:mod:`.gpu_sections`) and watches it, so a
hang or a CUDA fault costs one section, not the call: past a section's hard budget the worker is killed and a
new one runs the sections left. The report is rewritten after every section, so even a call cut short leaves
what was measured. Exit status 1 if any section failed, after the report is written. ``--dry-run`` runs the
same path on the CPU at tiny sizes (seconds), which is what ``tests/test_gpu_check.py`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPORT = "gpu-check.md"
SOURCE_REPO = Path(__file__).resolve().parents[1]  # the repo root when run from a checkout (editable install)
WORKER_SECTIONS = ("parity", "throughput", "training")


@dataclass(frozen=True)
class Plan:
    """What to measure and the time boxes. Defaults are the GPU run's; :meth:`dry` shrinks them for CPU."""

    device: str = "cuda"
    images: str = ""
    work: str = ""
    dry_run: bool = False
    parity_models: tuple[str, ...] = ("reefscenes-tiny", "reefscenes-tiny-damf")
    parity_dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")
    bench_model: str = "blip-base-shape"
    bench_dtypes: tuple[str, ...] = ("bf16", "fp16")
    bench_batches: tuple[int, ...] = (1, 16, 64, 256)
    bench_repeats: int = 3
    cell_budget_s: float = 8.0
    caption_length: int = 20
    roof_flops: float = 800e12
    train_model: str = "blip-base-shape"
    train_recipe: str = "damf"
    train_batch: int = 32
    train_steps: int = 10
    train_warmup: int = 2
    # Hard limits per section (s), worker start-up included; sections stop starting work at 75% of theirs.
    # Sum 420 s + install and start-up ~30 s: under the 8 minutes one device call may take.
    budgets: dict[str, float] = field(
        default_factory=lambda: {"parity": 75, "throughput": 150, "training": 105, "pytest": 90}
    )

    def dry(self) -> Plan:
        """The CPU dry run: tiny bundled model everywhere, batches 1 and 2, a few steps."""
        return replace(
            self,
            device="cpu",
            dry_run=True,
            bench_model="reefscenes-tiny",
            bench_dtypes=("fp32", "bf16"),
            bench_batches=(1, 2),
            bench_repeats=2,
            train_model="reefscenes-tiny",
            train_batch=2,
            train_steps=3,
            train_warmup=1,
            budgets={"parity": 60, "throughput": 60, "training": 60, "pytest": 120},
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class Section:
    name: str
    title: str
    status: str = "not run"  # not run | ok | FAILED
    seconds: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""


TITLES = {
    "parity": "Torch CUDA engine parity (greedy, bundled models)",
    "throughput": "Throughput (greedy, fixed length)",
    "training": "Training steps (DAMF recipe, bf16 autocast)",
    "pytest": "pytest -m gpu",
}


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines


def render(plan: Plan, sections: list[Section], env: dict[str, Any], header: list[str]) -> str:
    """The whole report as markdown."""
    failed = [s.name for s in sections if s.status == "FAILED"]
    mode = "dry run (cpu, tiny sizes)" if plan.dry_run else f"{plan.device}"
    lines = ["# reefcap GPU check", "", f"- Mode: {mode}", *header]
    if env:
        lines.append("- Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines.append(f"- Result: {'FAILED: ' + ', '.join(failed) if failed else 'every section that ran passed'}")
    lines += ["", "| section | status | seconds | hard budget s |", "|---|---|---:|---:|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds if s.seconds is not None else '-'} | "
              f"{plan.budgets[s.name]:.0f} |" for s in sections]  # fmt: skip
    for i, s in enumerate(sections, 1):
        lines += ["", f"## {i}. {s.title}", "", f"Status: {s.status}", ""]
        lines += _table(s.rows)
        if s.notes:
            lines += ["", *(f"- {n}" for n in s.notes)]
        if s.error:
            lines += ["", "```", s.error.strip(), "```"]
    return "\n".join(lines) + "\n"


def child_env(plan: Plan) -> dict[str, str]:
    """Environment of the worker and pytest. The dry run keeps torch to one thread: on a busy shared CPU, two
    spinning OpenMP threads made the tiny model ~100x slower (13 s for 2 captions instead of 0.1 s)."""
    env = dict(os.environ)
    # The tests' sample photos: the installed copy has no examples/ beside it (reefcap.models.samples).
    if plan.images and (Path(plan.images).parent / "raw").is_dir():
        env.setdefault("REEFCAP_SAMPLES", str(Path(plan.images).parent))
    if plan.dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _read_events(progress: Path, seen: int) -> tuple[list[dict[str, Any]], int]:
    text = progress.read_text() if progress.is_file() else ""
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # a line being written waits
    return [json.loads(x) for x in lines[seen:]], len(lines)


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the worker leads its own session: only its processes die
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _finish(section: Section, event: dict[str, Any]) -> None:
    result = event.get("result") or {}
    section.status, section.seconds = ("ok" if event["ok"] else "FAILED"), event["seconds"]
    section.rows, section.notes, section.error = result.get("rows", []), result.get("notes", []), event.get("trace", "")


def _watch(proc, progress: Path, plan: Plan, sections, env, pending: list[str], on_change) -> tuple[str | None, float]:
    """Follow one worker until it exits or overruns; returns the section it was in (None if all ended) and when
    that section started. Kills the worker past the section's hard budget."""
    seen, current, since = 0, pending[0], time.monotonic()  # start-up counts against the first section
    while True:
        exited = proc.poll() is not None  # polled before reading, so the last events are never missed
        events, seen = _read_events(progress, seen)
        for ev in events:
            if ev["event"] == "env":
                env.update(ev["env"])
            elif ev["event"] == "start":
                current, since = ev["section"], time.monotonic()
            elif ev["event"] == "done":
                _finish(sections[ev["section"]], ev)
                pending.remove(ev["section"])
                current, since = (pending[0] if pending else None), time.monotonic()
                on_change()
        if exited or not pending:
            return current, since
        if time.monotonic() - since > plan.budgets[current]:
            _kill(proc)
            return current, since
        time.sleep(0.2)


def run_worker(plan: Plan, sections: dict[str, Section], env: dict[str, Any], on_change) -> None:
    """Run the worker sections, restarting the worker after a hang or crash; fills ``sections`` as they end."""
    work = Path(plan.work)
    plan_file = work / "plan.json"
    plan_file.write_text(plan.to_json())
    pending = [n for n in WORKER_SECTIONS if n in sections]
    attempt = 0
    while pending:
        attempt += 1
        progress, log = work / f"progress-{attempt}.jsonl", work / f"worker-{attempt}.log"
        cmd = [sys.executable, "-m", "reefcap.bench.gpu_sections", "--plan", str(plan_file)]
        cmd += ["--progress", str(progress), "--sections", ",".join(pending)]
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=child_env(plan)
            )
        current, since = _watch(proc, progress, plan, sections, env, pending, on_change)
        proc.wait()
        if current in pending:  # the worker died, or was killed, inside `current`
            s, elapsed = sections[current], time.monotonic() - since
            why = "killed at its hard time box" if elapsed > plan.budgets[current] else "worker exited"
            s.status, s.seconds = "FAILED", round(elapsed, 1)
            s.error = f"{why}, exit status {proc.returncode}; worker log tail:\n" + log.read_text()[-3000:]
            pending.remove(current)
            on_change()


def run_pytest(plan: Plan, repo: Path, section: Section) -> None:
    """``pytest -m gpu`` on the repo's tests against the installed package; its summary goes in the report."""
    # cwd is the work folder, not the repo: `python -m` puts cwd on sys.path, and the repo's reefcap/ folder
    # lacks the subpackages the installed copy has.
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    cmd += ["--rootdir", str(repo), "-c", str(repo / "pyproject.toml"), str(repo / "tests")]
    started = time.monotonic()
    try:
        done = subprocess.run(
            cmd, cwd=plan.work, capture_output=True, timeout=plan.budgets["pytest"], env=child_env(plan)
        )
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = (exc.stdout or b"") + (exc.stderr or b""), None
    section.seconds = round(time.monotonic() - started, 1)
    lines = [x for x in output.decode(errors="replace").splitlines() if x.strip()]
    summary = next((x.strip("= ") for x in reversed(lines) if re.search(r"\bin [\d.]+s\b", x)), "no summary line")
    # Exit 5 is "no tests collected": nothing to run is not a failure of the machine.
    section.status = "ok" if code in (0, 5) else "FAILED"
    exit_status = code if code is not None else f"killed at {plan.budgets['pytest']:.0f} s"
    section.rows = [{"command": "pytest -m gpu", "exit status": exit_status, "summary": summary}]
    marker = next((i for i, x in enumerate(lines) if "short test summary" in x), len(lines))
    section.notes = [f"`{x.strip()}`" for x in lines[marker + 1 :] if not x.startswith("=") and x != summary][:20]
    if section.status == "FAILED":
        section.error = "\n".join(lines[-60:])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT"), help="report folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds (what make test runs)")
    parser.add_argument("--repo", type=Path, default=SOURCE_REPO, help="checkout whose tests/ pytest runs")
    parser.add_argument("--images", help="sample photos (default: REPO/examples/photos/euvp/raw; noise if absent)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: OUT/.gpu-check-work)")
    parser.add_argument("--note", action="append", default=[], help="line for the report header (install step)")
    parser.add_argument("--sections", default="parity,throughput,training,pytest")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("give the report folder as an argument or in $OUT")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; write OUT/gpu-check.md; 0 if every section passed, else 1."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out / ".gpu-check-work"
    work.mkdir(parents=True, exist_ok=True)
    images = args.images or str(args.repo / "examples" / "photos" / "euvp" / "raw")
    plan = Plan(images=images, work=str(work))
    plan = plan.dry() if args.dry_run else plan
    names = [n for n in args.sections.split(",") if n]
    sections = {n: Section(n, TITLES[n]) for n in names}
    env: dict[str, Any] = {}
    started = time.monotonic()
    header = [f"- Started: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", *(f"- {n}" for n in args.note)]

    def write(final: bool = False) -> None:
        total = [f"- Wall time{'' if final else ' so far'}: {time.monotonic() - started:.0f} s"]
        (out / REPORT).write_text(render(plan, list(sections.values()), env, header + total))

    write()
    run_worker(plan, sections, env, write)
    if "pytest" in sections:
        run_pytest(plan, args.repo, sections["pytest"])
    write(final=True)
    print(f"report: {out / REPORT}")
    return 1 if any(s.status != "ok" for s in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
