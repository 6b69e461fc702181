"""Configuration: one dataclass per component, a docstring per field, checks on construction.

The experiment settings live in ``config/config.yaml`` (checked against
``config/schema.yaml`` when the workflow starts, see :mod:`pipeline.workflow`); these
dataclasses are the typed view the library works with, and hold the cross-field checks a
JSON schema cannot express. Every default is a field's default here, and nowhere else.

- ``sources``     the models and corpora: ``ModelConfig`` (and its ``overrides``), ``CorpusConfig``
- ``stages``      one section per stage: ``ExtractConfig``, ``TrainConfig``, ``EvaluateConfig``,
                  ``AnalysesConfig``, ``ReportConfig``
- ``experiment``  ``PipelineConfig``, the whole config; ``parse_config``, ``load_config``

Each module imports only those above it in this list (``sources`` and ``stages`` none); the
package re-exports their public names: ``from pipeline.config import TrainConfig``.
"""

from .experiment import SECTIONS, PipelineConfig, load_config, parse_config, plugins_of
from .sources import GLOBAL_ONLY, OVERRIDABLE, CorpusConfig, ModelConfig
from .stages import (SPLITS, STORE_DTYPES, TOKEN_TABLE_AUTO_MAX, AnalysesConfig, EvaluateConfig, ExtractConfig,
                     ReportConfig, TrainConfig)

__all__ = [
    "GLOBAL_ONLY", "OVERRIDABLE", "CorpusConfig", "ModelConfig",
    "SPLITS", "STORE_DTYPES", "TOKEN_TABLE_AUTO_MAX", "AnalysesConfig", "EvaluateConfig", "ExtractConfig", "ReportConfig",
    "TrainConfig",
    "SECTIONS", "PipelineConfig", "load_config", "parse_config", "plugins_of",
]
