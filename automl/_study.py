"""Study orchestration: base model, Ray Tune x Optuna search, checkpoints, progress.

Layout of a study folder (``<output_dir>/<name>/``):

- ``config.yaml``: the validated config the study was launched with (``resume`` reads it);
- ``optuna.db``: the Optuna storage when the config names no other;
- ``base/``: the trained base model (``weights.pt``) and its measurements (``base.json``);
- ``checkpoints/trial_NNNNN/``: each finished trial's model (see :func:`save_checkpoint`);
- ``ray/``: Ray Tune's experiment folder (results, errors, persisted checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
import yaml
from torch import nn

import searchspace
from searchspace import Plan, SearchSpace
from automl._cluster import assigned_device, pack_folder, runtime_env, start_sink
from automl._config import StudyConfig, load_config
from automl._data import Splits, dataset_from_config
from automl._latency import gated_batches
from automl._measure import Metrics, measure
from automl._progress import LONG_TRIAL_S, EpochProgress, EpochStats
from automl._models import StagedNet, build_model
from automl._recovery import LAUNCHER, Heartbeat, close_interrupted, finished_count, guarded, register_launcher, remove_orphan_checkpoints
from automl._trial import TrialSettings, run_trial, save_checkpoint
from automl._train import TrainOptions, fit

__all__ = ["Payload", "StudyError", "open_storage", "prepare_study", "run_search"]

#: User attribute (and result key) holding why a trial failed.
FAIL_REASON = "fail_reason"
#: Result key of a trial's extra operating points (see ``automl._trial.Calibrated``).
VARIANTS = "variants"
#: User attribute of a trial recorded from another trial's model: the parent's number.
DERIVED_FROM = "derived_from"


class StudyError(RuntimeError):
    """A study cannot start or go on; the message is one line for the user."""


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage; SQLite gets a long lock timeout so concurrent writers wait, not fail.

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
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=False)
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


# --- base model ----------------------------------------------------------------------------


def _build_base(cfg: StudyConfig, data: Splits) -> StagedNet:
    return build_model(cfg.base.model, input_shape=data.input_shape, num_classes=data.num_classes, options=cfg.base.options)


def prepare_base(cfg: StudyConfig, data: Splits, study_dir: Path, *, log: Callable[[str], None] = print) -> tuple[nn.Module, Metrics]:
    """Train the base once (or load the user's checkpoint), cache it in the study folder, measure it."""
    folder = study_dir / "base"
    weights = folder / "weights.pt"
    record = folder / "base.json"
    model = _build_base(cfg, data)
    if weights.is_file() and record.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        metrics = Metrics(**json.loads(record.read_text())["metrics"])
        return model.eval(), metrics
    if cfg.base.checkpoint:
        try:
            state = torch.load(cfg.base.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:  # noqa: BLE001
            raise StudyError(f"base.checkpoint {cfg.base.checkpoint!r} does not fit base.model {cfg.base.model!r}: {exc}") from None
        log(f"base: loaded {cfg.base.checkpoint}")
        seconds, where = 0.0, {}
    else:
        log(f"base: training {cfg.base.model} for {cfg.base.epochs} epochs on {data.describe()}")
        options = TrainOptions(epochs=cfg.base.epochs, lr=cfg.base.lr, batch_size=cfg.budget.batch_size, seed=cfg.seed, **cfg.base.recipe(), **cfg.budget.device_options())
        show = EpochProgress(log)
        if cfg.resources.gpus > 0:
            # On a GPU machine or cluster the base trains where trials do: a Ray task with their resources.
            import ray
            from ray.util.queue import Queue

            _init_ray(cfg)
            queue = Queue(actor_options={"num_cpus": 0})
            task = ray.remote(num_cpus=cfg.resources.cpus, num_gpus=cfg.resources.gpus)(_train_base)
            ref = task.remote(model, data, options, cfg.resources.gpus, cfg.resources.cpus, queue)
            while not ray.wait([ref], timeout=1.0)[0]:
                _drain(queue, show)
            _drain(queue, show)
            show.close()
            state, seconds, where = ray.get(ref)
            ray.kill(queue.actor)
            model.load_state_dict(state)
            log(f"base: trained on {where['device']}" + (f" ({where['gpu_fallback']})" if "gpu_fallback" in where else ""))
        else:
            where = {"device": "cpu"}
            start = time.perf_counter()
            try:
                fit(model, data, options, progress=lambda s: show("base", s))
            finally:
                show.close()
            seconds = time.perf_counter() - start
    model.eval()
    metrics = measure(model, data, TrialSettings.from_config(cfg).latency)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    record.write_text(json.dumps({"model": cfg.base.model, "metrics": metrics.as_dict(), "train_seconds": seconds, **where}, indent=2))
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
    torch.set_num_threads(max(1, int(cpus)))
    device, where = assigned_device(gpus)
    start = time.perf_counter()
    fit(model, data, options, device=device, progress=_sender(queue, "base"))
    return {k: v.cpu() for k, v in model.state_dict().items()}, time.perf_counter() - start, where


def _init_ray(cfg: StudyConfig) -> None:
    """Connect to the configured cluster (or start a local Ray) with the study's user code."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address=cfg.ray_address or os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            logging_level="ERROR",
            runtime_env=runtime_env(cfg),
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


def build_space(cfg: StudyConfig, base: nn.Module) -> SearchSpace:
    methods = cfg.method_instances()
    usable = {n: m for n, m in methods.items() if m.supports(base) is None}
    if not any(m.stage == searchspace.Stage.STRUCTURE for m in usable.values()):
        reasons = "; ".join(f"{n}: {m.supports(base)}" for n, m in methods.items())
        raise StudyError(f"methods: none of the enabled methods applies to base.model {cfg.base.model!r} ({reasons})")
    return SearchSpace(usable, finetune=cfg.finetune_domains())


def prepare_study(cfg: StudyConfig, *, log: Callable[[str], None] = print) -> tuple[Path, Payload, SearchSpace]:
    """Create (or reopen) the study folder, the Optuna study, the data and the base model."""
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
        ignored = ("budget", "ray_address", "storage", "output_dir", "python_path")
        changed = sorted(k for k in saved if k not in ignored and before.get(k) != saved[k])
        if changed:
            raise StudyError(
                f"study {cfg.name!r} already exists in {study_dir} with a different {', '.join(changed)}; "
                "resume it with `automl resume` or give the new study another name"
            )
    config_file.write_text(yaml.safe_dump(saved, sort_keys=False))
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
    study.set_user_attr("study_dir", str(study_dir.resolve()))
    study.set_user_attr("dataset", cfg.dataset.name)
    space = build_space(cfg, base)
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
    )
    return study_dir, payload, space


def open_storage_checked(cfg: StudyConfig) -> optuna.storages.RDBStorage:
    if not cfg.storage:
        # The embedded default lives in the study folder: create the folder only once all else is valid.
        cfg.study_dir.mkdir(parents=True, exist_ok=True)
    return open_storage(cfg.storage_url)


def trial_function(config: dict[str, Any], payload: Payload) -> dict[str, Any]:
    """Run one trial from a Ray Tune config; returns the result dict (never raises for trial faults)."""
    import importlib

    from ray import tune

    for module in payload.plugins:  # user methods register themselves on import
        importlib.import_module(module)
    threads = max(1, int(payload.cpus))
    torch.set_num_threads(threads)
    device, where = assigned_device(payload.gpus)
    plan = Plan.from_dict(config["plan"])
    # Training steps hold the node's latency lock shared, so no step runs while a model is timed.
    data = gated_batches(payload.data) if payload.settings.latency.isolate else payload.data
    outcome, reason, attempts = guarded(
        lambda: run_trial(
            plan, payload.base, data, payload.settings, methods=payload.methods, device=device,
            progress=_sender(payload.progress, f"trial {config.get('optuna_trial_number', '?')}", after_s=LONG_TRIAL_S),
        ),
        time_limit_s=payload.time_limit_s,
        retries=payload.retries,
    )
    if outcome is None:
        # Every metric present (NaN): Tune rejects a result without the searched metrics and would
        # end the whole study; the searcher records the trial as FAIL by its fail_reason.
        nan_metrics = {m: math.nan for m in ("accuracy", "params", "size_bytes", "macs", "latency_ms", "latency_iqr_ms")}
        result = {**nan_metrics, FAIL_REASON: reason, "method": plan.label, "attempts": attempts}
        tune.report(result)
        return result
    result = {
        **outcome.metrics.as_dict(),
        "method": plan.label,
        "seconds": outcome.seconds,
        "attempts": attempts,
        "notes": json.dumps({**outcome.notes, **where}, default=str),
        "node": _node_id(),
    }
    if outcome.variants:
        # A JSON string: Ray flattens nested results; the searcher turns each into an Optuna trial.
        result[VARIANTS] = json.dumps([v.as_dict() for v in outcome.variants], default=str)
    number = config.get("optuna_trial_number")
    if payload.sink is not None and number is not None:
        # The checkpoint reaches the launcher's study folder before the result reaches Optuna, so a
        # COMPLETE trial always has its checkpoint, whichever node ran it (automl._cluster).
        import ray

        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(outcome, tmp, example=payload.data.example())
            ray.get(payload.sink.write.remote(int(number), pack_folder(tmp)))
    tune.report(result)
    return result


def _sender(queue: Any, label: str, *, after_s: float = 0.0) -> Callable[[EpochStats], None] | None:
    """Send epochs to the launcher (best effort) once the work has run for ``after_s`` seconds."""
    if queue is None:
        return None
    start = time.perf_counter()

    def send(stats: EpochStats) -> None:
        if time.perf_counter() - start >= after_s:
            try:
                queue.put_nowait((label, stats.as_dict()))
            except Exception:  # noqa: BLE001 - a full or gone queue only loses a progress line
                pass

    return send


def _drain(queue: Any, show: Callable[[str, EpochStats], None]) -> None:
    # Records travel as plain dicts: the queue actor then never imports torch to unpickle them.
    try:
        items = queue.get_nowait_batch(queue.qsize())
    except Exception:  # noqa: BLE001 - progress is best effort; the result path does not use it
        return
    for label, stats in items:
        show(label, EpochStats(**stats))


def _node_id() -> str | None:
    """The Ray node that ran the trial (user attr ``node``: which machine of a cluster measured it)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests, benchmarks) there is no node
        return None


# --- Ray Tune glue ------------------------------------------------------------------------


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class StudySearcher(OptunaSearch):
        """OptunaSearch that links Optuna and Ray trials and records why a trial failed."""

        def __init__(self, *args: Any, extra_metrics: tuple[str, ...] = (), budget: int | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._extra = extra_metrics
            self._budget = budget
            self._errored: dict[str, Any] = {}

        def running_trial_ids(self) -> list[int]:
            """Optuna ids of the trials this launcher runs now (for the heartbeat)."""
            return [ot._trial_id for tid, ot in list(self._ot_trials.items()) if tid not in self._completed_trials]

        def suggest(self, trial_id: str) -> dict | None:
            if self._budget is not None and self._ot_study is not None:
                # Several launchers may share one study (PostgreSQL): stop once the budget is
                # covered by finished trials plus those running anywhere.
                running = len(self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
                if finished_count(self._ot_study) + running >= self._budget:
                    return Searcher.FINISHED
            config = super().suggest(trial_id)
            if config is None:
                return None
            ot = self._ot_trials[trial_id]
            number = ot.number
            # Owner and first heartbeat right after ask: a resuming launcher can tell a trial of a
            # dead launcher (closed and re-queued) from one of a live launcher (left alone).
            ot.set_user_attr("launcher", LAUNCHER)
            ot.set_user_attr("heartbeat", time.time())
            ot.set_user_attr("ray_trial_id", trial_id)
            ot.set_user_attr("checkpoint", f"checkpoints/trial_{number:05d}")
            ot.set_user_attr("method", Plan.from_dict(config["plan"]).label)
            config["optuna_trial_number"] = number
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot = self._ot_trials.get(trial_id)
            if ot is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result, error)
            reason = None
            if error:
                # The callback's on_trial_error (called right after this) knows the Ray error text.
                self._errored[trial_id] = ot
                return None
            elif not result or result.get(FAIL_REASON):
                reason = (result or {}).get(FAIL_REASON) or "the trial reported no result"
            else:
                values = [result.get(m) for m in self.metric]
                if any(v is None or not math.isfinite(float(v)) for v in values):
                    reason = f"objective values are not finite: {dict(zip(self.metric, values))}"
            if reason is not None:
                ot.set_user_attr(FAIL_REASON, reason)
                if result and result.get("attempts") is not None:
                    ot.set_user_attr("attempts", result["attempts"])
                self._ot_study.tell(ot, None, state=optuna.trial.TrialState.FAIL)
                self._completed_trials.add(trial_id)
                return None
            for key in self._extra:
                if result.get(key) is not None:
                    ot.set_user_attr(key, result[key])
            parent = (ot.number, dict(ot.params), dict(ot.user_attrs))
            out = super().on_trial_complete(trial_id, result, error)
            if result.get(VARIANTS):
                self._add_variants(*parent, json.loads(result[VARIANTS]))
            return out

        def _add_variants(self, number: int, params: dict[str, Any], attrs: dict[str, Any], variants: list[dict[str, Any]]) -> None:
            """Record each extra operating point of a trial's model as its own COMPLETE trial.

            Its parameters are the parent's with the variant's overrides, replayed through the search
            space so that exactly the active parameters (and their distributions) are stored; it
            points at the parent's checkpoint and says which state (e.g. thresholds) to set on it.
            """
            for variant in variants:
                metrics = variant["metrics"]
                values = [metrics.get(m) for m in self.metric]
                if any(v is None or not math.isfinite(float(v)) for v in values):
                    continue
                replay = optuna.trial.FixedTrial({**params, **variant["params"]})
                try:
                    self._space(replay)
                except Exception:  # noqa: BLE001 - an override outside the space is skipped, not fatal
                    continue
                user_attrs = {k: metrics[k] for k in self._extra if metrics.get(k) is not None}
                user_attrs.update(
                    {
                        DERIVED_FROM: number,
                        "checkpoint": attrs.get("checkpoint"),
                        "method": attrs.get("method"),
                        "state": variant["state"],
                    }
                )
                self._ot_study.add_trial(
                    optuna.trial.create_trial(
                        params=replay.params,
                        distributions=replay.distributions,
                        values=[float(v) for v in values],
                        user_attrs=user_attrs,
                    )
                )

        def close_errored(self, trial_id: str, reason: str) -> None:
            """Record a trial whose Ray worker died (OOM kill, segfault...) as FAIL with Ray's reason."""
            ot = self._errored.pop(trial_id, None)
            if ot is None or trial_id in self._completed_trials:
                return
            ot.set_user_attr(FAIL_REASON, reason)
            self._ot_study.tell(ot, None, state=optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)

        def close_running(self, reason: str) -> list[int]:
            """Ctrl-C: close this launcher's running trials as interrupted and re-queue their params."""
            closed = []
            for tid, ot in list(self._ot_trials.items()):
                if tid in self._completed_trials:
                    continue
                try:
                    ot.set_user_attr("interrupted", True)
                    ot.set_user_attr(FAIL_REASON, reason)
                    self._ot_study.tell(ot, None, state=optuna.trial.TrialState.FAIL)
                except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
                    continue
                self._completed_trials.add(tid)
                closed.append(ot.number)
                if ot.params:
                    self._ot_study.enqueue_trial(dict(ot.params), user_attrs={"requeue_of": ot.number})
            return closed

    from ray.tune.search import Searcher

    return StudySearcher


def _error_text(trial: Any) -> str:
    """One line from Ray's record of a trial whose worker failed (e.g. killed when out of memory)."""
    text = ""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    try:
        if path and Path(path).is_file() and not str(path).endswith(".pkl"):
            lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
            text = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    except OSError:
        pass
    return f"the Ray worker running this trial failed: {text or 'no error text (killed, e.g. by the OS when out of memory)'}"[:2000]


def _callbacks(study_dir: Path, cfg: StudyConfig, total: int, log: Callable[[str], None], searcher: Any = None, queue: Any = None):
    from ray.tune import Callback

    class StudyCallback(Callback, _CallbackState):
        """Prints one progress line per finished trial; records why a Ray worker failed.

        Everything it uses is an attribute (not a closure variable) so that ``__getstate__`` can leave
        out what cannot be pickled (the log function's console, storages): Tune pickles its callbacks
        with the Tuner, and the pickled copy is never run.
        """

        def _progress(self, trial: Any, status: str) -> None:
            study = optuna.load_study(study_name=self.name, storage=self.storage)
            front = len(study.best_trials) if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else 0
            number = trial.config.get("optuna_trial_number", "?")
            self.log(f"[{self.done}/{self.total}] trial {number} {status} | failed {self.failed} | front {front}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            result = trial.last_result or {}
            if result.get(FAIL_REASON):
                self.failed += 1
                self._progress(trial, f"FAILED: {result[FAIL_REASON][:160]}")
                return
            acc = result.get("accuracy")
            self._progress(trial, f"{result.get('method')} acc={acc:.4f} size={result.get('size_bytes')}B lat={result.get('latency_ms', 0):.3f}ms" if acc is not None else "done")

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            # Long trials' epochs, at most once a second (a Tune step is much shorter).
            if self.queue is not None and time.monotonic() - self.drained >= 1.0:
                self.drained = time.monotonic()
                _drain(self.queue, self.epochs)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self.queue is not None:
                _drain(self.queue, self.epochs)
            self.epochs.close()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            self.failed += 1
            reason = _error_text(trial)
            if self.searcher is not None:
                self.searcher.close_errored(trial.trial_id, reason)
            self._progress(trial, f"FAILED: {reason[:160]}")

    cb = StudyCallback()
    cb.setup_state(total=total, url=cfg.storage_url, name=cfg.name, log=log, searcher=searcher, queue=queue)
    return cb


class _CallbackState:
    """The callback's state, kept out of closures (cloudpickle pickles a local class's closures)."""

    def setup_state(self, *, total: int, url: str, name: str, log: Callable[[str], None], searcher: Any, queue: Any = None) -> None:
        self.done = 0
        self.failed = 0
        self.total = total
        self.url = url
        self.name = name
        self._storage: Any = None
        self.log = log
        self.searcher = searcher
        self.queue = queue
        self.drained = 0.0
        self.epochs = EpochProgress(log)

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        if self._storage is None:
            self._storage = open_storage(self.url)
        return self._storage

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_storage": None, "log": print, "searcher": None, "epochs": None}


def run_search(
    cfg: StudyConfig,
    *,
    trials: int | None = None,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """Run (or continue) the study until it holds ``budget.trials`` finished trials.

    Finished (COMPLETE or FAIL) trials already in the storage count toward the budget, so
    ``resume`` calls this again with the same config. Trials left RUNNING by a launcher that died are
    closed as FAIL "interrupted" and their parameters re-queued; they do not count toward the budget
    (see :mod:`automl._recovery`). Ctrl-C closes this launcher's running trials the same way and
    raises ``KeyboardInterrupt``.
    """
    # A local single-user Ray needs no auth token and no dashboard; Tune's own table is replaced by
    # our one-line progress (StudyCallback).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C raises KeyboardInterrupt here at once (Tune would otherwise save a Tune state we never
    # restore: Optuna is the record); run_search closes and re-queues the running trials.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    import ray
    from ray import tune

    study_dir, payload, space = prepare_study(cfg, log=log)
    storage = open_storage(cfg.storage_url)
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    register_launcher(study)
    close_interrupted(study, log=log)
    removed = remove_orphan_checkpoints(study, study_dir)
    if removed:
        log(f"recovered: removed checkpoints of trials that did not complete: {removed}")
    finished = finished_count(study)
    for point in cfg.enqueue:  # skip_if_exists: a resumed study does not evaluate them twice
        study.enqueue_trial(dict(point), skip_if_exists=True)
    budget = trials if trials is not None else cfg.budget.trials
    remaining = budget - finished
    if remaining <= 0:
        log(f"study {cfg.name!r} already holds {finished} finished trials (budget {budget})")
        _remeasure(cfg, study, study_dir, payload, log)
        return study

    _init_ray(cfg)
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1) // cfg.resources.cpus)
    if cfg.resources.gpus > 0:
        slots = min(slots, int(resources.get("GPU", 0) // cfg.resources.gpus))
        if slots == 0:
            raise StudyError(f"resources.gpus: {cfg.resources.gpus} per trial requested, but the Ray cluster has {resources.get('GPU', 0)} GPUs")
    concurrent = max(1, min(slots, cfg.resources.max_concurrent or slots, remaining))
    metrics = [o.metric for o in cfg.objectives]
    searcher = _searcher_class()(
        space=space,
        metric=metrics,
        mode=["max" if o.resolved_direction == "maximize" else "min" for o in cfg.objectives],
        sampler=make_sampler(cfg, offset=len(study.get_trials(deepcopy=False))),
        study_name=cfg.name,
        storage=storage,
        extra_metrics=tuple(m for m in ("accuracy", "params", "size_bytes", "macs", "latency_ms", "latency_iqr_ms", "exit_fractions", "exit_accuracy", "exit_macs", "seconds", "attempts", "notes", "node") if m not in metrics),
        budget=budget,
    )
    payload.sink = start_sink(study_dir)
    from ray.util.queue import Queue

    payload.progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, payload=payload),
        {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus},
    )
    log(f"search: {remaining} trials, {concurrent} at a time, methods {sorted(space.methods)}, storage {cfg.storage_url}")
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=remaining,
            max_concurrent_trials=concurrent,
            time_budget_s=cfg.budget.time_limit_s,
            reuse_actors=True,
            trial_dirname_creator=lambda t: f"trial_{t.config.get('optuna_trial_number', t.trial_id)}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=f"search_{int(time.time())}",
            storage_path=str((study_dir / "ray").resolve()),
            callbacks=[_callbacks(study_dir, cfg, remaining, log, searcher, payload.progress)],
            verbose=0,
            # A trial whose worker died is started again (same config, same Optuna trial) this often.
            failure_config=tune.FailureConfig(max_failures=cfg.budget.retries),
        ),
    )
    try:
        sweep = lambda: close_interrupted(optuna.load_study(study_name=cfg.name, storage=storage), log=log)  # noqa: E731
        with Heartbeat(storage, searcher.running_trial_ids, sweep=sweep):
            tuner.fit()
    except KeyboardInterrupt:
        closed = searcher.close_running("interrupted: stopped with Ctrl-C; its parameters were re-queued")
        if closed:
            log(f"interrupted: trials {closed} closed as FAIL (interrupted) and re-queued")
        raise
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    _remeasure(cfg, study, study_dir, payload, log)
    return study


def _remeasure(cfg: StudyConfig, study: optuna.Study, study_dir: Path, payload: Payload, log: Callable[[str], None]) -> None:
    """Time the front's models again with nothing else running (see automl._latency)."""
    if not cfg.latency.remeasure_front or "latency_ms" not in [o.metric for o in cfg.objectives]:
        return
    from automl._latency import remeasure_front

    remeasure_front(
        study, study_dir, TrialSettings.from_config(cfg).latency, base=payload.base, example=payload.data.example(), log=log
    )


def load_study_config(study: str | Path) -> StudyConfig:
    """The config of an existing study, from its folder (or ``<runs>/<name>``)."""
    p = Path(study)
    candidates = [p / "config.yaml", Path("runs") / str(study) / "config.yaml"]
    for c in candidates:
        if c.is_file():
            return load_config(c)
    raise StudyError(f"study {str(study)!r} not found: no config.yaml in {p} or runs/{study}")
