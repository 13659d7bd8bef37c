# syntax=docker/dockerfile:1
# The TIDE operator (kopf). Build from the repository root:
#   docker buildx bake -f docker/docker-bake.json operator
# The chart runs it with the same command as ENTRYPOINT below (charts/tide/templates/deployment.yaml) and the
# kopf options as arguments; tests/test_chart_images.py checks that both agree.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tide_sglang ./tide_sglang
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# tide_sglang.stream (the Redis adapter the operator shares with the engines) and DraftRegistry (retention) import
# torch: the CPU build is enough here and keeps the image small. Pass another index or version with --build-arg.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
 && pip install --no-cache-dir "$(ls /wheels/tide_sglang-*.whl)[operator]" \
 && rm -rf /wheels \
 && groupadd --gid 65532 tide && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin tide
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["python", "-m", "tide_operator"]
CMD ["--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
