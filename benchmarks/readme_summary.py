"""Print the README's results summary from the benchmark result files, or put it in the README.

    python benchmarks/readme_summary.py                    # print the markdown block
    python benchmarks/readme_summary.py --write README.md  # replace the block between the markers
    python benchmarks/readme_summary.py --check README.md  # exit 1 if the README's block is stale

Reads ``benchmarks/results_vs_peft.json`` (written by ``python benchmarks/vs_peft.py --json``) and
the CorDA++ cost files ``benchmarks/results_cordapp.json`` / ``results_cordapp_ipm.json`` (written
by ``benchmarks/cordapp_smollm2.py``). Every figure in the block is computed from those files; a
file that lacks a figure the table needs is an error, never a blank cell. The block is the text
between ``<!-- results:begin -->`` and ``<!-- results:end -->``.

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


def split_readme(text: str, where: str = "README") -> tuple[str, str, str]:
    """(before and including BEGIN, the block, END and after)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SummaryError(f"{where}: needs exactly one {BEGIN} and one {END} "
                           f"(found {text.count(BEGIN)} and {text.count(END)})")
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    if stop < start:
        raise SummaryError(f"{where}: {END} comes before {BEGIN}")
    return text[:start], text[start:stop], text[stop:]


def block_of(text: str, where: str = "README") -> str:
    return split_readme(text, where)[1]


def with_block(text: str, summary: str, where: str = "README") -> str:
    head, _, tail = split_readme(text, where)
    return head + "\n" + summary + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="README", help="replace the block between the markers in this file")
    action.add_argument("--check", metavar="README", help="exit 1 if this file's block differs from the output")
    parser.add_argument("--results", default=str(VS_PEFT), help="vs_peft results (default: %(default)s)")
    parser.add_argument("--cordapp", nargs="*", default=[str(p) for p in CORDAPP],
                        help="CorDA++ cost results, one per mode (none: leave that table out)")
    args = parser.parse_args(argv)
    try:
        summary = render(Path(args.results), [Path(p) for p in args.cordapp])
        if args.write is None and args.check is None:
            sys.stdout.write(summary)
            return 0
        readme = Path(args.write or args.check)
        try:
            text = readme.read_text(encoding="utf-8")
        except OSError as exc:
            raise SummaryError(f"{readme}: cannot read it ({exc.strerror})") from None
        updated = with_block(text, summary, str(readme))
        if args.write:
            if updated != text:
                readme.write_text(updated, encoding="utf-8")
            print(f"{readme}: results block {'updated' if updated != text else 'already up to date'}")
            return 0
        if updated == text:
            return 0
        diff = difflib.unified_diff(block_of(text, str(readme)).splitlines(), ("\n" + summary).splitlines(),
                                    f"{readme} (results block)", "generated", lineterm="")
        print(f"{readme}: the results block is stale; run python benchmarks/readme_summary.py --write {readme}",
              file=sys.stderr)
        print("\n".join(diff), file=sys.stderr)
        return 1
    except SummaryError as exc:
        print(f"readme_summary: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
