# pluginpool: one image for workers, the aggregator, Flower and producers.
FROM python:3.11-slim-bookworm

# libseccomp2 lets each run install its seccomp filter; no compiler is needed. tini is
# PID 1: it reaps what is re-parented to it (each pool process's zygote guardian when it
# ends, a zygote whose guardian is gone); Celery's main process reaps only its own children.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libseccomp2 tini \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 pluginpool \
 && useradd --system --uid 10001 --gid pluginpool --home-dir /app --shell /usr/sbin/nologin pluginpool

WORKDIR /app
COPY pyproject.toml README.md ./
COPY policy ./policy
COPY tasks ./tasks
COPY pool ./pool
COPY examples ./examples
RUN pip install --no-cache-dir . \
 && mkdir -p /workspaces && chown pluginpool:pluginpool /workspaces

ENV PLUGINPOOL_WORKSPACE_ROOT=/workspaces \
    PLUGINPOOL_PLUGIN_PATHS='["/app/examples"]' \
    PYTHONUNBUFFERED=1

# Never root: run processes are unprivileged, and Landlock/seccomp need no privilege.
USER 10001:10001

EXPOSE 8008 5555
ENTRYPOINT ["tini", "--", "pluginpool"]
CMD ["worker", "--plugins", "all"]
