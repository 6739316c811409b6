"""EAP's protocol on real data that ships here: how well each quality score ranks good auxiliary anomalies above
poor ones, and what keeping the top third does to a detector. Feeds the two tables "EAP: quality of auxiliary
anomalies" of docs/results/eap.md (``--unrealistic-scale 3``, the default, and ``--unrealistic-scale 1``).

For each data set and seed, normals and real anomalies are split into
- a training set: 60% of the normals (y = 0) and m labelled real anomalies (y = 1);
- a test set: 25% of the normals and 30% of the real anomalies;
- an auxiliary set of 3·l anomalies: l real anomalies (good), l of the remaining 15% normals relabelled as anomalies
  (indistinguishable), and l points of another data set, standardised, randomly projected to the same dimension and
  scaled so that their mean norm is ``--unrealistic-scale`` times the training normals' (unrealistic: 3 puts them off
  the data; at 1 they blend into the normal cloud, and "unrealistic" then means "normal-looking noise").
AUC_QLT is the AUROC of a quality score with the good third as positives. ACC_G is the gain in balanced test
accuracy of a classifier (an RBF SVM on image features, a random forest on tabular data) when the top third of the
auxiliary set by the score is added to its training data as anomalies. Features are standardised with the
training normals' statistics; image features are raw pixels (digits, 64-D) or their PCA to 32 dimensions fitted on
the training normals (Animal-MNIST).

    python benchmarks/eap_quality.py                 # all data sets, 10 seeds
    python benchmarks/eap_quality.py --seeds 2 --datasets breast_cancer digits_3_vs_8

Prints one JSON object per (data set, scorer) and a final one with the mean AUC_QLT, ACC_G and average rank.

``--doc PAGE`` (e.g. ``--doc docs/results/eap.md``) also rewrites the page's block
``<!-- begin: eap_quality scale-<unrealistic scale> -->`` ... ``<!-- end: ... -->`` (``scale-3``, ``scale-1``) with
the command and the table of this run: one line per scorer, AUC_QLT per data set, the means and the average rank;
the rest of the page is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.svm import SVC

TABULAR = ("breast_cancer", "wine", "iris")
IMAGE_PAIRS = {
    "digits_3_vs_8": ("digits", "3", "8"),
    "digits_1_vs_7": ("digits", "1", "7"),
    "digits_4_vs_9": ("digits", "4", "9"),
    "animals_Dog_vs_Cat": ("animals", "Dog", "Cat"),
    "animals_Sheep_vs_Cow": ("animals", "Sheep", "Cow"),
    "animals_Horse_vs_Giraffe": ("animals", "Horse", "Giraffe"),
}
# whose points are projected into a task's feature space as the unrealistic third
OTHER = {"breast_cancer": "wine", "wine": "breast_cancer", "iris": "breast_cancer", "digits": "animals",
         "animals": "digits"}


def load_tabular(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, 1 for anomalies): breast cancer malignant; wine class 2; iris virginica."""
    from sklearn import datasets

    if name == "breast_cancer":
        data = datasets.load_breast_cancer()
        return data.data, (data.target == 0).astype(int)  # target 0 = malignant
    data = {"wine": datasets.load_wine, "iris": datasets.load_iris}[name]()
    return data.data, (data.target == 2).astype(int)


def load_images(source: str, normal: str, anomaly: str) -> tuple[np.ndarray, np.ndarray]:
    from anomgen.data import AnimalMNIST, Digits

    dataset = (Digits if source == "digits" else AnimalMNIST)(split="all")
    keep = [i for i, e in enumerate(dataset.entries) if e.category in (normal, anomaly)]
    x = np.stack([dataset.load_image(dataset.entries[i])[0].numpy().reshape(-1) for i in keep])
    y = np.array([int(dataset.entries[i].category == anomaly) for i in keep])
    return x, y


def all_points(source: str) -> np.ndarray:
    if source in TABULAR:
        return load_tabular(source)[0]
    from anomgen.data import AnimalMNIST, Digits

    dataset = (Digits if source == "digits" else AnimalMNIST)(split="all")
    idx = np.random.default_rng(0).choice(len(dataset), size=min(2000, len(dataset)), replace=False)
    return np.stack([dataset.load_image(dataset.entries[i])[0].numpy().reshape(-1) for i in idx])


def make_task(x: np.ndarray, y: np.ndarray, other: np.ndarray, seed: int, image: bool, max_third: int = 40,
              unrealistic_scale: float = 3.0):
    rng = np.random.default_rng(seed)
    normals, anomalies = rng.permutation(np.flatnonzero(y == 0)), rng.permutation(np.flatnonzero(y == 1))
    n_tr, n_te = int(0.6 * len(normals)), int(0.25 * len(normals))
    tr_n, te_n, pool_n = normals[:n_tr], normals[n_tr : n_tr + n_te], normals[n_tr + n_te :]
    m = max(3, round(0.03 * n_tr))
    n_te_a = int(0.3 * len(anomalies))
    lab_a, te_a, pool_a = anomalies[:m], anomalies[m : m + n_te_a], anomalies[m + n_te_a :]
    third = min(max_third, len(pool_a), len(pool_n))
    if third < 3:
        raise ValueError(f"too few points for an auxiliary set (third = {third})")
    good, indist = pool_a[:third], pool_n[:third]
    if image and x.shape[1] > 64:
        x = PCA(n_components=32, random_state=seed).fit(x[tr_n]).transform(x)
    mu, sd = x[tr_n].mean(0), x[tr_n].std(0)
    z = (x - mu) / np.where(sd > 1e-6, sd, 1.0)  # constant pixels (digit borders) stay unscaled
    # unrealistic: another data set, standardised, randomly projected to this feature dimension
    o_sd = other.std(0)
    o = (other - other.mean(0)) / np.where(o_sd > 1e-6, o_sd, 1.0)
    o = o[rng.choice(len(o), size=third, replace=len(o) < third)]
    unreal = o @ (rng.normal(size=(o.shape[1], z.shape[1])) / np.sqrt(o.shape[1]))
    # off the data: mean norm = unrealistic_scale × the training normals' mean norm (1.0 blends into the cloud)
    unreal *= unrealistic_scale * np.linalg.norm(z[tr_n], axis=1).mean() / np.linalg.norm(unreal, axis=1).mean()
    x_train = np.concatenate([z[tr_n], z[lab_a]])
    y_train = np.concatenate([np.zeros(len(tr_n), int), np.ones(len(lab_a), int)])
    x_aux = np.concatenate([z[good], z[indist], unreal])
    good_mask = np.concatenate([np.ones(third, int), np.zeros(2 * third, int)])
    x_test = np.concatenate([z[te_n], z[te_a]])
    y_test = np.concatenate([np.zeros(len(te_n), int), np.ones(len(te_a), int)])
    return x_train, y_train, x_aux, good_mask, x_test, y_test


def scorers(subsets: int, seed: int) -> dict:
    from anomgen.quality import (
        EAP,
        DataOOB,
        DensityQuality,
        KNNShapley,
        LeaveOneOut,
        PosteriorPlusDensity,
        PosteriorQuality,
        RandomQuality,
        RarityQuality,
    )

    return {
        "EAP": EAP(num_subsets=subsets, random_state=seed),
        "Random": RandomQuality(random_state=seed),
        "Rarity": RarityQuality(),
        "P_x": DensityQuality(),
        "P_y|x": PosteriorQuality(),
        "P_y|x+N*P_x": PosteriorPlusDensity(),
        "LOO": LeaveOneOut(),
        "KNN-Shapley": KNNShapley(),
        "Data-OOB": DataOOB(random_state=seed),
    }


def classifier(image: bool, seed: int):
    if image:
        return SVC(kernel="rbf", class_weight="balanced")
    return RandomForestClassifier(n_estimators=100, class_weight="balanced", random_state=seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--subsets", type=int, default=20, help="EAP bootstrap subsets (reference code: 100)")
    parser.add_argument("--datasets", nargs="+", default=[*TABULAR, *IMAGE_PAIRS])
    parser.add_argument("--unrealistic-scale", type=float, default=3.0,
                        help="mean norm of the unrealistic third / that of the training normals (standardised)")
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    args = parser.parse_args(argv)

    others = {}
    per_dataset: dict[str, dict[str, dict]] = {}
    for name in args.datasets:
        image = name in IMAGE_PAIRS
        if image:
            source, normal, anomaly = IMAGE_PAIRS[name]
            x, y = load_images(source, normal, anomaly)
        else:
            source = name
            x, y = load_tabular(name)
        other_name = OTHER[source]
        if other_name not in others:
            others[other_name] = all_points(other_name)
        results: dict[str, dict[str, list]] = {}
        for seed in range(args.seeds):
            x_train, y_train, x_aux, good, x_test, y_test = make_task(x, y, others[other_name], seed, image,
                                                                       unrealistic_scale=args.unrealistic_scale)
            base = classifier(image, seed).fit(x_train, y_train)
            base_acc = balanced_accuracy_score(y_test, base.predict(x_test))
            for sname, scorer in scorers(args.subsets, seed).items():
                t0 = time.perf_counter()
                q = scorer.fit(x_train, y_train).score_samples(x_aux)
                seconds = time.perf_counter() - t0
                top = np.argsort(-q, kind="stable")[: len(q) // 3]
                clf = classifier(image, seed).fit(np.concatenate([x_train, x_aux[top]]),
                                                  np.concatenate([y_train, np.ones(len(top), int)]))
                acc = balanced_accuracy_score(y_test, clf.predict(x_test))
                r = results.setdefault(sname, {"auc_qlt": [], "acc_g": [], "seconds": []})
                r["auc_qlt"].append(roc_auc_score(good, q))
                r["acc_g"].append(acc - base_acc)
                r["seconds"].append(seconds)
        per_dataset[name] = {}
        for sname, r in results.items():
            row = {"name": "eap_quality", "dataset": name, "scorer": sname, "seeds": args.seeds,
                   "auc_qlt": float(np.mean(r["auc_qlt"])), "auc_qlt_std": float(np.std(r["auc_qlt"])),
                   "acc_g": float(np.mean(r["acc_g"])), "seconds": float(np.mean(r["seconds"])),
                   "n_train": int(len(x_train)), "n_aux": int(len(x_aux)),
                   "unrealistic_scale": args.unrealistic_scale, "device": "cpu"}
            per_dataset[name][sname] = row
            print(json.dumps(row), flush=True)

    names = list(next(iter(per_dataset.values())))
    ranks = {s: [] for s in names}
    for rows in per_dataset.values():
        order = sorted(names, key=lambda s: -rows[s]["auc_qlt"])
        for rank, s in enumerate(order, start=1):
            ranks[s].append(rank)
    summary = {
        s: {
            "auc_qlt": float(np.mean([per_dataset[d][s]["auc_qlt"] for d in per_dataset])),
            "acc_g": float(np.mean([per_dataset[d][s]["acc_g"] for d in per_dataset])),
            "avg_rank": float(np.mean(ranks[s])),
        }
        for s in names
    }
    print(json.dumps({"name": "eap_quality_summary", "datasets": list(per_dataset), "seeds": args.seeds,
                      "subsets": args.subsets, "unrealistic_scale": args.unrealistic_scale, "summary": summary,
                      "device": "cpu"}))
    if args.doc:
        write_table(args, per_dataset, summary, argv)


def dataset_label(name: str) -> str:
    """``breast_cancer`` -> ``breast cancer``, ``digits_3_vs_8`` -> ``digits 3/8``, ``animals_Dog_vs_Cat`` ->
    ``Dog/Cat``: the page's column names."""
    if name in IMAGE_PAIRS:
        source, normal, anomaly = IMAGE_PAIRS[name]
        return f"{'digits ' if source == 'digits' else ''}{normal}/{anomaly}"
    return name.replace("_", " ")


def write_table(args, per_dataset: dict, summary: dict, argv) -> None:
    from docpage import table, write_doc

    datasets = list(per_dataset)
    body = table(["scorer", *map(dataset_label, datasets), "mean AUC_QLT", "mean ACC_G", "avg rank"],
                 [[s, *(f"{per_dataset[d][s]['auc_qlt']:.3f}" for d in datasets), f"**{v['auc_qlt']:.3f}**",
                   f"{v['acc_g']:+.3f}", f"{v['avg_rank']:.2f}"] for s, v in summary.items()])
    note = (f"{args.seeds} seeds, EAP with {args.subsets} bootstrap subsets, unrealistic third at "
            f"{args.unrealistic_scale:g}× the training normals' mean norm; CPU.")
    write_doc(args.doc, f"eap_quality scale-{args.unrealistic_scale:g}", "eap_quality.py",
              sys.argv[1:] if argv is None else argv, body, note)


if __name__ == "__main__":
    sys.exit(main())
