import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatasetFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATASET_FORMAT_UNSPECIFIED: _ClassVar[DatasetFormat]
    DATASET_FORMAT_JSONL: _ClassVar[DatasetFormat]
    DATASET_FORMAT_PARQUET: _ClassVar[DatasetFormat]
    DATASET_FORMAT_ARROW: _ClassVar[DatasetFormat]
    DATASET_FORMAT_HF_DISK: _ClassVar[DatasetFormat]

class RetrieverKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVER_KIND_UNSPECIFIED: _ClassVar[RetrieverKind]
    RETRIEVER_KIND_BM25: _ClassVar[RetrieverKind]
    RETRIEVER_KIND_DENSE: _ClassVar[RetrieverKind]
    RETRIEVER_KIND_HYBRID: _ClassVar[RetrieverKind]

class AdapterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TYPE_UNSPECIFIED: _ClassVar[AdapterType]
    ADAPTER_TYPE_LORA: _ClassVar[AdapterType]
    ADAPTER_TYPE_QLORA: _ClassVar[AdapterType]
    ADAPTER_TYPE_NONE: _ClassVar[AdapterType]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_CANCELLING: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]

class StageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATE_UNSPECIFIED: _ClassVar[StageState]
    STAGE_STATE_PENDING: _ClassVar[StageState]
    STAGE_STATE_RUNNING: _ClassVar[StageState]
    STAGE_STATE_SUCCEEDED: _ClassVar[StageState]
    STAGE_STATE_FAILED: _ClassVar[StageState]
    STAGE_STATE_CANCELLED: _ClassVar[StageState]
    STAGE_STATE_SKIPPED: _ClassVar[StageState]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_JOB_STATE: _ClassVar[EventType]
    EVENT_TYPE_STAGE_STATE: _ClassVar[EventType]
    EVENT_TYPE_PROGRESS: _ClassVar[EventType]
    EVENT_TYPE_METRICS: _ClassVar[EventType]
    EVENT_TYPE_LOG: _ClassVar[EventType]
    EVENT_TYPE_ARTIFACT: _ClassVar[EventType]
DATASET_FORMAT_UNSPECIFIED: DatasetFormat
DATASET_FORMAT_JSONL: DatasetFormat
DATASET_FORMAT_PARQUET: DatasetFormat
DATASET_FORMAT_ARROW: DatasetFormat
DATASET_FORMAT_HF_DISK: DatasetFormat
RETRIEVER_KIND_UNSPECIFIED: RetrieverKind
RETRIEVER_KIND_BM25: RetrieverKind
RETRIEVER_KIND_DENSE: RetrieverKind
RETRIEVER_KIND_HYBRID: RetrieverKind
ADAPTER_TYPE_UNSPECIFIED: AdapterType
ADAPTER_TYPE_LORA: AdapterType
ADAPTER_TYPE_QLORA: AdapterType
ADAPTER_TYPE_NONE: AdapterType
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_CANCELLING: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
STAGE_STATE_UNSPECIFIED: StageState
STAGE_STATE_PENDING: StageState
STAGE_STATE_RUNNING: StageState
STAGE_STATE_SUCCEEDED: StageState
STAGE_STATE_FAILED: StageState
STAGE_STATE_CANCELLED: StageState
STAGE_STATE_SKIPPED: StageState
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_JOB_STATE: EventType
EVENT_TYPE_STAGE_STATE: EventType
EVENT_TYPE_PROGRESS: EventType
EVENT_TYPE_METRICS: EventType
EVENT_TYPE_LOG: EventType
EVENT_TYPE_ARTIFACT: EventType

class ModelRef(_message.Message):
    __slots__ = ("path", "tokenizer_path")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    tokenizer_path: str
    def __init__(self, path: _Optional[str] = ..., tokenizer_path: _Optional[str] = ...) -> None: ...

class DatasetRef(_message.Message):
    __slots__ = ("path", "format", "prompt_column", "completion_column", "messages_column")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COLUMN_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_COLUMN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_COLUMN_FIELD_NUMBER: _ClassVar[int]
    path: str
    format: DatasetFormat
    prompt_column: str
    completion_column: str
    messages_column: str
    def __init__(self, path: _Optional[str] = ..., format: _Optional[_Union[DatasetFormat, str]] = ..., prompt_column: _Optional[str] = ..., completion_column: _Optional[str] = ..., messages_column: _Optional[str] = ...) -> None: ...

class DataSpec(_message.Message):
    __slots__ = ("train", "eval", "unlabeled", "test", "corpus", "test_corpus", "test_updated")
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    UNLABELED_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    TEST_CORPUS_FIELD_NUMBER: _ClassVar[int]
    TEST_UPDATED_FIELD_NUMBER: _ClassVar[int]
    train: DatasetRef
    eval: DatasetRef
    unlabeled: DatasetRef
    test: DatasetRef
    corpus: DatasetRef
    test_corpus: DatasetRef
    test_updated: DatasetRef
    def __init__(self, train: _Optional[_Union[DatasetRef, _Mapping]] = ..., eval: _Optional[_Union[DatasetRef, _Mapping]] = ..., unlabeled: _Optional[_Union[DatasetRef, _Mapping]] = ..., test: _Optional[_Union[DatasetRef, _Mapping]] = ..., corpus: _Optional[_Union[DatasetRef, _Mapping]] = ..., test_corpus: _Optional[_Union[DatasetRef, _Mapping]] = ..., test_updated: _Optional[_Union[DatasetRef, _Mapping]] = ...) -> None: ...

class RetrievalSpec(_message.Message):
    __slots__ = ("top_k", "retriever", "template", "passage_template", "gold_column", "embedding_model")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    GOLD_COLUMN_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    retriever: RetrieverKind
    template: str
    passage_template: str
    gold_column: str
    embedding_model: str
    def __init__(self, top_k: _Optional[int] = ..., retriever: _Optional[_Union[RetrieverKind, str]] = ..., template: _Optional[str] = ..., passage_template: _Optional[str] = ..., gold_column: _Optional[str] = ..., embedding_model: _Optional[str] = ...) -> None: ...

class IndexStage(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditStage(_message.Message):
    __slots__ = ("min_rows", "max_empty_fraction", "max_duplicate_fraction", "max_near_duplicate_fraction", "max_leakage_fraction", "near_duplicate_threshold", "max_tokens", "label_fields", "warn_only")
    MIN_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_EMPTY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_DUPLICATE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_NEAR_DUPLICATE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_LEAKAGE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NEAR_DUPLICATE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELDS_FIELD_NUMBER: _ClassVar[int]
    WARN_ONLY_FIELD_NUMBER: _ClassVar[int]
    min_rows: int
    max_empty_fraction: float
    max_duplicate_fraction: float
    max_near_duplicate_fraction: float
    max_leakage_fraction: float
    near_duplicate_threshold: float
    max_tokens: int
    label_fields: _containers.RepeatedScalarFieldContainer[str]
    warn_only: bool
    def __init__(self, min_rows: _Optional[int] = ..., max_empty_fraction: _Optional[float] = ..., max_duplicate_fraction: _Optional[float] = ..., max_near_duplicate_fraction: _Optional[float] = ..., max_leakage_fraction: _Optional[float] = ..., near_duplicate_threshold: _Optional[float] = ..., max_tokens: _Optional[int] = ..., label_fields: _Optional[_Iterable[str]] = ..., warn_only: _Optional[bool] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class OptimConfig(_message.Message):
    __slots__ = ("learning_rate", "batch_size", "gradient_accumulation_steps", "weight_decay", "warmup_steps", "zero_stage", "max_steps", "epochs", "checkpoint_every", "lr_scheduler_type", "dtype", "gradient_checkpointing")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULER_TYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int
    weight_decay: float
    warmup_steps: int
    zero_stage: int
    max_steps: int
    epochs: int
    checkpoint_every: int
    lr_scheduler_type: str
    dtype: str
    gradient_checkpointing: bool
    def __init__(self, learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., weight_decay: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., zero_stage: _Optional[int] = ..., max_steps: _Optional[int] = ..., epochs: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., lr_scheduler_type: _Optional[str] = ..., dtype: _Optional[str] = ..., gradient_checkpointing: _Optional[bool] = ...) -> None: ...

class SftStage(_message.Message):
    __slots__ = ("adapter", "lora", "optim", "max_length", "eval_every", "merge", "without_passages")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIM_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    WITHOUT_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterType
    lora: LoraConfig
    optim: OptimConfig
    max_length: int
    eval_every: int
    merge: bool
    without_passages: bool
    def __init__(self, adapter: _Optional[_Union[AdapterType, str]] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., optim: _Optional[_Union[OptimConfig, _Mapping]] = ..., max_length: _Optional[int] = ..., eval_every: _Optional[int] = ..., merge: _Optional[bool] = ..., without_passages: _Optional[bool] = ...) -> None: ...

class RewardFunction(_message.Message):
    __slots__ = ("name", "weight", "timeout_s", "args")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    timeout_s: float
    args: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., timeout_s: _Optional[float] = ..., args: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GrpoStage(_message.Message):
    __slots__ = ("group_size", "loss_type", "beta", "epsilon", "epsilon_high", "num_iterations", "scale_rewards", "max_staleness", "max_new_tokens", "temperature", "top_p", "rewards", "adapter", "lora", "optim", "dynamic_sampling", "prompts_per_step", "max_resample", "importance_sampling_level", "mask_truncated_completions", "importance_sampling_mode", "importance_sampling_cap", "max_reward_failure_fraction", "prompts")
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOSS_TYPE_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_HIGH_FIELD_NUMBER: _ClassVar[int]
    NUM_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    SCALE_REWARDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIM_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_RESAMPLE_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLING_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MASK_TRUNCATED_COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLING_MODE_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_SAMPLING_CAP_FIELD_NUMBER: _ClassVar[int]
    MAX_REWARD_FAILURE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    group_size: int
    loss_type: str
    beta: float
    epsilon: float
    epsilon_high: float
    num_iterations: int
    scale_rewards: str
    max_staleness: int
    max_new_tokens: int
    temperature: float
    top_p: float
    rewards: _containers.RepeatedCompositeFieldContainer[RewardFunction]
    adapter: AdapterType
    lora: LoraConfig
    optim: OptimConfig
    dynamic_sampling: bool
    prompts_per_step: int
    max_resample: int
    importance_sampling_level: str
    mask_truncated_completions: bool
    importance_sampling_mode: str
    importance_sampling_cap: float
    max_reward_failure_fraction: float
    prompts: str
    def __init__(self, group_size: _Optional[int] = ..., loss_type: _Optional[str] = ..., beta: _Optional[float] = ..., epsilon: _Optional[float] = ..., epsilon_high: _Optional[float] = ..., num_iterations: _Optional[int] = ..., scale_rewards: _Optional[str] = ..., max_staleness: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., rewards: _Optional[_Iterable[_Union[RewardFunction, _Mapping]]] = ..., adapter: _Optional[_Union[AdapterType, str]] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., optim: _Optional[_Union[OptimConfig, _Mapping]] = ..., dynamic_sampling: _Optional[bool] = ..., prompts_per_step: _Optional[int] = ..., max_resample: _Optional[int] = ..., importance_sampling_level: _Optional[str] = ..., mask_truncated_completions: _Optional[bool] = ..., importance_sampling_mode: _Optional[str] = ..., importance_sampling_cap: _Optional[float] = ..., max_reward_failure_fraction: _Optional[float] = ..., prompts: _Optional[str] = ...) -> None: ...

class StudentInit(_message.Message):
    __slots__ = ("keep_every_nth_layer", "from_tuned", "config_overrides", "layer_choice", "importance_prompts")
    class ConfigOverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KEEP_EVERY_NTH_LAYER_FIELD_NUMBER: _ClassVar[int]
    FROM_TUNED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    LAYER_CHOICE_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    keep_every_nth_layer: int
    from_tuned: bool
    config_overrides: _containers.ScalarMap[str, int]
    layer_choice: str
    importance_prompts: int
    def __init__(self, keep_every_nth_layer: _Optional[int] = ..., from_tuned: _Optional[bool] = ..., config_overrides: _Optional[_Mapping[str, int]] = ..., layer_choice: _Optional[str] = ..., importance_prompts: _Optional[int] = ...) -> None: ...

class DistillUntil(_message.Message):
    __slots__ = ("metric", "patience", "max_steps", "eval_every", "min_delta")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    metric: str
    patience: int
    max_steps: int
    eval_every: int
    min_delta: float
    def __init__(self, metric: _Optional[str] = ..., patience: _Optional[int] = ..., max_steps: _Optional[int] = ..., eval_every: _Optional[int] = ..., min_delta: _Optional[float] = ...) -> None: ...

class DistillStage(_message.Message):
    __slots__ = ("mode", "num_samples", "rewards", "filter", "min_reward", "top_k", "alpha", "kd_loss", "jsd_beta", "temperature", "max_new_tokens", "optim", "reuse_journal_of", "student_init", "eval_prompts", "prompts_per_step", "baseline", "min_agreement", "max_ahead", "scale_by_t2", "samples_per_step", "max_resample", "min_kept_fraction", "max_reward_failure_fraction", "student_without_passages", "sampling_temperature", "until")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MIN_REWARD_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    KD_LOSS_FIELD_NUMBER: _ClassVar[int]
    JSD_BETA_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPTIM_FIELD_NUMBER: _ClassVar[int]
    REUSE_JOURNAL_OF_FIELD_NUMBER: _ClassVar[int]
    STUDENT_INIT_FIELD_NUMBER: _ClassVar[int]
    EVAL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    MIN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_AHEAD_FIELD_NUMBER: _ClassVar[int]
    SCALE_BY_T2_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_RESAMPLE_FIELD_NUMBER: _ClassVar[int]
    MIN_KEPT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_REWARD_FAILURE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    STUDENT_WITHOUT_PASSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    mode: str
    num_samples: int
    rewards: _containers.RepeatedCompositeFieldContainer[RewardFunction]
    filter: str
    min_reward: float
    top_k: int
    alpha: float
    kd_loss: str
    jsd_beta: float
    temperature: float
    max_new_tokens: int
    optim: OptimConfig
    reuse_journal_of: str
    student_init: StudentInit
    eval_prompts: int
    prompts_per_step: int
    baseline: bool
    min_agreement: float
    max_ahead: int
    scale_by_t2: bool
    samples_per_step: int
    max_resample: int
    min_kept_fraction: float
    max_reward_failure_fraction: float
    student_without_passages: bool
    sampling_temperature: float
    until: DistillUntil
    def __init__(self, mode: _Optional[str] = ..., num_samples: _Optional[int] = ..., rewards: _Optional[_Iterable[_Union[RewardFunction, _Mapping]]] = ..., filter: _Optional[str] = ..., min_reward: _Optional[float] = ..., top_k: _Optional[int] = ..., alpha: _Optional[float] = ..., kd_loss: _Optional[str] = ..., jsd_beta: _Optional[float] = ..., temperature: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., optim: _Optional[_Union[OptimConfig, _Mapping]] = ..., reuse_journal_of: _Optional[str] = ..., student_init: _Optional[_Union[StudentInit, _Mapping]] = ..., eval_prompts: _Optional[int] = ..., prompts_per_step: _Optional[int] = ..., baseline: _Optional[bool] = ..., min_agreement: _Optional[float] = ..., max_ahead: _Optional[int] = ..., scale_by_t2: _Optional[bool] = ..., samples_per_step: _Optional[int] = ..., max_resample: _Optional[int] = ..., min_kept_fraction: _Optional[float] = ..., max_reward_failure_fraction: _Optional[float] = ..., student_without_passages: _Optional[bool] = ..., sampling_temperature: _Optional[float] = ..., until: _Optional[_Union[DistillUntil, _Mapping]] = ..., **kwargs) -> None: ...

class EvaluateStage(_message.Message):
    __slots__ = ("metrics", "max_new_tokens", "limit", "gates", "few_shot", "target", "rungs", "min_retained")
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    FEW_SHOT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RUNGS_FIELD_NUMBER: _ClassVar[int]
    MIN_RETAINED_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.RepeatedCompositeFieldContainer[RewardFunction]
    max_new_tokens: int
    limit: int
    gates: _containers.RepeatedCompositeFieldContainer[EvalGate]
    few_shot: int
    target: EvalTarget
    rungs: _containers.RepeatedScalarFieldContainer[str]
    min_retained: float
    def __init__(self, metrics: _Optional[_Iterable[_Union[RewardFunction, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., limit: _Optional[int] = ..., gates: _Optional[_Iterable[_Union[EvalGate, _Mapping]]] = ..., few_shot: _Optional[int] = ..., target: _Optional[_Union[EvalTarget, _Mapping]] = ..., rungs: _Optional[_Iterable[str]] = ..., min_retained: _Optional[float] = ...) -> None: ...

class EvalTarget(_message.Message):
    __slots__ = ("metric", "min")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    metric: str
    min: float
    def __init__(self, metric: _Optional[str] = ..., min: _Optional[float] = ...) -> None: ...

class EvalGate(_message.Message):
    __slots__ = ("model", "baseline", "metric", "min_margin", "min", "use_ci_low")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MIN_MARGIN_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    USE_CI_LOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    baseline: str
    metric: str
    min_margin: float
    min: float
    use_ci_low: bool
    def __init__(self, model: _Optional[str] = ..., baseline: _Optional[str] = ..., metric: _Optional[str] = ..., min_margin: _Optional[float] = ..., min: _Optional[float] = ..., use_ci_low: _Optional[bool] = ...) -> None: ...

class ExportStage(_message.Message):
    __slots__ = ("merge_adapter", "dtype")
    MERGE_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    merge_adapter: bool
    dtype: str
    def __init__(self, merge_adapter: _Optional[bool] = ..., dtype: _Optional[str] = ...) -> None: ...

class Stage(_message.Message):
    __slots__ = ("name", "audit", "sft", "grpo", "distill", "evaluate", "export", "index")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    SFT_FIELD_NUMBER: _ClassVar[int]
    GRPO_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    name: str
    audit: AuditStage
    sft: SftStage
    grpo: GrpoStage
    distill: DistillStage
    evaluate: EvaluateStage
    export: ExportStage
    index: IndexStage
    def __init__(self, name: _Optional[str] = ..., audit: _Optional[_Union[AuditStage, _Mapping]] = ..., sft: _Optional[_Union[SftStage, _Mapping]] = ..., grpo: _Optional[_Union[GrpoStage, _Mapping]] = ..., distill: _Optional[_Union[DistillStage, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluateStage, _Mapping]] = ..., export: _Optional[_Union[ExportStage, _Mapping]] = ..., index: _Optional[_Union[IndexStage, _Mapping]] = ...) -> None: ...

class RoleResources(_message.Message):
    __slots__ = ("replicas", "num_cpus", "num_gpus", "custom", "threads", "engine")
    class CustomEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NUM_CPUS_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    replicas: int
    num_cpus: float
    num_gpus: float
    custom: _containers.ScalarMap[str, float]
    threads: int
    engine: str
    def __init__(self, replicas: _Optional[int] = ..., num_cpus: _Optional[float] = ..., num_gpus: _Optional[float] = ..., custom: _Optional[_Mapping[str, float]] = ..., threads: _Optional[int] = ..., engine: _Optional[str] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("generator", "scorer", "trainer", "student", "retriever", "auto_gpus")
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVER_FIELD_NUMBER: _ClassVar[int]
    AUTO_GPUS_FIELD_NUMBER: _ClassVar[int]
    generator: RoleResources
    scorer: RoleResources
    trainer: RoleResources
    student: RoleResources
    retriever: RoleResources
    auto_gpus: bool
    def __init__(self, generator: _Optional[_Union[RoleResources, _Mapping]] = ..., scorer: _Optional[_Union[RoleResources, _Mapping]] = ..., trainer: _Optional[_Union[RoleResources, _Mapping]] = ..., student: _Optional[_Union[RoleResources, _Mapping]] = ..., retriever: _Optional[_Union[RoleResources, _Mapping]] = ..., auto_gpus: _Optional[bool] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("display_name", "teacher", "student", "data", "stages", "resources", "seed", "max_retries", "timeout_s", "resume_from", "retrieval", "tracking")
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    TRACKING_FIELD_NUMBER: _ClassVar[int]
    display_name: str
    teacher: ModelRef
    student: ModelRef
    data: DataSpec
    stages: _containers.RepeatedCompositeFieldContainer[Stage]
    resources: Resources
    seed: int
    max_retries: int
    timeout_s: float
    resume_from: str
    retrieval: RetrievalSpec
    tracking: TrackingSpec
    def __init__(self, display_name: _Optional[str] = ..., teacher: _Optional[_Union[ModelRef, _Mapping]] = ..., student: _Optional[_Union[ModelRef, _Mapping]] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., stages: _Optional[_Iterable[_Union[Stage, _Mapping]]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., seed: _Optional[int] = ..., max_retries: _Optional[int] = ..., timeout_s: _Optional[float] = ..., resume_from: _Optional[str] = ..., retrieval: _Optional[_Union[RetrievalSpec, _Mapping]] = ..., tracking: _Optional[_Union[TrackingSpec, _Mapping]] = ...) -> None: ...

class TrackingSpec(_message.Message):
    __slots__ = ("report_to", "mlflow_tracking_uri", "mlflow_experiment")
    REPORT_TO_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_TRACKING_URI_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    report_to: _containers.RepeatedScalarFieldContainer[str]
    mlflow_tracking_uri: str
    mlflow_experiment: str
    def __init__(self, report_to: _Optional[_Iterable[str]] = ..., mlflow_tracking_uri: _Optional[str] = ..., mlflow_experiment: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("done", "total", "unit")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    unit: str
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ..., unit: _Optional[str] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("name", "kind", "state", "progress", "metrics", "error", "start_time", "end_time")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    state: StageState
    progress: Progress
    metrics: _containers.ScalarMap[str, float]
    error: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[StageState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("stage", "reason")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    stage: str
    reason: str
    def __init__(self, stage: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "request_id", "labels", "spec", "state", "stages", "error", "create_time", "start_time", "end_time", "last_event_seq", "dashboard_url", "actors")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    DASHBOARD_URL_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    id: str
    request_id: str
    labels: _containers.ScalarMap[str, str]
    spec: JobSpec
    state: JobState
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    error: JobError
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    last_event_seq: int
    dashboard_url: str
    actors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., request_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_event_seq: _Optional[int] = ..., dashboard_url: _Optional[str] = ..., actors: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("job_id", "seq", "time", "type", "stage", "message", "job_state", "stage_state", "progress", "metrics", "artifact", "outputs")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    type: EventType
    stage: str
    message: str
    job_state: JobState
    stage_state: StageState
    progress: Progress
    metrics: _containers.ScalarMap[str, float]
    artifact: Artifact
    outputs: str
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., type: _Optional[_Union[EventType, str]] = ..., stage: _Optional[str] = ..., message: _Optional[str] = ..., job_state: _Optional[_Union[JobState, str]] = ..., stage_state: _Optional[_Union[StageState, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., outputs: _Optional[str] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "kind", "uri", "size_bytes", "sha256", "stage")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    uri: str
    size_bytes: int
    sha256: str
    stage: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., uri: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...
