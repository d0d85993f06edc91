"""Properties of the pure tile planning against brute-force tables: plan_mnk covers exactly the entries the MNK
reads (docs/math.md eq. (12)), symmetric_block equals dense indexing, tile_pairs equals a count of entries."""

import numpy as np
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.storage import MemoryStore

from mnkpipe.pipeline.plan import plan_full, plan_mnk
from mnkpipe.store import n_blocks
from mnkpipe.store import TiledArray, add_tiled_array, symmetric_block

FAST = settings(max_examples=50, deadline=None, database=None)  # a few seconds; no example database on disk


# -- brute force ---------------------------------------------------------------------------------------------------
def tiles_met(mask: np.ndarray, t: int) -> np.ndarray:
    """Upper-triangle tiles (bi <= bj) that hold at least one True entry of the symmetric n x n mask."""
    nb = n_blocks(len(mask), t)
    met = np.zeros((nb, nb), bool)
    for i, j in np.argwhere(mask):
        met[min(i, j) // t, max(i, j) // t] = True
    return met


def needed_entries(n: int, n_train: int, tasks) -> np.ndarray:
    """The entries (i, j) the MNK reads, docs/math.md eq. (12): train x all, all x train, the diagonal, and within
    each test task (support + query) x support and its mirror."""
    need = np.eye(n, dtype=bool)
    need[:n_train, :] = need[:, :n_train] = True
    for s, q in tasks:
        both = np.concatenate([s, q])
        need[np.ix_(both, s)] = need[np.ix_(s, both)] = True
    return need


def task_squares(n: int, n_train: int, tasks) -> np.ndarray:
    """The entries plan_mnk promises: train x all, all x train, and each test task's images with themselves."""
    promised = np.zeros((n, n), bool)
    promised[:n_train, :] = promised[:, :n_train] = True
    for s, q in tasks:
        both = np.concatenate([s, q])
        promised[np.ix_(both, both)] = True
    return promised


def expand(plan: np.ndarray, n: int, t: int) -> np.ndarray:
    """The n x n upper-triangle entries (i <= j) that the planned tiles compute."""
    dense = np.kron(plan, np.ones((t, t), bool))[:n, :n]
    return np.triu(dense | dense.T)


# -- layouts -------------------------------------------------------------------------------------------------------
@st.composite
def layouts(draw):
    """(n, tile_size, n_train, tasks): training images first, then the test tasks' images, as in the store's pool;
    each test task a support set and a query set of test images (tasks may share images, as independently sampled
    tasks can), and every test image in some task."""
    n_train = draw(st.integers(0, 20))
    pool = draw(st.integers(1, 25))
    t = draw(st.integers(1, 12))
    tasks = []
    for _ in range(draw(st.integers(0 if n_train else 1, 4))):
        k = draw(st.integers(1, min(pool, 9)))
        chosen = draw(st.permutations(range(pool)))[:k]
        n_s = draw(st.integers(1, k))
        tasks.append((chosen[:n_s], chosen[n_s:]))
    used = sorted({i for s, q in tasks for i in s + q})
    place = {old: n_train + new for new, old in enumerate(used)}
    tasks = [(np.array([place[i] for i in s], np.int64), np.array([place[i] for i in q], np.int64)) for s, q in tasks]
    return n_train + len(used), t, n_train, tasks


def plan_of(n, t, n_train, tasks) -> np.ndarray:
    return plan_mnk(n, t, n_train, [np.concatenate([s, q]) for s, q in tasks])


# -- plan_mnk ------------------------------------------------------------------------------------------------------
@FAST
@given(layouts())
def test_plan_mnk_is_the_tiles_of_train_rows_and_task_squares(layout):
    n, t, n_train, tasks = layout
    assert np.array_equal(plan_of(n, t, n_train, tasks), tiles_met(task_squares(n, n_train, tasks), t))


@FAST
@given(layouts())
def test_plan_mnk_leaves_no_needed_entry_uncovered(layout):
    n, t, n_train, tasks = layout
    need = needed_entries(n, n_train, tasks)
    covered = expand(plan_of(n, t, n_train, tasks), n, t)
    assert not (np.triu(need) & ~covered).any()


@FAST
@given(layouts())
def test_plan_mnk_adds_only_tiles_of_one_tasks_query_pairs(layout):
    """A planned tile that holds no needed entry is there for query x query entries of a test task, off the
    diagonal: the only part of a task's square that eq. (12) does not read."""
    n, t, n_train, tasks = layout
    extra = plan_of(n, t, n_train, tasks) & ~tiles_met(needed_entries(n, n_train, tasks), t)
    query_pairs = np.zeros((n, n), bool)
    for _, q in tasks:
        query_pairs[np.ix_(q, q)] = True
    np.fill_diagonal(query_pairs, False)
    assert not (extra & ~tiles_met(query_pairs, t)).any()


def test_plan_mnk_covers_more_than_needed_when_a_tile_pair_holds_only_queries():
    """One test task with one support image (4) and three queries (5, 6, 7), one image per tile: the tiles (5, 6),
    (5, 7), (6, 7) are planned though eq. (12) reads none of them."""
    tasks = [(np.array([4]), np.array([5, 6, 7]))]
    plan = plan_of(8, 1, 4, tasks)
    need = tiles_met(needed_entries(8, 4, tasks), 1)
    assert {tuple(int(v) for v in ij) for ij in np.argwhere(plan & ~need)} == {(5, 6), (5, 7), (6, 7)}


def test_plan_mnk_needs_nothing_more_when_a_tile_holds_a_whole_task():
    """The usual layout (a task's images contiguous, supports first, tiles larger than a task) adds no tile."""
    tasks = [(np.arange(10 + 12 * k, 13 + 12 * k), np.arange(13 + 12 * k, 22 + 12 * k)) for k in range(3)]
    plan = plan_of(46, 16, 10, tasks)
    assert np.array_equal(plan, tiles_met(needed_entries(46, 10, tasks), 16))


@FAST
@given(st.integers(1, 40), st.integers(1, 12))
def test_plan_full_is_every_upper_tile(n, t):
    assert np.array_equal(expand(plan_full(n, t), n, t), np.triu(np.ones((n, n), bool)))


# -- symmetric_block -----------------------------------------------------------------------------------------------
@st.composite
def block_requests(draw):
    """(m, t, rows, cols): a random symmetric matrix, a tile size, and index arrays (unsorted, repeated, empty)."""
    n = draw(st.integers(1, 30))
    t = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    a = np.random.default_rng(seed).standard_normal((n, n))
    index = st.lists(st.integers(0, n - 1), max_size=15).map(lambda v: np.array(v, np.int64))
    return a + a.T, t, draw(index), draw(index)


@FAST
@given(block_requests())
def test_symmetric_block_equals_dense_indexing(request):
    m, t, rows, cols = request
    calls = []

    def upper_tile(bi, bj):
        calls.append((bi, bj))
        assert bi <= bj, "only upper tiles are stored"
        return m[bi * t:(bi + 1) * t, bj * t:(bj + 1) * t]

    assert np.array_equal(symmetric_block(rows, cols, t, upper_tile), m[np.ix_(rows, cols)])
    wanted = {(min(i // t, j // t), max(i // t, j // t)) for i in rows for j in cols}
    assert set(calls) <= wanted


# -- tile_pairs ----------------------------------------------------------------------------------------------------
def tiled(n: int, t: int, plan: np.ndarray) -> TiledArray:
    root = zarr.open_group(MemoryStore(), mode="w")
    add_tiled_array(root, "gram", n, t, "float32", plan)
    return TiledArray("memory", "gram", group=root)


@FAST
@given(st.integers(1, 40), st.integers(1, 12))
def test_tile_pairs_counts_the_upper_triangle_entries_of_each_tile(n, t):
    arr = tiled(n, t, plan_full(n, t))
    for bi in range(arr.n_blocks):
        for bj in range(bi, arr.n_blocks):
            i, j = np.meshgrid(np.arange(n)[arr.block_range(bi)], np.arange(n)[arr.block_range(bj)], indexing="ij")
            assert arr.tile_pairs(bi, bj) == int((i <= j).sum())


@FAST
@given(layouts())
def test_tile_pairs_summed_over_a_plan_counts_its_entries(layout):
    n, t, n_train, tasks = layout
    plan = plan_of(n, t, n_train, tasks)
    arr = tiled(n, t, plan)
    assert sum(arr.tile_pairs(*tile) for tile in arr.planned_tiles()) == int(expand(plan, n, t).sum())
