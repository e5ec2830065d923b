"""The retention study: every recipe over several seeds, a learning-rate sweep and the baselines
users compare against, with intervals, resumable, its results committed run by run.

    python benchmarks/retention_study.py --list               # the studies and their settings
    python benchmarks/retention_study.py clip_kpm             # run (or go on with) one study
    python benchmarks/retention_study.py clip_kpm --commit    # and git-commit each finished run
    python benchmarks/retention_study.py clip_kpm --report    # only rebuild study.md / PNGs from the runs

A study is one recipe run with the flags below (seeds x methods x learning rates) and
``--resume``: a run whose ``runs.json`` exists is read back, so a study stopped at any point goes
on where it stopped (the run in progress restarts from its last checkpoint). The full outputs stay
in ``out/study/<name>``; what a reader needs to check the numbers (every run's settings, scores,
losses and per-item results, the study's statistics and plots) is copied to
``docs/results/<date>-<name>/`` as each run finishes, with ``provenance.json``: the command, the
commit of every sitting and its wall time. The README's tables are generated from those folders
(``benchmarks/readme_summary.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from corda_vl.lab.experiment import settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
BASELINES = "pissa,milora,peft-corda,eva,mica"
# CorDA, CorDA++ under each compactness metric, and CorDA at the engine's damping floor before
# 2026-12-06 (1e-4; the 2026-12-06 clip_kpm_variants folder ran when 1e-4 was the default and 1e-2
# the variant, see its provenance.json)
CLIP_VARIANTS = LLAMA_VARIANTS = "corda,corda++,corda++:paper,corda++:heldout,corda:damping=0.0001"
STUDIES: dict[str, tuple[str, list[str]]] = {
    # name: (recipe, flags). lora, corda and corda++ at three learning rates; the baselines and
    # LoRA + weight decay at the recipe's rate; the adapter-scale dial adds frontier points.
    "clip_kpm": ("clip_kpm", ["--seeds", "0,1,2,3,4", "--methods", f"lora,corda,corda++,{BASELINES}",
                              "--lrs", "0.0005,0.001,0.002", "--lr-methods", "lora,corda,corda++",
                              "--lora-weight-decays", "0.1", "--scale-sweep", "--scales", "0.25,0.5,0.75"]),
    "clip_ipm": ("clip_kpm", ["--mode", "ipm", "--seeds", "0,1,2", "--methods", "lora,corda,corda++,pissa",
                              "--task-eval-every", "20"]),
    "llama_kpm": ("llama_kpm", ["--seeds", "0,1,2", "--methods", f"lora,corda,corda++,{BASELINES}",
                                "--lrs", "0.0005,0.001,0.002", "--lr-methods", "lora,corda,corda++",
                                "--lora-weight-decays", "0.1"]),
    "llava_kpm": ("llava_kpm", ["--seeds", "0,1,2", "--methods", f"lora,corda,corda++,{BASELINES}",
                                "--lrs", "0.00025,0.0005,0.001", "--lr-methods", "lora,corda,corda++",
                                "--lora-weight-decays", "0.1"]),
    # The CorDA++ and KPM-default choices: CorDA++ under each compactness metric, and CorDA with the
    # old damping floor, against CorDA, LoRA and PEFT's CorDA (the runs the recipe's own
    # study has already made are reused, see REUSE)
    "clip_kpm_variants": ("clip_kpm", ["--seeds", "0,1,2,3,4", "--methods", f"lora,{CLIP_VARIANTS},peft-corda",
                                       "--lrs", "0.0005,0.001,0.002", "--lr-methods", f"lora,{CLIP_VARIANTS}",
                                       "--scale-sweep", "--scales", "0.25,0.5,0.75"]),
    "llama_kpm_variants": ("llama_kpm", ["--seeds", "0,1,2", "--methods", f"lora,{LLAMA_VARIANTS},peft-corda",
                                         "--lrs", "0.0005,0.001,0.002", "--lr-methods", f"lora,{LLAMA_VARIANTS}"]),
}
# A study may start from another study's kept runs of the very same settings (same recipe, same
# identity; only the grid differs), once one of them, rerun here, gives the same per-item results.
REUSE = {"clip_kpm_variants": "clip_kpm", "llama_kpm_variants": "llama_kpm"}
COMMON = ["--no-save-adapters", "--resume"]
# The run that is rerun before reusing: the longest code path the grid shares with the other study.
CHECK_ORDER = {"corda++": 0, "corda": 1}
KEEP = ("runs.json", "items.jsonl")  # and items_scale*.jsonl: what the statistics read


def kept(f: Path) -> bool:
    """Whether a run's file is one the study keeps (what its statistics read)."""
    return f.name in KEEP or (f.name.startswith("items_scale") and f.suffix == ".jsonl")


def git(*args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=check, capture_output=True, text=True).stdout.strip()


def results_dir(name: str) -> Path:
    """The study's dated folder: the newest existing one (a study goes on), else today's."""
    found = sorted(RESULTS.glob(f"*-{name}"))
    return found[-1] if found else RESULTS / f"{datetime.date.today().isoformat()}-{name}"


def copy_run(run_dir: Path, out: Path, dest: Path) -> Path:
    target = dest / run_dir.relative_to(out)
    target.mkdir(parents=True, exist_ok=True)
    for f in run_dir.iterdir():
        if kept(f):
            shutil.copy2(f, target / f.name)
    return target


def commit(paths: list[Path], message: str, tries: int = 5) -> None:
    """Commit ``paths`` alone (other staged or changed files are left as they are). Another git
    command holding the index lock makes a try fail: wait and try again, and never let a failed
    commit stop the study (the files stay, the next commit takes them)."""
    for attempt in range(tries):
        try:
            git("add", *map(str, paths))
            if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *map(str, paths)], cwd=ROOT).returncode:
                git("commit", "-q", "-m", message, "--", *map(str, paths))
            return
        except subprocess.CalledProcessError as exc:
            if attempt == tries - 1:
                print(f"[study] could not commit ({exc.stderr.strip()}); the files are kept", flush=True)
            time.sleep(2)


def watch(out: Path, dest: Path, total: int, stop: threading.Event, do_commit: bool,
          sitting: Sitting) -> None:
    """Copy (and commit) every run as its runs.json appears, with the sitting's provenance."""
    seen = {p for p in out.glob("runs/*/*/seed*/runs.json")}
    while not stop.wait(15):
        for name in ("before_items.jsonl", "config.json"):
            if (out / name).is_file() and not (dest / name).is_file():
                shutil.copy2(out / name, dest / name)
        for p in sorted(set(out.glob("runs/*/*/seed*/runs.json")) - seen):
            seen.add(p)
            target = copy_run(p.parent, out, dest)
            sitting.update()
            print(f"[study] kept {target.relative_to(ROOT)} ({len(seen)}/{total})", flush=True)
            if do_commit:
                commit([target, sitting.path, *(dest / n for n in ("before_items.jsonl", "config.json")
                                                if (dest / n).is_file())],
                       f"results: {dest.name} {p.parent.relative_to(out / 'runs')} ({len(seen)}/{total})")


class Sitting:
    """One sitting's entry in ``provenance.json``, written when the sitting starts and again after
    every kept run, so a sitting that is killed outright (no chance to write at the end) is still on
    record with the runs it finished and the time it ran."""

    def __init__(self, dest: Path, name: str, recipe: str, command: list[str], total: int):
        self.dest, self.path, self.total = dest, dest / "provenance.json", total
        self.started = time.time()
        started = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)
        self.provenance = json.loads(self.path.read_text()) if self.path.is_file() else {
            "study": name, "recipe": recipe, "command": f"python benchmarks/retention_study.py {name}",
            "recipe_command": " ".join(["python", *command[1:]]).replace(str(ROOT) + "/", ""), "sittings": []}
        self.entry = {
            "started": started.isoformat(timespec="seconds"), "commit": git("rev-parse", "--short", "HEAD"),
            "runs_at_start": self._runs_done()}
        self.provenance["sittings"].append(self.entry)
        self.update()

    def _runs_done(self) -> int:
        return len(list(self.dest.glob("runs/*/*/seed*/runs.json")))

    def update(self, finished: bool = False) -> None:
        self.entry.update({"wall_seconds": round(time.time() - self.started, 1), "finished": finished,
                           "runs_done": self._runs_done(), "runs_total": self.total})
        self.provenance["run_seconds"] = run_seconds(self.dest)
        self.path.write_text(json.dumps(self.provenance, indent=2) + "\n")


def run_study(name: str, do_commit: bool, extra: list[str]) -> None:
    recipe, flags = STUDIES[name]
    out = ROOT / "out" / "study" / name
    dest = results_dir(name)
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, f"recipes/{recipe}.py", *flags, *COMMON, *extra, "--output-dir", str(out)]
    sys.path.insert(0, str(ROOT / "recipes"))
    cfg = study_config(recipe, flags + extra)
    total = len(settings(cfg))
    sitting = Sitting(dest, name, recipe, command, total)
    if reused := reuse(name, out, dest, cfg, command):
        sitting.provenance["reused"] = reused
        sitting.update()
        if do_commit and reused["runs"]:
            commit([dest], f"results: {dest.name} reuses {reused['runs']} runs of {reused['from']}")
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(out, dest, total, stop, do_commit, sitting), daemon=True)
    watcher.start()
    print(f"[study] {name}: {total} runs, outputs in {out}, results in {dest}", flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    stop.set()
    watcher.join()
    for p in out.glob("runs/*/*/seed*/runs.json"):  # whatever the watcher had not picked up yet
        copy_run(p.parent, out, dest)
    finished = code == 0
    sitting.update(finished)
    if finished:
        keep_report(out, dest)
    if do_commit:
        commit([dest], f"results: {dest.name} {'finished' if finished else 'stopped'} "
                       f"({sitting.entry['runs_done']}/{total} runs)")
    if not finished:
        raise SystemExit(f"[study] {name}: the recipe stopped with exit code {code}; run the same command to go on.")


def study_config(recipe: str, flags: list[str]):
    """The recipe's config with the study's flags on top (as the recipe itself will parse them)."""
    from corda_vl.lab.experiment import parse_recipe
    from corda_vl.lab.recipe_config import ClipRecipeConfig, LlamaRecipeConfig, LlavaRecipeConfig

    types = {"clip_kpm": ClipRecipeConfig, "llama_kpm": LlamaRecipeConfig, "llava_kpm": LlavaRecipeConfig}
    _, cfg = parse_recipe("", ROOT / "recipes" / "configs" / f"{recipe}.yaml", [f for f in flags if f != "--resume"],
                          config_type=types[recipe])
    return cfg


def count_runs(recipe: str, flags: list[str]) -> int:
    """How many runs the grid has, from the recipe's own config and these flags."""
    return len(settings(study_config(recipe, flags)))


def reusable_runs(src: Path, cfg) -> list:
    """The settings of this study's grid that ``src`` (another study's results folder) holds, after
    checking that ``src`` ran the same recipe with the same identity (the settings that change the
    numbers; fields the older config lacks are listed but cannot be compared)."""
    from corda_vl.lab.identity import differences, identity

    recipe = cfg.recipe
    old, mine = json.loads((src / "config.json").read_text()), identity(cfg)
    if old.get("recipe") != recipe:
        raise SystemExit(f"[study] cannot reuse {src}: it ran recipe {old.get('recipe')!r}, not {recipe!r}")
    shared = [k for k in mine if k in old]
    if diff := differences({k: old[k] for k in shared}, {k: mine[k] for k in shared}):
        raise SystemExit(f"[study] cannot reuse {src}: its settings differ: {'; '.join(diff)}")
    if absent := sorted(set(mine) - set(old)):
        print(f"[study] {src.name} predates the settings {', '.join(absent)}: the check run decides", flush=True)
    return [s for s in settings(cfg) if (src / "runs" / s.path / "runs.json").is_file()]


def kept_files(run_dir: Path) -> dict[str, list]:
    """A kept run's per-item results and scores, as parsed JSON, by file name."""
    files = {}
    for f in sorted(run_dir.iterdir()):
        if f.name == "runs.json":
            files[f.name] = [{k: r.get(k) for k in ("task", "retention", "update")} for r in json.loads(f.read_text())]
        elif kept(f):
            files[f.name] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return files


def reuse(name: str, out: Path, dest: Path, cfg, command: list[str]) -> dict | None:
    """Copy the runs of ``REUSE[name]``'s results folder that this grid also has into ``out`` (so
    ``--resume`` reads them back) and ``dest``. One of them, CorDA++'s or else CorDA's where there
    is one (the longest code path), is first rerun here: its scores and per-item results must equal the
    kept ones exactly, else nothing is reused and every run is made here. Returns what provenance.json records."""
    if name not in REUSE or not (src := results_dir(REUSE[name])).is_dir():
        return None
    found = reusable_runs(src, cfg)
    if not found:
        return None
    check = min(found, key=lambda s: CHECK_ORDER.get(s.method, len(CHECK_ORDER)))
    only = ["--methods", check.method, "--lr-methods", check.method, "--lrs", f"{check.lr:g}",
            "--seeds", str(check.seed), "--lora-weight-decays", ""]
    if not (out / "runs" / check.path / "runs.json").is_file():
        print(f"[study] rerunning {check.path} to compare with {src.name}", flush=True)
        if subprocess.run([*command, *only], cwd=ROOT).returncode:
            raise SystemExit(f"[study] the check run {check.path} failed; nothing was reused")
    mine, kept = kept_files(out / "runs" / check.path), kept_files(src / "runs" / check.path)
    record = {"from": src.name, "runs": 0, "check_run": check.path, "check_identical": mine == kept}
    if mine != kept:
        record["differs_in"] = sorted(f for f in set(mine) | set(kept) if mine.get(f) != kept.get(f))
        if same_file(out / "before_items.jsonl", src / "before_items.jsonl") is False:
            record["differs_in"].append("before_items.jsonl (the base model itself scores differently here)")
        print(f"[study] {check.path} rerun here differs from {src.name} in {', '.join(record['differs_in'])}: "
              f"nothing is reused, every run is made here", flush=True)
        return record
    for s in found:
        target = out / "runs" / s.path
        if s != check and not (target / "runs.json").is_file():
            target.mkdir(parents=True, exist_ok=True)
            for f in (src / "runs" / s.path).iterdir():
                shutil.copy2(f, target / f.name)
        copy_run(target, out, dest)
    print(f"[study] reused {len(found) - 1} runs of {src.name}; {check.path} rerun here was identical", flush=True)
    return {**record, "runs": len(found) - 1}


def same_file(a: Path, b: Path) -> bool | None:
    """Whether two files hold the same bytes (None: one of them is missing)."""
    return a.read_bytes() == b.read_bytes() if a.is_file() and b.is_file() else None


def run_seconds(dest: Path) -> dict[str, float]:
    """Seconds per stage summed over the kept runs (their runs.json)."""
    total: dict[str, float] = {}
    for p in dest.glob("runs/*/*/seed*/runs.json"):
        for stage, s in json.loads(p.read_text())[0]["seconds"].items():
            total[stage] = round(total.get(stage, 0.0) + s, 1)
    return total


def keep_report(out: Path, dest: Path) -> None:
    """The study's statistics and plots, rebuilt from the kept runs (so they match the folder)."""
    from corda_vl.lab.study import write_study

    for name in ("before_items.jsonl", "config.json", "results.json"):
        if (out / name).is_file():
            shutil.copy2(out / name, dest / name)
    for path in write_study(dest).values():
        print(f"[study] wrote {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", choices=sorted(STUDIES))
    parser.add_argument("--list", action="store_true", help="print the studies and their flags")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run's results")
    parser.add_argument("--report", action="store_true", help="only rebuild the statistics from the kept runs")
    args, extra = parser.parse_known_args(argv)
    if args.list or not args.study:
        for name, (recipe, flags) in STUDIES.items():
            print(f"{name}: recipes/{recipe}.py {' '.join(flags + COMMON)}")
        return
    if args.report:
        keep_report(ROOT / "out" / "study" / args.study, results_dir(args.study))
        return
    run_study(args.study, args.commit, extra)


if __name__ == "__main__":
    main()
