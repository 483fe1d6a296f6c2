"""fastprompt: learn a soft prompt by backpropagation through a frozen causal LM, fast and exact."""
__version__ = "0.1.0"

from .data import load_pairs, subsample, train_test_split  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    DataError,
    FastpromptError,
    ModelError,
    NonFiniteError,
    PromptFileError,
    TemplateError,
)
from .models import load_model  # noqa: E402
from .template import Template  # noqa: E402
from .tuner import PromptTuner  # noqa: E402

__all__ = [
    "ConfigError", "DataError", "FastpromptError", "ModelError", "NonFiniteError", "PromptFileError",
    "PromptTuner", "Template", "TemplateError", "load_model", "load_pairs", "subsample", "train_test_split",
]
