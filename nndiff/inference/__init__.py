"""Predictor base (documentation/inference.md): model-folder loading, input cases, seeded
generators, inverse mapping to original grid and units, atomic output writing, Monte-Carlo
mean/std. Families subclass :class:`Predictor`."""
from nndiff.inference.files import InputCase, find_input_cases, monte_carlo_summary, write_output
from nndiff.inference.model_folder import locate_plans_and_dataset_json, parse_model_folder_name
from nndiff.inference.predictor import PreparedCase, Predictor, seed_for
from nndiff.inference.registry import PREDICTORS, predictor_class_for, register_predictor
from nndiff.inference.sliding_window import sliding_window, sliding_window_model

__all__ = [
    "PREDICTORS",
    "InputCase",
    "PreparedCase",
    "Predictor",
    "find_input_cases",
    "locate_plans_and_dataset_json",
    "monte_carlo_summary",
    "parse_model_folder_name",
    "predictor_class_for",
    "register_predictor",
    "seed_for",
    "sliding_window",
    "sliding_window_model",
    "write_output",
]
