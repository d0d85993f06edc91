"""Meta-test evaluation on a computed (read-only) Gram store: MNK and its ablations in both label modes, with and
without task augmentation, for nested subsets of the training tasks and several seeds."""

from dataclasses import asdict

import numpy as np
from tqdm import tqdm

from ..kernels import mnk
from ..pipeline.driver import run_tiles
from ..pipeline.ray_session import start_ray, stop_ray
from ..store import StoreError, open_store
from .augment import augment_tasks
from .derived import check_results_dir, claim_results_dir, held
from .labels import (LABEL_MODES, decode, embedding_settings, embedding_targets, extractor_dir, extractor_key,
                     pool_embeddings, write_extractor_key)
from .phi import (ARRAY, INF, PhiSource, kernel_reader, phi_attrs, phi_path, phi_settings, prepare_phi, read_phi,
                  task_ops_list)
from .protocol import check_counts, default_counts, subset_size, train_subsets
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


def evaluate(store_path, *, train_counts=None, seeds: int = 3, out=None, methods=KERNEL_METHODS, labels=("onehot",),
             augment=(1,), ridge: float = 1e-5, eta: float = INF, t_outer: float = INF, normalise: bool = True,
             conventions: str = "formulas", config=None, phi_tile_size: int = 256, max_bytes: float = 1e9,
             cpus: int | None = None, address: str | None = None, progress: bool = True) -> dict:
    """Accuracy on every test task of each method, label mode and augmentation K, per count of training tasks and
    seed; results.json (merged with what the same store's results folder holds) and its rendering in `out`."""
    methods, labels, augment = list(methods), list(labels), sorted(set(int(k) for k in augment))
    check_options(methods, labels, augment, seeds, ridge, eta, t_outer)
    if conventions not in mnk.CONVENTIONS or (conventions == "authors" and not normalise):
        raise ValueError(f"--conventions must be one of {', '.join(mnk.CONVENTIONS)} (authors with the cosine "
                         f"normalisations, not --no-normalise); got {conventions}")
    if conventions != "formulas":  # the other methods do not depend on the conventions: evaluated with the formulas
        methods = [m for m in methods if m in CONVENTION_METHODS]
    store = open_store(store_path)  # read-only: evaluate writes nothing into the store
    ep = store.episodes()
    check_complete(store)
    n_train = ep.train.n_tasks
    counts = check_counts(train_counts or default_counts(n_train), n_train)
    out = check_results_dir(results_dir(store.path, out), store.path)  # outside the store, made by mnkpipe
    results = results_header(store)
    merged(out / "results.json", results)  # refuses another store's results before any work
    claim_results_dir(out, store.path)
    emb_settings = embedding_settings(config) if "embedding" in labels else None

    settings = phi_settings(ridge, eta, normalise, conventions)
    kb, _ = kernel_reader(store, settings, max_bytes)
    test = ep.test
    test_ops = task_ops_list(kb, test, settings)
    images = store.images()
    hyper = dict(settings, t_outer=str(float(t_outer)), normalise_phi=normalise)
    meta_methods = [m for m in ("mnk", "meta_term") if m in methods]
    keys = ([method_key(m, lab, k) for m in meta_methods for lab in labels for k in augment]
            + [method_key("r_t", lab) for lab in labels if "r_t" in methods]
            + (["embedding_1nn"] if "embedding_1nn" in methods and "embedding" in labels else [])
            + (["pixel_1nn"] if "pixel_1nn" in methods else []))
    per = {key: {n: np.zeros((seeds, test.n_tasks)) for n in counts} for key in keys}
    sizes = {n: [] for n in counts}

    def score(key, n, s, predict):
        per[key][n][s] = [np.mean(predict(i) == test.query_labels[i]) for i in range(test.n_tasks)]

    pixel_acc = [np.mean(pixel_1nn(images, test.support[i], test.support_labels[i], test.query[i])
                         == test.query_labels[i]) for i in range(test.n_tasks)]
    started = start_ray(address, cpus=cpus) if meta_methods else False  # one Ray instance for all Phi arrays
    try:
        full_phi = None
        if meta_methods and 1 in augment:
            full_phi = _phi_train(store, out, settings, ep.train, phi_attrs(store, settings, 1), phi_tile_size,
                                  max_bytes, cpus, address, progress)
        offsets = np.cumsum([0] + [ep.train.query.shape[1]] * n_train)
        bar = tqdm(total=seeds * len(counts), desc="evaluate (count, seed)", disable=not progress)
        for s in range(seeds):
            for n, subset in train_subsets(n_train, counts, s).items():
                sizes[n].append(subset_size(ep.train, subset))
                train = ep.train.subset(subset)
                if "pixel_1nn" in keys:  # the same at every count and seed
                    per["pixel_1nn"][n][s] = pixel_acc
                emb = None
                if "embedding" in labels:
                    key = extractor_key(results["gram_key"], subset, s, emb_settings)
                    ckpt = extractor_dir(out, key)
                    with held(out, ckpt):  # one run trains it, a second one on the same folder waits and reuses it
                        write_extractor_key(ckpt, key)
                        emb = pool_embeddings(images, train, emb_settings, seed=s, checkpoint_dir=ckpt,
                                              progress=progress)
                tests = {"onehot": test_ops} if "onehot" in labels else {}
                if emb is not None:
                    tests["embedding"] = [embedding_targets(t, sl, ql, emb, test=True) for t, sl, ql in
                                          zip(test_ops, test.support_labels, test.query_labels)]
                    if "embedding_1nn" in keys:
                        score("embedding_1nn", n, s, lambda i: mnk.nearest_support(
                            emb[test.query[i]], emb[test.support[i]], test.support_labels[i]))
                for lab in labels:
                    if "r_t" in methods:
                        score(method_key("r_t", lab), n, s,
                              lambda i: decode(tests[lab][i].r_q, tests[lab][i], test.support_labels[i], lab))
                for k in augment if meta_methods else []:
                    if k == 1:
                        tasks = train
                        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in subset])
                        phi = full_phi[np.ix_(rows, rows)]
                    else:
                        tasks = augment_tasks(train, k, np.random.default_rng([s, k, *subset]))
                        phi = _phi_train(store, out, settings, tasks, phi_attrs(store, settings, k, subset, s),
                                         phi_tile_size, max_bytes, cpus, address, progress)
                    preds = meta_predictions(kb, tasks, phi, tests, test.support_labels, emb, settings,
                                             t_outer=t_outer)
                    for (method, lab), pred in preds.items():
                        if method in methods:
                            score(method_key(method, lab, k), n, s, pred.__getitem__)
                bar.update()
        bar.close()
    finally:
        if started:
            stop_ray()
    for key in keys:
        method, *rest = key.split("/")
        h = {} if method == "pixel_1nn" else dict(hyper)
        if rest:
            h["labels"] = rest[0]
        if len(rest) > 1:
            h["augment"] = int(rest[1][1:])
        if "embedding" in key and emb_settings is not None:
            h["embedding"] = asdict(emb_settings)
        name = key if conventions == "formulas" else f"{method}-{conventions}{key[len(method):]}"  # mnk-authors/...
        results["methods"][name] = method_record(counts, per[key], sizes, h)
    write_results(results, out)
    return results


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


def _phi_train(store, out, settings, tasks, attrs, tile_size, max_bytes, cpus, address, progress) -> np.ndarray:
    """Phi_train over the stacked queries of `tasks`, from its group under the results folder (created whole, its
    missing tiles computed by the Ray driver first, under the group's lock: a second run waits, then reads it)."""
    path = phi_path(out, attrs)
    with held(out, path):
        prepare_phi(out, attrs, tasks, tile_size)
        run_tiles(path, name=ARRAY, source=PhiSource(store.path, tasks, settings, max_bytes), cpus=cpus,
                  address=address, progress=progress)
    return read_phi(path)
