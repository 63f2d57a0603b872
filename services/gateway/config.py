"""Gateway configuration (environment prefix ``SF_GATEWAY_``)."""

from __future__ import annotations

import os
import socket
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SF_GATEWAY_")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    gateway_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Names this replica in Redis routes.",
    )
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_max_connections: int = Field(64, ge=1, description="Pooled Redis connections.")
    # gRPC targets: host:port, a comma-separated list, or dns:///headless-svc:port.
    vad_target: str = "127.0.0.1:50051"
    asr_target: str = "127.0.0.1:50052"
    speaker_target: str = "127.0.0.1:50053"

    # Per-device tokens (services/gateway/auth.py): HMAC-SHA256 over
    # "client_id|device_id|timestamp", as xiaozhi-esp32-server issues them.
    auth_secret: SecretStr = Field(
        SecretStr(""),
        description="HMAC secret of per-device tokens (xiaozhi-esp32-server's server.auth_key).",
    )
    auth_token_max_age_s: int = Field(
        30 * 24 * 3600, gt=0, description="A per-device token is valid this long after issue."
    )
    # Testing only: shared tokens admit any Device-Id, so identity is not verified.
    allow_shared_tokens: bool = Field(
        False,
        description="Also accept auth_tokens and the Redis set sf:auth:tokens, for any device.",
    )
    # Shared device tokens, used only with allow_shared_tokens: accepted besides
    # those in the Redis set sf:auth:tokens (comma-separated in the environment).
    auth_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allow_anonymous: bool = Field(
        False, description="Open mode for local use: accept devices without a valid token."
    )
    admin_token: str = Field("", description="Bearer token for the speaker enrolment API.")
    api_docs: bool = Field(False, description="Serve /docs, /redoc and /openapi.json.")
    handshake_timeout_s: float = Field(
        10.0,
        gt=0,
        le=120,
        description="A request's line and headers must arrive within this time; "
        "a slower client gets 408 and its socket is closed.",
    )

    hello_timeout_s: float = Field(10.0, gt=0)
    session_ttl_s: int = Field(3600, ge=60)
    max_sessions: int = Field(2000, ge=1)
    max_utterance_s: float = Field(30.0, gt=0, le=120)
    max_frames_per_s: int = Field(50, ge=1, description="Audio frames per second per session.")
    max_audio_speed: float = Field(
        2.0,
        gt=0,
        description="Seconds of audio a session may send per second (averaged over 5 s, "
        "plus a 2 s burst); a device streams in real time (1.0).",
    )
    max_text_messages_per_s: float = Field(10.0, gt=0, description="Per session, over 5 s.")
    max_text_bytes_per_s: float = Field(65536.0, gt=0, description="Per session, over 5 s.")
    max_sessions_per_token: int = Field(
        200, ge=1, description="Connections one credential may hold at once."
    )
    max_sessions_per_address: int = Field(
        0,
        ge=0,
        description="Connections one client address may hold at once; 0: no cap (behind a "
        "proxy every device has the proxy's address unless client_address_header is set).",
    )
    client_address_header: str = Field(
        "", description="Header carrying the client address set by a trusted proxy."
    )
    idle_timeout_s: float = Field(
        300.0, gt=0, description="Close a session that sends and receives nothing this long."
    )
    drain_timeout_s: float = Field(
        20.0, ge=0, description="On SIGTERM: time to finish in-flight utterances."
    )
    max_inflight_utterances: int = Field(4, ge=1, description="Per session, awaiting results.")
    vad_progress_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A VAD replica that leaves audio unacknowledged this long is treated as lost.",
    )
    vad_silence_ms: int = Field(500, ge=100, le=5000, description="End-of-speech window.")
    asr_language: str = "auto"
    asr_use_itn: bool = True
    asr_timeout_s: float = Field(10.0, gt=0)
    speaker_timeout_s: float = Field(10.0, gt=0)
    speaker_threshold: float = Field(0.75, ge=-1, le=1)
    min_utterance_ms: int = Field(200, ge=0)
    min_speech_dbfs: float = Field(
        -70.0,
        le=0,
        description="An utterance whose loudest 20 ms stays below this is dropped as silent.",
    )
    # The APIs of the servers xiaozhi-esp32-server already calls (services/gateway/compat/).
    compat_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API keys of the FunASR, OpenAI and voiceprint APIs (comma-separated); "
        "the Redis set sf:compat:keys is accepted too.",
    )
    compat_open: bool = Field(
        False, description="Open mode for a private network: the compatible APIs need no key."
    )
    funasr_port: int = Field(
        10095, ge=0, le=65535, description="FunASR WebSocket port (root path); 0: off."
    )
    funasr_max_message_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest FunASR message (one binary message may be a whole utterance).",
    )
    funasr_tags: bool = Field(
        True, description="Final FunASR texts start with SenseVoice tags (<|en|><|NEUTRAL|>...)."
    )
    funasr_max_partials: int = Field(
        16, ge=0, description="Partial re-recognitions in flight on this gateway; past it, skipped."
    )
    openai_max_upload_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest /v1/audio/transcriptions upload (413)."
    )
    openai_max_audio_s: float = Field(
        1800.0, gt=0, description="Longest audio one transcription request may decode to."
    )
    openai_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"],
        description="What `model` may name (comma-separated); all use the cluster's ASR.",
    )
    downlink_sample_rate: int = 24000
    downlink_frame_ms: int = 60
    log_level: str = "INFO"

    @field_validator("auth_tokens", "compat_keys", "openai_models", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value
