"""Configuration: one dataclass per component, a docstring per field, checks on construction.

Each setting is written once, here: its type (the annotation), default, allowed values
(``setting()``) and docstring. The JSON schema a config is checked against is generated from
them, and every config (the workflow's, the CLI's, a library call's) goes through
``parse_config``. ``config/config.yaml`` names the default experiment (models, corpora) and
nothing else; a config file stands alone, or layers itself over others with ``base:``.

- ``fields``      ``setting()``: a field with its constraints; their checks and JSON schema
- ``sources``     the models and corpora: ``ModelConfig`` (and its ``overrides``), ``CorpusConfig``
- ``stages``      one section per stage: ``ExtractConfig``, ``TrainConfig``, ``EvaluateConfig``,
                  ``AnalysesConfig``, ``ReportConfig``
- ``schema``      the JSON schema of a whole config, ``validate``
- ``experiment``  ``PipelineConfig``, the whole config; ``parse_config``, ``load_config``,
                  ``read_config`` (a file and its ``base`` files)

Each module imports only those above it in this list (``fields`` none); the
package re-exports their public names: ``from pipeline.config import TrainConfig``.
"""

from .experiment import (
    DEFAULT_CONFIG,
    PipelineConfig,
    layered_config,
    load_config,
    parse_config,
    plugins_of,
    read_config,
)
from .schema import SECTIONS, config_schema
from .sources import GLOBAL_ONLY, OVERRIDABLE, CorpusConfig, ModelConfig
from .stages import (
    SPLITS,
    STORE_DTYPES,
    TOKEN_TABLE_AUTO_MAX,
    AnalysesConfig,
    EvaluateConfig,
    ExtractConfig,
    ReportConfig,
    TrainConfig,
)

__all__ = [
    "GLOBAL_ONLY",
    "OVERRIDABLE",
    "CorpusConfig",
    "ModelConfig",
    "SPLITS",
    "STORE_DTYPES",
    "TOKEN_TABLE_AUTO_MAX",
    "AnalysesConfig",
    "EvaluateConfig",
    "ExtractConfig",
    "ReportConfig",
    "TrainConfig",
    "SECTIONS",
    "config_schema",
    "DEFAULT_CONFIG",
    "PipelineConfig",
    "layered_config",
    "load_config",
    "parse_config",
    "plugins_of",
    "read_config",
]
