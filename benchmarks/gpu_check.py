"""One command that proves the CUDA paths and times 7B-class sizes on one H100 / H200, in at most
8 minutes, writing its figures to ``<output-dir>/gpu_check.json`` and ``gpu_check.md``.

    python benchmarks/gpu_check.py --tiny                # CPU-sized, seconds (run by tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --output-dir out/gpu  # the GPU run (refuses to run full sizes without CUDA)
    python benchmarks/gpu_check.py --stages timing --layers 8 --modes kpm   # a second, narrower run

Stages (``--stages``; in this order, each guarded: a failure is recorded and the next one runs):

* env:        device, versions, TF32 flags.
* exactness:  tiny LLaMA, CLIP and LLaVA on the device in fp32 and bf16: max |logits after
  build_corda - before|, a save_corda -> load_corda round trip, and a few training steps
  (corda_vl.lab.training.train with mixed_precision="auto": bf16 autocast on a GPU).
* timing:     LLaMA-7B-shaped (random weights, bf16), 64 x 2048 calibration tokens, r = 64 on all
  seven projections, KPM and IPM: collect_covariances + build_corda against PEFT's
  preprocess_corda + get_peft_model (batch size 1) and against the floor of the job (no-grad
  forward, XᵀX per unique input, one SVD per module), all from benchmarks/vs_peft.py. Wall time,
  torch.cuda.max_memory_allocated (reset between sides), max |Δlogits| at init; and the TFLOP/s
  of the XᵀX sums (GramSum as calibration runs them, and plain GEMMs) against ~790 bf16 TFLOP/s.
* sequential: build_corda_sequential against all at once (KPM): peak GPU memory and time against
  what plan_memory predicted, and how far the two paths' adapters are apart.
* llava:      LLaVA-7B-shaped (CLIP ViT-L/14-336 vision layers + the 7B LLaMA layers, a few random
  images): image / text covariances and the CorDA++ allocation across vision, projector and
  language (allocate_ranks); time and memory.
* tests:      the test suite with CUDA visible (``--tests``, default ``tests``), started first in
  its own process on the other half of the CPU cores so it overlaps the GPU stages; killed when
  the budget runs out (the counts then come from its progress line).

Only ``layers`` of the 32 decoder layers (``--layers``, default 2) and of the 24 vision layers
(``--vision-layers``) are built: every layer costs the same, so times and memory per layer scale
(``depth_scale`` in the JSON). ``--budget-s`` (default 450): stages not started by then are
skipped; at ``--deadline-s`` (default budget + 20) the running stage is interrupted. The JSON and
Markdown are rewritten after every stage, so a killed run leaves what it measured.

On the GPU machine (torch, transformers, peft, accelerate, timm, pytest; no hub, no index), the
other runtime wheels travel in ``gpu_wheels/`` (git-ignored). Fill it here once:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d gpu_wheels datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 countryinfo==1.0.1 easy-vqa==1.0 \\
        babel==2.19.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4

then run ``bash benchmarks/gpu_check.sh`` there with ``gpu_wheels`` carried (it installs the wheels
and the repo, and writes into ``${OUT:-out/gpu_check}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import gpu_check_stages as stages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("env", "exactness", "timing", "sequential", "llava", "tests")
SMOKE_TESTS = "def test_passes():\n    assert True\n\n\ndef test_skips():\n    import pytest\n    pytest.skip('smoke')\n"
"""--tiny's test stage: a generated file, so the runner is exercised without running the suite
inside the suite (tests/test_gpu_check.py runs --tiny)."""


class Deadline(BaseException):
    """Raised by SIGALRM at --deadline-s; a BaseException so no ``except Exception`` swallows it."""


def _on_alarm(signum, frame):
    raise Deadline("deadline reached")


class Context:
    """What every stage gets: sizes, device, the clock of the budget, the results so far."""

    def __init__(self, args, sizes: stages.Sizes, device: torch.device):
        self.args, self.sizes, self.device = args, sizes, device
        self.started = time.perf_counter()
        self.out_dir = Path(args.output_dir)
        self.results: dict = {"stages": {}}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def guard(self, fn, needs_budget: bool = False):
        """``fn()``'s figures, or its error: one failing part must not cost the rest of the run."""
        if needs_budget and self.left() <= 0:
            return {"skipped": "budget"}
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            return error_entry(exc)

    def write(self) -> None:
        """JSON and Markdown, rewritten whole after every stage (atomically: a kill leaves one)."""
        self.results["elapsed_s"] = time.perf_counter() - self.started
        self.results["errors"] = list(find_errors(self.results["stages"]))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.results, indent=2, default=str)),
                           ("gpu_check.md", markdown(self.results))):
            tmp = self.out_dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out_dir / name)


def error_entry(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def find_errors(node, path: str = ""):
    """Dotted paths of every recorded error, however deep."""
    if isinstance(node, dict):
        if "error" in node:
            yield path
        for key, value in node.items():
            yield from find_errors(value, f"{path}.{key}" if path else key)


# ---------------------------------------------------------------------------------------------
# Stages run here: env and tests


def stage_env(ctx) -> dict:
    import accelerate
    import peft
    import transformers

    cuda = ctx.device.type == "cuda"
    props = torch.cuda.get_device_properties(ctx.device) if cuda else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None  # the GPU machine gets a copy of the tree, maybe without .git
    return {"device": str(ctx.device), "device_name": props.name if cuda else stages.NO_CUDA,
            "memory_gib": props.total_memory / stages.GIB if cuda else stages.NO_CUDA,
            "multiprocessors": props.multi_processor_count if cuda else stages.NO_CUDA,
            "cuda_version": torch.version.cuda, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": sys.version.split()[0],
            "cpu_threads": torch.get_num_threads(), "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "bf16_supported": cuda and torch.cuda.is_bf16_supported(),
            "commit": commit}


class TestRun:
    """The test suite in a child process started before the GPU stages, on the other half of the
    CPU cores (the benchmark keeps the first half), collected at the end."""

    def __init__(self, ctx: Context):
        args = ctx.args
        self.started = time.perf_counter()
        self.timeout = args.tests_timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_tests_"))
        self.junit, self.log = self.tmp / "junit.xml", ctx.out_dir / "tests.log"
        if args.tests is not None:
            targets = shlex.split(args.tests)
        elif args.tiny:
            (self.tmp / "test_smoke.py").write_text(SMOKE_TESTS)
            targets = [str(self.tmp / "test_smoke.py")]
        else:
            targets = ["tests"]
        self.command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                        f"--junitxml={self.junit}", *targets]
        cores = split_cores()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        if cores:
            env["OMP_NUM_THREADS"] = str(len(cores[1]))
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.log, "w")
        # own session: a kill at the deadline reaches the workers the suite starts (torchrun tests)
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        if cores:
            try:
                os.sched_setaffinity(self.proc.pid, cores[1])
            except ProcessLookupError:  # already done (a tiny selection)
                pass
        self.cores = [sorted(c) for c in cores] if cores else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def finish(self, ctx: Context) -> dict:
        """Wait while the budget (and --tests-timeout) allows, then count what ran."""
        limit = min(self.timeout - (time.perf_counter() - self.started), ctx.left())
        timed_out = False
        try:
            self.proc.wait(timeout=max(limit, 1.0))
        except subprocess.TimeoutExpired:
            self.kill()
            timed_out = True
        self.log_file.close()
        text = self.log.read_text(errors="replace")
        out = {"command": " ".join(self.command[1:]), "seconds": time.perf_counter() - self.started,
               "timed_out": timed_out, "returncode": self.proc.returncode, "cores": self.cores}
        out.update(parse_junit(self.junit) if self.junit.exists() else parse_progress(text))
        summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        out["summary"] = summary[-1].strip("= ") if summary else None
        return out


def split_cores() -> tuple[set[int], set[int]] | None:
    """(this process's cores, the tests' cores): halves of the CPUs where there are 4 or more."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 4:
        return None
    return set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    counts = {key: 0 for key in ("tests", "failures", "errors", "skipped")}
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failed_tests": failed[:50], "counted_from": "junit"}


def parse_progress(text: str) -> dict:
    """Counts from pytest -q's progress characters, for a run killed before its report."""
    marks = "".join(m.group(1) for m in re.finditer(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?$", text, re.M))
    return {"passed": marks.count(".") + marks.count("X"), "failed": marks.count("F"), "errors": marks.count("E"),
            "skipped": marks.count("s") + marks.count("x"), "failed_tests": re.findall(r"^FAILED (\S+)", text, re.M),
            "counted_from": "progress (killed before the report)"}


# ---------------------------------------------------------------------------------------------
# Running the stages


def run_stage(ctx: Context, name: str, fn, always: bool = False) -> None:
    """Run one stage under its guard; record figures or error, its seconds and its warnings."""
    if not always and ctx.left() <= 0:
        ctx.results["stages"][name] = {"status": "skipped: budget"}
        return
    entry: dict = {"status": "running"}
    ctx.results["stages"][name] = entry
    ctx.write()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            entry.update(fn(ctx))
            entry["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded, the next stage runs
            entry.update(status="error", **error_entry(exc))
        except BaseException:  # the deadline or a SIGINT: record, then stop
            entry["status"] = "interrupted"
            raise
        finally:
            entry["seconds"] = time.perf_counter() - start
            seen = list(dict.fromkeys(f"{w.category.__name__}: {w.message}"[:300] for w in caught))
            if seen:
                entry["warnings"] = seen[:8]
            stages.free(ctx.device)
            ctx.write()


STAGES = {"env": stage_env, "exactness": stages.stage_exactness, "timing": stages.stage_timing,
          "sequential": stages.stage_sequential, "llava": stages.stage_llava}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized models (seconds); what the test suite runs")
    parser.add_argument("--output-dir", default=os.environ.get("OUT") or "out/gpu_check")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stages not started by then are skipped")
    parser.add_argument("--deadline-s", type=float, help="interrupt the running stage (default: budget + 20)")
    parser.add_argument("--stages", nargs="+", default=list(ORDER), choices=ORDER)
    parser.add_argument("--device", help="default: cuda where available, else cpu (then only --tiny)")
    for name in ("layers", "vision-layers", "llava-layers", "seqs", "seq-len", "batch-size", "rank", "images"):
        parser.add_argument(f"--{name}", type=int, help="override the size (see gpu_check_stages.Sizes)")
    parser.add_argument("--modes", nargs="+", choices=["kpm", "ipm"])
    parser.add_argument("--tests", help="pytest arguments (default: tests; --tiny: a generated smoke file)")
    parser.add_argument("--tests-timeout", type=float, default=600.0, help="seconds the test process may run")
    args = parser.parse_args(argv)
    if args.deadline_s is None:
        args.deadline_s = args.budget_s + 20
    return args


def sizes_from(args) -> stages.Sizes:
    base = stages.TINY if args.tiny else stages.Sizes()
    fields = {f.name for f in dataclasses.fields(stages.Sizes)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "modes" in overrides:
        overrides["modes"] = tuple(overrides["modes"])
    return dataclasses.replace(base, **overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny and args.device is None:
        print("gpu_check: no CUDA device; the full sizes need one (7B-shaped layers). Use --tiny on CPU.")
        return 2
    if args.tiny and device.type == "cpu":
        # matrices of 64 rows: a thread pool's start-up and, on a busy machine, its contention
        # cost several times the work (measured: 50 s with 2 threads, 10 s with 1, on 2 cores)
        torch.set_num_threads(1)
    sizes = sizes_from(args)
    ctx = Context(args, sizes, device)
    ctx.results.update(command=" ".join(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
                       tiny=args.tiny, date=datetime.datetime.now().isoformat(timespec="seconds"),
                       budget_s=args.budget_s, sizes=dataclasses.asdict(sizes))
    tests = None
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.deadline_s)
    try:
        if "tests" in args.stages:
            tests = TestRun(ctx)
            cores = split_cores()
            if cores:
                os.sched_setaffinity(0, cores[0])
                torch.set_num_threads(len(cores[0]))
        for name in ORDER[:-1]:
            if name in args.stages:
                run_stage(ctx, name, STAGES[name])
        if tests is not None:
            run_stage(ctx, "tests", tests.finish, always=True)
    except (Deadline, KeyboardInterrupt) as exc:
        ctx.results["interrupted"] = f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if tests is not None and "tests" not in ctx.results["stages"]:  # interrupted: count what ran so far
            ctx.results["stages"]["tests"] = {"status": "interrupted", **ctx.guard(lambda: tests.finish(ctx))}
        if tests is not None:
            tests.kill()
        for name in args.stages:
            ctx.results["stages"].setdefault(name, {"status": "skipped: interrupted"})
        ctx.write()
    print((ctx.out_dir / "gpu_check.md").read_text())
    return 1 if ctx.results["errors"] or "interrupted" in ctx.results else 0


# ---------------------------------------------------------------------------------------------
# Markdown


def dig(results: dict, path: str):
    node = results.get("stages", {})
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def failed_tests(results: dict):
    counts = [dig(results, "tests.failed"), dig(results, "tests.errors")]
    return sum(counts) if all(isinstance(c, int) for c in counts) else None


TARGETS = [  # (figure, where in the stages or how to get it, target, met?): the acceptance figures
    ("speed-up vs PEFT, KPM", "timing.kpm.ratios.speedup_vs_peft", ">= 3", lambda v: v >= 3),
    ("speed-up vs PEFT, IPM", "timing.ipm.ratios.speedup_vs_peft", ">= 3", lambda v: v >= 3),
    ("ours / floor, KPM", "timing.kpm.ratios.ours_over_floor", "<= 1.5", lambda v: v <= 1.5),
    ("ours / floor, IPM", "timing.ipm.ratios.ours_over_floor", "<= 1.5", lambda v: v <= 1.5),
    ("added GPU memory / PEFT's, KPM", "timing.kpm.ratios.added_memory_vs_peft", "<= 0.5", lambda v: v <= 0.5),
    ("added GPU memory / PEFT's, IPM", "timing.ipm.ratios.added_memory_vs_peft", "<= 0.5", lambda v: v <= 0.5),
    ("XᵀX sums (GramSum) / bf16 peak", "timing.xtx.gramsum_fp32_fraction_of_peak", ">= 0.5", lambda v: v >= 0.5),
    ("sequential peak / plan_memory", "sequential.sequential.peak_over_predicted_mixed", "within 10 %",
     lambda v: abs(v - 1) <= 0.1),
    ("tests failed + errors", failed_tests, "0", lambda v: v == 0),
]


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        value = json.dumps(value, default=str)
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def flatten(node: dict, prefix: str = ""):
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key == "traceback" or (not prefix and key in ("status", "seconds")):  # in the heading / the JSON
            continue
        if isinstance(value, dict) and value:
            yield from flatten(value, path)
        else:
            yield path, fmt(value)


def markdown(results: dict) -> str:
    env = dig(results, "env") or {}
    lines = [f"# GPU check: {env.get('device_name', '?')} ({env.get('device', '?')}), {results.get('date')}", "",
             f"`{results.get('command')}`: {results.get('elapsed_s', 0):.0f} s of a {results.get('budget_s'):.0f} s "
             f"budget{'; INTERRUPTED: ' + results['interrupted'] if 'interrupted' in results else ''}.",
             f"Errors: {', '.join(results.get('errors') or []) or 'none'}.", "",
             "## Targets", "",
             *(["CPU-sized run (--tiny): these figures exercise the code, the targets are the GPU run's.", ""]
               if results.get("tiny") else []), "| figure | value | target | met |", "| --- | --- | --- | --- |"]
    for label, where, target, test in TARGETS:
        value = where(results) if callable(where) else dig(results, where)
        met = ("yes" if test(value) else "NO") if isinstance(value, (int, float)) else "n/a"
        lines.append(f"| {label} | {fmt(value) if value is not None else '-'} | {target} | {met} |")
    for name, entry in results.get("stages", {}).items():
        lines += ["", f"## {name}: {entry.get('status')}"
                  + (f", {entry['seconds']:.1f} s" if isinstance(entry.get("seconds"), float) else ""), ""]
        rows = list(flatten(entry))
        if rows:
            lines += ["| figure | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
