"""AutoML search over neural-network compression methods: config, data, models, trials, study."""

from automl._config import ConfigError, StudyConfig, load_config, parse_config
from automl._data import DATASETS, Splits, load_dataset
from automl._measure import LatencySettings, Metrics, measure
from automl._models import StagedNet, build_model, list_models
from automl._rebuild import load_model
from automl._search import run_search
from automl._study import StudyError
from automl._trial import TrialOutcome, TrialSettings, run_trial

__all__ = [
    "DATASETS",
    "ConfigError",
    "LatencySettings",
    "Metrics",
    "Splits",
    "StagedNet",
    "StudyConfig",
    "StudyError",
    "TrialOutcome",
    "TrialSettings",
    "build_model",
    "list_models",
    "load_model",
    "load_config",
    "load_dataset",
    "measure",
    "parse_config",
    "run_search",
    "run_trial",
]
