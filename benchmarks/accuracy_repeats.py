"""Repeated runs of benchmarks/accuracy.py side by side: how far apart two runs of one system
land, next to the gap between the systems.

    python benchmarks/accuracy_repeats.py runs/accuracy/brats_a runs/accuracy/brats_b \\
        runs/accuracy/brats_c --out runs/accuracy/brats_repeats.md

Each argument is a workdir of accuracy.py (or its accuracy.json) on the same dataset and folds.
A system's result found unchanged in several workdirs (a workdir that reused another's nnU-Net
side) counts once. For raw and, where every run has it, post-processed held-out Dice, per system
and class: each run's value, their mean and their range; then, per pair of systems, whether the
first is at least the second in every pairing of their runs (min >= max), only in the mean, or
not. Also the largest change of one class of one case between two runs of one system: with a
few held-out cases, the size of difference one rerun makes. Prints markdown; writes it to
`--out` too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import statistics
import sys


def _result_file(path: pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  f = path / "accuracy.json" if path.is_dir() else path
  if not f.is_file():
    sys.exit(f"error: {path}: no accuracy.json (a workdir of benchmarks/accuracy.py)")
  return f


def load_runs(paths) -> dict[str, list[dict]]:
  """{system: [run, ...]} over the workdirs, a run being {'source', 'scores', 'post' (the
  post-processed scores or None), 'steps', 'commits'}; a system's result that appears unchanged
  in several workdirs is kept once (the first). Exits naming the file when the workdirs are of
  different datasets or folds."""
  runs: dict[str, list[dict]] = {}
  seen, first = set(), None
  for p in paths:
    f = _result_file(p)
    try:
      result = json.loads(f.read_text())
    except ValueError as e:
      sys.exit(f"error: {f}: not JSON ({e})")
    key = (pathlib.Path(result.get("dataset", "")).name, json.dumps(result.get("splits")))
    if first is None:
      first = (f, key)
    elif key != first[1]:
      sys.exit(f"error: {f}: another dataset or other folds than {first[0]}")
    for system, side in result.items():
      if not isinstance(side, dict) or "scores" not in side:
        continue
      ident = (system, json.dumps(side["scores"]["per_case"], sort_keys=True))
      if ident in seen:
        continue
      seen.add(ident)
      folds = side.get("folds", [])
      runs.setdefault(system, []).append({
          "source": str(f.parent), "scores": side["scores"],
          "post": (side.get("postprocessed") or {}).get("scores"),
          "steps": sorted({fd.get("steps") for fd in folds if fd.get("steps") is not None}),
          "commits": sorted({fd["commit"] for fd in folds if fd.get("commit")})})
  if not runs:
    sys.exit("error: no system results in " + ", ".join(map(str, paths)))
  return runs


def _dice(scores: dict, cls: str) -> float | None:
  m = scores["foreground_mean"] if cls == "mean (foreground)" else scores["per_class"][cls]
  return m["dice"]


def compare(a: list[float], b: list[float]) -> str:
  """'every pairing' where min(a) >= max(b), 'mean only' where only mean(a) >= mean(b), else
  'no'."""
  if min(a) >= max(b):
    return "every pairing"
  return "mean only" if statistics.mean(a) >= statistics.mean(b) else "no"


def ordered(runs: dict) -> list[str]:
  """jaxseg's networks first, then the others (nnU-Net), as accuracy.py's table."""
  return sorted(s for s in runs if s.startswith("jaxseg")) + sorted(
      s for s in runs if not s.startswith("jaxseg"))


def spread_table(runs: dict[str, list[dict]], which: str) -> list[str]:
  """Markdown rows for `which` ('scores' or 'post'): per class, each system's runs, mean and
  range, then each comparison of a system with nnU-Net (every system with every other where
  there is no nnU-Net): the first at least the second in every pairing, in the mean only, or
  not."""
  systems = ordered(runs)
  classes = [c for c in runs[systems[0]][0]["scores"]["per_class"] if c != "background"]
  pairs = ([(s, "nnunet") for s in systems if s != "nnunet"] if "nnunet" in runs
           else list(itertools.combinations(systems, 2)))
  lines = ["| class | " + " | ".join(
      f"{s} ({len(runs[s])} run{'s' * (len(runs[s]) > 1)}): Dice, mean [range]" for s in systems)
           + "".join(f" | {a} >= {b}" for a, b in pairs) + " |",
           "|---|" + "---|" * (len(systems) + len(pairs))]
  for cls in classes + ["mean (foreground)"]:
    values = {s: [_dice(r[which], cls) for r in runs[s]] for s in systems}
    if any(v is None for vs in values.values() for v in vs):
      continue  # the class is in neither reference nor prediction of a run's cases
    cells = [f"{' / '.join(f'{v:.3f}' for v in values[s])}, {statistics.mean(values[s]):.3f} "
             f"[{max(values[s]) - min(values[s]):.3f}]" for s in systems]
    cells += [compare(values[a], values[b]) for a, b in pairs]
    lines.append(f"| {cls} | " + " | ".join(cells) + " |")
  return lines


def largest_case_change(system_runs: list[dict]) -> tuple[float, str, str] | None:
  """(the largest |Dice change| of one class of one case between two runs, case, class), or
  None for a single run."""
  best = None
  for r1, r2 in itertools.combinations(system_runs, 2):
    c1, c2 = r1["scores"]["per_case"], r2["scores"]["per_case"]
    for case in sorted(set(c1) & set(c2)):
      for cls, m in c1[case].items():
        d1, d2 = m.get("dice"), c2[case].get(cls, {}).get("dice")
        if cls == "background" or d1 is None or d2 is None:
          continue
        if best is None or abs(d1 - d2) > best[0]:
          best = (abs(d1 - d2), case, cls)
  return best


def report(runs: dict[str, list[dict]]) -> str:
  lines = ["Held-out Dice over repeated runs (each run's value, their mean and [max - min]):", ""]
  lines += spread_table(runs, "scores")
  if all(r["post"] for rs in runs.values() for r in rs):
    lines += ["", "After nnU-Net's post-processing step (chosen per run):", ""]
    lines += spread_table(runs, "post")
  lines.append("")
  for s in ordered(runs):
    rs = runs[s]
    change = largest_case_change(rs)
    where = (f"; largest change of one class of one case between two runs: {change[0]:.3f} "
             f"({change[2]}, {change[1]})") if change else ""
    lines.append(f"{s}: " + "; ".join(
        f"{r['source']} (steps {'/'.join(map(str, r['steps'])) or '?'}, commit "
        f"{'/'.join(r['commits']) or '?'})" for r in rs) + where)
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", type=pathlib.Path)
  p.add_argument("--out", type=pathlib.Path, default=None, help="also write the markdown here")
  a = p.parse_args(argv)
  text = report(load_runs(a.workdirs))
  print(text)
  if a.out:
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
