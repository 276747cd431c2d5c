"""Study configuration: validated once at the edge (pydantic), immutable afterwards.

A bad config raises :class:`ConfigError` whose message is one line naming the field path and what
is allowed; the CLI turns it into exit code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

import searchspace
from automl._constraints import Constraints
from automl._data import DATASETS, FACTORY, resolve_augment
from automl._latency import LatencySettings
from automl._metrics import DEFAULT_DIRECTION, OBJECTIVE_METRICS, ObjectiveName
from automl._models import LIBRARIES, check_model_name, list_models
from automl._pareto import DEFAULT_MAX_DROP
from automl._weights import check_weights
from automl._plugins import import_plugins

__all__ = ["ConfigError", "StudyConfig", "load_config"]


class ConfigError(ValueError):
    """A study config broke a rule; ``str(err)`` is one line: ``<field>: <rule>, got <value>``."""


def check_reference(reference: str) -> None:
    """Import a ``module:function`` reference; raise ``ValueError`` (one line) when it cannot be used."""
    module, _, function = reference.partition(":")
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a bad config
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"module {module!r} cannot be imported ({type(exc).__name__}: {text}); it is looked up in "
            "the config's folder, the current folder, python_path and the installed packages"
        ) from None
    if not callable(getattr(mod, function, None)):
        public = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"module {module!r} has no function {function!r}; it has: {', '.join(public) or 'none'}")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DatasetConfig(_Frozen):
    #: A built-in dataset (see automl._data.DATASETS) or a user factory "module:function".
    name: str
    root: str | None = None
    download: bool = False
    image_size: int | None = Field(default=None, ge=4, le=1024)
    val_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    seed: int = 0
    #: Cap on training samples (handy for quick studies on big datasets); None = all.
    max_train_samples: int | None = Field(default=None, ge=10)
    #: Training augmentation; "auto" = the dataset's default (automl._data.transforms_for).
    augment: Literal["auto", "none", "flip", "crop_flip", "resized_crop_flip"] = "auto"
    #: DataLoader worker processes decoding streamed datasets (per trial, and for the base).
    workers: int = Field(default=2, ge=0, le=64)
    #: Keyword arguments of a "module:function" dataset factory.
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATASETS and not FACTORY.fullmatch(v):
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(sorted(DATASETS))} or 'module:function'")
        if v not in DATASETS:
            check_reference(v)
        return v

    @model_validator(mode="after")
    def _root(self) -> DatasetConfig:
        if self.name in DATASETS and DATASETS[self.name].needs_root and not self.root:
            raise ValueError(f"dataset {self.name!r} reads from disk: set dataset.root to its folder")
        try:
            resolve_augment(self.name, self.augment)
        except ValueError as exc:
            raise ValueError(f"dataset.{exc}") from None
        if self.options and self.name in DATASETS:
            raise ValueError(f"dataset.options are the keyword arguments of a 'module:function' factory; {self.name!r} takes none")
        return self


class _Recipe(_Frozen):
    """Training options shared by the base (``base:``) and fine-tuning (``budget:``)."""

    #: Learning-rate schedule per step: warm-up then anneal, cosine annealing to 0, or constant.
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    #: SGD momentum (ignored by adam/adamw).
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    #: Nesterov momentum (sgd with momentum > 0 only).
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _nesterov(self) -> _Recipe:
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError(f"nesterov needs optimizer sgd with momentum > 0, got optimizer={self.optimizer} momentum={self.momentum}")
        return self

    def recipe(self) -> dict[str, Any]:
        """The keyword arguments of :class:`automl._train.TrainOptions` this section sets."""
        return {k: getattr(self, k) for k in ("schedule", "optimizer", "momentum", "nesterov", "weight_decay", "label_smoothing")}


class BaseModelConfig(_Recipe):
    #: A built-in or short torchvision name, ``torchvision:NAME``, ``timm:NAME`` or ``module:function``.
    model: str
    options: dict[str, Any] = Field(default_factory=dict)
    #: Pretrained weights from the library's hub (downloaded when named): a torchvision weights
    #: name (``IMAGENET1K_V1``, ``DEFAULT``) or ``pretrained`` (timm); the classifier is replaced
    #: for the dataset's classes and the model fine-tuned for ``epochs``.
    weights: str | None = None
    #: The user's checkpoint (a state dict, possibly under ``state_dict``/``model``/``model_state_dict``,
    #: keys possibly prefixed ``module.``/``model.``, or a ``torch.export`` ``.pt2``): used as is when
    #: its classes are the dataset's, else its classifier is replaced and the model fine-tuned.
    checkpoint: str | None = None
    epochs: int = Field(default=20, ge=1, le=10_000)
    lr: float = Field(default=3e-3, gt=0.0, le=10.0)

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        allowed = f"{', '.join(list_models())}, 'torchvision:NAME', 'timm:NAME' or 'module:function'"
        if v.partition(":")[0] in LIBRARIES:
            check_model_name(v)
            return v
        if v not in list_models() and not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError(f"unknown base model {v!r}; allowed: {allowed}")
        if v not in list_models():
            check_reference(v)
        return v

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"checkpoint file must exist, got {v!r}")
        return v

    @model_validator(mode="after")
    def _weights(self) -> BaseModelConfig:
        if self.weights is not None:
            if self.checkpoint is not None:
                raise ValueError(f"base.weights and base.checkpoint: set one of them, got weights={self.weights!r} and checkpoint={self.checkpoint!r}")
            try:
                check_weights(self.model, self.weights)
            except ValueError as exc:
                raise ValueError(f"base.weights: {exc}") from None
        return self


class Objective(_Frozen):
    metric: ObjectiveName
    direction: Literal["maximize", "minimize"] | None = None

    @property
    def resolved_direction(self) -> str:
        return self.direction or DEFAULT_DIRECTION[self.metric]


class BudgetConfig(_Recipe):
    trials: int = Field(default=30, ge=1, le=100_000)
    #: Wall-clock limit of the whole search in seconds; None = no limit.
    time_limit_s: float | None = Field(default=None, gt=0)
    #: Fine-tuning epochs after each compression stage that trains.
    epochs: int = Field(default=3, ge=0, le=10_000)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    batch_size: int = Field(default=100, ge=1, le=65_536)
    #: Wall-clock limit of one trial in seconds (FAIL "TrialTimeLimit" when over); None = no limit.
    trial_time_limit_s: float | None = Field(default=None, gt=0)
    #: Times a trial that raised (or whose Ray worker died) is tried again before it is recorded FAIL.
    retries: int = Field(default=0, ge=0, le=10)
    #: Mixed-precision training (base and fine-tuning): autocast to bf16 or fp16; "none" = float32.
    amp: Literal["none", "bf16", "fp16"] = "none"
    #: Channels-last memory format while training (base and fine-tuning); faster on GPUs.
    channels_last: bool = False

    def device_options(self) -> dict[str, Any]:
        """How training uses the device, for the base and every trial alike."""
        return {"amp": self.amp, "channels_last": self.channels_last}

    def recipe(self) -> dict[str, Any]:
        return {**super().recipe(), **self.device_options()}


class SamplerConfig(_Frozen):
    name: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int | None = 0


class SchedulerConfig(_Frozen):
    """Which Ray Tune scheduler stops trials early (``fifo`` = none: every trial fine-tunes fully).

    ``moasha``: Pareto-aware asynchronous successive halving (:mod:`automl._moasha`) on (validation
    accuracy after each fine-tuning epoch, the trial's costs from its dry run). Rungs at
    ``grace_epochs x reduction_factor^k`` epochs of the trial's epoch count (all of its training
    epochs so far, see :func:`automl._tune.trial_function`); at each the best
    ``ceil(n / reduction_factor)`` go on.
    """

    name: Literal["fifo", "moasha"] = "fifo"
    grace_epochs: int = Field(default=1, ge=1, le=10_000)
    reduction_factor: float = Field(default=3.0, ge=2.0, le=1000.0)


class ReviewConfig(_Frozen):
    """How a finished study is reviewed (``show``, ``report``, ``export/finalize --pick``).

    The knee and every pick choose among the models whose test accuracy is at most ``max_drop``
    (a fraction: 0.01 = 1 percentage point) below the base model's; ``show`` lists the rest of the
    front apart. The default is Intel Neural Compressor's default tolerance (1 %): a compressed
    model further below its base is rarely the one a user ships, and a knee taken over models
    many points worse would rank accuracy as just one cost among others. Within the tolerance the
    knee trades off the other objectives only (:func:`automl._pareto.tolerance_knee`).
    """

    max_drop: float = Field(default=DEFAULT_MAX_DROP, ge=0.0, le=1.0)


class ResourcesConfig(_Frozen):
    cpus: float = Field(default=1.0, gt=0.0, le=1024)
    gpus: float = Field(default=0.0, ge=0.0, le=64)
    #: Concurrent trials; None = as many as the cluster's resources allow.
    max_concurrent: int | None = Field(default=None, ge=1, le=10_000)

    @model_validator(mode="after")
    def _fractions(self) -> ResourcesConfig:
        for field in ("cpus", "gpus"):
            v = getattr(self, field)
            if v > 1 and v != int(v):
                raise ValueError(f"resources.{field} above 1 must be a whole number, got {v}")
        return self


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class LatencyConfig(LatencySettings):
    """The ``latency`` section: every timing setting (:class:`automl._latency.LatencySettings`, which
    defines them, their defaults and ranges) and the search's drift check."""

    #: At the end of a search, time the front's artifacts again with nothing else running and
    #: record how far each moved from its trial value (study attr ``latency_drift``); never replaces it.
    drift_check: bool = True

    @field_validator("node")
    @classmethod
    def _node(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,99}", v):
            raise ValueError(f"latency.node must name a Ray custom resource (letters, digits, _ . : / -, starting with a letter or _), got {v!r}")
        if v in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"latency.node must name a custom resource, not Ray's built-in {v!r}")
        return v

    @field_validator("runner")
    @classmethod
    def _runner(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError(f"latency.runner must be 'module:function', got {v!r}")
        try:
            check_reference(v)
        except ValueError as exc:
            raise ValueError(f"latency.runner {v!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _runner_file(self) -> LatencyConfig:
        if self.runner is not None and self.runtime == "eager":
            raise ValueError(f"latency.runner times the artifact file, and latency.runtime 'eager' has none; use onnxruntime or torchscript, got runner={self.runner!r}")
        return self

    @model_validator(mode="after")
    def _attempts(self) -> LatencyConfig:
        if self.min_attempts > self.max_attempts:
            raise ValueError(f"latency.min_attempts must be at most latency.max_attempts ({self.max_attempts}), got {self.min_attempts}")
        return self

    def settings(self) -> LatencySettings:
        """The timing settings alone, as every measurement takes them."""
        return LatencySettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LatencySettings)})


class StudyConfig(_Frozen):
    """A whole study. See ``studies/*.yaml`` and the README for every field."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    #: Folders put on ``sys.path`` (before the fields below are checked) for ``module:function``
    #: references and plugins; :func:`load_config` adds the config's folder and the current folder.
    #: The modules a study names from these folders travel to Ray workers (``runtime_env``).
    python_path: tuple[str, ...] = ()
    #: Modules imported before anything else; each may register extra methods (a user's own
    #: compression method, written like the built-ins). Trials import them too.
    plugins: tuple[str, ...] = ()
    dataset: DatasetConfig
    base: BaseModelConfig
    #: Method name -> narrowed hyperparameter ranges ({} = the method's full ranges).
    methods: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"none": {}, "tucker": {}})
    #: Narrowing of the fine-tuning options searched for every method (distillation).
    finetune: dict[str, Any] = Field(default_factory=dict)
    #: Points evaluated first, as Optuna parameter names -> values (Optuna's ``enqueue_trial``),
    #: e.g. ``{method: tucker, tucker.rank_out: 0.5, tucker.rank_in: 0.5, distill: false}``.
    enqueue: tuple[dict[str, Any], ...] = ()
    objectives: tuple[Objective, ...] = (
        Objective(metric="accuracy"),
        Objective(metric="size_bytes"),
        Objective(metric="latency_ms"),
    )
    budget: BudgetConfig = BudgetConfig()
    sampler: SamplerConfig = SamplerConfig()
    #: Early stopping of trials by a Ray Tune scheduler (default fifo: off).
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    storage: str | None = None
    #: Seconds each storage call waits for a database that stopped answering (a restart, a
    #: failover), retrying with backoff; a finished trial whose record still cannot be written goes
    #: to the study folder's journal, replayed by ``resume``. 0: no waiting.
    storage_retry_s: float = Field(default=120.0, ge=0, le=86400)
    ray_address: str | None = None
    latency: LatencyConfig = LatencyConfig()
    #: Bounds on the final model (automl._constraints): a trial whose costs, known before training,
    #: break a max_* bound stops before it trains; min_accuracy keeps trials off the front and picks.
    constraints: Constraints = Constraints()
    #: How the front is reviewed: the accuracy tolerance of the knee and the picks.
    review: ReviewConfig = ReviewConfig()
    #: Folder that holds one sub-folder per study.
    output_dir: str = "runs"
    seed: int = 0

    @field_validator("python_path")
    @classmethod
    def _python_path(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        resolved = []
        for i, folder in enumerate(v):
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"python_path[{i}] must be an existing folder, got {folder!r}")
            if str(path) not in resolved:
                resolved.append(str(path))
        for path in reversed(resolved):
            if path not in sys.path:
                sys.path.insert(0, path)
        return tuple(resolved)

    @field_validator("plugins")
    @classmethod
    def _plugins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import_plugins(v)  # a PluginError is a ValueError: one line naming plugins[i]
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError(f"at least one method must be enabled; allowed: {', '.join(searchspace.list_methods())}")
        for name, overrides in v.items():
            try:
                method = searchspace.get_method(name)
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
            if not isinstance(overrides, Mapping):
                raise ValueError(f"methods.{name} must map hyperparameter names to ranges, got {overrides!r}")
            try:
                method.narrowed(overrides)
            except (KeyError, ValueError) as exc:
                raise ValueError(exc.args[0]) from None
        structure = searchspace.list_methods(searchspace.Stage.STRUCTURE)
        if not any(n in structure for n in v):
            raise ValueError(f"at least one structure method must be enabled ({', '.join(structure)}), got {sorted(v)}")
        return v

    @field_validator("finetune")
    @classmethod
    def _finetune(cls, v: dict[str, Any]) -> dict[str, Any]:
        allowed = searchspace.FINETUNE_HYPERPARAMETERS
        for key, value in v.items():
            if key not in allowed:
                raise ValueError(f"unknown fine-tuning option {key!r}; allowed: {', '.join(allowed)}")
            try:
                allowed[key].narrow(value)
            except ValueError as exc:
                raise ValueError(f"finetune.{key}: {exc}") from None
        return v

    @field_validator("objectives", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # "accuracy" is shorthand for {metric: accuracy} with its natural direction.
        if isinstance(v, (list, tuple)):
            return [{"metric": o} if isinstance(o, str) else o for o in v]
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: tuple[Objective, ...]) -> tuple[Objective, ...]:
        names = [o.metric for o in v]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"objectives must be a non-empty list of distinct metrics from {list(OBJECTIVE_METRICS)}, got {names}")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[a-z][a-z0-9+]*://", v):
            raise ValueError(f"storage must be an SQLAlchemy URL such as sqlite:///path.db or postgresql://user@host/db, got {v!r}")
        return v

    @model_validator(mode="after")
    def _scheduler(self) -> StudyConfig:
        if self.scheduler.name == "fifo":
            return self
        if "accuracy" not in [o.metric for o in self.objectives]:
            names = [o.metric for o in self.objectives]
            raise ValueError(f"scheduler.name moasha ranks trials by validation accuracy, so accuracy must be an objective, got objectives {names}")
        most = self.max_training_epochs
        if self.scheduler.grace_epochs >= most:
            raise ValueError(
                f"scheduler.grace_epochs must be below the most epochs a trial fine-tunes (budget.epochs x fine-tuning "
                f"stages of the enabled methods = {most}), else no rung is ever reached, got {self.scheduler.grace_epochs}"
            )
        return self

    # Derived values -------------------------------------------------------------------------

    @property
    def max_training_epochs(self) -> int:
        """The most fine-tuning epochs a trial's chain can run: ``budget.epochs`` after each stage
        that has an enabled method which fine-tunes (the scheduler's last rung lies below it)."""
        stages = {m.stage for m in self.method_instances().values() if m.finetune}
        return self.budget.epochs * len(stages)

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def storage_url(self) -> str:
        """The Optuna storage: the config's URL, or a SQLite file inside the study folder."""
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.study_dir / 'optuna.db').resolve()}"

    def method_instances(self) -> dict[str, searchspace.CompressionMethod]:
        return {n: searchspace.get_method(n)(ranges=searchspace.get_method(n).narrowed(o)) for n, o in self.methods.items()}

    def finetune_domains(self) -> dict[str, searchspace.Domain]:
        return {k: searchspace.FINETUNE_HYPERPARAMETERS[k].narrow(v) for k, v in self.finetune.items()}

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """A validated copy with some top-level fields replaced (CLI flags)."""
        data = self.model_dump(mode="python")
        data.update({k: v for k, v in changes.items() if v is not None})
        return parse_config(data, source="command line")


def _format(err: ValidationError, source: str) -> str:
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-")) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        msg = "unknown key (not a field of this section)"
    elif first["type"] == "missing":
        msg = "required field is missing"
    got = first.get("input")
    tail = "" if first["type"] in ("missing",) or "got" in msg else f", got {got!r}"
    more = len(err.errors()) - 1
    extra = f" (+{more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc}: {msg}{tail}{extra}"


def parse_config(data: Any, *, source: str = "config") -> StudyConfig:
    """Validate a mapping as a :class:`StudyConfig`; raise :class:`ConfigError` with one line."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping of fields, got {type(data).__name__}")
    try:
        return StudyConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format(err, source).replace("\n", " ")) from None


def load_config(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a YAML study config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if isinstance(data, dict):
        # User code next to the config (or in the folder the user launches from) is importable.
        given = data.get("python_path") or []
        if isinstance(given, (list, tuple)):
            given = [str((p.parent / str(g)).resolve()) for g in given]  # relative to the config
            data["python_path"] = [*given, *(f for f in (str(p.parent.resolve()), os.getcwd()) if f not in given)]
    return parse_config(data, source=str(p))
