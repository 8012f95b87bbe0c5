"""One typed config for a run: data, augmentation, model, training. Saved with every run.

``sections`` defines the fields, their bounds and the freeze-policy grammar; ``io`` validates
dicts and YAML files into a ``Config`` and walks its fields (the CLI derives a flag from each).
"""

from imgclf.config.io import (
    SECTIONS,
    build_config,
    cli_flag,
    config_fields,
    config_to_yaml,
    flag_name,
    load_config,
    one_line,
)
from imgclf.config.sections import (
    AugmentConfig,
    Config,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    StageConfig,
    TrainConfig,
    check_policy,
)

__all__ = ["SECTIONS", "AugmentConfig", "Config", "DataConfig", "EvaluateConfig", "ModelConfig", "StageConfig",
           "TrainConfig", "build_config", "check_policy", "cli_flag", "config_fields", "config_to_yaml", "flag_name",
           "load_config", "one_line"]
