"""The mnkpipe command line: thin click wrappers around the Python API."""

import json
import logging
import signal
import sys
import threading
import warnings
from contextlib import contextmanager

import click

INTERRUPTED = "finished tiles are kept; rerun the same command to resume"
OUT_HELP = ("Results folder, or s3://BUCKET/PREFIX [default: <store>-results, on the same object store for a store "
            "on S3].")


def _fail(e: Exception):
    raise click.ClickException(str(e))


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that locks and Ray are released on the way out."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _api(call):
    """Run call() for a command: its errors become one clear message (exit 1)."""
    try:
        return call()
    except (ValueError, RuntimeError, OSError) as e:
        _fail(e)


class _StoreFolder(click.Path):
    """--store: store.store_location (`~` expanded; system folders and unsupported URL schemes refused), then click's
    path checks for a folder; an s3://BUCKET/PREFIX passes as its URL (the store itself says whether it is there)."""

    def __init__(self, exists: bool = False):
        super().__init__(exists=exists, file_okay=False)

    def convert(self, value, param, ctx):
        from .store.paths import store_location
        try:
            place = store_location(value)
        except RuntimeError as e:  # StoreError: an unsupported URL scheme, a system folder
            self.fail(str(e), param, ctx)
        return place if isinstance(place, str) else super().convert(str(place), param, ctx)


def _quiet_teardown():
    """Silence what the event loops of Ray and zarr say while the interpreter exits after a command: Ray's loop, cut
    off mid-start, logs "Task was destroyed but it is pending!" for each of its tasks; a zarr call cut off before its
    coroutine ran warns that it was never awaited; a zarr task still running when the thread pools shut down logs
    "Task exception was never retrieved" with a traceback. That is teardown, not news: the command has said its
    line."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _stop(message: str, code: int):
    """The one line of a stop, teardown silenced first."""
    _quiet_teardown()
    click.echo(f"\n{message}: {INTERRUPTED}.", err=True)
    raise click.exceptions.Exit(code)


class _Commands(click.Group):
    """The command group: Ctrl-C exits 130 and SIGTERM 143 at any moment of any command, each with a one-line
    message and no traceback, after the store's lock and Ray were released on the way out."""

    def main(self, *args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return super().main(*args, **kwargs)
        finally:
            _quiet_teardown()
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    def make_context(self, *args, **kwargs):  # the group's own arguments are parsed outside any command
        with _stops():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _stops():
            return super().invoke(ctx)


@contextmanager
def _stops():
    """Ctrl-C and SIGTERM inside the block: the one-line stop with exit 130 / 143."""
    try:
        yield
    except KeyboardInterrupt:
        _stop("Interrupted (Ctrl-C)", 130)
    except _Terminated:
        _stop("Stopped (SIGTERM)", 143)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mnkpipe")
def main():
    """CNTK and Meta Neural Kernel Gram matrices at scale, and meta-test evaluation with them.

    \b
    Typical flow:
      mnkpipe compute-kernel --config configs/smoke.toml --store runs/smoke.zarr
      mnkpipe status runs/smoke.zarr
      mnkpipe evaluate --store runs/smoke.zarr
    Data is found through --data, else $MNKPIPE_DATA, else ~/.cache/mnkpipe/omniglot (where `mnkpipe data download`
    puts the Omniglot zips).
    """


# -- data ------------------------------------------------------------------------------------------------------
@main.group()
def data():
    """Omniglot data: download it, or show what is there."""


@data.command("info")
@click.option("--data", "root", help="Data folder (default: $MNKPIPE_DATA, else ~/.cache/mnkpipe/omniglot).")
def data_info(root):
    """Omniglot: alphabets, characters and images per split. A class-folder dataset: classes and images per split."""
    from .data import DataError, dataset_info, resolve_data_root
    try:
        rows = dataset_info(resolve_data_root(root))
    except DataError as e:
        _fail(e)
    groups, classes = ("alphabets", "characters") if rows[0]["kind"] == "omniglot" else ("groups", "classes")
    click.echo(f"{'split':<22}{groups:>10}{classes:>12}{'images':>9}  source")
    for r in rows:
        click.echo(f"{r['split']:<22}{r['groups']:>10}{r['classes']:>12}{r['images']:>9}  {r['source']}")


@data.command("download")
@click.option("--root", help="Where to put the zips (default: $MNKPIPE_DATA, else ~/.cache/mnkpipe/omniglot).")
def data_download(root):
    """Fetch the official Omniglot zips from the dataset's public GitHub location."""
    from .data import DataError, default_data_root, download_omniglot
    try:
        for p in download_omniglot(root or default_data_root()):
            click.echo(str(p))
    except DataError as e:
        _fail(e)


# -- kernel ------------------------------------------------------------------------------------------------------
@main.command("gram")
@click.option("--data", help="Omniglot folder (default: $MNKPIPE_DATA, else ~/.cache/mnkpipe/omniglot).")
@click.option("--n", default=8, show_default=True, type=click.IntRange(min=1),
              help="Number of evaluation-split images.")
@click.option("--depth", default=10, show_default=True, type=click.IntRange(min=2, max=1000),
              help="CNTK depth (depth - 1 conv layers).")
@click.option("--size", default=28, show_default=True, type=click.IntRange(min=3),
              help="Image size after resizing (then padded by 4).")
@click.option("--backend", default="auto", show_default=True, help="auto, cpu, reference or cupy.")
def gram_cmd(data, n, depth, size, backend):
    """Print the CNTK Gram of a few real Omniglot images, with its timing: a quick look at the kernel."""
    from .pipeline.quicklook import omniglot_gram
    try:
        r = omniglot_gram(data, n=n, depth=depth, size=size, backend=backend)
    except (ValueError, RuntimeError, OSError) as e:
        _fail(e)
    click.echo(f"CNTK Gram (depth {depth}, GAP, {size}x{size} padded to {size + 4}x{size + 4}, backend "
               f"{r['backend']}) of {n} Omniglot images:")
    for name in r["names"]:
        click.echo(f"  {name}")
    with __import__("numpy").printoptions(precision=4, suppress=True, linewidth=120):
        click.echo(r["cosine"])
    click.echo(f"(cosine-normalised K_ij / sqrt(K_ii K_jj); raw diagonal mean {r['diag_mean']:.4g})")
    click.echo(f"{r['pairs']} pairs in {r['seconds']:.2f} s = {r['pairs'] / r['seconds']:.1f} pairs/s "
               f"(first call includes numba's compile or cache load)")


@main.command("compute-kernel")
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False), help="Experiment TOML (configs/).")
@click.option("--store", required=True, type=_StoreFolder(),
              help="Zarr store to create or resume: a folder, or s3://BUCKET/PREFIX (AWS_* variables).")
@click.option("--data", help="Data root (default: $MNKPIPE_DATA, else ~/.cache/mnkpipe/omniglot).")
@click.option("--gpus", default=0, show_default=True, type=click.IntRange(min=0),
              help="GPU workers (one cupy actor per GPU).")
@click.option("--cpus", type=click.IntRange(min=1),
              help="CPU workers, one core each [default: all cores of the Ray cluster].")
@click.option("--address", help="Join a Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: a local instance).")
@click.option("--tile-size", type=click.IntRange(min=1),
              help="Override [compute] tile_size (must match an existing store).")
@click.option("--break-lock", is_flag=True, help="Take over a store whose lock is held by a driver known to be dead.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def compute_kernel_cmd(config, store, data, gpus, cpus, address, tile_size, break_lock, no_progress):
    """Compute the CNTK Gram of an experiment into a tiled Zarr store.

    Rerunning the same command resumes: only missing tiles are computed. A store made from a different config or
    data is refused, and a store being computed by another driver is refused.
    """
    from .pipeline.driver import compute_kernel
    s = _api(lambda: compute_kernel(config, store, data=data, gpus=gpus, cpus=cpus, address=address,
                                    tile_size=tile_size, progress=not no_progress, break_lock=break_lock))
    rate = s["pairs_computed"] / s["seconds"] if s["seconds"] else 0
    click.echo(f"{s['tiles_computed']} tiles computed, {s['tiles_skipped']} already done, "
               f"{s['pairs_computed']:,} pairs in {s['seconds']:.1f} s ({rate:,.0f} pairs/s) -> {store}")


@main.command("status")
@click.argument("store", type=_StoreFolder(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_cmd(store, as_json):
    """Tiles and pairs done, rate, ETA and the workers last seen."""
    from .pipeline.inspect import format_status, store_status
    try:
        s = store_status(store)
    except (ValueError, RuntimeError, OSError) as e:
        _fail(e)
    click.echo(json.dumps(s, indent=1, default=str) if as_json else format_status(s))


@main.command("verify")
@click.argument("store", type=_StoreFolder(exists=True))
@click.option("--repair", is_flag=True,
              help="Recompute bad tiles (takes the store's lock; local Ray unless --address).")
@click.option("--cpus", type=click.IntRange(min=1), help="CPU workers for --repair.")
@click.option("--gpus", default=0, show_default=True, type=click.IntRange(min=0),
              help="GPU workers for --repair (for a store computed with --gpus).")
@click.option("--address", help="Ray cluster for --repair.")
def verify_cmd(store, repair, cpus, gpus, address):
    """Check the input arrays, the plan, and every done tile's checksum, finiteness and (diagonal tiles) symmetry.
    Without --repair it only reads (no lock), so it can run while a driver computes the store."""
    from .pipeline.driver import repair_store
    from .pipeline.inspect import verify_store

    def verify_and_repair():
        r = repair_store(store, gpus=gpus, cpus=cpus, address=address) if repair else verify_store(store)
        for note in r.get("notes", []):
            click.echo(f"note: {note}")
        for b in r["bad"]:
            click.echo(f"BAD tile {b['tile']}: {b['problem']}")
        click.echo(f"{r['checked']} done tiles checked, {len(r['bad'])} bad")
        if repair:
            click.echo(f"repaired: {r['tiles_recomputed']} tiles recomputed")
        return r

    r = _api(verify_and_repair)
    if r["bad"] and not repair:
        sys.exit(1)


# -- evaluation --------------------------------------------------------------------------------------------------
def _int_list(ctx, param, text):
    """A comma-separated list of integers ("1,2,4"), or None when the option is not given."""
    if text is None:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def _finite_non_negative(ctx, param, value):
    """A real option that must be finite and >= 0 (nan, inf and negative values are refused, naming the option)."""
    if not 0 <= value < float("inf"):
        raise click.BadParameter(f"must be finite and >= 0; got {value}")
    return value


def _ridge_list(ctx, param, text):
    """A comma-separated list of finite ridges > 0 ("1e-6,1e-4,1e-2"), or () when the option is not given."""
    if text is None:
        return ()
    try:
        values = [float(c) for c in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0 < v < float("inf") for v in values):
        raise click.BadParameter(f"every ridge must be finite and > 0; got {text}")
    return tuple(values)


def _name_list(ctx, param, text):
    """A comma-separated list of names, or None when the option is not given."""
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def _show_results(store, out):
    from .evaluation.mirror import local_copy, results_location
    loc = results_location(store, out)
    click.echo((local_copy(loc) / "results.md").read_text())
    click.echo(f"-> {loc.url}")


@main.command("evaluate")
@click.option("--store", required=True, type=_StoreFolder(exists=True),
              help="A computed store: a folder, or s3://BUCKET/PREFIX (read only; AWS_* variables).")
@click.option("--train-tasks", callback=_int_list,
              help="Comma-separated numbers of training tasks [default: 1,2,4,... all].")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Random nested training subsets per count.")
@click.option("--out", type=click.Path(file_okay=False), help=OUT_HELP)
@click.option("--methods", default="mnk,meta_term,r_t,embedding_1nn,pixel_1nn", show_default=True,
              callback=_name_list, help="Kernel methods and ablations to run.")
@click.option("--labels", default="onehot", show_default=True, callback=_name_list,
              help="Label mode(s), comma-separated: onehot, embedding (the [embedding] extractor, trained), "
                   "random_embedding (the same extractor untrained) (docs/math.md sec. 2.3).")
@click.option("--augment", default="1", show_default=True, callback=_int_list,
              help="Task augmentation K (comma-separated for several): the tasks plus K-1 re-partitions of their "
                   "classes.")
@click.option("--config", type=click.Path(dir_okay=False),
              help="TOML whose [embedding] table sets the feature extractor [default: reference values].")
@click.option("--ridge", default=1e-5, show_default=True, type=float, callback=_finite_non_negative,
              help="Ridge on base and meta kernels.")
@click.option("--ridge-grid", callback=_ridge_list,
              help="Comma-separated ridges: also choose the ridge of mnk, meta_term and r_t per count and seed on "
                   "the store's validation tasks (rows <method>-valridge; docs/math.md sec. 2.5).")
@click.option("--eta", default="inf", show_default=True, type=float,
              help="Inner-loop time (lr x steps); inf = converged.")
@click.option("--t-outer", default="inf", show_default=True, type=float, help="Outer-loop time; inf = converged.")
@click.option("--no-normalise", is_flag=True, help="No cosine normalisation of K and Phi.")
@click.option("--conventions", default="formulas", show_default=True,
              help="formulas (docs/math.md), or authors: the authors' code's placement of the ridge "
                   "(docs/conventions.md); rows mnk-authors, meta_term-authors, r_t-authors.")
@click.option("--phi-tile-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Tile size of the meta-kernel arrays.")
@click.option("--cpus", type=click.IntRange(min=1), help="CPU workers for the meta-kernel tiles.")
@click.option("--address", help="Ray cluster for the meta-kernel tiles.")
@click.option("--no-progress", is_flag=True)
def evaluate_cmd(store, train_tasks, seeds, out, methods, labels, augment, config, ridge, ridge_grid, eta, t_outer,
                 no_normalise, conventions, phi_tile_size, cpus, address, no_progress):
    """Meta-test accuracy vs number of training tasks: MNK and its ablations (meta term alone, r_t, embedding
    1-NN, pixel 1-NN), in one or more label modes, with and without task augmentation.

    Never writes into the store (it may be read-only): the meta-kernel arrays and the extractors' checkpoints live
    under the results folder, keyed by their settings, so a rerun or a sweep reuses them. Writes results.json,
    results.csv, results.md and accuracy.png there. For a store on S3 the results folder is <store>-results on the
    same object store (worked on through a local copy under $MNKPIPE_CACHE; docs/cluster.md), or a local --out.
    """
    from .evaluation.evaluate import EvaluateSettings, evaluate
    _api(lambda: evaluate(store, EvaluateSettings(
        train_counts=train_tasks, seeds=seeds, out=out, methods=methods, labels=labels, augment=augment, config=config,
        ridge=ridge, ridge_grid=ridge_grid, eta=eta, t_outer=t_outer, normalise=not no_normalise,
        conventions=conventions, phi_tile_size=phi_tile_size, cpus=cpus, address=address, progress=not no_progress)))
    _show_results(store, out)


@main.command("baselines")
@click.option("--store", required=True, type=_StoreFolder(exists=True),
              help="The store (a folder or s3://BUCKET/PREFIX) whose episodes (same training subsets, same test "
                   "tasks) the baselines use.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="TOML with a [baselines] table.")
@click.option("--train-tasks", callback=_int_list,
              help="Comma-separated numbers of training tasks [default: 1,2,4,... all].")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Seeds (training subsets) per count.")
@click.option("--methods", default="maml,imaml", show_default=True, callback=_name_list)
@click.option("--meta-steps", type=click.IntRange(min=1), help="Override meta-training steps.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Torch device; auto picks CUDA when torch sees one.")
@click.option("--out", type=click.Path(file_okay=False), help=OUT_HELP)
@click.option("--no-progress", is_flag=True)
def baselines_cmd(store, config, train_tasks, seeds, methods, meta_steps, device, out, no_progress):
    """MAML and iMAML on the store's episodes, checkpoints selected on validation tasks (never on test tasks).

    Resumable: checkpoints live in <results>/checkpoints, keyed by the store's fingerprint and the settings.
    Results join results.json beside the kernel methods (refused if it belongs to another store).
    """
    from .evaluation.baselines_run import baseline_settings, run_baselines
    try:
        settings = baseline_settings(config, meta_steps=meta_steps)
        run_baselines(store, methods=methods, train_counts=train_tasks, seeds=seeds,
                      settings=settings, out=out, progress=not no_progress, device=device)
    except (ValueError, RuntimeError, OSError) as e:
        _fail(e)
    _show_results(store, out)


@main.command("report")
@click.option("--store", type=_StoreFolder(), help="Store whose results to render (a folder or s3://...).")
@click.option("--out", type=click.Path(file_okay=False), help=OUT_HELP)
@click.option("--x", "x", default="tasks", show_default=True, type=click.Choice(["tasks", "characters"]),
              help="x-axis of the figure: training tasks or training characters (classes).")
@click.option("--plot-methods", callback=_name_list,
              help="Comma-separated results.json keys to draw in the figure [default: all; the tables hold all].")
def report_cmd(store, out, x, plot_methods):
    """Render results.json (all methods) as results.md, results.csv and accuracy.png, and print the table."""
    from .evaluation.report import report
    if not (store or out):
        raise click.UsageError("give --store or --out")
    paths = _api(lambda: report(store, out, x=x, plot_methods=plot_methods))
    click.echo(paths["md"].read_text())
    click.echo(f"figure: {paths['where']}/accuracy.png")


if __name__ == "__main__":
    main()
