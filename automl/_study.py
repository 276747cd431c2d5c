"""Study preparation: storage, study folder, data, base model, sampler and search space.

The trainable is :mod:`automl._tune`, the searcher :mod:`automl._searcher`; the run loop is
:mod:`automl._search`; a trial's record is written by :mod:`automl._records`.

Layout of a study folder (``<output_dir>/<name>/``):

- ``config.yaml``: the validated config the study was launched with (``resume`` reads it);
- ``optuna.db``: the Optuna storage when the config names no other;
- ``base/``: the trained base model (``weights.pt``), its artifact files (``model.pt2``,
  ``model.onnx``; ``model.ts`` only for the torchscript runtime) and its measurements (``base.json``), measured exactly as every trial is;
- ``profile.json``: the base's sensitivity profile, where a method's ranges read it
  (:mod:`automl._sensitivity`);
- ``checkpoints/trial_NNNNN/``: each finished trial's checkpoint (see :mod:`automl._checkpoint`);
- ``ray/``: Ray Tune's experiment folder (results, errors, persisted checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
import yaml
from torch import nn

import searchspace
from searchspace import SearchSpace
from automl._artifact import ArtifactError
from automl._cluster import assigned_device, runtime_env
from automl._config import StudyConfig, load_config
from automl._data import Splits, dataset_from_config
from automl._measure import Metrics, measure
from automl._progress import EpochProgress, drain, sender
from automl._storage import RetryingRDBStorage
from automl._models import StagedNet, build_model
from automl._sensitivity import PROFILE, ensure_profile
from automl._weights import WeightsError, load_start
from automl._threads import ThreadPlan, ray_system_config, set_threads, training_threads
from automl._trial import TrialSettings
from automl._train import TrainOptions, fit

__all__ = ["Payload", "StudyError", "StudyHalted", "base_train_options", "init_ray", "load_study_config", "objective_values", "open_storage", "prepare_study"]


class StudyError(RuntimeError):
    """A study cannot start or go on; the message is one line for the user."""

    #: The launcher's exit code: 2, bad input (a config, a name, a URL).
    code = 2


class StudyHalted(StudyError):
    """The study stopped on a fault of its surroundings (the database did not come back, the disk
    is full); what finished is kept and ``automl resume`` continues once the fault is fixed."""

    code = 1


def open_storage(url: str, *, retry_s: float = 0.0, log: Callable[[str], None] | None = None) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage; SQLite gets a long lock timeout so concurrent writers wait, not fail.

    Args:
        retry_s: how long each storage call waits for a database that stopped answering (a
            restart, a failover), retrying with backoff (:mod:`automl._storage`); 0 raises at once.
        log: where the launcher says it is waiting for the database.

    Raises:
        StudyError: the database cannot be reached (one line, no SQLAlchemy stack).
    """
    engine_kwargs: dict[str, Any] = {}
    shown = _hide_password(url)
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        return RetryingRDBStorage(url, retry_s=retry_s, log=log, shown=shown, engine_kwargs=engine_kwargs, skip_compatibility_check=False)
    except Exception as exc:  # noqa: BLE001 - surface a one-line cause for any driver error
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if isinstance(exc, ImportError) and exc.__cause__ is not None:
            cause = f"its database driver is not installed ({exc.__cause__})"
        raise StudyError(f"storage {shown!r} cannot be opened: {cause}") from None


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given
        return url


@dataclass
class Payload:
    """What every trial needs, put once in Ray's object store."""

    data: Splits
    base: nn.Module
    settings: TrialSettings
    methods: dict[str, searchspace.CompressionMethod]
    cpus: float
    gpus: float
    plugins: tuple[str, ...] = ()
    #: Trial faults (see automl._recovery.guarded) and where checkpoints go (automl._cluster).
    time_limit_s: float | None = None
    retries: int = 0
    sink: Any = None
    #: A Ray queue carrying long trials' per-epoch progress to the launcher (automl._progress).
    progress: Any = None
    #: Report validation accuracy after every training epoch to Ray Tune (a scheduler acts on it).
    report_epochs: bool = False
    #: The base architecture every checkpoint's plan starts from (automl._checkpoint).
    base_ref: dict[str, Any] | None = None
    #: The base's sensitivity profile, for methods that allocate per layer (automl._sensitivity).
    profile: searchspace.SensitivityProfile | None = None


# --- base model ----------------------------------------------------------------------------


def base_reference(cfg: StudyConfig, data: Splits) -> dict[str, Any]:
    """What :func:`automl.build_model` needs to build the base architecture (a checkpoint's ``base``)."""
    return {
        "model": cfg.base.model, "options": dict(cfg.base.options or {}), "input_shape": list(data.input_shape), "num_classes": int(data.num_classes),
        # How a trial draws calibration batches (automl._trial.run_trial): a rebuild given the data replays them exactly.
        "calibration": {"batch_size": cfg.budget.batch_size, "seed": cfg.seed},
    }


def _build_base(cfg: StudyConfig, data: Splits) -> StagedNet:
    """The base architecture, initialised from ``cfg.seed``: one config gives one base, run after run."""
    ref = base_reference(cfg, data)
    torch.manual_seed(cfg.seed)
    return build_model(ref["model"], input_shape=ref["input_shape"], num_classes=ref["num_classes"], options=ref["options"])


def base_train_options(cfg: StudyConfig) -> TrainOptions:
    """How the base trains: its epochs and recipe, the study's batch size, seed and device options."""
    return TrainOptions(epochs=cfg.base.epochs, lr=cfg.base.lr, batch_size=cfg.budget.batch_size, seed=cfg.seed, **cfg.base.recipe(), **cfg.budget.device_options())


def prepare_base(cfg: StudyConfig, data: Splits, study_dir: Path, *, log: Callable[[str], None] = print) -> tuple[nn.Module, Metrics]:
    """Train the base once (or load the user's checkpoint), cache it in the study folder, measure it.

    ``base.json`` records where it trained, ``torch_threads`` (PyTorch's thread count in the process
    that trained it) and ``nice`` (that process's niceness; :mod:`automl._threads`).
    """
    folder = study_dir / "base"
    weights = folder / "weights.pt"
    record = folder / "base.json"
    model = _build_base(cfg, data)
    if weights.is_file() and record.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        metrics = Metrics(**json.loads(record.read_text())["metrics"])
        return model.eval(), metrics
    try:
        begun = load_start(
            model, name=cfg.base.model, weights=cfg.base.weights, checkpoint=cfg.base.checkpoint,
            input_shape=data.input_shape, num_classes=int(data.num_classes), options=cfg.base.options,
        )
    except WeightsError as exc:
        raise StudyError(str(exc)) from exc
    if begun is not None:
        log(f"base: {begun.describe()}")
    if begun is not None and begun.fits:
        # The user's model for these classes is measured as it is, not trained again.
        seconds, where = 0.0, {}
    else:
        log(f"base: {'fine-tuning' if begun else 'training'} {cfg.base.model} for {cfg.base.epochs} epochs on {data.describe()}")
        options = base_train_options(cfg)
        show = EpochProgress(log)
        if cfg.resources.gpus > 0:
            # On a GPU machine or cluster the base trains where trials do: a Ray task with their resources.
            import ray
            from ray.util.queue import Queue

            init_ray(cfg)
            queue = Queue(actor_options={"num_cpus": 0})
            task = ray.remote(num_cpus=cfg.resources.cpus, num_gpus=cfg.resources.gpus)(_train_base)
            ref = task.remote(model, data, options, cfg.resources.gpus, cfg.resources.cpus, queue)
            while not ray.wait([ref], timeout=1.0)[0]:
                drain(queue, show)
            drain(queue, show)
            show.close()
            state, seconds, where = ray.get(ref)
            ray.kill(queue.actor)
            model.load_state_dict(state)
            log(f"base: trained on {where['device']}" + (f" ({where['gpu_fallback']})" if "gpu_fallback" in where else ""))
        else:
            where = {"device": "cpu", "torch_threads": torch.get_num_threads(), "nice": os.nice(0)}
            start = time.perf_counter()
            try:
                fit(model, data, options, progress=lambda s: show("base", s))
            finally:
                show.close()
            seconds = time.perf_counter() - start
    model.eval()
    try:
        # Measured like every trial (same artifact, runtime and inputs), so ratios compare like with like.
        metrics, _ = measure(model, data, cfg.latency.settings(), folder=folder)
    except ArtifactError as exc:
        raise StudyError(f"base.model {cfg.base.model!r} cannot be measured: {exc}") from exc
    torch.save(model.state_dict(), weights)
    started = {"start": begun.as_dict()} if begun is not None else {}
    record.write_text(json.dumps({"model": cfg.base.model, **started, "metrics": metrics.as_dict(), "train_seconds": seconds, **where}, indent=2))
    log(
        f"base: accuracy {metrics.accuracy:.4f}, {metrics.params} params, {metrics.size_bytes} bytes, "
        f"latency {metrics.latency_ms:.3f} ms"
    )
    return model, metrics


def _train_base(
    model: nn.Module, data: Splits, options: TrainOptions, gpus: float, cpus: float, queue: Any
) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """Ray task: train the base on the task's device; returns CPU weights, seconds, device record.
    Each epoch's progress goes to the launcher through ``queue``."""
    threads = set_threads(training_threads(cpus))
    device, where = assigned_device(gpus)
    start = time.perf_counter()
    fit(model, data, options, device=device, progress=sender(queue, "base"))
    return {k: v.cpu() for k, v in model.state_dict().items()}, time.perf_counter() - start, {**where, "torch_threads": threads, "nice": os.nice(0)}


def init_ray(cfg: StudyConfig) -> None:
    """Connect to the configured cluster (or start a local Ray) with the study's user code."""
    import ray

    if not ray.is_initialized():
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            logging_level="ERROR",
            runtime_env=runtime_env(cfg),
            # A Ray started here runs its workers at the launcher's priority (the thread plan).
            **({} if address else {"_system_config": ray_system_config()}),
        )


# --- Optuna objects ----------------------------------------------------------------------


def make_sampler(cfg: StudyConfig, *, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; ``offset`` (trials already in the study) shifts the seed.

    Without the shift a resumed launcher, or a second launcher joining the study, would replay the
    first launcher's random start-up points and evaluate the same parameters again.
    """
    seed = None if cfg.sampler.seed is None else cfg.sampler.seed + offset
    if cfg.sampler.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar keeps parallel workers from sampling the same point while others run.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=8)


def objective_values(cfg: StudyConfig, metrics: dict[str, Any]) -> list[float]:
    return [float(metrics[o.metric]) if metrics.get(o.metric) is not None else math.nan for o in cfg.objectives]


#: Study user attribute: ``{method: reason}`` of the configured methods left out of the search
#: because they cannot apply to the base (``supports()``), shown by ``automl report``.
LEFT_OUT = "left_out"


def left_out_methods(methods: dict[str, searchspace.CompressionMethod], base: nn.Module) -> dict[str, str]:
    """``{name: reason}`` of the methods whose :meth:`~searchspace.CompressionMethod.supports`
    refuses ``base``: they are left out before the study starts, so that none becomes a failed trial."""
    reasons = {n: m.supports(base) for n, m in methods.items()}
    return {n: r for n, r in reasons.items() if r is not None}


def build_space(cfg: StudyConfig, base: nn.Module, *, left_out: dict[str, str] | None = None) -> SearchSpace:
    """The search space of the configured methods that apply to ``base``.

    Raises:
        StudyError: no structure method applies (the reasons of each are in the message).
    """
    methods = cfg.method_instances()
    left_out = left_out_methods(methods, base) if left_out is None else left_out
    usable = {n: m for n, m in methods.items() if n not in left_out}
    if not any(m.stage == searchspace.Stage.STRUCTURE for m in usable.values()):
        reasons = "; ".join(f"{n}: {left_out.get(n, 'applies, but it is not a structure method')}" for n in methods)
        raise StudyError(f"methods: none of the enabled methods applies to base.model {cfg.base.model!r} ({reasons})")
    return SearchSpace(usable, finetune=cfg.finetune_domains())


def prepare_study(cfg: StudyConfig, *, log: Callable[[str], None] = print) -> tuple[Path, Payload, SearchSpace]:
    """Create (or reopen) the study folder, the Optuna study, the data and the base model.

    The launcher computes with the config's thread plan from here on (:mod:`automl._threads`); its
    one line is logged first.
    """
    study_dir = cfg.study_dir
    storage = open_storage_checked(cfg)
    study_dir.mkdir(parents=True, exist_ok=True)
    config_file = study_dir / "config.yaml"
    saved = cfg.model_dump(mode="json")
    saved["output_dir"] = str(study_dir.parent.resolve())  # resume works from any folder
    if config_file.exists():
        before = yaml.safe_load(config_file.read_text())
        try:  # a study saved before a field existed holds its default: compare validated forms
            before = StudyConfig.model_validate(before).model_dump(mode="json")
        except Exception:  # noqa: BLE001 - an unreadable old config is compared as written
            pass
        # Budget, cluster address and storage may change between runs; what defines the search may not.
        ignored = ("budget", "ray_address", "storage", "storage_retry_s", "output_dir", "python_path", "review")
        changed = sorted(k for k in saved if k not in ignored and before.get(k) != saved[k])
        if changed:
            raise StudyError(
                f"study {cfg.name!r} already exists in {study_dir} with a different {', '.join(changed)}; "
                "resume it with `automl resume` or give the new study another name"
            )
    config_file.write_text(yaml.safe_dump(saved, sort_keys=False))
    plan = ThreadPlan.from_config(cfg)
    plan.apply()
    log(plan.describe())
    data = dataset_from_config(cfg.dataset)
    base, base_metrics = prepare_base(cfg, data, study_dir, log=log)
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.name,
        directions=[o.resolved_direction for o in cfg.objectives],
        load_if_exists=True,
    )
    study.set_user_attr("base", base_metrics.as_dict())
    study.set_user_attr("base_model", cfg.base.model)
    study.set_user_attr("objectives", [o.metric for o in cfg.objectives])
    # optuna-dashboard and study.best_trials label the axes with these (not "Objective 0/1/2");
    # Optuna still calls the method experimental, which is no news to a user of this tool.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.metric for o in cfg.objectives])
    study.set_user_attr("study_dir", str(study_dir.resolve()))
    study.set_user_attr("dataset", cfg.dataset.name)
    # The config's bounds, for `show`/`export --pick` (automl._pareto.study_constraints).
    study.set_user_attr("constraints", cfg.constraints.model_dump(exclude_none=True))
    left_out = left_out_methods(cfg.method_instances(), base)
    for name, reason in left_out.items():
        log(f"method {name} left out: {reason}")
    study.set_user_attr(LEFT_OUT, left_out)
    space = build_space(cfg, base, left_out=left_out)
    profile, profile_record = ensure_profile(cfg, study_dir, base, data, space.methods, log=log)
    if profile_record is not None:
        study.set_user_attr(PROFILE, profile_record)
    payload = Payload(
        data=data,
        base=base,
        settings=TrialSettings.from_config(cfg),
        methods=space.methods,
        cpus=cfg.resources.cpus,
        gpus=cfg.resources.gpus,
        plugins=cfg.plugins,
        time_limit_s=cfg.budget.trial_time_limit_s,
        retries=cfg.budget.retries,
        base_ref=base_reference(cfg, data),
        profile=profile,
    )
    return study_dir, payload, space


def open_storage_checked(cfg: StudyConfig) -> optuna.storages.RDBStorage:
    if not cfg.storage:
        # The embedded default lives in the study folder: create the folder only once all else is valid.
        cfg.study_dir.mkdir(parents=True, exist_ok=True)
    return open_storage(cfg.storage_url)


def load_study_config(study: str | Path) -> StudyConfig:
    """The config of an existing study, from its folder (or ``<runs>/<name>``)."""
    p = Path(study)
    candidates = [p / "config.yaml", Path("runs") / str(study) / "config.yaml"]
    for c in candidates:
        if c.is_file():
            return load_config(c)
    raise StudyError(f"study {str(study)!r} not found: no config.yaml in {p} or runs/{study}")
