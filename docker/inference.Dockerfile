# syntax=docker/dockerfile:1
# SGLang's official image plus tide-sglang: installing the package registers the TIDE plugin under SGLang's
# `sglang.srt.plugins` entry point, which SGLang loads in every scheduler process (unless SGLANG_PLUGINS names
# a list without `tide`). Build from the repository root:
#   docker buildx bake -f docker/docker-bake.json inference
# The operator runs inference pods with command ["tide", "serve"] (SGLang's server with TIDE's defaults), the
# ENTRYPOINT below; tests/test_chart_images.py checks that both agree. TIDE supports SGLang 0.5.17 to 0.5.23.
ARG SGLANG_IMAGE=lmsysorg/sglang
ARG SGLANG_TAG=v0.5.23

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tide_sglang ./tide_sglang
COPY operator ./operator
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${SGLANG_IMAGE}:${SGLANG_TAG}
COPY --from=build /wheels /wheels
# torch is not a dependency of tide-sglang, so SGLang's CUDA build of torch stays as it is.
RUN pip install --no-cache-dir /wheels/tide_sglang-*.whl && rm -rf /wheels \
 && python -c "from importlib.metadata import entry_points; \
assert any(e.name == 'tide' for e in entry_points(group='sglang.srt.plugins')), 'TIDE plugin not registered'" \
 && python -c "from tide_sglang.plugin import versions; versions.check(versions.installed())" \
 && groupadd --gid 65532 tide && useradd --uid 65532 --gid 65532 --home-dir /home/tide --create-home \
    --shell /usr/sbin/nologin tide
# Not root: the operator runs the pod as this uid (restricted Pod Security), with HOME and /tmp on emptyDirs.
USER 65532:65532
EXPOSE 30000
ENTRYPOINT ["tide", "serve"]
