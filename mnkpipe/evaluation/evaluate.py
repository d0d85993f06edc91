"""Meta-test evaluation on a computed (read-only) Gram store: MNK and its ablations in both label modes, with and
without task augmentation, for nested subsets of the training tasks and several seeds."""

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..kernels import mnk
from ..pipeline.driver import run_tiles
from ..pipeline.ray_session import start_ray, stop_ray
from ..store import StoreError, open_store
from .augment import augment_tasks
from .derived import check_results_dir, claim_results_dir, held, store_gram_key
from .labels import (EMBEDDING_MODES, LABEL_MODES, decode, embedding_settings, embedding_targets, extractor_dir,
                     extractor_key, mode_settings, pool_embeddings, write_extractor_key)
from .phi import (ARRAY, INF, CachedGram, PhiSource, normalised, phi_attrs, phi_path, phi_settings, prepare_phi,
                  read_phi, task_ops_list)
from .protocol import check_train_counts, default_counts, subset_size, train_subsets
from .mirror import local_results, results_location
from .report import render, write_results
from .results import merged, method_key, method_record, results_header
from .validation import WithValidation, validation_kernel

KERNEL_METHODS = ("mnk", "meta_term", "r_t", "embedding_1nn", "pixel_1nn")
CONVENTION_METHODS = ("mnk", "meta_term", "r_t")  # the methods conventions="authors" changes, keyed mnk-authors, ...
RIDGE_METHODS = CONVENTION_METHODS  # the methods the ridge changes: with a ridge grid, also keyed mnk-valridge, ...


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


def check_options(methods, labels, augment, seeds, ridge, eta, t_outer, ridge_grid=()) -> None:
    """Every option a user gives, checked before anything is read or written; the message names the option."""
    if set(methods) - set(KERNEL_METHODS):
        raise ValueError(f"--methods: unknown method(s) {sorted(set(methods) - set(KERNEL_METHODS))}; choose from "
                         f"{', '.join(KERNEL_METHODS)} (maml and imaml come from `mnkpipe baselines`)")
    if not labels or set(labels) - set(LABEL_MODES):
        raise ValueError(f"--labels must be one or more of {', '.join(LABEL_MODES)}; got {','.join(labels)}")
    if not augment or min(augment) < 1:
        raise ValueError(f"--augment must be integers >= 1 (1 = the tasks as sampled); got {list(augment)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1; got {seeds!r}")
    if not 0 <= ridge < INF:
        raise ValueError(f"--ridge must be finite and >= 0; got {ridge}")
    if not all(0 < r < INF for r in ridge_grid):
        raise ValueError(f"--ridge-grid must be finite ridges > 0; got {list(ridge_grid)}")
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
    ridge_grid: tuple[float, ...] = ()  # ridges to choose from on the validation tasks, per count and seed
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
        grid = tuple(sorted(set(float(r) for r in self.ridge_grid)))
        check_options(list(self.methods), list(self.labels), augment, self.seeds, self.ridge, self.eta, self.t_outer,
                      grid)
        object.__setattr__(self, "ridge_grid", grid)
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

    With a ridge grid, the ridge-dependent methods also run at every grid ridge, scored on the validation tasks as
    well, and their records <method>-valridge/... hold, per count and seed, the test accuracy at the ridge with the
    best mean validation accuracy (docs/math.md sec. 2.5).

    settings, or the keyword options of EvaluateSettings (evaluate(store, seeds=2, ...)).
    """
    if settings is None:
        settings = EvaluateSettings(**options)
    elif options:
        raise TypeError(f"evaluate takes EvaluateSettings or keyword options, not both; got {sorted(options)}")
    store = open_store(store_path)  # read-only: evaluate writes nothing into the store
    ep = store.episodes()
    check_complete(store)
    if settings.ridge_grid and (ep.val is None or ep.val.n_tasks == 0):
        raise ValueError(f"--ridge-grid: {store.path} has no validation tasks ([tasks] val_tasks = 0) to choose on")
    counts = check_train_counts(settings.train_counts or default_counts(ep.train.n_tasks), ep.train.n_tasks)
    with local_results(results_location(store.path, settings.out), settings.progress, render) as local:
        out, results = results_folder(store, local.folder)
        shared = local.shared
        if not settings.ridge_grid:
            run = _Run(store, out, settings, counts, shared)
            run.curve()
            results["methods"].update(run.records())
        else:
            vk = validation_kernel(out, store, settings.progress)
            runs, embeddings = {}, {}  # the embeddings do not depend on the ridge: every run reuses the first run's
            for r in sorted(set(settings.ridge_grid) | {settings.ridge}):
                runs[r] = _Run(store, out, replace(settings, ridge=r), counts, shared, validation=vk,
                               embeddings=embeddings)
                runs[r].curve()
            results["methods"].update(runs[settings.ridge].records())
            results["methods"].update(validation_chosen(runs, settings, counts))
        write_results(results, out)
    return results


def choose_ridge(val_acc: dict, test_acc: dict) -> tuple[np.ndarray, np.ndarray]:
    """For each seed s: r*(s) = the ridge r with the highest val_acc[r][s] (the smallest on ties), and the test
    accuracies test_acc[r*(s)][s]; val_acc[r]: (seeds,), test_acc[r]: (seeds, test tasks)."""
    grid = sorted(val_acc)
    best = np.argmax(np.stack([val_acc[r] for r in grid]), axis=0)
    chosen = np.array([grid[b] for b in best])
    return chosen, np.stack([test_acc[r][s] for s, r in enumerate(chosen)])


def validation_chosen(runs: dict, settings: EvaluateSettings, counts: list[int]) -> dict:
    """{<method>-valridge/...: record} of every ridge-dependent key: per count and seed, the test accuracies at the
    ridge chosen on the validation tasks, with the grid, the chosen ridges and their validation accuracies."""
    any_run = next(iter(runs.values()))
    out = {}
    for key in any_run.keys:
        method, *_ = key.split("/")
        if method not in RIDGE_METHODS:
            continue
        per, chosen, val = {}, {}, {}
        for n in counts:
            val_n = {r: run.per_val[key][n].mean(1) for r, run in runs.items()}
            ridges, per[n] = choose_ridge(val_n, {r: run.per[key][n] for r, run in runs.items()})
            chosen[str(n)] = ridges.tolist()
            val[str(n)] = [float(val_n[r][s]) for s, r in enumerate(ridges)]
        hyper = dict(any_run.hyperparameters(key), ridge="chosen on validation", ridge_grid=sorted(runs),
                     ridge_chosen=chosen, validation_accuracy=val, n_validation_tasks=int(any_run.val.n_tasks))
        note = (f"ridge (base kernel and meta kernel) chosen per count and seed (docs/math.md eq. (22)) from "
                f"{sorted(runs)} by the mean accuracy on {any_run.val.n_tasks} validation tasks (training-split "
                "classes no training task uses)")
        out[variant_name(key, settings.conventions, "valridge")] = method_record(counts, per, any_run.sizes, hyper,
                                                                                note=note)
    return out


def variant_name(key: str, *tags: str) -> str:
    """results.json name of a key's variant: mnk/onehot/K1 with tags authors, valridge -> mnk-authors-valridge/..."""
    method, sep, rest = key.partition("/")
    return "-".join([method, *(t for t in tags if t and t != "formulas")]) + sep + rest


def results_folder(store, out) -> tuple[Path, dict]:
    """The local results folder out (outside the store, made by mnkpipe, claimed) and a fresh results header;
    another store's results there are refused before any work."""
    out = check_results_dir(out, store.path)
    results = results_header(store)
    merged(out / "results.json", results)
    claim_results_dir(out, store.path)
    return out, results


class _Run:
    """One evaluate pass at one ridge: the base-kernel reader, the test (and, when given the validation kernel, the
    validation) tasks' TaskOps, and the accuracy arrays it fills."""

    def __init__(self, store, out: Path, settings: EvaluateSettings, counts: list[int], shared,
                 validation: dict | None = None, embeddings: dict | None = None):
        self.store, self.out, self.s, self.counts, self.shared = store, out, settings, counts, shared
        self.embedding_cache = embeddings  # {(mode, subset, seed): embeddings} shared by a grid's runs, or None
        self.emb_settings = (embedding_settings(settings.config) if set(EMBEDDING_MODES) & set(settings.labels)
                             else None)
        self.phi_settings = phi_settings(settings.ridge, settings.eta, settings.normalise, settings.conventions)
        self.ep = store.episodes()
        self.images = store.images()
        raw = CachedGram(store, settings.max_bytes)
        self.val = None
        if validation is not None:  # validation images follow the pool: index n + v
            raw = WithValidation(raw, store.n, validation)
            val_images = store.array("val_images")[...]
            self.val = self.ep.val.remap(np.arange(len(val_images)) + store.n)
            self.images = np.concatenate([self.images, val_images])
        self.kb = normalised(raw, self.phi_settings)
        self.test = self.ep.test
        self.test_ops = task_ops_list(self.kb, self.test, self.phi_settings)
        self.val_ops = task_ops_list(self.kb, self.val, self.phi_settings) if self.val is not None else None
        self.keys = result_keys(settings)
        self.per = {key: {n: np.zeros((settings.seeds, self.test.n_tasks)) for n in counts} for key in self.keys}
        self.per_val = ({key: {n: np.zeros((settings.seeds, self.val.n_tasks)) for n in counts} for key in self.keys}
                        if self.val is not None else None)
        self.sizes = {n: [] for n in counts}
        self.pixel_acc = [np.mean(pixel_1nn(self.images, self.test.support[i], self.test.support_labels[i],
                                            self.test.query[i]) == self.test.query_labels[i])
                          for i in range(self.test.n_tasks)]
        self.full_phi = None

    def task_sets(self) -> dict:
        """{"test": (TaskSet, TaskOps, accuracy arrays), and "val": the same for the validation tasks when scored}."""
        sets = {"test": (self.test, self.test_ops, self.per)}
        if self.val is not None:
            sets["val"] = (self.val, self.val_ops, self.per_val)
        return sets

    def curve(self) -> None:
        """Every count of training tasks and seed, under one Ray instance for all Phi arrays (when any is needed)."""
        s = self.s
        started = start_ray(s.address, cpus=s.cpus) if s.meta_methods else False
        try:
            if s.meta_methods and 1 in s.augment:
                self.full_phi = self.phi_train(self.ep.train, phi_attrs(self.store, self.phi_settings, 1))
            bar = tqdm(total=s.seeds * len(self.counts), desc=f"evaluate (count, seed), ridge {s.ridge:g}",
                       disable=not s.progress)
            for seed in range(s.seeds):
                for n, subset in train_subsets(self.ep.train.n_tasks, self.counts, seed).items():
                    self.subset(n, seed, subset)
                    bar.update()
            bar.close()
        finally:
            if started:
                stop_ray()

    def subset(self, n: int, seed: int, subset: np.ndarray) -> None:
        """Every method on the training subset drawn for count n and seed, scored on each task set."""
        s, test, train = self.s, self.test, self.ep.train.subset(subset)
        self.sizes[n].append(subset_size(self.ep.train, subset))
        if "pixel_1nn" in self.keys:  # the same at every count and seed
            self.per["pixel_1nn"][n][seed] = self.pixel_acc
        emb = {lab: self.embeddings(train, subset, seed, lab) for lab in s.labels if lab in EMBEDDING_MODES}
        if "embedding_1nn" in self.keys:
            e = emb["embedding"]
            self.per["embedding_1nn"][n][seed] = query_accuracies(
                test, lambda i: mnk.nearest_support(e[test.query[i]], e[test.support[i]], test.support_labels[i]))
        targets = {}  # {set: {label mode: TaskOps of its tasks with that mode's targets}}
        for name, (tasks, ops, per) in self.task_sets().items():
            targets[name] = {lab: ops if lab == "onehot" else
                             [embedding_targets(t, sl, ql, emb[lab], test=True) for t, sl, ql in
                              zip(ops, tasks.support_labels, tasks.query_labels)] for lab in s.labels}
            for lab in s.labels if "r_t" in s.methods else []:
                t = targets[name][lab]
                per[method_key("r_t", lab)][n][seed] = query_accuracies(
                    tasks, lambda i: decode(t[i].r_q, t[i], tasks.support_labels[i], lab))
        for k in s.augment if s.meta_methods else []:
            train_k, phi = self.augmented(train, subset, seed, k)
            ops, fits = meta_fits(self.kb, train_k, phi, s.labels, emb, self.phi_settings, t_outer=s.t_outer)
            for name, (tasks, _, per) in self.task_sets().items():
                preds = meta_predictions(self.kb, ops, fits, targets[name], tasks.support_labels)
                for (method, lab), pred in preds.items():
                    if method in s.methods:
                        per[method_key(method, lab, k)][n][seed] = query_accuracies(tasks, pred.__getitem__)

    def embeddings(self, train, subset, seed: int, mode: str) -> np.ndarray:
        """Embeddings of the pool (and validation images, when scored) by the extractor of a label mode for this
        training subset and seed (trained once, then reused; with a shared cache, embedded once for all its runs)."""
        cached = (mode, tuple(int(i) for i in subset), seed)
        if self.embedding_cache is not None and cached in self.embedding_cache:
            return self.embedding_cache[cached]
        settings = mode_settings(self.emb_settings, mode)
        key = extractor_key(store_gram_key(self.store), subset, seed, settings)
        ckpt = extractor_dir(self.out, key)
        with held(self.out, ckpt):  # one run trains it, a second one on the same folder waits and reuses it
            write_extractor_key(ckpt, key)
            emb = pool_embeddings(self.images, train, settings, seed=seed, checkpoint_dir=ckpt,
                                  progress=self.s.progress)
        if self.embedding_cache is not None:
            self.embedding_cache[cached] = emb
        return emb

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
        it). With the results on an object store the workers write the tiles there (they need not see this host)."""
        s, path = self.s, phi_path(self.out, attrs)
        with held(self.out, path):
            prepare_phi(self.out, attrs, tasks, s.phi_tile_size)
            with self.shared(path) as target:
                run_tiles(target, name=ARRAY, source=PhiSource(self.store.path, tasks, self.phi_settings, s.max_bytes),
                          cpus=s.cpus, address=s.address, progress=s.progress)
        return read_phi(path)

    def hyperparameters(self, key: str) -> dict:
        """The settings a key's record ran with."""
        method, *rest = key.split("/")
        h = {} if method == "pixel_1nn" else dict(self.phi_settings, t_outer=str(float(self.s.t_outer)),
                                                  normalise_phi=self.s.normalise)
        if rest:
            h["labels"] = rest[0]
        if len(rest) > 1:
            h["augment"] = int(rest[1][1:])
        mode = "embedding" if method == "embedding_1nn" else rest[0] if rest else None
        if mode in EMBEDDING_MODES:
            h["embedding"] = asdict(mode_settings(self.emb_settings, mode))
        return h

    def records(self) -> dict:
        """{results.json name: method record} of every key, with the hyperparameters it ran with."""
        return {variant_name(key, self.s.conventions): method_record(self.counts, self.per[key], self.sizes,
                                                                     self.hyperparameters(key))
                for key in self.keys}


def query_accuracies(tasks, predict) -> list[float]:
    """[mean(predict(i) == query labels of task i)] over the tasks of a TaskSet."""
    return [float(np.mean(predict(i) == tasks.query_labels[i])) for i in range(tasks.n_tasks)]


def meta_fits(kb, tasks, phi, labels, emb, settings: dict, *, t_outer: float) -> tuple[list, dict]:
    """(TaskOps of the training tasks, {label mode: MNKFit}): alpha fitted on the training tasks' targets of each
    label mode (emb: {label mode: the pool's embeddings} of the embedding modes)."""
    ops = task_ops_list(kb, tasks, settings)
    fits = {}
    for lab in labels:
        train_ops = ops if lab == "onehot" else [embedding_targets(o, sl, ql, emb[lab], test=False) for o, sl, ql in
                                                 zip(ops, tasks.support_labels, tasks.query_labels)]
        fits[lab] = mnk.mnk_fit(train_ops, phi, ridge=settings["ridge"], t_outer=t_outer,
                                normalise_phi=settings["normalise_k"],
                                conventions=settings.get("conventions", "formulas"))
    return ops, fits


def meta_predictions(kb, ops, fits: dict, tests: dict, support_labels) -> dict:
    """{(method, label mode): predicted labels of each task} for MNK F = r_t + Phi(X_t, X_train) alpha and its
    meta term alone Phi(X_t, X_train) alpha (ops, fits: from meta_fits; tests: each label mode's TaskOps of the
    tasks to predict). Phi(X_t, X_train) is computed once per task, for every label mode, and not kept."""
    out = {(m, lab): [] for m in ("mnk", "meta_term") for lab in tests}
    any_fit = next(iter(fits.values()))  # Phi(X_t, X_train) and its normalisation do not depend on the labels
    for i, t in enumerate(next(iter(tests.values()))):
        phi_t = mnk.phi_test(kb, ops, t, any_fit)
        for lab, fit in fits.items():
            meta, tl = phi_t @ fit.alpha, tests[lab][i]
            out["mnk", lab].append(decode(tl.r_q + meta, tl, support_labels[i], lab))
            out["meta_term", lab].append(decode(meta, tl, support_labels[i], lab))
    return out
