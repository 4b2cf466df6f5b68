# credsidecar: slim, non-root image.
#   docker build -t credsidecar .
# Stage 1 builds the wheel and installs it with its dependencies into a venv;
# stage 2 is the runtime with that venv only (no pip cache, no build tools).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent/ agent/
COPY proxy/ proxy/
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/credsidecar \
 && python -m pip --python /opt/credsidecar/bin/python install /wheels/credsidecar-*.whl

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="credsidecar" \
      org.opencontainers.image.description="Keeps an application's credentials fresh" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/credsidecar /opt/credsidecar
ENV PATH=/opt/credsidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# numeric uid/gid: Kubernetes runAsNonRoot can verify it without /etc/passwd
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["credsidecar"]
CMD ["run", "-c", "/etc/credsidecar/config.yaml"]
