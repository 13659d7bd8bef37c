# syntax=docker/dockerfile:1
# The online trainer (`tide train`): reads captured hidden states from Redis, trains the EAGLE-3 draft, publishes
# versions to the registry. Build from the repository root:
#   docker buildx bake -f docker/docker-bake.json trainer         # NVIDIA (torch from PyPI, CUDA)
#   docker buildx bake -f docker/docker-bake.json trainer-rocm    # AMD (torch from the ROCm base image)
# The operator runs it with `spec.training.command`, whose default ["tide", "train"] is the ENTRYPOINT below;
# tests/test_chart_images.py checks that both agree.
ARG BASE_IMAGE=python:3.11-slim

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tide_sglang ./tide_sglang
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
# Empty TORCH_SPEC keeps the base image's torch (ROCm images ship their own build).
ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN if [ -n "${TORCH_SPEC}" ]; then pip install --no-cache-dir "${TORCH_SPEC}"; fi \
 && pip install --no-cache-dir "$(ls /wheels/tide_sglang-*.whl)[train]" \
 && rm -rf /wheels \
 && python -c "import torch, tide_sglang.trainer.service; print('torch', torch.__version__)" \
 && groupadd --gid 65532 tide && useradd --uid 65532 --gid 65532 --home-dir /home/tide --create-home \
    --shell /usr/sbin/nologin tide
# Not root: the operator runs the pod as this uid (restricted Pod Security), with HOME and /tmp on emptyDirs.
USER 65532:65532
ENTRYPOINT ["tide", "train"]
