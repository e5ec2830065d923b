"""Print the README's results summary from the benchmark result files, or put it in the README.

    python benchmarks/readme_summary.py                    # print the markdown block
    python benchmarks/readme_summary.py --write README.md  # replace the block between the markers
    python benchmarks/readme_summary.py --check README.md  # exit 1 if the README's block is stale

Reads ``benchmarks/results_vs_peft.json`` (written by ``python benchmarks/vs_peft.py --json``) and
the CorDA++ cost files ``benchmarks/results_cordapp.json`` / ``results_cordapp_ipm.json`` (written
by ``benchmarks/cordapp_smollm2.py``). Every figure in the block is computed from those files; a
file that lacks a figure the table needs is an error, never a blank cell. The block is the text
between ``<!-- results:begin -->`` and ``<!-- results:end -->``.

A second block, between ``<!-- study:begin -->`` and ``<!-- study:end -->``, holds the retention
study's tables: from every ``docs/results/<date>-<study>/study.json`` (written by
``benchmarks/retention_study.py``), with that folder's ``provenance.json`` (command, commits, wall
time). Both blocks are written and checked together.

Exit status: 0 done (or, with --check, up to date); 1 the README's block differs (--check);
2 a results file or the README is missing, unreadable or incomplete.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VS_PEFT = ROOT / "benchmarks" / "results_vs_peft.json"
CORDAPP = (ROOT / "benchmarks" / "results_cordapp.json", ROOT / "benchmarks" / "results_cordapp_ipm.json")
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
STUDY_BEGIN = "<!-- study:begin -->"
STUDY_END = "<!-- study:end -->"
STUDIES = ROOT / "docs" / "results"
# vs_peft.py flags whose values the file records under "args", in the order the command shows them
COMMAND_FLAGS = (("modes", "--modes"), ("repeat", "--repeat"), ("seqs", "--seqs"), ("seq_len", "--seq-len"),
                 ("rank", "--rank"), ("batch_size", "--batch-size"))
PROVENANCE = ("date", "commit", "command")  # printed when a results file records them


class SummaryError(Exception):
    """A results file or the README cannot give the summary (the message says which and why)."""


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.name


def load(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SummaryError(f"{_shown(path)}: no such results file") from None
    except json.JSONDecodeError as exc:
        raise SummaryError(f"{_shown(path)}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SummaryError(f"{_shown(path)}: expected a JSON object at the top level")
    return data


def _key_path(keys: tuple[str, ...]) -> str:
    return "".join(f"[{k!r}]" for k in keys)


def need(data: Any, path: Path, *keys: str) -> Any:
    """data[k0][k1]..., or a SummaryError naming the file and the whole key path."""
    value = data
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise SummaryError(f"{_shown(path)}: required key {_key_path(keys[:i + 1])} is missing")
        value = value[key]
    if value is None:
        raise SummaryError(f"{_shown(path)}: {_key_path(keys)} is null")
    return value


def number(data: Any, path: Path, *keys: str) -> float:
    value = need(data, path, *keys)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SummaryError(f"{_shown(path)}: {_key_path(keys)} is not a number: {value!r}")
    return float(value)


def provenance(data: dict[str, Any]) -> str:
    found = [f"{key} {data[key]}" for key in PROVENANCE if data.get(key)]
    return "; ".join(found)


def vs_peft_command(data: dict[str, Any], path: Path) -> str:
    args = need(data, path, "args")
    parts = ["python benchmarks/vs_peft.py"]
    for key, flag in COMMAND_FLAGS:
        value = args.get(key)
        if value is None:
            continue
        parts.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(parts)


def vs_peft_table(path: Path = VS_PEFT) -> list[str]:
    data = load(path)
    results = need(data, path, "results")
    modes = [m for m in ("kpm", "ipm") if m in results]
    if not modes:
        raise SummaryError(f"{_shown(path)}: ['results'] holds neither 'kpm' nor 'ipm'")
    args = need(data, path, "args")
    repeat = int(number(data, path, "args", "repeat"))
    lines = [
        f"From `{_shown(path)}` (the arguments it records: `{vs_peft_command(data, path)}`)"
        + (f" ({provenance(data)})" if provenance(data) else "")
        + f"; each side's fastest of {repeat} round{'s' if repeat != 1 else ''}, "
        f"{args.get('seqs', '?')} sequences × {args.get('seq_len', '?')} tokens, r = {args.get('rank', '?')}.",
        "",
        "| mode | ours (s) | PEFT (s) | floor (s) | speed-up vs PEFT | ours vs floor "
        "| memory added: ours / PEFT (MB) | added vs PEFT | max abs Δlogits at init: ours / PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        ours, peft = ([number(data, path, "results", mode, side, key)
                       for key in ("seconds", "added_rss_mb", "max_abs_dlogits")] for side in ("ours", "peft"))
        floor = number(data, path, "results", mode, "floor", "seconds")
        if min(ours[0], peft[0], peft[1], floor) <= 0:
            raise SummaryError(f"{_shown(path)}: ['results'][{mode!r}] has a non-positive time or PEFT memory; "
                               f"the ratios would be meaningless")
        lines.append(
            f"| {mode.upper()} | {ours[0]:.1f} | {peft[0]:.1f} | {floor:.1f} | {peft[0] / ours[0]:.2f}× "
            f"| {ours[0] / floor:.2f}× | {ours[1]:.0f} / {peft[1]:.0f} | {ours[1] / peft[1]:.2f}× "
            f"| {ours[2]:.1e} / {peft[2]:.1e} |"
        )
    return lines


def cordapp_table(paths: list[Path]) -> list[str]:
    if not paths:
        return []
    rows, settings = [], set()
    for path in paths:
        data = load(path)
        mode = str(need(data, path, "mode"))
        settings.add((str(need(data, path, "model")), int(number(data, path, "rank")),
                      int(number(data, path, "tokens"))))
        best = {side: number(data, path, "best", side) for side in ("corda", "corda++ alloc", "corda++ select")}
        if best["corda"] <= 0:
            raise SummaryError(f"{_shown(path)}: ['best']['corda'] is not positive")
        extra = f" ({provenance(data)})" if provenance(data) else ""
        rows.append(f"| {mode.upper()} | {best['corda']:.1f} | {best['corda++ alloc']:.1f} "
                    f"| {best['corda++ alloc'] / best['corda']:.2f}× | {best['corda++ select']:.1f} "
                    f"| {best['corda++ select'] / best['corda']:.2f}× | `{_shown(path)}`{extra} |")
    setting = "; ".join(f"{model}, r = {rank}, {tokens:,} calibration tokens" for model, rank, tokens in sorted(settings))
    return [
        f"CorDA++ build time against plain CorDA ({setting}; `python benchmarks/cordapp_smollm2.py [--mode ipm]`):",
        "",
        "| mode | corda (s) | corda++, allocation only (s) | vs corda | corda++, selection among the whole set and 2 splits (s) "
        "| vs corda | file |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def render(vs_peft: Path = VS_PEFT, cordapp: list[Path] | tuple[Path, ...] = CORDAPP) -> str:
    """The markdown block, ending with a newline."""
    lines = ["<!-- generated by `python benchmarks/readme_summary.py --write README.md`; do not edit by hand -->",
             *vs_peft_table(Path(vs_peft))]
    extra = cordapp_table([Path(p) for p in cordapp])
    if extra:
        lines += ["", *extra]
    return "\n".join(lines) + "\n"


def split_readme(text: str, where: str = "README", begin: str = BEGIN, end: str = END) -> tuple[str, str, str]:
    """(before and including ``begin``, the block, ``end`` and after)."""
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SummaryError(f"{where}: needs exactly one {begin} and one {end} "
                           f"(found {text.count(begin)} and {text.count(end)})")
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise SummaryError(f"{where}: {end} comes before {begin}")
    return text[:start], text[start:stop], text[stop:]


def block_of(text: str, where: str = "README", begin: str = BEGIN, end: str = END) -> str:
    return split_readme(text, where, begin, end)[1]


def with_block(text: str, summary: str, where: str = "README", begin: str = BEGIN, end: str = END) -> str:
    head, _, tail = split_readme(text, where, begin, end)
    return head + "\n" + summary + tail


# --- the retention study ----------------------------------------------------------------------

def _interval(d: dict[str, Any], path: Path, scale: float, digits: int, star: bool = False) -> str:
    est, low, high = (number(d, path, k) if d.get(k) is not None else float("nan") for k in ("estimate", "low", "high"))
    if low != low or high != high:
        return f"{est * scale:.{digits}f} (no interval)"
    mark = "*" if star and (low > 0 or high < 0) else ""
    return f"{est * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]{mark}"


def _scale(metric: str) -> tuple[float, int]:
    """Accuracies in %, perplexity and cross-entropy as they are."""
    return (1.0, 2) if metric in ("perplexity", "ppl", "ce", "loss") else (100.0, 1)


def _matched_cell(m: dict[str, Any] | None, path: Path, task_scale: float) -> str:
    if m is None:
        return "–"
    score = m.get("task_score")
    if score is None or score != score:  # NaN: the frontiers do not overlap
        return "no overlap"
    lrs = m.get("lrs") or []
    where = f"lr {lrs[0]:g}" if len(lrs) == 1 else f"{len(lrs)} lrs" if lrs else "all lrs"
    return (f"{_interval(m['difference'], path, 1.0, 3, star=True)} at {number(m, path, 'task_score') * task_scale:.1f} "
            f"({where})")


def _stages(prov: dict[str, Any]) -> str:
    """' (train 36 min, eval 4 min, ...)': where the runs' time went, summed over runs."""
    stages = prov.get("run_seconds") or {}
    if not stages:
        return ""
    return " (" + ", ".join(f"{k} {v / 60:.0f} min" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])) + ")"


def study_table(folder: Path) -> list[str]:
    """One study, compact: each method at the recipe's learning rate (task and retention, mean over
    seeds [95 % interval]) and its retention at matched task score against LoRA; CorDA++ against
    CorDA in a line below; IPM studies add the convergence ratios. Per-benchmark scores, the sweep
    and the paired differences are in the folder's study.md."""
    path, prov_path = folder / "study.json", folder / "provenance.json"
    data, prov = load(path), load(prov_path)
    config = load(folder / "config.json")
    lr = number(config, folder / "config.json", "lr")
    task, metrics = need(data, path, "task"), need(data, path, "metrics")
    task_scale, task_digits = _scale(metrics[task])
    sittings = need(prov, prov_path, "sittings")
    wall = sum(number(s, prov_path, "wall_seconds") for s in sittings)
    commits = ", ".join(dict.fromkeys(str(s.get("commit")) for s in sittings))
    seeds, items = need(data, path, "seeds"), need(data, path, "items")
    matched = data.get("matched") or []
    against_lora = {m["method"]: m for m in matched if m["reference"].startswith("lora")}
    lines = [f"**{need(prov, prov_path, 'study')}** (`{need(prov, prov_path, 'command')}`; {len(seeds)} seeds; "
             f"items: {', '.join(f'{b} {n}' for b, n in items.items())}; commit {commits}; "
             f"{f'{wall / 3600:.1f} h' if wall >= 3600 else f'{wall / 60:.0f} min'} of study wall time{_stages(prov)}; "
             f"[`{_shown(folder)}`]({_shown(folder)}/study.md))", "",
             f"| method | {task} ({metrics[task]}), lr {lr:g} | retention, lr {lr:g} "
             "| retention − LoRA's at matched task score |", "|---|---|---|---|",
             f"| base model | {need(data, path, 'base')[task] * task_scale:.{task_digits}f} | 1 | – |"]
    for arm in need(data, path, "arms").values():
        if arm.get("scale") is not None or arm.get("lr") != lr:
            continue
        scores = need(arm, path, "scores")
        label = arm["method"]  # weight decay is part of the method's name ("lora r8 wd 0.1")
        lines.append(f"| {label} | {_interval(scores[task], path, task_scale, task_digits)} "
                     f"| {_interval(scores['retention'], path, 1.0, 3)} "
                     f"| {_matched_cell(against_lora.get(label), path, task_scale)} |")
    for m in matched:
        if not m["reference"].startswith("lora"):
            lines += ["", f"{m['method']} − {m['reference']}, retention at matched task score: "
                          f"{_matched_cell(m, path, task_scale)}."]
    convergence = data.get("convergence") or []
    if config.get("mode") == "ipm" and convergence:
        lines += ["", "Convergence: LoRA's steps over the method's steps to reach LoRA's final smoothed training loss "
                  "and LoRA's final task score (> 1 is faster; mean over seeds [95 % interval]):", "",
                  "| method | against | loss | task |", "|---|---|---|---|"]
        for c in convergence:
            cells = [_interval(c[w]["ratio"], path, 1.0, 2) if w in c else "–" for w in ("loss", "task")]
            lines.append(f"| {c['arm']} | {c['reference']} | {cells[0]} | {cells[1]} |")
    return lines


def render_studies(root: Path = STUDIES) -> str:
    """The study block: every study folder with a study.json, newest date last per study."""
    folders = sorted(p.parent for p in Path(root).glob("*/study.json"))
    lines = ["<!-- generated by `python benchmarks/readme_summary.py --write README.md`; do not edit by hand -->"]
    if not folders:
        lines.append("No retention study has finished yet.")
    for folder in folders:
        lines += ["", *study_table(folder)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="README", help="replace the block between the markers in this file")
    action.add_argument("--check", metavar="README", help="exit 1 if this file's block differs from the output")
    parser.add_argument("--results", default=str(VS_PEFT), help="vs_peft results (default: %(default)s)")
    parser.add_argument("--cordapp", nargs="*", default=[str(p) for p in CORDAPP],
                        help="CorDA++ cost results, one per mode (none: leave that table out)")
    parser.add_argument("--studies", default=str(STUDIES),
                        help="folder of the dated retention-study folders (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        blocks = [("results", BEGIN, END, render(Path(args.results), [Path(p) for p in args.cordapp])),
                  ("study", STUDY_BEGIN, STUDY_END, render_studies(Path(args.studies)))]
        if args.write is None and args.check is None:
            sys.stdout.write("\n".join(b[3] for b in blocks))
            return 0
        readme = Path(args.write or args.check)
        try:
            text = readme.read_text(encoding="utf-8")
        except OSError as exc:
            raise SummaryError(f"{readme}: cannot read it ({exc.strerror})") from None
        updated = text
        for _, begin, end, summary in blocks:
            updated = with_block(updated, summary, str(readme), begin, end)
        if args.write:
            if updated != text:
                readme.write_text(updated, encoding="utf-8")
            print(f"{readme}: results blocks {'updated' if updated != text else 'already up to date'}")
            return 0
        if updated == text:
            return 0
        for name, begin, end, summary in blocks:
            diff = list(difflib.unified_diff(block_of(text, str(readme), begin, end).splitlines(),
                                             ("\n" + summary).splitlines(), f"{readme} ({name} block)", "generated",
                                             lineterm=""))
            if diff:
                print(f"{readme}: the {name} block is stale; run python benchmarks/readme_summary.py --write {readme}",
                      file=sys.stderr)
                print("\n".join(diff), file=sys.stderr)
        return 1
    except SummaryError as exc:
        print(f"readme_summary: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
