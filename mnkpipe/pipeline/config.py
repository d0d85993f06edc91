"""Experiment configuration: a TOML file with [data], [tasks], [kernel] and [compute] tables.

A config file must have [tasks] and [kernel] (what is computed); [data] and [compute] may be left out, then the
defaults below apply (Omniglot background -> evaluation, 28 x 28 padded to 32; tiles of 256, plan "mnk", float64).
[baselines] (read by `mnkpipe baselines`) and [embedding] (the label-embedding extractor, read by `mnkpipe
evaluate`) are optional tables that this module passes over.
"""

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path


OPTIONAL_TABLES = ("baselines", "embedding")  # read by `mnkpipe baselines` and `mnkpipe evaluate`
REQUIRED_TABLES = ("tasks", "kernel")          # a config file without them would run on defaults unnoticed
MAX_DEPTH = 1000                               # deeper CNTKs are numerically the same as depth 1000, and take days
MAX_IMAGE_SIZE = 1024                          # side of the images after resizing (and of the padding)


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file and key."""


@dataclass
class DataConfig:
    dataset: str = "omniglot"          # "omniglot" or "folder"
    root: str = ""                     # "" -> --data or $MNKPIPE_DATA
    train_split: str = "background"    # omniglot split, or a sub-folder of root for "folder"
    test_split: str = "evaluation"
    image_size: int = 28
    pad: int = 32


@dataclass
class TasksConfig:
    protocol: str = "episodes"         # "episodes" or "lake-runs" (the 20 official 20-way 1-shot runs as test tasks)
    way: int = 5
    shot: int = 1
    query: int = 19
    train_tasks: int = 8
    test_tasks: int = 20
    val_tasks: int = 10                # validation tasks for the baselines, from training-split classes unused by
                                       # train tasks
    train_classes: int = 0             # 0: all classes of the training split
    val_classes: int = 50
    seed: int = 0
    rotations: bool = False


@dataclass
class KernelConfig:
    name: str = "cntk"
    depth: int = 20
    gap: bool = True
    fix: bool = False


@dataclass
class ComputeConfig:
    tile_size: int = 256
    plan: str = "mnk"                  # "mnk": only the blocks MNK needs; "full": the whole upper triangle
    dtype: str = "float64"             # "float64" or "float32"


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ExperimentConfig":
        parts = {}
        for f in dataclasses.fields(cls):
            table = d.get(f.name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: [{f.name}] must be a table")
            parts[f.name] = section(f.default_factory, table, f"{where} [{f.name}]")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)} - set(OPTIONAL_TABLES)
        if unknown:
            raise ConfigError(f"{where}: unknown table(s) {sorted(unknown)}; expected [data], [tasks], [kernel], "
                              "[compute] and optionally [baselines], [embedding]")
        for name in OPTIONAL_TABLES:
            if name in d and not isinstance(d[name], dict):
                raise ConfigError(f"{where}: [{name}] must be a table")
        cfg = cls(**parts)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        """Raise ConfigError naming the first key out of its range (counts below their minimum are never
        reinterpreted: train_classes = 0 means all classes, a negative one is refused)."""
        d, t = self.data, self.tasks
        checks = [
            (d.dataset in ("omniglot", "folder"), "[data] dataset must be 'omniglot' or 'folder'"),
            (3 <= d.image_size <= MAX_IMAGE_SIZE, f"[data] image_size must be in [3, {MAX_IMAGE_SIZE}]"),
            (d.pad == 0 or d.image_size <= d.pad <= MAX_IMAGE_SIZE,
             f"[data] pad must be 0 (none) or in [image_size, {MAX_IMAGE_SIZE}]"),
            (t.protocol in ("episodes", "lake-runs"), "[tasks] protocol must be 'episodes' or 'lake-runs'"),
            (t.way >= 2, "[tasks] way must be >= 2"), (t.shot >= 1, "[tasks] shot must be >= 1"),
            (t.query >= 1, "[tasks] query must be >= 1"),
            (t.train_tasks >= 1, "[tasks] train_tasks must be >= 1"),
            (t.test_tasks >= 1, "[tasks] test_tasks must be >= 1"),
            (t.val_tasks >= 0, "[tasks] val_tasks must be >= 0"),
            (t.train_classes >= 0, "[tasks] train_classes must be >= 0 (0: all classes of the training split)"),
            (t.val_classes >= 0, "[tasks] val_classes must be >= 0"),
            (t.seed >= 0, "[tasks] seed must be >= 0"),
            (self.kernel.name == "cntk", "[kernel] name must be 'cntk' (the only base kernel so far)"),
            (2 <= self.kernel.depth <= MAX_DEPTH, f"[kernel] depth must be in [2, {MAX_DEPTH}]"),
            (self.compute.tile_size >= 1, "[compute] tile_size must be >= 1"),
            (self.compute.plan in ("mnk", "full"), "[compute] plan must be 'mnk' or 'full'"),
            (self.compute.dtype in ("float64", "float32"), "[compute] dtype must be 'float64' or 'float32'"),
        ]
        for ok, msg in checks:
            if not ok:
                key = msg.split(" must ")[0]
                value = getattr(getattr(self, key[1:key.index("]")]), key.split()[-1])
                raise ConfigError(f"{where}: {msg} (got {value!r})")


def section(factory, table: dict, where: str):
    obj = factory()
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(names)}")
        want = type(getattr(obj, key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key} = {value!r} should be of type {want.__name__}")
        setattr(obj, key, value)
    return obj


def read_table(config_path, name: str) -> tuple[dict, str]:
    """The [name] table of a TOML file ({} without a file or without the table) and where it came from, for errors."""
    if not config_path:
        return {}, f"[{name}]"
    try:
        with open(config_path, "rb") as f:
            table = tomllib.load(f).get(name, {})
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{config_path}: not valid TOML: {e}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{config_path}: [{name}] must be a table")
    return table, f"{config_path} [{name}]"


def load_config(path) -> ExperimentConfig:
    """Read and validate an experiment TOML file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    missing = [t for t in REQUIRED_TABLES if t not in d]
    if missing:
        raise ConfigError(f"{path}: missing table(s) {', '.join(f'[{t}]' for t in missing)}; a config must say "
                          "which tasks and which kernel to compute (see configs/smoke.toml)")
    return ExperimentConfig.from_dict(d, where=str(path))
