# credsidecar: slim, non-root image.
#   docker build -t credsidecar .
# Stage 1 (the full Debian image: gcc and the Python headers) builds the wheel, with the
# proxy's hot modules compiled by mypyc, and installs it with its dependencies into a
# venv; the build fails if the compiled modules did not build. Stage 2 is the slim
# runtime with that venv only: no compiler, no pip cache, no build tools. Both stages
# are the same Python release on the same Debian, so the extensions fit.
ARG PYTHON=3.11
FROM python:${PYTHON}-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY agent/ agent/
COPY proxy/ proxy/
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/credsidecar \
 && python -m pip --python /opt/credsidecar/bin/python install /wheels/credsidecar-*.whl \
 && /opt/credsidecar/bin/credsidecar version | grep -q "proxy build: compiled with mypyc"

FROM python:${PYTHON}-slim-bookworm
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
