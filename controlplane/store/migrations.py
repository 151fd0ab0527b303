"""Numbered, append-only schema migrations, applied in order at start-up.

Ranges: 0001-0009 core (tenants, keys, sites), 0010-0019 jobs, 0020-0029 deployments and usage,
0030-0039 outbox and security. Never edit a migration once committed: add a new one.
JSON goes in TEXT columns (never pickles); times are epoch seconds (REAL).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

from controlplane.core import jobspec
from controlplane.core.errors import Unprocessable

log = logging.getLogger("cpn.store")


def _typed_job_specs(conn: sqlite3.Connection) -> None:
    """Every ``jobs.spec`` decodes as a ``jobspec.JobSpec`` from here on (the store reads it typed).

    A spec that does not (a row written before the spec was typed, from outside the gateway) is
    quarantined: its text is kept in ``job_spec_quarantine`` with the decoder's error, the row gets
    a stand-in spec built from its own columns (no accelerators: the scheduler can never place
    it), a job still waiting fails with the reason, and each is logged, then their count.
    """
    conn.execute(
        "CREATE TABLE job_spec_quarantine (job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, error TEXT NOT NULL, "
        "quarantined_at REAL NOT NULL)")
    now = time.time()
    bad = 0
    rows = conn.execute("SELECT id, spec, name, cards, priority, state FROM jobs").fetchall()
    for job_id, text, name, cards, priority, state in rows:
        try:
            jobspec.decode(text)
            continue
        except Unprocessable as exc:
            error = str(exc)
        bad += 1
        stand_in = jobspec.JobSpec(name=name, cards=cards, accelerators=(), est_hours=0.0, priority=priority)
        conn.execute("INSERT INTO job_spec_quarantine (job_id, spec, error, quarantined_at) VALUES (?, ?, ?, ?)",
                     (job_id, text, error, now))
        conn.execute("UPDATE jobs SET spec = ? WHERE id = ?", (jobspec.encode(stand_in).decode(), job_id))
        if state in ("queued", "restarting"):
            conn.execute(
                "UPDATE jobs SET state = 'failed', reason = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                (f"stored spec is unusable ({error}); kept in job_spec_quarantine", now, now, job_id))
        log.warning("event=job_spec_quarantined job=%s state=%s error=%s", job_id, state, error)
    if bad:
        log.warning("event=job_specs_quarantined count=%d of=%d", bad, len(rows))


Migration = str | Callable[[sqlite3.Connection], None]
"""SQL statements, or a function run on the connection inside the migration's transaction."""

MIGRATIONS: list[tuple[str, Migration]] = [
    (
        "0001_core",
        """
        CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            default_origin TEXT,
            quota_cards INTEGER,
            rate_per_s REAL,
            burst INTEGER,
            created_at REAL NOT NULL
        );
        CREATE TABLE api_keys (
            key_hash TEXT PRIMARY KEY,
            tenant_id TEXT,
            role TEXT NOT NULL CHECK (role IN ('admin', 'tenant')),
            label TEXT,
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
        CREATE TABLE sites (
            id TEXT PRIMARY KEY,
            tier TEXT,
            city TEXT,
            provider TEXT,
            accelerators TEXT NOT NULL DEFAULT '{}',
            first_seen REAL NOT NULL,
            last_registered REAL NOT NULL,
            draining INTEGER NOT NULL DEFAULT 0
        );
        """,
    ),
    (
        # operator site declarations (owner: sitetrust). What the operator declared about a site
        # (tier, city, cards, tenants of its own models) as JSON; NULL for sites only heard of.
        "0002_site_declarations",
        """
        ALTER TABLE sites ADD COLUMN declared TEXT
        """,
    ),
    (
        # jobs (owner: training core). Ids sort before 0020, so this entry sits here in the list.
        "0010_jobs",
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            spec TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'placed', 'starting', 'running', 'restarting',
                                                 'succeeded', 'failed', 'cancelled')),
            priority INTEGER NOT NULL DEFAULT 0,
            cards INTEGER NOT NULL CHECK (cards >= 1),
            attempt INTEGER NOT NULL DEFAULT 0,
            pool TEXT NOT NULL DEFAULT '',
            accelerator TEXT NOT NULL DEFAULT '',
            progress REAL NOT NULL DEFAULT 0,
            checkpoint TEXT NOT NULL DEFAULT '',
            checkpoint_pool TEXT NOT NULL DEFAULT '',
            user_retries INTEGER NOT NULL DEFAULT 0,
            infra_restarts INTEGER NOT NULL DEFAULT 0,
            max_user_retries INTEGER NOT NULL DEFAULT 2,
            max_infra_restarts INTEGER NOT NULL DEFAULT 50,
            attempt_since REAL,
            reason TEXT NOT NULL DEFAULT '',
            placement TEXT,
            card_hours REAL NOT NULL DEFAULT 0,
            energy_cny REAL NOT NULL DEFAULT 0,
            submitted_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            finished_at REAL
        );
        CREATE INDEX jobs_tenant ON jobs (tenant, submitted_at);
        CREATE INDEX jobs_state ON jobs (state);
        CREATE TABLE attempts (
            job_id TEXT NOT NULL REFERENCES jobs (id),
            attempt INTEGER NOT NULL,
            pool TEXT NOT NULL,
            accelerator TEXT NOT NULL,
            cards INTEGER NOT NULL,
            placed_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            exit_reason TEXT NOT NULL DEFAULT '',
            exit_code INTEGER,
            detail TEXT NOT NULL DEFAULT '',
            card_hours REAL NOT NULL DEFAULT 0,
            energy_cny REAL NOT NULL DEFAULT 0,
            breakdown TEXT,
            PRIMARY KEY (job_id, attempt)
        );
        CREATE TABLE job_events (
            job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (job_id, attempt, seq)
        );
        CREATE TABLE idempotency (
            tenant TEXT NOT NULL,
            key TEXT NOT NULL,
            body_hash TEXT NOT NULL,
            job_id TEXT NOT NULL,
            status INTEGER NOT NULL,
            response TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant, key)
        );
        """,
    ),
    (
        # agent events keyed by the sending site too (owner: sitetrust): an event is recorded only
        # from the site holding its attempt, and the key names that site.
        "0011_job_events_site",
        """
        CREATE TABLE job_events_new (
            job_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            site TEXT NOT NULL DEFAULT '',
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (job_id, attempt, site, seq)
        );
        INSERT INTO job_events_new (job_id, attempt, site, seq, kind, body, at)
            SELECT e.job_id, e.attempt, COALESCE(a.pool, ''), e.seq, e.kind, e.body, e.at
            FROM job_events e LEFT JOIN attempts a ON a.job_id = e.job_id AND a.attempt = e.attempt;
        DROP TABLE job_events;
        ALTER TABLE job_events_new RENAME TO job_events
        """,
    ),
    (
        # typed job specs (owner: typedjobs): jobs.spec holds a jobspec.JobSpec as msgspec JSON;
        # rows whose spec does not decode are quarantined (see _typed_job_specs).
        "0012_typed_job_specs",
        _typed_job_specs,
    ),
    (
        "0020_deployments",
        """
        CREATE TABLE deployments (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            model TEXT NOT NULL,
            spec TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'ready', 'degraded', 'deleted')),
            report TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            deleted_at REAL
        );
        CREATE INDEX deployments_tenant ON deployments (tenant, created_at);
        CREATE TABLE replicas (
            deployment TEXT NOT NULL REFERENCES deployments (id),
            site TEXT NOT NULL,
            accelerator TEXT NOT NULL,
            cards REAL NOT NULL CHECK (cards > 0),
            state TEXT NOT NULL CHECK (state IN ('placed', 'loading', 'ready', 'lost', 'removed')),
            updated_at REAL NOT NULL,
            PRIMARY KEY (deployment, site)
        );
        CREATE INDEX replicas_site ON replicas (site, state);
        """,
    ),
    (
        "0021_usage",
        """
        CREATE TABLE usage (
            tenant TEXT NOT NULL,
            model TEXT NOT NULL,
            site TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            card_hours REAL NOT NULL DEFAULT 0,
            energy_cny REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (tenant, model, site)
        );
        """,
    ),
    (
        # Idempotency-Key of POST /v1/deployments (owner: deployments store). Apart from the jobs'
        # ``idempotency`` table: a key names one deployment, and the answer is recorded after the
        # first plan is rendered (NULL until then; see store/deployments.py).
        "0022_deployment_idempotency",
        """
        CREATE TABLE deployment_idempotency (
            tenant TEXT NOT NULL,
            key TEXT NOT NULL,
            body_hash TEXT NOT NULL,
            deployment_id TEXT NOT NULL REFERENCES deployments (id),
            response TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant, key)
        );
        """,
    ),
    (
        # command outbox (owner: training service). Commands to sites are written in the same
        # transaction as the decision causing them and sent afterwards (controlplane/services/outbox.py).
        "0030_outbox",
        """
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            site TEXT NOT NULL,
            kind TEXT NOT NULL,
            job_id TEXT NOT NULL DEFAULT '',
            attempt INTEGER NOT NULL DEFAULT 0,
            body TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'dropped')),
            tries INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            created_at REAL NOT NULL,
            done_at REAL,
            detail TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX outbox_pending ON outbox (state, next_at);
        CREATE INDEX outbox_job ON outbox (job_id, attempt)
        """,
    ),
    (
        # key lifecycle (owner: keys). Every key gets a public id (listed, revoked by; old keys get
        # one derived from their digest), the start of the key for humans, and an optional expiry.
        "0031_keys",
        """
        ALTER TABLE api_keys ADD COLUMN id TEXT;
        ALTER TABLE api_keys ADD COLUMN prefix TEXT NOT NULL DEFAULT '';
        ALTER TABLE api_keys ADD COLUMN expires_at REAL;
        UPDATE api_keys SET id = 'key_' || substr(key_hash, 1, 16) WHERE id IS NULL;
        CREATE UNIQUE INDEX api_keys_id ON api_keys (id)
        """,
    ),
    (
        # the replicated record's usage (owner: store/replica.py, Rule 5): this process's own
        # cumulative counters, committed locally with the usage they count, so counters the record
        # has not acknowledged yet survive the process and are published on its next start. Local only.
        "0032_record_usage_own",
        """
        CREATE TABLE record_usage_own (
            process TEXT NOT NULL,
            tenant TEXT NOT NULL,
            model TEXT NOT NULL,
            site TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            card_hours REAL NOT NULL DEFAULT 0,
            energy_cny REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (process, tenant, model, site)
        )
        """,
    ),
    (
        # autoscaled replicas (owner: lending, issue 15 item 1): when the autoscaler added a replica
        # (NULL: coverage or the floor placed it), so a restarted or newly elected controller may
        # still scale in what the autoscaler added, and only that.
        "0033_replica_scaled",
        """
        ALTER TABLE replicas ADD COLUMN scaled_at REAL
        """,
    ),
]
