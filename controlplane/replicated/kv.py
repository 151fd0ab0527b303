"""The replicated record: one JetStream KV bucket with 3 replicas (the NATS adapter of this package).

This is the only module of :mod:`controlplane.replicated` that imports ``nats``; everything it
raises is one of :mod:`.errors`.

What it promises:

- Rule 1: one bucket (``CPN_RECORD``) holds every entity kind under ``<kind>.<id>`` keys; ``sys.``
  keys belong to the record itself (leases, fences). One bucket, because a revision is then the
  bucket stream's sequence, one number that orders every write of every kind (a projection's
  ``wait_for(revision)`` needs nothing more), and because JetStream's atomic batches commit within
  one stream only: a decision that writes a job, its attempt and a usage row commits them together.
- Rule 2: a write returns only after the stream's leader has it stored on a quorum of the replicas
  (the JetStream publish acknowledgement of an R3 stream); the servers run with
  ``sync_interval: always``, so that quorum has it on disk. A write keeps trying through a stream
  leader election (a node's loss) for up to ``write_deadline_s``; after that it raises
  :class:`~.errors.NoQuorum`, never a silent success.
- Rule 3: every update is conditional: ``create`` (the key must not exist), ``update(key, value,
  revision)`` (the key's last revision must be ``revision``), ``commit([...])`` (each write's own
  condition, all or nothing). A lost condition raises :class:`~.errors.Conflict`.
- Rule 4: a commit may be fenced by a leader epoch (:class:`Fence`): it then also carries a check
  that ``sys.fence.<name>`` is still at revision ``epoch``, so once a newer leader has written the
  fence, nothing the old one commits can land (:class:`~.errors.Fenced`).
- Rule 5: reads (``get``) are direct gets that any replica answers, so they go on during an
  election; a replica may lag by a few writes, which a compare-and-set prepared from it then
  finds out (Conflict). Reads that must include one's own write go through a projection's
  ``wait_for(revision)``.
- Rule 6: liveness without the stream. A lease holder answers on ``cpn.v1.sys.alive.<digest of its
  identity>`` through this connection (:meth:`Record.answer_alive`) and a candidate asks there
  (:meth:`Record.probe_alive`): core NATS only, so the answer goes on while the record's stream
  elects a new leader. Only the hub identity may publish or subscribe under ``cpn.`` beyond a
  site's own subjects (``natsconf.hub_permissions``), so no site can answer for a leader.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api
from nats.js.kv import KeyValue

from edge_agent.wire import HUB_INBOX_PREFIX
from controlplane.replicated.errors import Conflict, Fenced, NoQuorum, NotFound, RecordError

BUCKET = "CPN_RECORD"
REPLICAS = 3
WRITE_DEADLINE_S = 12.0
"""Default time a write keeps retrying. It must outlast a stream leader election after the loss of
the node that led it: nats-server's Raft waits 4-9 s (fixed, not configurable) before a follower
campaigns, so a shorter deadline turns the loss of one node of three into errors."""
MAX_BATCH = 1000
"""nats-server's default limit of messages in one atomic batch."""
WATCH_HEARTBEAT_S = 1.0
"""A watch's idle heartbeat: nats-py's ordered consumer makes its consumer again when it has heard
nothing for two of these (nats-py's default, 5 s, left a lost consumer unnoticed for 10-20 s)."""
GET_ASK_S = 0.25
"""How long one try of :meth:`Record.get` waits before it is asked again (a replica answers in
about a millisecond on loopback)."""
FILL_ASK_S = 0.5
"""How long one get of :meth:`Record.changes_after` waits before it is asked again (the stream's
leader answers one in about a millisecond on loopback)."""
WATCH_INACTIVE_S = 60.0
"""A watch's consumer left without its subscriber (a watch restarted elsewhere) goes after this."""
_KV_OP = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+ places these (TTL, MaxAge, purge, remove)
_MARKER_DELETES = {"MaxAge", "Purge", "Remove"}

# JetStream headers, as plain strings (nats-py's api.Header is a str Enum).
_EXPECT_SUBJECT_SEQ = api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value
_EXPECT_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"  # nats-server 2.11+; not in nats-py
_BATCH_ID = api.Header.BATCH_ID.value
_BATCH_SEQUENCE = api.Header.BATCH_SEQUENCE.value
_BATCH_COMMIT = api.Header.BATCH_COMMIT.value

FENCE_PREFIX = "sys.fence."
FENCE_CHECK_PREFIX = "sys.fenced."
"""A fenced commit's check message goes to ``sys.fenced.<name>``. nats-server refuses a
subject-sequence check while another check of the same subject is still being replicated (error
10164, a bare "wrong last sequence"), so one process's fenced commits go one at a time (a lock per
fence): a leader commits a whole tick's decisions in one batch rather than many small ones."""

ALIVE_PREFIX = "cpn.v1.sys.alive."
"""A lease holder's liveness subject (Rule 6): ``ALIVE_PREFIX`` + :func:`alive_token` of its identity."""

_WRONG_LAST_SEQUENCE = {10071, 10164}
_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_UNAVAILABLE = {10008, 10023}  # JetStream temporarily unavailable; JetStream not enabled / not ready


class Entry(msgspec.Struct, frozen=True):
    key: str
    value: bytes
    revision: int


class Change(msgspec.Struct, frozen=True):
    """One write seen by a watch; ``value`` None means the key was deleted."""

    key: str
    value: bytes | None
    revision: int


class Write(msgspec.Struct, frozen=True):
    """One write of a commit. ``revision``: the key's last revision it expects (0: must not exist;
    None: unconditional, for keys only one writer ever writes)."""

    key: str
    value: bytes
    revision: int | None = 0


class Fence(msgspec.Struct, frozen=True):
    """A leader's fence: ``epoch`` is the revision of ``sys.fence.<name>`` its acquisition wrote."""

    name: str
    epoch: int

    @property
    def key(self) -> str:
        return FENCE_PREFIX + self.name


def key(kind: str, ident: str) -> str:
    """The record key of one entity (ids are cpn ids: one NATS token)."""
    return f"{kind}.{ident}"


def alive_token(identity: str) -> str:
    """One NATS subject token for a process identity (which may hold dots: a host name)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


class Responder:
    """A liveness responder (:meth:`Record.answer_alive`); :meth:`stop` ends it."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub
        self.answered = 0

    async def stop(self) -> None:
        try:
            await self._sub.unsubscribe()
        except (nats.errors.Error, asyncio.TimeoutError):
            pass  # connection gone: nothing left to unsubscribe


class NodeState(msgspec.Struct, frozen=True, kw_only=True):
    """One NATS server holding a replica of the record."""

    name: str
    leader: bool
    current: bool
    lag: int = 0
    seen_s_ago: float = 0.0


class Record:
    """A connection to the record bucket. Make one with :meth:`open`; ``close()`` when done."""

    def __init__(self, nc: Client, bucket: str, timeout_s: float, write_deadline_s: float) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout_s)
        self.bucket = bucket
        self.timeout_s = timeout_s
        self.write_deadline_s = write_deadline_s
        self._stream = f"KV_{bucket}"
        self._pre = f"$KV.{bucket}."
        self._kv = KeyValue(name=bucket, stream=self._stream, pre=self._pre, js=self._js, direct=True)
        self.writes = 0
        self.retries = 0
        self._fence_locks: dict[str, asyncio.Lock] = {}
        self.conflicts = 0
        self.no_quorum = 0

    def __repr__(self) -> str:
        return (f"<Record {self.bucket} writes={self.writes} conflicts={self.conflicts} retries={self.retries} "
                f"no_quorum={self.no_quorum} connected={self._nc.is_connected}>")

    @classmethod
    async def open(cls, servers: Sequence[str], *, bucket: str = BUCKET, replicas: int = REPLICAS,
                   timeout_s: float = 2.0, write_deadline_s: float = WRITE_DEADLINE_S, name: str = "cpn-record",
                   create: bool = True, connect: Mapping[str, Any] | None = None) -> Record:
        """Connect (to any of ``servers``; reconnecting forever) and make sure the bucket exists.

        Args:
            timeout_s: how long one request waits for its answer.
            write_deadline_s: how long a write keeps retrying (no stream leader, no answer) before
                it raises :class:`~.errors.NoQuorum`.
            connect: more ``nats.connect`` options: the process's NATS identity (``user``,
                ``password``) and ``tls`` context (:func:`controlplane.compose.record_connection`).

        Raises:
            NoQuorum: the bucket could not be created or found within ``write_deadline_s``.
        """

        async def quiet(*_: Any) -> None:
            pass

        nc = await nats.connect(
            list(servers), name=name, connect_timeout=timeout_s, max_reconnect_attempts=-1,
            reconnect_time_wait=0.1, ping_interval=1, max_outstanding_pings=2,
            # the hub identity may subscribe only under its own inbox prefix (natsconf.hub_permissions):
            # on a server with cpn's identities the record's answers arrive there or nowhere
            inbox_prefix=HUB_INBOX_PREFIX.encode(),
            error_cb=quiet, disconnected_cb=quiet, reconnected_cb=quiet, closed_cb=quiet, **(connect or {}),
        )
        record = cls(nc, bucket, timeout_s, write_deadline_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + write_deadline_s
        while create:
            try:
                await record._ensure_bucket(replicas)
                break
            except NoQuorum:
                # a cluster just started (or electing) may not answer its first JetStream requests in
                # time: keep asking until the write deadline, as a write would
                if loop.time() + 0.2 < deadline:
                    await asyncio.sleep(0.2)
                    continue
                await nc.close()
                raise
            except BaseException:
                await nc.close()
                raise
        return record

    async def reconnect(self) -> None:
        """Move this record's connection to another server of the pool (its server may hang: a
        paused node keeps its sockets open, and pings notice that only after seconds)."""
        await self._nc.force_reconnect()

    async def server_answers(self, timeout_s: float) -> bool:
        """Does the server this connection uses answer a ping within ``timeout_s``? (A paused
        node keeps its sockets open; an election of the stream leaves the server answering.)"""
        try:
            # nats-py annotates the timeout as int; it waits with asyncio.wait_for, which takes a float
            await self._nc.flush(timeout=max(0.01, timeout_s))  # type: ignore[arg-type]
            return True
        except (nats.errors.Error, asyncio.TimeoutError):
            return False

    # ------------------------------------------------------------------ liveness (Rule 6)

    async def answer_alive(self, identity: str, holding: Any) -> Responder:
        """Answer liveness probes for ``identity`` while ``holding()`` is true (else stay silent),
        through this connection. nats-py subscribes again after a reconnect."""

        async def answer(msg: Any) -> None:
            if msg.reply and holding():
                try:
                    await msg.respond(identity.encode())
                    responder.answered += 1
                except nats.errors.Error:
                    pass  # the asker will ask again

        try:
            sub = await self._nc.subscribe(ALIVE_PREFIX + alive_token(identity), cb=answer)
        except _TRANSIENT as exc:
            raise NoQuorum(f"liveness responder: {exc!r}") from None
        responder = Responder(sub)
        return responder

    async def probe_alive(self, identity: str, timeout_s: float) -> bool:
        """Did the process ``identity`` answer a liveness probe within ``timeout_s``? False on no
        answer, no responders, or an answer naming another identity; a dead connection of our own
        is also False (the caller proves its own link with a read in the same round)."""
        try:
            msg = await self._nc.request(ALIVE_PREFIX + alive_token(identity), b"", timeout=max(0.01, timeout_s))
        except (nats.errors.Error, asyncio.TimeoutError):
            return False
        return bytes(msg.data) == identity.encode()

    async def nodes(self) -> list[NodeState]:
        """The NATS servers holding the record's replicas, as the stream's Raft group reports them
        (the leader first). Empty when no server answers (no quorum: the stream has no leader)."""
        try:
            info = await self._js.stream_info(self._stream)
        except Exception:  # no stream leader, not connected: say nothing rather than something old
            return []
        cluster = info.cluster
        if cluster is None:  # a single server without clustering
            return [NodeState(name=str(self._nc.connected_url.netloc if self._nc.connected_url else "nats"),
                              leader=True, current=True)]
        out = [NodeState(name=str(cluster.leader or ""), leader=True, current=True)] if cluster.leader else []
        for peer in cluster.replicas or []:
            out.append(NodeState(name=str(peer.name), leader=False, current=bool(peer.current),
                                 lag=int(peer.lag or 0), seen_s_ago=round(float(peer.active or 0) / 1e9, 3)))
        return out

    async def close(self) -> None:
        try:
            await self._nc.close()
        except (OSError, nats.errors.Error):
            pass  # the servers are gone already: nothing left to flush

    async def _ensure_bucket(self, replicas: int) -> None:
        try:
            info = await self._js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            try:
                await self._js.create_key_value(api.KeyValueConfig(
                    bucket=self.bucket, history=1, replicas=replicas, storage=api.StorageType.FILE, direct=True))
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:  # e.g. no suitable peers yet on a cluster just started
                    raise NoQuorum(f"cannot create bucket {self.bucket}: {exc}") from None
                # else another process created it first (and set its options since)
            except _TRANSIENT as exc:
                raise NoQuorum(f"cannot create bucket {self.bucket}: {exc!r}") from None
            try:
                info = await self._js.stream_info(self._stream)
            except nats.js.errors.NotFoundError:  # created, not yet known to the server asked (seen under load)
                raise NoQuorum(f"bucket {self.bucket} created but not found yet") from None
        except _TRANSIENT as exc:
            raise NoQuorum(f"cannot read bucket {self.bucket}: {exc!r}") from None
        if not (info.config.allow_atomic and info.config.allow_direct):
            # nats-py's KeyValueConfig has no switch for atomic batches; the stream has.
            config = info.config
            config.allow_atomic = True
            config.allow_direct = True
            try:
                await self._js.update_stream(config)
            except _TRANSIENT as exc:
                raise NoQuorum(f"cannot enable atomic batches on {self.bucket}: {exc!r}") from None

    # ------------------------------------------------------------------ reads

    async def get(self, key: str, *, ask_s: float = GET_ASK_S) -> Entry:
        """The key's current value and revision, by direct gets (any replica answers, so reads go
        on during an election; one that lags a little is caught by the compare-and-set prepared
        from it). A direct get goes to any replica, a paused one too, and waits for it: asked once
        with the whole ``timeout_s``, 12 of 40 gets timed out after 2 s with the stream's leader
        node paused (measured), each of them a lease read that failed (and a candidate's failed
        read clears a holder's silence). So another get is sent every ``ask_s`` while none has
        answered (the earlier ones stay in flight: a slow answer still counts), every third of
        the stream's leader, until ``timeout_s`` in all; the first answer wins.

        Raises:
            NotFound: no such key, or it was deleted.
            NoQuorum: no replica answered in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        tries: set[asyncio.Task[Any]] = set()
        errors: list[BaseException] = []
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                js = self._nc.jetstream(timeout=left)
                tries.add(asyncio.ensure_future(js.get_msg(self._stream, subject=self._pre + key,
                                                           direct=len(errors) % 3 != 2 or not tries)))
                done, _ = await asyncio.wait(tries, timeout=min(ask_s, left), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    tries.discard(task)
                    exc = task.exception()
                    if exc is None:
                        msg = task.result()
                        if (msg.headers or {}).get(_KV_OP) in ("DEL", "PURGE"):
                            raise NotFound(key)
                        return Entry(key=key, value=bytes(msg.data or b""), revision=int(msg.seq or 0))
                    if isinstance(exc, nats.js.errors.NotFoundError):
                        raise NotFound(key) from None
                    if not isinstance(exc, _READ_ERRORS):
                        raise exc
                    errors.append(exc)
                    if loop.time() + 0.01 >= deadline:
                        break
        finally:
            for task in tries:
                task.cancel()
        raise NoQuorum(f"get {key}: no replica answered within {self.timeout_s:.1f} s "
                       f"({errors[-1]!r})" if errors else f"get {key}: no replica answered within {self.timeout_s:.1f} s")

    async def keys(self, pattern: str) -> list[str]:
        """The keys matching ``pattern`` (NATS wildcards, e.g. ``sys.process.>``); [] if none.

        Raises:
            NoQuorum: the stream did not answer in time.
        """
        try:
            info = await self._js.stream_info(self._stream, subjects_filter=self._pre + pattern)
        except _TRANSIENT as exc:
            raise NoQuorum(f"keys {pattern}: {exc!r}") from None
        subjects = info.state.subjects or {}
        return sorted(subject[len(self._pre):] for subject in subjects)

    async def last_revision(self) -> int:
        """The bucket's latest revision (its stream's last sequence)."""
        try:
            info = await self._js.stream_info(self._stream)
        except _TRANSIENT as exc:
            raise NoQuorum(f"stream info: {exc!r}") from None
        return int(info.state.last_seq)

    # ------------------------------------------------------------------ writes

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` only if it does not exist; return its revision. Raises Conflict if it does."""
        return (await self.commit([Write(key, value, 0)]))[0]

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Compare-and-set: write only if the key's last revision is ``revision``; return the new one."""
        if revision <= 0:
            raise ValueError("update needs the revision the value was read at (create() for new keys)")
        return (await self.commit([Write(key, value, revision)]))[0]

    async def delete(self, key: str, revision: int) -> int:
        """Delete ``key`` if its last revision is ``revision`` (a delete marker, as nats-py writes)."""
        messages = [(self._pre + key, b"", {"KV-Operation": "DEL", _EXPECT_SUBJECT_SEQ: str(revision)})]
        return (await self._send(messages, [], key))[0]

    async def commit(self, writes: Sequence[Write], fence: Fence | None = None, *,
                     deadline_s: float | None = None) -> list[int]:
        """Apply ``writes`` all together or not at all; return their revisions, in order.

        With ``fence``, the commit also checks that the fence is still at ``fence.epoch``;
        ``deadline_s`` overrides ``write_deadline_s`` for this commit.

        Raises:
            Conflict: one write's condition did not hold (nothing was written).
            Fenced: the fence has moved on (nothing was written).
            NoQuorum: no acknowledgement in time (outcome unknown).
        """
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        for w in writes:
            headers: dict[str, str] = {}
            if w.revision is not None:
                headers[_EXPECT_SUBJECT_SEQ] = str(w.revision)
            messages.append((self._pre + w.key, w.value, headers))
        if fence is not None:
            messages.append((self._pre + FENCE_CHECK_PREFIX + fence.name, str(fence.epoch).encode(), {
                _EXPECT_SUBJECT_SEQ: str(fence.epoch),
                _EXPECT_SUBJECT_SEQ_SUBJECT: self._pre + fence.key,
            }))
        if not messages:
            return []
        if len(messages) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} writes in one commit (got {len(messages)})")
        first_key = writes[0].key if writes else FENCE_CHECK_PREFIX
        try:
            if fence is None:
                revisions = await self._send(messages, writes, first_key, deadline_s)
            else:
                async with self._fence_lock(fence.name):
                    revisions = await self._send(messages, writes, first_key, deadline_s)
        except Conflict:
            if fence is not None and await self._fence_moved(fence):
                raise Fenced(f"epoch {fence.epoch} of {fence.name!r} is not the current one", fence.key) from None
            raise
        return revisions[:len(writes)]

    def _fence_lock(self, name: str) -> asyncio.Lock:
        lock = self._fence_locks.get(name)
        if lock is None:
            lock = self._fence_locks[name] = asyncio.Lock()
        return lock

    async def _fence_moved(self, fence: Fence) -> bool:
        try:
            return (await self.get(fence.key)).revision != fence.epoch
        except NotFound:
            return True
        except NoQuorum:
            return False

    async def _send(self, messages: list[tuple[str, bytes, dict[str, str]]], writes: Sequence[Write],
                    key: str, deadline_s: float | None = None) -> list[int]:
        """Send one message or one atomic batch; retry what is safe to retry until the deadline.

        Returns the revisions of the messages, in order. Retries:
        - no responders / JetStream unavailable: no stream leader took the message (an election
          after a node's loss takes nats-server 4-9 s): send again;
        - no acknowledgement (timeout, connection lost): the outcome is unknown; send again, and
          if that conflicts, read back: when every key holds what we wrote, the first send landed.
        """
        loop = asyncio.get_running_loop()
        deadline_s = self.write_deadline_s if deadline_s is None else deadline_s
        deadline = loop.time() + deadline_s
        uncertain = False
        backoff_s = 0.05
        last_error = "no attempt"
        while True:
            attempt_s = min(self.timeout_s, max(0.05, deadline - loop.time()))
            try:
                data = await self._attempt(messages, attempt_s)
                last = self._ack(data, key)
                return [last - len(messages) + 1 + i for i in range(len(messages))]  # a batch is contiguous
            except _NotTaken as exc:
                last_error = str(exc)
            except nats.errors.NoRespondersError:
                last_error = "no stream leader"  # nobody took it: safe to send again
            except _TRANSIENT as exc:
                uncertain = True
                last_error = type(exc).__name__
            except Conflict as conflict:
                if not uncertain:
                    raise
                landed = await self._landed(writes)
                if landed is not None:
                    return landed + [0] * (len(messages) - len(landed))
                if not conflict.in_flight:
                    raise
                # "a write to this key is still being replicated": most likely our own unanswered
                # one (no quorum to commit it). Still unknown: keep trying until the deadline.
                self.conflicts -= 1
                last_error = "our earlier send still in flight"
            if loop.time() + backoff_s >= deadline:
                self.no_quorum += 1
                raise NoQuorum(f"write {key}: not acknowledged by a quorum within {deadline_s:g} s "
                               f"({last_error}){'; it may have been applied' if uncertain else ''}")
            self.retries += 1
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 0.5)

    async def _attempt(self, messages: list[tuple[str, bytes, dict[str, str]]], timeout_s: float) -> bytes:
        if len(messages) == 1:
            subject, value, headers = messages[0]
            msg = await self._nc.request(subject, value, timeout=timeout_s, headers=headers or None)
            return bytes(msg.data)
        batch_id = secrets.token_hex(16)
        n = len(messages)
        for i, (subject, value, headers) in enumerate(messages, 1):
            headers = {**headers, _BATCH_ID: batch_id, _BATCH_SEQUENCE: str(i)}
            if i < n:
                await self._nc.publish(subject, value, headers=headers)
            else:
                headers[_BATCH_COMMIT] = "1"
                msg = await self._nc.request(subject, value, timeout=timeout_s, headers=headers)
        return bytes(msg.data)

    async def _landed(self, writes: Sequence[Write]) -> list[int] | None:
        """After an unacknowledged send: the revisions of ``writes`` if every key holds our value
        (None when that cannot be shown, e.g. for a delete: the caller sees the Conflict)."""
        if not writes:
            return None
        revisions = []
        for w in writes:
            try:
                entry = await self.get(w.key)
            except RecordError:
                return None
            if entry.value != w.value:
                return None
            revisions.append(entry.revision)
        return revisions

    def _ack(self, data: bytes, key: str) -> int:
        try:
            ack = json.loads(data)
        except ValueError:
            raise RecordError(f"write {key}: not a JetStream acknowledgement: {data[:200]!r}") from None
        error = ack.get("error")
        if error:
            code = int(error.get("err_code") or 0)
            description = str(error.get("description") or "")
            if code in _WRONG_LAST_SEQUENCE:
                self.conflicts += 1
                # 10164: the bare "wrong last sequence" a clustered stream answers while another
                # write to the key (or check of the fence) is still being replicated
                raise Conflict(f"write {key}: {description}", key, in_flight=code == 10164)
            if code in _UNAVAILABLE or int(error.get("code") or 0) == 503:
                raise _NotTaken(description)
            raise RecordError(f"write {key}: {description} (err_code {code})")
        self.writes += 1
        return int(ack["seq"])

    # ------------------------------------------------------------------ watch

    async def watch(self, keys: str = ">", *, after: int | None = None,
                    heartbeat_s: float = WATCH_HEARTBEAT_S) -> Watch:
        """Every key's current value (in revision order), then ``None`` once caught up, then each
        later write as it happens. Stop it with :meth:`Watch.stop`.

        ``after``: instead of every key's value, every write after that revision (with one value
        kept per key, the last write of each key written since, deletes as markers), then ``None``,
        then later writes: how a watch that went silent is started again without a snapshot.
        ``heartbeat_s``: the consumer's idle heartbeat (nats-py's ordered consumer notices a lost
        consumer, or a gap, after two silent intervals).

        Raises:
            NoQuorum: the watch could not be set up in time.
        """
        queue: asyncio.Queue[Change | None | _Stop] = asyncio.Queue()
        watch = Watch(queue)

        async def delivered(msg: Any) -> None:
            meta = msg.metadata
            header = msg.headers or {}
            op = header.get(_KV_OP)
            reason = header.get(_MARKER_REASON)
            if op is None and reason is not None and reason not in _MARKER_DELETES:
                change = None  # a server marker of an unknown kind: not a value
            else:
                deleted = op in ("DEL", "PURGE") or reason in _MARKER_DELETES
                change = Change(key=msg.subject[len(self._pre):], value=None if deleted else bytes(msg.data or b""),
                                revision=int(meta.sequence.stream))
            watch.delivered += 1
            if change is not None:
                queue.put_nowait(change)
            if meta.num_pending == 0:
                watch._caught_up()

        config = api.ConsumerConfig(inactive_threshold=WATCH_INACTIVE_S)
        if after is None:
            policy = api.DeliverPolicy.LAST_PER_SUBJECT
        else:
            policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = after + 1
        try:
            sub = await self._js.subscribe(self._pre + keys, stream=self._stream, cb=delivered, ordered_consumer=True,
                                     deliver_policy=policy, idle_heartbeat=heartbeat_s, config=config)
        except _TRANSIENT as exc:
            raise NoQuorum(f"watch: {exc!r}") from None
        except nats.js.errors.APIError as exc:
            raise NoQuorum(f"watch: {exc}") from None
        watch._sub = sub
        try:
            info = await sub.consumer_info()
        except _READ_ERRORS as exc:
            await watch.stop()
            raise NoQuorum(f"watch: {exc!r}") from None
        if info.num_pending == 0 and watch.delivered == 0:
            watch._caught_up()  # nothing to deliver: caught up now
        return watch

    async def changes_after(self, revision: int, upto: int, keys: str = ">", *,
                            ask_s: float = FILL_ASK_S) -> list[Change]:
        """The writes after ``revision`` up to ``upto`` that the record still holds (one per key:
        its last write), oldest first, asked of the stream's leader (the server that answers
        writes) one message at a time: no consumer, so no node in particular, is needed. Not
        direct gets first: every replica takes its share of those, a paused one too, and each of
        its shares would cost a timeout. Each get waits ``ask_s``; with no answer (or an error)
        it is asked again, as a direct get (any replica), then of the leader again, and so on,
        until ``timeout_s`` in all. (A replica that lags answers fewer, never with a gap: each
        holds a prefix of the stream.)

        Raises:
            NoQuorum: the stream's leader did not answer in time (an election under way).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        js = self._nc.jetstream(timeout=ask_s)
        out: list[Change] = []
        seq = revision + 1
        direct = False
        while seq <= upto:
            try:
                msg = await js.get_msg(self._stream, seq=seq, subject=self._pre + keys, next=True, direct=direct)
            except nats.js.errors.NotFoundError:
                break  # nothing more after seq
            except _READ_ERRORS as exc:
                if loop.time() + ask_s < deadline:
                    direct = not direct  # the leader busy or electing: a replica may answer (and back)
                    continue
                if out:
                    break  # what came so far is a prefix: keep it
                raise NoQuorum(f"changes after {revision}: {exc!r}") from None
            if msg.seq is None or msg.seq < seq or msg.seq > upto or msg.subject is None:
                break
            header = msg.headers or {}
            op = header.get(_KV_OP)
            reason = header.get(_MARKER_REASON)
            if op is not None or reason is None or reason in _MARKER_DELETES:
                deleted = op in ("DEL", "PURGE") or reason in _MARKER_DELETES
                out.append(Change(key=msg.subject[len(self._pre):], value=None if deleted else bytes(msg.data or b""),
                                  revision=int(msg.seq)))
            seq = int(msg.seq) + 1
        return out


class _Stop:
    """The end of a stopped watch's queue."""


_STOP = _Stop()


class Watch:
    """An async iterator of :class:`Change` (and one ``None`` when the initial state is complete)."""

    def __init__(self, queue: asyncio.Queue[Change | None | _Stop]) -> None:
        self._queue = queue
        self._sub: Any = None
        self._stopped = False
        self._init_done = False
        self.delivered = 0
        """Messages the watch's consumer delivered (values, deletes, markers)."""

    def _caught_up(self) -> None:
        if not self._init_done:
            self._init_done = True
            self._queue.put_nowait(None)

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Change | None:
        if self._stopped and self._queue.empty():
            raise StopAsyncIteration
        change = await self._queue.get()
        if isinstance(change, _Stop):
            raise StopAsyncIteration
        return change

    async def stop(self) -> None:
        """Unsubscribe (the server drops the consumer ``WATCH_INACTIVE_S`` later; one on a dead
        node goes with it)."""
        if self._stopped:
            return
        self._stopped = True
        self._queue.put_nowait(_STOP)
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            await sub.unsubscribe()
        except (nats.errors.Error, asyncio.TimeoutError):
            pass  # connection gone: nothing left to unsubscribe


class _NotTaken(Exception):
    """JetStream answered that it cannot take the write now (no leader, no quorum): not applied."""


_TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
)
_READ_ERRORS: tuple[type[BaseException], ...] = (*_TRANSIENT, nats.js.errors.APIError)
"""What a watch's setup or a get may raise while the stream elects or a node is gone."""
