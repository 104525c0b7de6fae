"""Tables and curves of finished runs, as the papers report them (RSB Table 6: top-1 over seeds).

    python report.py runs/                        # every run folder under runs/
    python report.py runs/a3-* --plot a3.png      # and the loss, lr and top-1 curves

Groups the runs by recipe, model and epochs (from each run folder's recipe.json and
metrics.jsonl) and prints a Markdown table: final and best top-1 as mean +- standard
deviation (over runs, n - 1), min and max, for the plain weights and, where the recipe keeps
one, the EMA. Runs that have not reached their last epoch are listed, not counted.
--plot needs matplotlib (pip install -r requirements-extra.txt).
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def find_runs(paths):
    """Run folders (holding recipe.json and metrics.jsonl) at or under `paths`, sorted."""
    found = set()
    for path in map(Path, paths):
        if not path.exists():
            sys.exit(f"error: {path} does not exist")
        candidates = [path] if (path / "metrics.jsonl").exists() else \
            [m.parent for m in path.rglob("metrics.jsonl")]
        found.update(c for c in candidates if (c / "recipe.json").exists())
    if not found:
        sys.exit(f"error: no run folder (recipe.json + metrics.jsonl) in {', '.join(paths)}")
    return sorted(found)


def load_run(folder):
    recipe = json.loads((folder / "recipe.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return dict(folder=folder, recipe=recipe, rows=rows)


def spread(values):
    """mean +- std (n - 1; 0 for one run), min, max."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}", f"{min(values):.2f}", \
        f"{max(values):.2f}"


def table(runs):
    """The Markdown table, and the unfinished runs' lines."""
    groups, unfinished = defaultdict(list), []
    for run in runs:
        r = run["recipe"]
        if not run["rows"] or run["rows"][-1]["epoch"] < r["epochs"]:
            done = run["rows"][-1]["epoch"] if run["rows"] else 0
            unfinished.append(f"not counted, {done} of {r['epochs']} epochs: {run['folder']}")
            continue
        groups[(r["recipe"], r["model"], r["epochs"])].append(run)
    lines = ["| recipe | model | epochs | weights | runs | final top-1 | min | max | "
             "best top-1 | min | max | published |", "|" + "---|" * 12]
    for (recipe, model, epochs), members in sorted(groups.items()):
        published = members[0]["recipe"].get("paper_top1")
        for weights, key in (("model", "top1"), ("EMA", "ema_top1")):
            if key not in members[0]["rows"][-1]:
                continue
            final = [m["rows"][-1][key] for m in members]
            best = [max(row[key] for row in m["rows"]) for m in members]
            lines.append(f"| {recipe} | {model} | {epochs} | {weights} | {len(members)} | "
                         + " | ".join(spread(final)) + " | " + " | ".join(spread(best))
                         + f" | {published if published is not None else ''} |")
    return "\n".join(lines) + "\n", unfinished


def plot(runs, path):
    """Train loss, lr and top-1 (EMA dashed) against the epoch, one colour per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: --plot needs matplotlib: pip install matplotlib "
                 "(or pip install -r requirements-extra.txt)")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        epochs = [row["epoch"] for row in run["rows"]]
        label = run["folder"].name
        line, = axes[0].plot(epochs, [row["train_loss"] for row in run["rows"]], label=label)
        axes[1].plot(epochs, [row["lr"] for row in run["rows"]], color=line.get_color())
        axes[2].plot(epochs, [row["top1"] for row in run["rows"]], color=line.get_color())
        if "ema_top1" in run["rows"][0]:
            axes[2].plot(epochs, [row["ema_top1"] for row in run["rows"]], "--",
                         color=line.get_color())
    for ax, title in zip(axes, ("train loss", "lr", "top-1 (%), EMA dashed")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    p.add_argument("--plot", metavar="FILE.png", help="draw loss, lr and top-1 curves")
    args = p.parse_args(argv)
    runs = [load_run(folder) for folder in find_runs(args.runs)]
    text, unfinished = table(runs)
    print(text, end="")
    for line in unfinished:
        print(line)
    if args.plot:
        plot(runs, args.plot)
        print(f"curves of {len(runs)} run(s) in {args.plot}")


if __name__ == "__main__":
    main()
