"""Taking over a session another node held: what the client missed, from Redis, and each stream going on here or ending.

See docs/protocol.md#resume-across-nodes: the replay entries after the client's last seq are sent again once, in
order; a restartable channel goes on at the next chunk (from the delivered chunks' positions when it needs them);
a channel that saves its state goes on from the last state in Redis (the client sending its pushed input again from
the state's position, or the stream ends with `input_lost`); a lossy one goes on from now; any other ends with
`producer_lost` (or `resume_gap` when what followed is gone).
"""

from __future__ import annotations

import logging
from typing import Any

from streamplex.server.channel import Channel, ChannelError
from streamplex.server.protocol import EndReason, encode, end_frame
from streamplex.server.session import Session
from streamplex.server.session_store import Entry, SavedState, SessionRecord, SessionStore

log = logging.getLogger("streamplex")


async def take_over(
    store: SessionStore,
    session: Session,
    record: SessionRecord,
    channels: dict[str, Channel],
    last_seqs: dict[str, int],
    inputs: dict[str, int] | None = None,
) -> tuple[dict[str, Any], list[Any]]:
    """Restore `record`'s streams into `session`: what `resumed` reports per stream, and the frames to send first
    (`inputs`: per stream, the byte of its pushed input from which the client can send it again)."""
    report: dict[str, Any] = {}
    frames: list[Any] = []
    for sid, spec in record.streams.items():
        last = last_seqs.get(sid, -1)
        channel = channels.get(spec.channel)
        lossy = channel is not None and channel.lossy
        positions: list[Any] | None = None
        if channel is not None and channel.needs_positions:  # it goes on from every delivered chunk's position
            entries = await store.replay(record.id, sid, -1) or []
            expected, replayed, positions, end = _walk(entries, 0, last, lossy)
            if expected <= last:  # Redis lacks some of what the client has: replay what it holds, but it cannot go on
                expected, replayed, _, end = _walk(entries, last + 1, last, lossy)
                positions = None
        else:
            entries = await store.replay(record.id, sid, last) or []
            expected, replayed, _, end = _walk(entries, last + 1, last, lossy)
        if end is not None and sid not in last_seqs:
            continue  # ended, and the client is done with it
        frames += [p for _, p in replayed]
        entry_report = {"channel": spec.channel, "resumed": True, "replayed": len(replayed), "next_seq": expected}
        if end is not None:
            frames.append(end)
            if channel is not None:  # kept for a later resume of this session
                session.restore(sid, channel, None, spec.params, expected, replayed, end)
            report[sid] = entry_report
            continue
        gap = not replayed and any(e.seq > last for e in entries)  # what follows the client's last chunk is gone
        saved = await store.saved(record.id, sid) if channel is not None and channel.saves_state else None
        reason = _going_on(channel, sid, spec.channel, spec.params, session, expected, replayed, gap, positions, saved, (inputs or {}).get(sid), entry_report)
        if reason is not None:
            end_payload = encode(end_frame(sid, reason))
            frames.append(end_payload)
            store.ended(record.id, sid, expected, end_payload)
            if reason == EndReason.RESUME_GAP:
                entry_report = {"channel": spec.channel, "resumed": False}
        report[sid] = entry_report
    return report, frames


def _going_on(
    channel: Channel | None,
    sid: str,
    name: str,
    raw: dict[str, Any],
    session: Session,
    next_seq: int,
    replayed: list[Any],
    gap: bool,
    positions: list[Any] | None,
    saved: SavedState | None,
    held: int | None,
    report: dict[str, Any],
) -> EndReason | None:
    """Restore a taken-over stream that had not ended, to go on at `next_seq` on this node (from its `saved` state, the
    client holding its pushed input from byte `held`, which `report` gets the position to send again from); or say why it ends."""
    lost_positions = channel is not None and channel.needs_positions and positions is None
    if channel is None or not (channel.restartable or channel.lossy) or lost_positions or channel.status().state != "available":
        why = "its channel cannot start at a position" if channel is not None else "its channel does not exist here"
        if lost_positions:
            why = "Redis no longer holds every chunk it sent"
        if channel is not None and channel.status().state != "available":
            why = f"its channel is {channel.status().state} here"
        log.warning("session %s stream %s (%s) cannot go on on this node: %s", session.id, sid, name, why)
        return EndReason.RESUME_GAP if gap else EndReason.PRODUCER_LOST
    if not session.principal.may_use(name, channel.admin):  # the record is Redis's word, and scopes may differ by node
        log.warning("session %s stream %s (%s) cannot go on on this node: its API key may not use that channel", session.id, sid, name)
        return EndReason.PRODUCER_LOST
    try:
        params = channel.parse(raw)
    except ChannelError as exc:
        log.warning("session %s stream %s (%s) cannot go on on this node: %s", session.id, sid, name, exc.message)
        return EndReason.PRODUCER_LOST
    if not channel.lossy and not channel.restarts(params):
        log.warning("session %s stream %s (%s) cannot go on on this node: its output with these params may differ from run to run", session.id, sid, name)
        return EndReason.RESUME_GAP if gap else EndReason.PRODUCER_LOST
    if not channel.saves_state:
        session.restore(sid, channel, params, raw, next_seq, replayed, None, positions or [])
        return None
    saved_at, input_from = (saved.next, saved.input) if saved is not None else (0, 0)
    if saved_at > next_seq:  # a batch of writes to Redis was lost: the chunks before the state are not all there
        log.warning(
            "session %s stream %s (%s) cannot go on on this node: Redis lacks chunks %d to %d before its saved state",
            session.id,
            sid,
            name,
            next_seq,
            saved_at - 1,
        )
        return EndReason.RESUME_GAP
    if channel.acks_input(params):
        if held is None or held > input_from:
            log.warning(
                "session %s stream %s (%s) cannot go on on this node: it needs the client's input from byte %d, and the client holds it from %s",
                session.id,
                sid,
                name,
                input_from,
                "nowhere (it did not say)" if held is None else f"byte {held}",
            )
            return EndReason.INPUT_LOST
        report["input"] = input_from
    session.restore(sid, channel, params, raw, next_seq, replayed, None, saved=None if saved is None else saved.state, saved_at=saved_at, input_from=input_from)
    return None


def _walk(entries: list[Entry], start: int, last: int, lossy: bool) -> tuple[int, list[tuple[int, Any]], list[Any], Any]:
    """Read a stream's replay entries in order from seq `start`: the next seq, the frames after the client's `last`,
    the positions of the chunks walked, and the `end` frame if the walk reached it (a lossy stream only says if it ended)."""
    expected, replayed, positions, end = start, [], [], None
    for entry in entries:
        if lossy:
            end = entry.payload if entry.end else None
            continue
        if entry.seq != expected:
            break
        if entry.end:
            end = entry.payload
            break
        if entry.seq > last:
            replayed.append((entry.seq, entry.payload))
        positions.append(entry.position)
        expected += 1
    return max(expected, last + 1) if lossy else expected, replayed, positions, end
