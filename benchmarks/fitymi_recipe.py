"""The FITYMI outlier-exposure recipe chosen without a test label of the task: a grid of OE recipes is scored on
*digits* (another dataset: its test labels say nothing about Animal-MNIST), the best mean one-vs-rest AUROC over the
ten digit classes is chosen, and the Animal-MNIST table is run again with it, beside the earlier recipe (lr 4e-3, 30
epochs, blocks 0-1 frozen), which was chosen on the test AUROC of Animal-MNIST's Dog. The recipe chosen here is now
the pipeline's default (``oe.lr: 1.6e-2`` in ``configs/fitymi/small.yaml``); every run of this benchmark pins the
earlier one as its baseline (:data:`BASELINE`, the pipeline's own OE run), so the rows mean what they meant when they
were made. Feeds the section "An OE recipe chosen without test labels" of ``docs/results/fitymi.md``.

    python benchmarks/fitymi_recipe.py --doc docs/results/fitymi.md

1. ``fitymi_classes.py --experiment fitymi_digits --stop-only`` with one ``--recipe`` per entry of :data:`RECIPES`:
   per digit, the score-SDE stopped by FID and OE of every recipe on its stop set
   (``benchmarks/results/fitymi_digits_recipes.jsonl``);
2. :func:`choose`: the recipe with the highest mean one-vs-rest AUROC after OE over the digits (``default`` is the
   pipeline's own OE run, with :data:`BASELINE`);
3. ``fitymi_classes.py --experiment fitymi_animals --stop-only`` (the main table's SDE settings), with the chosen
   recipe as a ``--recipe`` when it is not the baseline (``benchmarks/results/fitymi_animals_recipe.jsonl``).

Both results files resume like ``fitymi_classes.py``'s (classes already there are skipped). ``--classes-digits`` /
``--classes-animals`` run a subset (e.g. two processes side by side, each on its own ``--animals-results``; the
choice is made from every digit row in the file, and refused until all ten digits are there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import fitymi_classes  # noqa: E402
from pipeline_runs import read_rows  # noqa: E402

# OE recipes on the stop set; "default" is the pipeline's own OE run, with the recipe of BASELINE (the pipeline's
# default when the rows were made), so that the rows keep their meaning now that the chosen recipe is the default
DEFAULT = "default"
BASELINE = ["oe.lr=4e-3", "oe.freeze_blocks=2", "oe.epochs=30"]


class Recipe(NamedTuple):
    overrides: list[str]
    about: str


RECIPES = {
    DEFAULT: Recipe([], "lr 4e-3, 30 epochs, blocks 0-1 frozen"),  # BASELINE
    "lr1e-3": Recipe(["oe.lr=1e-3"], "lr 1e-3, 30 epochs, blocks 0-1 frozen"),
    "lr1.6e-2": Recipe(["oe.lr=1.6e-2"], "lr 1.6e-2, 30 epochs, blocks 0-1 frozen"),
    "lr4e-3_freeze4": Recipe(["oe.freeze_blocks=4"], "lr 4e-3, 30 epochs, blocks 0-3 frozen"),
}
DIGITS = tuple(str(d) for d in range(10))
# the main table's SDE settings on Animal-MNIST (docs/results/fitymi.md, "FITYMI per class")
ANIMAL_SDE = ["callbacks.fid_early_stopping.num_samples=128", "model.num_steps=50", "trainer.max_epochs=30"]


def prefix(recipe: str) -> str:
    """Where a recipe's figures are in a row: the pipeline's own OE or an extra ``--recipe`` run."""
    return "oe_sde_stop" if recipe == DEFAULT else f"oe_recipe_{recipe}"


def recipe_means(rows: list[dict], key: str = "image_AUROC") -> dict[str, float]:
    """Per recipe, the mean of ``key`` after OE over the rows (every row must have every recipe)."""
    means = {}
    for recipe in RECIPES:
        values = [r.get(f"{prefix(recipe)}/{key}") for r in rows]
        if any(v is None for v in values):
            missing = [r["normal_class"] for r, v in zip(rows, values) if v is None]
            raise SystemExit(f"recipe {recipe!r} has no {key} for classes {missing}: run them first")
        means[recipe] = sum(values) / len(values)
    return means


def choose(rows: list[dict]) -> str:
    """The recipe with the highest mean one-vs-rest AUROC over the digit rows (all ten digits needed; ties go to the
    first in :data:`RECIPES`)."""
    missing = sorted(set(DIGITS) - {r["normal_class"] for r in rows})
    if missing:
        raise SystemExit(f"the recipe is chosen on every digit; digits {missing} have no row yet")
    means = recipe_means(rows)
    return max(RECIPES, key=means.__getitem__)  # max keeps the first of equal means


def recipe_args(recipes) -> list[str]:
    return [arg for name in recipes if name != DEFAULT for arg in ("--recipe", name, *RECIPES[name].overrides)]


def choice_table(rows: list[dict]) -> str:
    """Per recipe: mean AUROC after OE over the digits (one-vs-rest, one-vs-one closest) and on how many digits it
    is best."""
    from docpage import table

    means, closest = recipe_means(rows), recipe_means(rows, "image_AUROC_one_vs_one_closest")
    best = [max(RECIPES, key=lambda recipe: r[f"{prefix(recipe)}/image_AUROC"]) for r in rows]
    chosen = choose(rows)
    return table(["OE recipe (on the stop set)", "mean AUROC one-vs-rest / closest (10 digits)", "best on (digits)"],
                 [[RECIPES[name].about + (" (the earlier default)" if name == DEFAULT else "")
                   + (" **chosen**" if name == chosen else ""),
                   f"{means[name]:.3f} / {closest[name]:.3f}", str(best.count(name))] for name in RECIPES])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-results", default="benchmarks/results/fitymi_digits_recipes.jsonl")
    parser.add_argument("--animals-results", default="benchmarks/results/fitymi_animals_recipe.jsonl")
    parser.add_argument("--classes-digits", nargs="*", default=None, help="default: all ten")
    parser.add_argument("--classes-animals", nargs="*", default=None,
                        help="default: all ten; none (the flag alone): stop after the choice")
    parser.add_argument("--work-dir", default=None, help="keep the runs here (default: temporary folders)")
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose blocks are rewritten")
    args = parser.parse_args(argv)
    work = ["--work-dir", args.work_dir] if args.work_dir else []
    fitymi_classes.main(["--experiment", "fitymi_digits", "--stop-only", "--results", args.digits_results, *work,
                         "--extra", *BASELINE,
                         *(["--classes", *args.classes_digits] if args.classes_digits else []),
                         *recipe_args(RECIPES)])
    chosen = choose(read_rows(Path(args.digits_results)))
    print(f"chosen on digits: {chosen} ({RECIPES[chosen].about})", flush=True)
    if args.classes_animals == []:
        return chosen
    doc = ["--doc", args.doc] if args.doc else []
    fitymi_classes.main(["--experiment", "fitymi_animals", "--stop-only", "--results", args.animals_results, *work,
                         *(["--classes", *args.classes_animals] if args.classes_animals else []),
                         "--extra", *BASELINE, "--sde-extra", *ANIMAL_SDE, *recipe_args([chosen]), *doc])
    if args.doc:
        from docpage import write_doc

        write_doc(args.doc, "fitymi_recipe choice", "fitymi_recipe.py", sys.argv[1:] if argv is None else argv,
                  choice_table(read_rows(Path(args.digits_results))),
                  f"Rows: `{args.digits_results}`. Chosen: {RECIPES[chosen].about}.")
    return chosen


if __name__ == "__main__":
    main()
