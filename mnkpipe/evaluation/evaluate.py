"""Meta-test evaluation on a computed (read-only) Gram store: MNK and its ablations in both label modes, with and
without task augmentation, for nested subsets of the training tasks and several seeds."""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..kernels import mnk
from ..pipeline.driver import run_tiles
from ..pipeline.ray_session import start_ray, stop_ray
from ..store import StoreError, open_store
from .augment import augment_tasks
from .derived import check_results_dir, claim_results_dir, held, store_gram_key
from .labels import (LABEL_MODES, decode, embedding_settings, embedding_targets, extractor_dir, extractor_key,
                     pool_embeddings, write_extractor_key)
from .phi import (ARRAY, INF, PhiSource, kernel_reader, phi_attrs, phi_path, phi_settings, prepare_phi, read_phi,
                  task_ops_list)
from .protocol import check_train_counts, default_counts, subset_size, train_subsets
from .report import write_results
from .results import merged, method_key, method_record, results_dir, results_header

KERNEL_METHODS = ("mnk", "meta_term", "r_t", "embedding_1nn", "pixel_1nn")
CONVENTION_METHODS = ("mnk", "meta_term", "r_t")  # the methods conventions="authors" changes, keyed mnk-authors, ...


def pixel_1nn(images: np.ndarray, support, support_labels, query) -> np.ndarray:
    """Label of each query's nearest support image (Euclidean, standardised pixels)."""
    s, q = images[support].reshape(len(support), -1), images[query].reshape(len(query), -1)
    return mnk.nearest_support(q, s, support_labels)


def check_complete(store) -> None:
    missing = store.missing_tiles("gram")
    if missing:
        cfg = store.manifest["config"]
        raise StoreError(f"{store.path}: {len(missing)} of {len(store.planned_tiles('gram'))} Gram tiles are not done. "
                         f"Finish them first: mnkpipe compute-kernel --config <the {cfg['kernel']['name']} config> "
                         f"--store {store.path} (the same command that started it resumes it)")


def check_options(methods, labels, augment, seeds, ridge, eta, t_outer) -> None:
    """Every option a user gives, checked before anything is read or written; the message names the option."""
    if set(methods) - set(KERNEL_METHODS):
        raise ValueError(f"--methods: unknown method(s) {sorted(set(methods) - set(KERNEL_METHODS))}; choose from "
                         f"{', '.join(KERNEL_METHODS)} (maml and imaml come from `mnkpipe baselines`)")
    if not labels or set(labels) - set(LABEL_MODES):
        raise ValueError(f"--labels must be one or both of {', '.join(LABEL_MODES)}; got {','.join(labels)}")
    if not augment or min(augment) < 1:
        raise ValueError(f"--augment must be integers >= 1 (1 = the tasks as sampled); got {list(augment)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1; got {seeds!r}")
    if not ridge >= 0:
        raise ValueError(f"--ridge must be >= 0; got {ridge}")
    for name, v in (("--eta", eta), ("--t-outer", t_outer)):
        if not v > 0:
            raise ValueError(f"{name} must be > 0 (inf = converged); got {v}")


@dataclass(frozen=True)
class EvaluateSettings:
    """Every option of evaluate, checked when made; methods are those the conventions change when not "formulas"."""

    train_counts: tuple[int, ...] | None = None  # numbers of training tasks [default: 1, 2, 4, ... all]
    seeds: int = 3  # random nested training subsets per count
    out: str | Path | None = None  # results folder [default: <store>-results]
    methods: tuple[str, ...] = KERNEL_METHODS
    labels: tuple[str, ...] = ("onehot",)
    augment: tuple[int, ...] = (1,)  # task augmentation K, sorted and distinct
    ridge: float = 1e-5
    eta: float = INF
    t_outer: float = INF
    normalise: bool = True
    conventions: str = "formulas"
    config: str | Path | None = None  # TOML with an [embedding] table
    phi_tile_size: int = 256
    max_bytes: float = 1e9  # Gram tiles cached by the base-kernel reader
    cpus: int | None = None
    address: str | None = None
    progress: bool = True

    def __post_init__(self):
        augment = tuple(sorted(set(int(k) for k in self.augment)))
        check_options(list(self.methods), list(self.labels), augment, self.seeds, self.ridge, self.eta, self.t_outer)
        if self.conventions not in mnk.CONVENTIONS or (self.conventions == "authors" and not self.normalise):
            raise ValueError(f"--conventions must be one of {', '.join(mnk.CONVENTIONS)} (authors with the cosine "
                             f"normalisations, not --no-normalise); got {self.conventions}")
        methods = tuple(self.methods)
        if self.conventions != "formulas":  # the other methods do not depend on the conventions: run with formulas
            methods = tuple(m for m in methods if m in CONVENTION_METHODS)
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "augment", augment)
        if self.train_counts is not None:
            object.__setattr__(self, "train_counts", tuple(self.train_counts))

    @property
    def meta_methods(self) -> list[str]:
        """The methods that need Phi_train: mnk and meta_term."""
        return [m for m in ("mnk", "meta_term") if m in self.methods]


def result_keys(s: EvaluateSettings) -> list[str]:
    """results.json keys the settings ask for: mnk/<labels>/K<k>, ..., r_t/<labels>, embedding_1nn, pixel_1nn."""
    return ([method_key(m, lab, k) for m in s.meta_methods for lab in s.labels for k in s.augment]
            + [method_key("r_t", lab) for lab in s.labels if "r_t" in s.methods]
            + (["embedding_1nn"] if "embedding_1nn" in s.methods and "embedding" in s.labels else [])
            + (["pixel_1nn"] if "pixel_1nn" in s.methods else []))


def evaluate(store_path, settings: EvaluateSettings | None = None, **options) -> dict:
    """Accuracy on every test task of each method, label mode and augmentation K, per count of training tasks and
    seed; results.json (merged with what the same store's results folder holds) and its rendering in `out`.

    settings, or the keyword options of EvaluateSettings (evaluate(store, seeds=2, ...)).
    """
    if settings is None:
        settings = EvaluateSettings(**options)
    elif options:
        raise TypeError(f"evaluate takes EvaluateSettings or keyword options, not both; got {sorted(options)}")
    store = open_store(store_path)  # read-only: evaluate writes nothing into the store
    ep = store.episodes()
    check_complete(store)
    counts = check_train_counts(settings.train_counts or default_counts(ep.train.n_tasks), ep.train.n_tasks)
    out, results = results_folder(store, settings.out)
    run = _Run(store, out, settings, counts)
    run.curve()
    results["methods"].update(run.records())
    write_results(results, out)
    return results


def results_folder(store, out) -> tuple[Path, dict]:
    """The results folder (outside the store, made by mnkpipe, claimed) and a fresh results header; another store's
    results there are refused before any work."""
    out = check_results_dir(results_dir(store.path, out), store.path)
    results = results_header(store)
    merged(out / "results.json", results)
    claim_results_dir(out, store.path)
    return out, results


class _Run:
    """One evaluate call: the base-kernel reader, the test tasks' TaskOps, and the accuracy arrays it fills."""

    def __init__(self, store, out: Path, settings: EvaluateSettings, counts: list[int]):
        self.store, self.out, self.s, self.counts = store, out, settings, counts
        self.emb_settings = embedding_settings(settings.config) if "embedding" in settings.labels else None
        self.phi_settings = phi_settings(settings.ridge, settings.eta, settings.normalise, settings.conventions)
        self.kb, _ = kernel_reader(store, self.phi_settings, settings.max_bytes)
        self.ep = store.episodes()
        self.test = self.ep.test
        self.test_ops = task_ops_list(self.kb, self.test, self.phi_settings)
        self.images = store.images()
        self.keys = result_keys(settings)
        self.per = {key: {n: np.zeros((settings.seeds, self.test.n_tasks)) for n in counts} for key in self.keys}
        self.sizes = {n: [] for n in counts}
        self.pixel_acc = [np.mean(pixel_1nn(self.images, self.test.support[i], self.test.support_labels[i],
                                            self.test.query[i]) == self.test.query_labels[i])
                          for i in range(self.test.n_tasks)]
        self.full_phi = None

    def score(self, key: str, n: int, seed: int, predict) -> None:
        """Accuracy of predict(i) (labels of test task i's queries) on every test task, at count n and seed."""
        test = self.test
        self.per[key][n][seed] = [np.mean(predict(i) == test.query_labels[i]) for i in range(test.n_tasks)]

    def curve(self) -> None:
        """Every count of training tasks and seed, under one Ray instance for all Phi arrays (when any is needed)."""
        s = self.s
        started = start_ray(s.address, cpus=s.cpus) if s.meta_methods else False
        try:
            if s.meta_methods and 1 in s.augment:
                self.full_phi = self.phi_train(self.ep.train, phi_attrs(self.store, self.phi_settings, 1))
            bar = tqdm(total=s.seeds * len(self.counts), desc="evaluate (count, seed)", disable=not s.progress)
            for seed in range(s.seeds):
                for n, subset in train_subsets(self.ep.train.n_tasks, self.counts, seed).items():
                    self.subset(n, seed, subset)
                    bar.update()
            bar.close()
        finally:
            if started:
                stop_ray()

    def subset(self, n: int, seed: int, subset: np.ndarray) -> None:
        """Every method on the training subset drawn for count n and seed."""
        s, test, train = self.s, self.test, self.ep.train.subset(subset)
        self.sizes[n].append(subset_size(self.ep.train, subset))
        if "pixel_1nn" in self.keys:  # the same at every count and seed
            self.per["pixel_1nn"][n][seed] = self.pixel_acc
        emb = self.embeddings(train, subset, seed) if "embedding" in s.labels else None
        tests = {"onehot": self.test_ops} if "onehot" in s.labels else {}
        if emb is not None:
            tests["embedding"] = [embedding_targets(t, sl, ql, emb, test=True) for t, sl, ql in
                                  zip(self.test_ops, test.support_labels, test.query_labels)]
            if "embedding_1nn" in self.keys:
                self.score("embedding_1nn", n, seed, lambda i: mnk.nearest_support(
                    emb[test.query[i]], emb[test.support[i]], test.support_labels[i]))
        for lab in s.labels:
            if "r_t" in s.methods:
                self.score(method_key("r_t", lab), n, seed,
                           lambda i: decode(tests[lab][i].r_q, tests[lab][i], test.support_labels[i], lab))
        for k in s.augment if s.meta_methods else []:
            tasks, phi = self.augmented(train, subset, seed, k)
            preds = meta_predictions(self.kb, tasks, phi, tests, test.support_labels, emb, self.phi_settings,
                                     t_outer=s.t_outer)
            for (method, lab), pred in preds.items():
                if method in s.methods:
                    self.score(method_key(method, lab, k), n, seed, pred.__getitem__)

    def embeddings(self, train, subset, seed: int) -> np.ndarray:
        """The pool's embeddings by the extractor of this training subset and seed (trained once, then reused)."""
        key = extractor_key(store_gram_key(self.store), subset, seed, self.emb_settings)
        ckpt = extractor_dir(self.out, key)
        with held(self.out, ckpt):  # one run trains it, a second one on the same folder waits and reuses it
            write_extractor_key(ckpt, key)
            return pool_embeddings(self.images, train, self.emb_settings, seed=seed, checkpoint_dir=ckpt,
                                   progress=self.s.progress)

    def augmented(self, train, subset, seed: int, k: int):
        """(tasks, Phi_train) for augmentation K = k: the subset's rows of the full Phi for k = 1, else k x the tasks
        re-partitioned (their own Phi group)."""
        if k == 1:
            q = self.ep.train.query.shape[1]
            rows = np.concatenate([np.arange(i * q, (i + 1) * q) for i in subset])
            return train, self.full_phi[np.ix_(rows, rows)]
        tasks = augment_tasks(train, k, np.random.default_rng([seed, k, *subset]))
        return tasks, self.phi_train(tasks, phi_attrs(self.store, self.phi_settings, k, subset, seed))

    def phi_train(self, tasks, attrs) -> np.ndarray:
        """Phi_train over the stacked queries of `tasks`, from its group under the results folder (created whole,
        its missing tiles computed by the Ray driver first, under the group's lock: a second run waits, then reads
        it)."""
        s, path = self.s, phi_path(self.out, attrs)
        with held(self.out, path):
            prepare_phi(self.out, attrs, tasks, s.phi_tile_size)
            run_tiles(path, name=ARRAY, source=PhiSource(self.store.path, tasks, self.phi_settings, s.max_bytes),
                      cpus=s.cpus, address=s.address, progress=s.progress)
        return read_phi(path)

    def records(self) -> dict:
        """{results.json name: method record} of every key, with the hyperparameters it ran with."""
        s = self.s
        hyper = dict(self.phi_settings, t_outer=str(float(s.t_outer)), normalise_phi=s.normalise)
        out = {}
        for key in self.keys:
            method, *rest = key.split("/")
            h = {} if method == "pixel_1nn" else dict(hyper)
            if rest:
                h["labels"] = rest[0]
            if len(rest) > 1:
                h["augment"] = int(rest[1][1:])
            if "embedding" in key and self.emb_settings is not None:
                h["embedding"] = asdict(self.emb_settings)
            name = key if s.conventions == "formulas" else f"{method}-{s.conventions}{key[len(method):]}"
            out[name] = method_record(self.counts, self.per[key], self.sizes, h)
        return out


def meta_predictions(kb, tasks, phi, tests: dict, support_labels, emb, settings: dict, *, t_outer: float) -> dict:
    """{(method, label mode): predicted labels of each test task} for MNK F = r_t + Phi(X_t, X_train) alpha and its
    meta term alone Phi(X_t, X_train) alpha, alpha fitted on the training tasks' targets of each label mode
    (tests: the test TaskOps of each label mode, support_labels: the test tasks' support labels, emb: the pool's
    embeddings or None). Phi(X_t, X_train) is computed once per test task, for every label mode, and not kept."""
    ops = task_ops_list(kb, tasks, settings)
    fits = {}
    for lab in tests:
        train_ops = ops if lab == "onehot" else [embedding_targets(o, sl, ql, emb, test=False) for o, sl, ql in
                                                 zip(ops, tasks.support_labels, tasks.query_labels)]
        fits[lab] = mnk.mnk_fit(train_ops, phi, ridge=settings["ridge"], t_outer=t_outer,
                                normalise_phi=settings["normalise_k"],
                                conventions=settings.get("conventions", "formulas"))
    out = {(m, lab): [] for m in ("mnk", "meta_term") for lab in tests}
    any_fit = next(iter(fits.values()))  # Phi(X_t, X_train) and its normalisation do not depend on the labels
    for i, t in enumerate(next(iter(tests.values()))):
        phi_t = mnk.phi_test(kb, ops, t, any_fit)
        for lab, fit in fits.items():
            meta, tl = phi_t @ fit.alpha, tests[lab][i]
            out["mnk", lab].append(decode(tl.r_q + meta, tl, support_labels[i], lab))
            out["meta_term", lab].append(decode(meta, tl, support_labels[i], lab))
    return out
