"""What edge nodes and model workers share in Redis: key names, the job and result entries, the Lua scripts.

Per remote channel, a job stream `PREFIX:model:jobs:CHANNEL` read by the consumer group `workers` (one consumer per
model worker). Per job: its result stream `...:out:JOB` (chunks with their checkpoint, then one end entry), its pushed
input `...:in:JOB`, its owner `...:owner:JOB` (the worker whose writes count: a worker that claims the job takes it, so a
stalled one can no longer write) and, once its client left, `...:cancelled:JOB`. Workers announce themselves in a sorted
set scored by Redis's clock (`...:workers`, with what each serves in `...:workers:info`); edge nodes keep
`...:edge:NODE` alive, so that workers drop the jobs of a node that died. See docs/architecture.md#the-model-tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

GROUP = "workers"
WORKER_TTL = 3.0  # seconds without a heartbeat after which a worker counts as gone
WORKER_BEAT = 1.0
EDGE_TTL = 5.0  # seconds without an edge node's sign of life after which workers drop its jobs
EDGE_BEAT = 0.5
JOB_FIELDS = ("job", "params", "tenant", "start", "positions", "edge")

# Chunk entry: k=c, s=seq, d=data (JSON), p=position (JSON); end entry: k=e, r=reason, c=code, m=message.
# Writes count only while the writer owns the job; each refreshes the job's keys' expiry.
WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# A worker's heartbeat, scored by Redis's clock (nodes' clocks may differ); drops workers silent for ARGV[3] ms.
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
for _, name in ipairs(gone) do
  redis.call('ZREM', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
end
return now
"""

# What the live workers (heartbeat within ARGV[1] ms) serve.
LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local names = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
if #names == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(names))
"""


Fields = dict[bytes, bytes]
Entries = list[tuple[bytes, Fields]]


def entries(reply: Any) -> Entries:
    """The entries of an XREAD or XREADGROUP reply on one stream (the clients do not decode responses)."""
    return cast("Entries", reply[0][1]) if reply else []


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of the model tier under one deployment's prefix."""

    prefix: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:model"

    def jobs(self, channel: str) -> str:
        return f"{self.base}:jobs:{channel}"

    def out(self, job: str) -> str:
        return f"{self.base}:out:{job}"

    def input(self, job: str) -> str:
        return f"{self.base}:in:{job}"

    def owner(self, job: str) -> str:
        return f"{self.base}:owner:{job}"

    def cancelled(self, job: str) -> str:
        return f"{self.base}:cancelled:{job}"

    def edge(self, node: str) -> str:
        return f"{self.base}:edge:{node}"

    @property
    def workers(self) -> str:
        return f"{self.base}:workers"

    @property
    def info(self) -> str:
        return f"{self.base}:workers:info"

    @property
    def cancel(self) -> str:
        """The pub/sub channel on which an edge node names a job whose client left."""
        return f"{self.base}:cancel"
