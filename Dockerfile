# confedge in a container (docs/DEPLOY.md, "Container").
#
#   docker build -t confedge .
#   docker run -d --name confedge --network host \
#       -v /etc/confedge:/etc/confedge:ro -v confedge-state:/var/lib/confedge confedge
#
# Host networking: TURN hands out relay addresses from turn.relay_ports (16384 ports by default);
# publishing a range that size through Docker's proxy costs one process or NAT rule per port
# and hides the clients' real addresses from the guard, so run with --network host.
# The host's firewall stays the host's job: `confedge firewall` output is loaded on the host.

# -- build: a wheel, with the proxy's hot path compiled by mypyc (needs gcc and the headers) --
# libnghttp2-dev: the HTTP/2 engine on libnghttp2 (the runtime stage has the library itself).
# `confedge --version` in the image says what was built.
FROM debian:bookworm-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
        libnghttp2-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY src ./src
RUN python3 -m venv /opt/confedge \
    && /opt/confedge/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/confedge/bin/pip install --no-cache-dir '.[redis]'

# -- runtime: Python, nft (for guard.firewall), no compiler ------------------------------------
# Ports 80/443 as the non-root user on the host's network (Docker's unprivileged-port sysctl
# does not apply there): the interpreter gets CAP_NET_BIND_SERVICE, which is in Docker's
# default set. nft gets CAP_NET_ADMIN, usable only with --cap-add NET_ADMIN (guard.firewall);
# without it the guard logs once and bans in confedge itself.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 nftables libcap2-bin ca-certificates \
        libnghttp2-14 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --no-create-home --home-dir /var/lib/confedge \
        --shell /usr/sbin/nologin confedge \
    && install -d -o confedge -g confedge -m 0750 /var/lib/confedge \
    && install -d -m 0755 /etc/confedge \
    && setcap cap_net_bind_service=+ep "$(readlink -f /usr/bin/python3)" \
    && setcap cap_net_admin=+ep /usr/sbin/nft
COPY --from=build /opt/confedge /opt/confedge
ENV PATH=/opt/confedge/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
USER confedge
VOLUME ["/var/lib/confedge"]
# Documentation only (host networking publishes nothing): the defaults of SPEC §1.
EXPOSE 80/tcp 443/tcp 3478/udp 3478/tcp 5349/tcp 9090/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["confedge"]
CMD ["run", "--config", "/etc/confedge/confedge.toml"]
