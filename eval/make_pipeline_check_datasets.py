"""PIPELINE CHECK ONLY, NOT A BENCHMARK: small stand-ins for SAEBench's SCR/TPP datasets, for offline runs.

SAEBench's SCR and TPP read two Hub datasets, LabHC/bias_in_bios (biographies labelled with profession and
gender) and canrager/amazon_reviews_mcauley_1and5 (reviews labelled with product category and a 1- or 5-star
rating). Without the Hub, this script writes datasets in the same schema (same columns, label codes and
train/test splits) whose texts were written for this purpose: short templated biographies and reviews in
which the profession/category and the gender/rating are each signalled by a few words. They exist so that
SAEBench's SCR/TPP code can run end to end offline through `sae-lens eval --datasets-dir`; the numbers they
give test the pipeline, not an SAE.

    python eval/make_pipeline_check_datasets.py --out DIR
    sae-lens eval --evals scr,tpp --datasets-dir DIR --eval-config eval/pipeline_check_eval_config.yaml ...
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, DatasetInfo
from sae_bench.sae_bench_utils.dataset_info import amazon_category_dict, gender_dict, profession_dict

DESCRIPTION = (
    "PIPELINE CHECK ONLY, not a benchmark: templated texts written for an offline run of SAEBench's code, in the "
    "schema of {name}; made by softsae-plugin's eval/make_pipeline_check_datasets.py"
)
# Rows per (class, label) cell: enough for SAEBench's SCR/TPP at train_set_size 200 / test_set_size 100
# (SCR needs more than half the train set size in its two fully biased cells).
TRAIN_PER_CELL, TEST_PER_CELL = 120, 60

PROFESSIONS = {
    "accountant": ["prepares tax returns for small firms", "audits the books of local charities",
                   "reconciles ledgers every quarter", "advises clients on payroll and budgets"],
    "architect": ["designs timber houses for steep sites", "draws plans for public libraries",
                  "restores the facades of old warehouses", "sketches floor plans and builds scale models"],
    "attorney": ["represents tenants in housing court", "drafts contracts for software startups",
                 "argues appeals before the state court", "defends clients in criminal trials"],
    "dentist": ["fills cavities and fits crowns", "runs a clinic for children's teeth",
                "performs root canals and cleanings", "teaches patients to floss properly"],
    "filmmaker": ["shoots documentaries about rivers", "edits short films for festivals",
                  "directs low-budget horror movies", "writes and films stories about small towns"],
    "journalist": ["reports on city hall for a daily paper", "writes long features about farming",
                   "covers elections for a radio station", "interviews witnesses for investigative stories"],
    "nurse": ["cares for patients on a cardiac ward", "works night shifts in the emergency room",
              "gives vaccinations at a community clinic", "monitors newborns in intensive care"],
    "professor": ["teaches graduate seminars in chemistry", "supervises doctoral students in history",
                  "lectures on linear algebra to first-year students", "publishes research on ancient trade routes"],
    "psychologist": ["counsels teenagers with anxiety", "runs therapy groups for veterans",
                     "studies memory in older adults", "treats patients with phobias and depression"],
    "surgeon": ["operates on broken hips and knees", "performs heart bypass operations",
                "removes tumours in long operations", "repairs injuries in the trauma theatre"],
    "teacher": ["teaches reading to second graders", "runs the science lab at a middle school",
                "coaches the debate club after classes", "marks homework and plans lessons for fifth grade"],
}  # fmt: skip
NAMES = {
    "male": ["James", "Robert", "David", "Michael", "Thomas", "Daniel", "Peter", "Mark", "Paul", "Steven"],
    "female": ["Mary", "Linda", "Susan", "Karen", "Laura", "Emily", "Anna", "Sarah", "Julia", "Helen"],
}
PRONOUNS = {"male": ("He", "his"), "female": ("She", "her")}
BIO_EXTRAS = [
    "{P} grew up in a small town by the coast.", "In {p} free time {p2} enjoys hiking and chess.",
    "{P} lives with {p} two dogs.", "{P} has worked in the field for twelve years.",
    "{P} volunteers at the local food bank.", "{P} speaks three languages.",
]  # fmt: skip

CATEGORIES = {
    "Books": ["novel", "paperback", "cookbook", "biography"],
    "CDs_and_Vinyl": ["album", "vinyl record", "live CD", "box set of the band's early songs"],
    "Software": ["photo editing program", "antivirus subscription", "accounting software", "video editor app"],
    "Electronics": ["pair of headphones", "portable speaker", "HDMI cable", "external hard drive"],
    "Pet_Supplies": ["cat litter", "dog leash", "bag of bird seed", "aquarium filter"],
    "Office_Products": ["stapler", "box of printer paper", "desk organizer", "pack of gel pens"],
    "Industrial_and_Scientific": ["digital caliper", "set of lab beakers", "soldering station", "safety goggles"],
    "Toys_and_Games": ["board game", "puzzle of a thousand pieces", "toy robot", "set of building blocks"],
    "Cell_Phones_and_Accessories": ["phone case", "screen protector", "phone charger", "car mount for my phone"],
    "Musical_Instruments": ["guitar strings", "digital piano", "drum sticks", "ukulele"],
}
REVIEWS = {
    5.0: ["Absolutely love this {item}.", "This {item} is excellent, five stars.", "Best {item} I have bought.",
          "The {item} works perfectly and arrived early.", "Great value, the {item} exceeded my expectations."],
    1.0: ["This {item} is terrible.", "Do not buy this {item}, one star.", "Worst {item} I have ever bought.",
          "The {item} broke after two days.", "Complete waste of money, the {item} never worked."],
}  # fmt: skip
REVIEW_EXTRAS = [
    "I ordered it as a gift.", "Shipping took about a week.", "The packaging was plain.",
    "I have used it every day since.", "My brother has the same one.", "It came in a brown box.",
]  # fmt: skip


def _bio(rng: random.Random, profession: str, gender: str) -> str:
    subject, possessive = PRONOUNS[gender]
    extras = rng.sample(BIO_EXTRAS, 2)
    fill = {"P": subject, "p": possessive, "p2": subject.lower()}
    activity, other = rng.sample(PROFESSIONS[profession], 2)
    return " ".join(
        [f"{rng.choice(NAMES[gender])} {activity}.", f"{subject} also {other}.", *(e.format(**fill) for e in extras)]
    )


def _review(rng: random.Random, category: str, rating: float) -> str:
    item = rng.choice(CATEGORIES[category])
    first, second = rng.sample(REVIEWS[rating], 2)
    return " ".join([first.format(item=item), rng.choice(REVIEW_EXTRAS), second.format(item=item)])


def _split(
    rng: random.Random, cells: Sequence[tuple[dict[str, object], Callable[[], str]]], text_column: str, n: int
) -> dict[str, list[object]]:
    rows: list[dict[str, object]] = [{text_column: make(), **labels} for labels, make in cells for _ in range(n)]
    rng.shuffle(rows)
    return {key: [row[key] for row in rows] for key in rows[0]}


def build(
    name: str, text_column: str, cells: Sequence[tuple[dict[str, object], Callable[[], str]]], rng: random.Random
) -> DatasetDict:
    """A train/test DatasetDict of `cells` (labels, text maker), described as a pipeline check of `name`."""
    info = DatasetInfo(description=DESCRIPTION.format(name=name))
    return DatasetDict(
        {
            split: Dataset.from_dict(_split(rng, cells, text_column, n), info=info)
            for split, n in (("train", TRAIN_PER_CELL), ("test", TEST_PER_CELL))
        }
    )


def make_datasets(out: Path, seed: int = 0) -> list[Path]:
    """Write the bias_in_bios and amazon reviews stand-ins under `out` (in folders named by Hub id)."""
    rng = random.Random(seed)
    bios = build(
        "LabHC/bias_in_bios",
        "hard_text",
        [
            ({"profession": profession_dict[p], "gender": gender_dict[g]}, lambda p=p, g=g: _bio(rng, p, g))
            for p in PROFESSIONS
            for g in NAMES
        ],
        rng,
    )
    reviews = build(
        "canrager/amazon_reviews_mcauley_1and5",
        "text",
        [
            ({"category": amazon_category_dict[c], "rating": r}, lambda c=c, r=r: _review(rng, c, r))
            for c in CATEGORIES
            for r in REVIEWS
        ],
        rng,
    )
    paths = []
    for hub_id, data in (("LabHC/bias_in_bios", bios), ("canrager/amazon_reviews_mcauley_1and5", reviews)):
        path = out / hub_id
        data.save_to_disk(str(path))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the pipeline-check datasets to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the datasets (use as --datasets-dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in make_datasets(args.out, args.seed):
        print(f"wrote {path} (pipeline check only, not a benchmark)")


if __name__ == "__main__":
    main()
