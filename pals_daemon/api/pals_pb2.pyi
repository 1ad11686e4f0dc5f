from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProfileState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROFILE_STATE_UNSPECIFIED: _ClassVar[ProfileState]
    PROFILE_STATE_RUNNING: _ClassVar[ProfileState]
    PROFILE_STATE_DONE: _ClassVar[ProfileState]
    PROFILE_STATE_FAILED: _ClassVar[ProfileState]
    PROFILE_STATE_CANCELLED: _ClassVar[ProfileState]
PROFILE_STATE_UNSPECIFIED: ProfileState
PROFILE_STATE_RUNNING: ProfileState
PROFILE_STATE_DONE: ProfileState
PROFILE_STATE_FAILED: ProfileState
PROFILE_STATE_CANCELLED: ProfileState

class GpuStatus(_message.Message):
    __slots__ = ("index", "uuid", "name", "min_limit_w", "max_limit_w", "default_limit_w", "requested_limit_w", "enforced_limit_w", "original_limit_w", "power_w", "power_instant_w", "energy_j", "sm_clock_mhz", "clock_event_reasons", "power_capped", "controlled", "fault", "engine_id", "decided_limit_w", "limit_drift", "external_limit_w", "clock_control", "clock_control_note", "locked_clock_requested_mhz", "locked_clock_decided_mhz", "min_clock_mhz", "max_clock_mhz", "clock_external")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MIN_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    MAX_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    POWER_INSTANT_W_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    CLOCK_EVENT_REASONS_FIELD_NUMBER: _ClassVar[int]
    POWER_CAPPED_FIELD_NUMBER: _ClassVar[int]
    CONTROLLED_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    DECIDED_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    LIMIT_DRIFT_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    CLOCK_CONTROL_FIELD_NUMBER: _ClassVar[int]
    CLOCK_CONTROL_NOTE_FIELD_NUMBER: _ClassVar[int]
    LOCKED_CLOCK_REQUESTED_MHZ_FIELD_NUMBER: _ClassVar[int]
    LOCKED_CLOCK_DECIDED_MHZ_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MAX_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    CLOCK_EXTERNAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    requested_limit_w: float
    enforced_limit_w: float
    original_limit_w: float
    power_w: float
    power_instant_w: float
    energy_j: float
    sm_clock_mhz: int
    clock_event_reasons: int
    power_capped: bool
    controlled: bool
    fault: str
    engine_id: str
    decided_limit_w: float
    limit_drift: bool
    external_limit_w: float
    clock_control: bool
    clock_control_note: str
    locked_clock_requested_mhz: int
    locked_clock_decided_mhz: int
    min_clock_mhz: int
    max_clock_mhz: int
    clock_external: bool
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., min_limit_w: _Optional[float] = ..., max_limit_w: _Optional[float] = ..., default_limit_w: _Optional[float] = ..., requested_limit_w: _Optional[float] = ..., enforced_limit_w: _Optional[float] = ..., original_limit_w: _Optional[float] = ..., power_w: _Optional[float] = ..., power_instant_w: _Optional[float] = ..., energy_j: _Optional[float] = ..., sm_clock_mhz: _Optional[int] = ..., clock_event_reasons: _Optional[int] = ..., power_capped: _Optional[bool] = ..., controlled: _Optional[bool] = ..., fault: _Optional[str] = ..., engine_id: _Optional[str] = ..., decided_limit_w: _Optional[float] = ..., limit_drift: _Optional[bool] = ..., external_limit_w: _Optional[float] = ..., clock_control: _Optional[bool] = ..., clock_control_note: _Optional[str] = ..., locked_clock_requested_mhz: _Optional[int] = ..., locked_clock_decided_mhz: _Optional[int] = ..., min_clock_mhz: _Optional[int] = ..., max_clock_mhz: _Optional[int] = ..., clock_external: _Optional[bool] = ...) -> None: ...

class EngineTargets(_message.Message):
    __slots__ = ("tokens_per_s", "ttft_ms", "tpot_ms")
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    tokens_per_s: float
    ttft_ms: float
    tpot_ms: float
    def __init__(self, tokens_per_s: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ...) -> None: ...

class EngineStatus(_message.Message):
    __slots__ = ("engine_id", "model", "gpu_indices", "connected", "configured_max_num_seqs", "configured_max_num_batched_tokens", "targets", "max_num_seqs_limit", "max_num_batched_tokens_limit", "throughput_tokens_per_s", "tokens_per_joule", "qos_violation_fraction", "num_running", "num_waiting", "predicted_tokens_per_s", "predicted_power_w", "has_profile", "windows", "qos_violation_windows")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_JOULE_FIELD_NUMBER: _ClassVar[int]
    QOS_VIOLATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_POWER_W_FIELD_NUMBER: _ClassVar[int]
    HAS_PROFILE_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    QOS_VIOLATION_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    model: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    connected: bool
    configured_max_num_seqs: int
    configured_max_num_batched_tokens: int
    targets: EngineTargets
    max_num_seqs_limit: int
    max_num_batched_tokens_limit: int
    throughput_tokens_per_s: float
    tokens_per_joule: float
    qos_violation_fraction: float
    num_running: int
    num_waiting: int
    predicted_tokens_per_s: float
    predicted_power_w: float
    has_profile: bool
    windows: int
    qos_violation_windows: int
    def __init__(self, engine_id: _Optional[str] = ..., model: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., connected: _Optional[bool] = ..., configured_max_num_seqs: _Optional[int] = ..., configured_max_num_batched_tokens: _Optional[int] = ..., targets: _Optional[_Union[EngineTargets, _Mapping]] = ..., max_num_seqs_limit: _Optional[int] = ..., max_num_batched_tokens_limit: _Optional[int] = ..., throughput_tokens_per_s: _Optional[float] = ..., tokens_per_joule: _Optional[float] = ..., qos_violation_fraction: _Optional[float] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., predicted_tokens_per_s: _Optional[float] = ..., predicted_power_w: _Optional[float] = ..., has_profile: _Optional[bool] = ..., windows: _Optional[int] = ..., qos_violation_windows: _Optional[int] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("budget_w", "effective_budget_w", "ramp_remaining_s", "min_budget_w", "max_budget_w", "sum_requested_limits_w", "sum_enforced_limits_w", "node_power_w")
    BUDGET_W_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_BUDGET_W_FIELD_NUMBER: _ClassVar[int]
    RAMP_REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    MIN_BUDGET_W_FIELD_NUMBER: _ClassVar[int]
    MAX_BUDGET_W_FIELD_NUMBER: _ClassVar[int]
    SUM_REQUESTED_LIMITS_W_FIELD_NUMBER: _ClassVar[int]
    SUM_ENFORCED_LIMITS_W_FIELD_NUMBER: _ClassVar[int]
    NODE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    budget_w: float
    effective_budget_w: float
    ramp_remaining_s: float
    min_budget_w: float
    max_budget_w: float
    sum_requested_limits_w: float
    sum_enforced_limits_w: float
    node_power_w: float
    def __init__(self, budget_w: _Optional[float] = ..., effective_budget_w: _Optional[float] = ..., ramp_remaining_s: _Optional[float] = ..., min_budget_w: _Optional[float] = ..., max_budget_w: _Optional[float] = ..., sum_requested_limits_w: _Optional[float] = ..., sum_enforced_limits_w: _Optional[float] = ..., node_power_w: _Optional[float] = ...) -> None: ...

class ControllerStatus(_message.Message):
    __slots__ = ("mode", "backend", "period_s", "ticks", "decisions_changed", "last_tick_duration_s", "last_reason", "last_tick_started_unix_s", "state_save_error", "state_save_failures")
    MODE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    TICKS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    LAST_TICK_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_TICK_STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    STATE_SAVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATE_SAVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    mode: str
    backend: str
    period_s: float
    ticks: int
    decisions_changed: int
    last_tick_duration_s: float
    last_reason: str
    last_tick_started_unix_s: float
    state_save_error: str
    state_save_failures: int
    def __init__(self, mode: _Optional[str] = ..., backend: _Optional[str] = ..., period_s: _Optional[float] = ..., ticks: _Optional[int] = ..., decisions_changed: _Optional[int] = ..., last_tick_duration_s: _Optional[float] = ..., last_reason: _Optional[str] = ..., last_tick_started_unix_s: _Optional[float] = ..., state_save_error: _Optional[str] = ..., state_save_failures: _Optional[int] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("timestamp_unix_s", "gpus", "engines", "budget", "controller")
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    timestamp_unix_s: float
    gpus: _containers.RepeatedCompositeFieldContainer[GpuStatus]
    engines: _containers.RepeatedCompositeFieldContainer[EngineStatus]
    budget: BudgetStatus
    controller: ControllerStatus
    def __init__(self, timestamp_unix_s: _Optional[float] = ..., gpus: _Optional[_Iterable[_Union[GpuStatus, _Mapping]]] = ..., engines: _Optional[_Iterable[_Union[EngineStatus, _Mapping]]] = ..., budget: _Optional[_Union[BudgetStatus, _Mapping]] = ..., controller: _Optional[_Union[ControllerStatus, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("budget_w", "clear", "ramp_s")
    BUDGET_W_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    RAMP_S_FIELD_NUMBER: _ClassVar[int]
    budget_w: float
    clear: bool
    ramp_s: float
    def __init__(self, budget_w: _Optional[float] = ..., clear: _Optional[bool] = ..., ramp_s: _Optional[float] = ...) -> None: ...

class SetEngineTargetsRequest(_message.Message):
    __slots__ = ("engine_id", "targets")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    targets: EngineTargets
    def __init__(self, engine_id: _Optional[str] = ..., targets: _Optional[_Union[EngineTargets, _Mapping]] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("interval_s",)
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    def __init__(self, interval_s: _Optional[float] = ...) -> None: ...

class StartProfileRequest(_message.Message):
    __slots__ = ("engine_id", "caps_w", "batches", "hold_s", "settle_s", "output_path", "parallelism", "clocks_mhz")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPS_W_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    HOLD_S_FIELD_NUMBER: _ClassVar[int]
    SETTLE_S_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_MHZ_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    caps_w: _containers.RepeatedScalarFieldContainer[float]
    batches: _containers.RepeatedScalarFieldContainer[int]
    hold_s: float
    settle_s: float
    output_path: str
    parallelism: str
    clocks_mhz: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, engine_id: _Optional[str] = ..., caps_w: _Optional[_Iterable[float]] = ..., batches: _Optional[_Iterable[int]] = ..., hold_s: _Optional[float] = ..., settle_s: _Optional[float] = ..., output_path: _Optional[str] = ..., parallelism: _Optional[str] = ..., clocks_mhz: _Optional[_Iterable[int]] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("engine_id",)
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    def __init__(self, engine_id: _Optional[str] = ...) -> None: ...

class CancelProfileRequest(_message.Message):
    __slots__ = ("engine_id",)
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    def __init__(self, engine_id: _Optional[str] = ...) -> None: ...

class ProfilePointResult(_message.Message):
    __slots__ = ("cap_w", "batch", "tokens_per_s", "gpu_power_w", "clock_mhz")
    CAP_W_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GPU_POWER_W_FIELD_NUMBER: _ClassVar[int]
    CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    cap_w: float
    batch: int
    tokens_per_s: float
    gpu_power_w: float
    clock_mhz: int
    def __init__(self, cap_w: _Optional[float] = ..., batch: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., gpu_power_w: _Optional[float] = ..., clock_mhz: _Optional[int] = ...) -> None: ...

class ProfileJob(_message.Message):
    __slots__ = ("engine_id", "state", "points_done", "points_total", "current", "phase", "error", "output_path", "points", "elapsed_s", "estimated_remaining_s", "warnings")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POINTS_DONE_FIELD_NUMBER: _ClassVar[int]
    POINTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    state: ProfileState
    points_done: int
    points_total: int
    current: ProfilePointResult
    phase: str
    error: str
    output_path: str
    points: _containers.RepeatedCompositeFieldContainer[ProfilePointResult]
    elapsed_s: float
    estimated_remaining_s: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, engine_id: _Optional[str] = ..., state: _Optional[_Union[ProfileState, str]] = ..., points_done: _Optional[int] = ..., points_total: _Optional[int] = ..., current: _Optional[_Union[ProfilePointResult, _Mapping]] = ..., phase: _Optional[str] = ..., error: _Optional[str] = ..., output_path: _Optional[str] = ..., points: _Optional[_Iterable[_Union[ProfilePointResult, _Mapping]]] = ..., elapsed_s: _Optional[float] = ..., estimated_remaining_s: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("engine_id", "model", "gpu_uuids", "gpu_indices", "max_num_seqs", "max_num_batched_tokens", "client_version")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    model: str
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    max_num_seqs: int
    max_num_batched_tokens: int
    client_version: str
    def __init__(self, engine_id: _Optional[str] = ..., model: _Optional[str] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., client_version: _Optional[str] = ...) -> None: ...

class FinishedRequest(_message.Message):
    __slots__ = ("ttft_ms", "tpot_ms", "prompt_tokens", "output_tokens")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: float
    tpot_ms: float
    prompt_tokens: int
    output_tokens: int
    def __init__(self, ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("window_s", "num_steps", "busy_s", "num_running", "num_waiting", "prefill_tokens", "decode_tokens", "kv_cache_usage", "arrived_requests", "finished")
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    window_s: float
    num_steps: int
    busy_s: float
    num_running: int
    num_waiting: int
    prefill_tokens: int
    decode_tokens: int
    kv_cache_usage: float
    arrived_requests: int
    finished: _containers.RepeatedCompositeFieldContainer[FinishedRequest]
    def __init__(self, window_s: _Optional[float] = ..., num_steps: _Optional[int] = ..., busy_s: _Optional[float] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., decode_tokens: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., arrived_requests: _Optional[int] = ..., finished: _Optional[_Iterable[_Union[FinishedRequest, _Mapping]]] = ...) -> None: ...

class LayerExpertLoad(_message.Message):
    __slots__ = ("layer", "tokens_per_expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens_per_expert: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens_per_expert: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertLoadReport(_message.Message):
    __slots__ = ("gpu_uuid", "gpu_index", "window_s", "layers")
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    gpu_uuid: str
    gpu_index: int
    window_s: float
    layers: _containers.RepeatedCompositeFieldContainer[LayerExpertLoad]
    def __init__(self, gpu_uuid: _Optional[str] = ..., gpu_index: _Optional[int] = ..., window_s: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[LayerExpertLoad, _Mapping]]] = ...) -> None: ...

class EngineMessage(_message.Message):
    __slots__ = ("register", "step", "expert_load")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    register: Register
    step: StepReport
    expert_load: ExpertLoadReport
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., step: _Optional[_Union[StepReport, _Mapping]] = ..., expert_load: _Optional[_Union[ExpertLoadReport, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("session_id", "report_interval_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    report_interval_s: float
    def __init__(self, session_id: _Optional[str] = ..., report_interval_s: _Optional[float] = ...) -> None: ...

class Directive(_message.Message):
    __slots__ = ("sequence", "max_num_seqs", "max_num_batched_tokens", "ttl_ms")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    max_num_seqs: int
    max_num_batched_tokens: int
    ttl_ms: int
    def __init__(self, sequence: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class ExpertLoadAck(_message.Message):
    __slots__ = ("accepted", "unattributed")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UNATTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    unattributed: int
    def __init__(self, accepted: _Optional[int] = ..., unattributed: _Optional[int] = ...) -> None: ...

class DaemonMessage(_message.Message):
    __slots__ = ("registered", "directive")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVE_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    directive: Directive
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., directive: _Optional[_Union[Directive, _Mapping]] = ...) -> None: ...
