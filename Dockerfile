# provider-agent as a container: the daemon as PID 1, its identity and state in a volume.
#
#   podman build --format docker -t provider-agent .        (docker build -t provider-agent .)
#   podman run -d --name provider-agent --network host --stop-timeout 70 \
#     -v /etc/provider-agent/agent.toml:/etc/provider-agent/agent.toml:ro \
#     -v provider-agent-state:/var/lib/provider-agent provider-agent
#
# BASE is any Debian-like image with python3 (3.11 or later), its venv module and useradd; the
# build stage installs the package and its dependencies from the package index into a venv, and
# the final stage gets only that venv. A build host behind a TLS-intercepting proxy lends the
# build its CA bundle, which pip trusts (`podman build --volume
# /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro …`): a mount, so
# nothing of it stays in the image.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
COPY pyproject.toml README.md /src/
COPY provider_agent /src/provider_agent
RUN python3 -m venv /opt/provider-agent \
    && /opt/provider-agent/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
        --quiet /src

FROM ${BASE}
RUN groupadd --gid 10001 provider-agent \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/provider-agent \
        --no-create-home --shell /usr/sbin/nologin provider-agent \
    && install -d -o provider-agent -g provider-agent -m 0700 /var/lib/provider-agent \
    && install -d -m 0755 /etc/provider-agent
COPY --from=build /opt/provider-agent /opt/provider-agent
# STATE_DIRECTORY: the identity key ($STATE_DIRECTORY/identity.key) and the state (outbox, ledger,
# control socket) live in the volume, whatever agent.toml says (as under systemd).
ENV PATH=/opt/provider-agent/bin:$PATH \
    STATE_DIRECTORY=/var/lib/provider-agent \
    PROVIDER_AGENT_CONFIG=/etc/provider-agent/agent.toml \
    PROVIDER_AGENT_HEALTHZ=http://127.0.0.1:9821/healthz
VOLUME ["/var/lib/provider-agent"]
USER provider-agent:provider-agent
WORKDIR /var/lib/provider-agent
# /healthz on [observability] prometheus_addr (set PROVIDER_AGENT_HEALTHZ when that changes).
# Honoured by docker and by podman with `--format docker`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['PROVIDER_AGENT_HEALTHZ'], timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["provider-agent"]
CMD ["run", "--config", "/etc/provider-agent/agent.toml"]
