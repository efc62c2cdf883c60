"""Optuna studies across step caches: search space, objective, storage, Pareto front and freeze selection.

NVIDIA picked TeaCache's threshold and `ret_steps` for FLUX.2 [dev] by grid search. A study automates that for
any model and quality budget, across every step-cache method (TeaCache, TaylorSeer, MagCache, FirstBlockCache,
SeaCache): the method is a categorical dimension with each method's own settings under it. Every trial generates
the prompt set with one candidate recipe, is timed, counts the share of the block stack that ran, and is scored
against an uncached reference made once with the same prompts and seeds. Two objectives (speed, quality loss)
give one Pareto front across methods; `select` picks the fastest point of any method within a quality budget.
Everything that defines a study is stored in it, so any process that can open the storage can join or resume it
(`run_worker`).
"""

from flux2lab.study.config import SPEED_METRICS, StudyConfig, make_config, prompt_records
from flux2lab.study.objective import TrialRunner, trial_weights
from flux2lab.study.plot import pareto_figure, plot_pareto
from flux2lab.study.recovery import recover, status
from flux2lab.study.selection import (
    BUDGETS,
    describe_budgets,
    format_table,
    freeze_trial,
    measured_metrics,
    pareto_front,
    select,
)
from flux2lab.study.space import (
    SEARCHED_METHODS,
    build_space,
    choose_methods,
    default_space,
    describe_point,
    read_grid_file,
    recipe_for,
    settings_text,
)
from flux2lab.study.storage import create_or_load, default_storage, display_url, load_study, open_storage, study_names
from flux2lab.study.worker import run_worker, start_workers, stop_workers, wait_for_workers

__all__ = [
    "BUDGETS", "SEARCHED_METHODS", "SPEED_METRICS", "StudyConfig", "TrialRunner", "build_space", "choose_methods",
    "create_or_load", "default_space", "default_storage", "describe_budgets", "describe_point", "display_url",
    "format_table", "freeze_trial", "load_study", "make_config", "measured_metrics", "open_storage", "pareto_figure",
    "pareto_front", "plot_pareto", "prompt_records", "read_grid_file", "recipe_for", "recover", "run_worker",
    "select", "settings_text", "start_workers", "status", "stop_workers", "study_names", "trial_weights",
    "wait_for_workers",
]
