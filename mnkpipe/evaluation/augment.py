"""Task augmentation (docs/math.md sec. 2.3): the same images of the same classes, dealt into new way-way tasks."""

import numpy as np

from ..data import TaskSet


def augment_tasks(tasks: TaskSet, k: int, rng: np.random.Generator, max_tries: int = 1000) -> TaskSet:
    """The tasks, then k - 1 random re-partitions of their class slots into way-way tasks, each slot's images
    re-split into shot support and the rest query: k x T tasks on the same images (no new kernel entries).

    A class slot is one class of one task with its shot + query images; a partition never puts two slots of the
    same class (a class drawn by two tasks) into one task.
    """
    if k < 1:
        raise ValueError(f"--augment must be >= 1; got {k}")
    way, shot, n_q = tasks.way, tasks.shot, tasks.n_query
    t = tasks.n_tasks
    slot_class = tasks.classes.reshape(-1)  # slot (task i, label c) -> global class
    slot_images = np.concatenate([_by_label(tasks.support, tasks.support_labels, way, shot),
                                  _by_label(tasks.query, tasks.query_labels, way, n_q)], axis=2).reshape(t * way, -1)
    if len(np.unique(slot_class)) < way:
        raise ValueError(f"the tasks hold only {len(np.unique(slot_class))} distinct classes: too few to re-partition "
                         f"into {way}-way tasks")
    parts = [tasks]
    for _ in range(k - 1):
        for _ in range(max_tries):
            order = rng.permutation(t * way).reshape(t, way)
            if all(len(np.unique(slot_class[o])) == way for o in order):
                break
        else:
            raise ValueError(f"found no re-partition without a repeated class in {max_tries} tries")
        imgs = rng.permuted(slot_images[order], axis=2)  # (t, way, shot + query): a new split of each slot
        labels = np.broadcast_to(np.arange(way)[None, :, None], imgs.shape)
        parts.append(TaskSet(imgs[:, :, :shot].reshape(t, -1), labels[:, :, :shot].reshape(t, -1),
                             imgs[:, :, shot:].reshape(t, -1), labels[:, :, shot:].reshape(t, -1),
                             slot_class[order]))
    return TaskSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("support", "support_labels", "query", "query_labels", "classes")))


def _by_label(idx: np.ndarray, labels: np.ndarray, way: int, per: int) -> np.ndarray:
    """(tasks, way, per) image indices of each task's class c = 0 .. way-1, from (tasks, way * per) arrays."""
    order = np.argsort(labels, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).reshape(len(idx), way, per)
