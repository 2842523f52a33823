"""Names shared across modules, defined once: registered models, checkpoint formats, the default encoder."""

MOCO_ENCODER_MODEL = "fewshot-moco-encoder"  # registered by moco_pretrain --register and the moco search
CLASSIFIER_MODEL = "fewshot-classifier"  # registered by semisup
CHAMPION_ALIAS = "champion"  # the registry alias of a model's best version (validation score)
DEFAULT_ENCODER = f"models:/{MOCO_ENCODER_MODEL}@{CHAMPION_ALIAS}"

MOCO_CHECKPOINT_FORMAT = "fewshot-moco-checkpoint"
MOCO_CHECKPOINT_VERSION = 1
SEMISUP_CHECKPOINT_FORMAT = "fewshot-semisup-checkpoint"
SEMISUP_CHECKPOINT_VERSION = 1
