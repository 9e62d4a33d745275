"""A study file (TOML): shared run options, a grid of values (or several, ``[[grid]]``, whose
cells are joined, as scikit-learn's ParameterGrid takes a list of grids), and which cells to
keep."""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from medxfer.errors import MedxferError
from medxfer.families import build_options, family_of, option_names
from medxfer.models.factory import ModelSpec
from medxfer.models.weights import torchvision_weights
from medxfer.study.table import COLUMN_OF, EXPERIMENT, as_text


@dataclass
class Cell:
    name: str
    options: dict[str, Any]  # RunConfig fields except ``out``


@dataclass
class Study:
    name: str
    base: dict[str, Any]
    grids: list[dict[str, list[Any]]]
    skip_unavailable_weights: bool = False
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    compare: list[str] = field(default_factory=list)  # options compared besides ``mode``
    # experiment options of the reference every other experiment is also paired against
    baseline: dict[str, Any] = field(default_factory=dict)
    # local ImageNet weights per architecture ([study.weights]), for those with no standard
    # download here; scratch cells of that architecture ignore them
    weights: dict[str, str] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every combination of each grid over ``base``, in grid order, grid after grid."""
        cells, self.skipped = [], []
        for grid in self.grids:
            cells += self._cells_of(grid)
        names = [cell.name for cell in cells]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise MedxferError(f"{self.source}: the grids make the cell {twice!r} twice")
        return cells

    def _cells_of(self, grid: dict[str, list[Any]]) -> list[Cell]:
        keys, cells = list(grid), []
        for values in itertools.product(*(grid[k] for k in keys)):
            options = {**self.base, **dict(zip(keys, values, strict=True))}
            arch = options.get("arch", "mobilenet_v2")
            if arch in self.weights and "weights" not in options:
                options["weights"] = self.weights[arch]
            name = "-".join(_slug(k, v) for k, v in zip(keys, values, strict=True))
            if self.skip_unavailable_weights and not weights_available(options):
                self.skipped.append(name)
                continue
            cells.append(Cell(name, options))
        return cells


PATH_OPTIONS = ("data", "weights", "cache_dir")  # made absolute where cells run


def as_run(key: str, value: Any) -> Any:
    """``value`` of option ``key`` as a cell runs it: paths absolute (remote workers find them)."""
    return str(Path(value).expanduser().resolve()) if key in PATH_OPTIONS and value else value


OPTION_OF = {column: option for option, column in COLUMN_OF.items()}
PRESETS = ("paper", "paper-offline", "quick", "segmentation", "detection")


def load_study(
    source: str, overrides: list[str] | None = None, grid_overrides: list[str] | None = None
) -> Study:
    """A study from a preset name or a TOML path; ``overrides`` are ``key=value`` for base,
    ``grid_overrides`` ``key=v1,v2`` to replace (or add) a grid axis."""
    if source in PRESETS:
        text = resources.files("medxfer.study.presets").joinpath(f"{source}.toml").read_text()
    else:
        path = Path(source)
        if not path.is_file():
            raise MedxferError(f"{source}: no such study file (or preset: {', '.join(PRESETS)})")
        text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MedxferError(f"{source}: invalid TOML ({exc})") from None
    meta, base = raw.get("study", {}), dict(raw.get("base", {}))
    for key in ("track", "tracking_uri"):  # [study] track = "mlflow": every cell tracks
        if key in meta:
            base.setdefault(key, meta[key])
    for item in overrides or []:
        key, _, value = item.partition("=")
        base[key.strip().replace("-", "_")] = _parse_value(value.strip())
    grids = _grids(raw.get("grid", {}), grid_overrides or [], source)
    family = family_of(base)
    axes = [key for grid in grids for key in grid]
    compare = _compared(meta.get("compare", []), [*base, *axes], family, source)
    baseline = _baseline(meta.get("baseline", {}), source)
    for key in set.intersection(*(set(grid) for grid in grids)):
        base.pop(key, None)  # every cell takes it from a grid
    if "data" not in base:
        raise MedxferError(f"{source}: base.data is required")
    study = Study(
        meta.get("name", Path(source).stem),
        base,
        grids,
        bool(meta.get("skip_unavailable_weights", False)),
        source,
        compare=list(compare),
        baseline=baseline,
        weights=_weights_table(meta.get("weights", {}), source),
    )
    tasks = [t for grid in grids for t in grid.get("task", [])]
    if any(family_of({"task": t}) != family for t in tasks):
        raise MedxferError(f"{source}: one study trains one kind of run (task {tasks})")
    cells = study.cells()
    built = [build_options({**cell.options, "out": "-"}) for cell in cells]
    _check_distinct(cells, built, source)
    if baseline:  # validate every cell, and the baseline, before anything runs
        _check_baseline(baseline, cells[0].options, built, source)
    return study


def _grids(raw: Any, overrides: list[str], source: str) -> list[dict[str, list[Any]]]:
    """``[grid]`` as a list of one grid, ``[[grid]]`` as it is; each ``key=v1,v2`` override
    replaces (or adds) that axis in every grid."""
    grids = raw if isinstance(raw, list) else [raw]
    if not grids or not all(isinstance(g, dict) and g for g in grids):
        raise MedxferError(f"{source}: grid must be a table ([grid]) or tables ([[grid]]) of axes")
    grids = [dict(g) for g in grids]
    for item in overrides:
        key, _, values = item.partition("=")
        axis = [_parse_value(v.strip()) for v in values.split(",")]
        for grid in grids:
            grid[key.strip().replace("-", "_")] = axis
    for grid in grids:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise MedxferError(f"{source}: grid.{key} must be a non-empty list")
    return grids


def _baseline(raw: Any, source: str) -> dict[str, Any]:
    """``[study.baseline]``: the options of the reference experiment (e.g. the paper's protocol)."""
    if not isinstance(raw, dict) or any(isinstance(v, list | dict) for v in raw.values()):
        raise MedxferError(f"{source}: study.baseline must map run options to single values")
    baseline = {COLUMN_OF.get(k, k): v for k, v in raw.items()}
    for key in baseline:
        if key not in EXPERIMENT:
            raise MedxferError(f"{source}: study.baseline {key!r}: not an experiment option")
        baseline[key] = as_run(key, baseline[key])  # as the cells run them
    return baseline


def _check_distinct(cells: list[Cell], built: list, source: str) -> None:
    """No two cells run the same options (defaults filled in), whatever their names."""
    seen: dict[str, str] = {}
    for cell, config in zip(cells, built, strict=True):
        first = seen.setdefault(repr(config), cell.name)
        if first != cell.name:
            raise MedxferError(f"{source}: cells {first!r} and {cell.name!r} run the same options")


def _check_baseline(baseline: dict, options: dict, built: list, source: str) -> None:
    """The baseline's values are valid run options and some cell of the study has them all
    (compared as the results table holds them: ``threshold_rule`` is the config's rule)."""
    build_options({**options, **{OPTION_OF.get(k, k): v for k, v in baseline.items()}, "out": "-"})

    def value(config, key: str) -> str:
        return as_text(as_run(key, getattr(config, key)))

    if not any(all(value(c, k) == as_text(v) for k, v in baseline.items()) for c in built):
        shown = ", ".join(f"{OPTION_OF.get(k, k)}={v}" for k, v in baseline.items())
        raise MedxferError(f"{source}: study.baseline ({shown}) is none of the study's cells")


def _compared(compare: Any, used: list[str], family: str, source: str) -> list[str]:
    """The options ``[study] compare`` names (as table columns), after checking them and
    every option the study sets against ``family``'s."""
    known = option_names(family) - {"out"}
    if not isinstance(compare, list):
        raise MedxferError(f"{source}: study.compare must be a list of run options")
    for key in [*used, *compare]:
        if key not in known:
            raise MedxferError(f"{source}: {key!r} is not a {family} run option")
    compare = [COLUMN_OF.get(key, key) for key in compare]
    for key in compare:
        if key not in EXPERIMENT:
            raise MedxferError(
                f"{source}: study.compare {key!r}: not an option that defines an experiment"
                " (seeds and folds are replicates; paths and devices change nothing)"
            )
    return compare


def weights_available(options: dict[str, Any]) -> bool:
    """Whether a pretrained cell can get its weights here without a download."""
    spec = ModelSpec(
        options.get("arch", "mobilenet_v2"),
        options.get("mode", "transfer"),
        weights=options.get("weights"),
    )
    if not spec.pretrained or spec.weights:
        return True
    if spec.arch.startswith("timm/"):
        return False
    weights = torchvision_weights(spec.arch, options.get("weights_tag", "IMAGENET1K_V1"))
    return weights is not None and weights.cached_path.exists()


def _slug(key: str, value: Any) -> str:
    text = str(value).replace("/", "_")
    short = {"arch": "", "mode": "", "lr": "lr", "seed": "s"}.get(key, f"{key}=")
    return f"{short}{text}"


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _weights_table(table: Any, source: str) -> dict[str, str]:
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise MedxferError(f"{source}: study.weights must map architecture names to files")
    for arch, path in table.items():
        if not Path(path).is_file():
            raise MedxferError(f"{path}: weights file for {arch} (study.weights) not found")
    return dict(table)
