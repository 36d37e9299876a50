# gpt_jax OpenAI-compatible server, CPU.
#   docker build -t gpt-jax .
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/runs/tiny:/model:ro" gpt-jax
# The model is whatever is mounted at /model: a gpt_jax workdir or an HF model directory; for a GGUF file mount it
# and name it: docker run ... -v "$PWD/m.gguf:/models/m.gguf:ro" gpt-jax --config.init_from=/models/m.gguf
# No registry (or an intercepting HTTPS proxy)? tools/build_image.sh --local-base builds FROM a Debian base made
# on this machine; any Debian-based image with `python` (3.11 or newer) and pip on the PATH will do (apt: g++).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS deps

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
# The dependencies in a layer of their own, installed for an empty stand-in package, so that a change to the code
# rebuilds only the last, small layer. The server never imports TensorFlow, TFDS or TensorBoard (they feed and log
# training), so the same step uninstalls them and the largest of what only they need (1.7 GB).
RUN mkdir gpt_jax && touch gpt_jax/__init__.py && pip install ".[serve,convert]" \
    && pip uninstall -y gpt_jax tensorflow-cpu tensorflow-datasets tensorboard tensorboard-data-server keras \
       libclang h5py pyarrow grpcio array_record \
    && rm -rf gpt_jax build gpt_jax.egg-info
COPY gpt_jax ./gpt_jax
RUN pip install --no-deps . && rm -rf build gpt_jax.egg-info

# The CPU decode kernel (gpt_jax/cpu_kernel.cc; it runs on CPUs with AVX-512, XLA computes the same elsewhere),
# built by gpt_jax with g++ in a stage of its own: the server image gets the library and no compiler.
FROM deps AS kernel
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends g++ >/dev/null \
    && GPT_JAX_CACHE=/tmp/kernel python -c "import shutil; from gpt_jax import cpu_kernel; \
shutil.copy(cpu_kernel._build(), '/cpu_kernel.so')"

FROM deps
COPY --from=kernel /cpu_kernel.so /app/cpu_kernel.so
ENV GPT_JAX_CPU_KERNEL_LIBRARY=/app/cpu_kernel.so
RUN useradd --create-home --uid 1000 gptjax
USER gptjax

EXPOSE 8000
# GPT_JAX_API_KEY set at `docker run -e` makes a bearer token required
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
# SIGTERM (docker stop) lets requests in flight finish, up to 30 s; give docker stop at least that long
STOPSIGNAL SIGTERM
# The model is --config.init_from: /model by default (a gpt_jax workdir, an HF directory); pass another after the
# image name, e.g. --config.init_from=/models/m.gguf. The server's own state goes to a fresh --workdir.
ENTRYPOINT ["python", "-m", "gpt_jax.main", "--mode=serve", "--host=0.0.0.0", "--port=8000", "--workdir=/tmp/serve", \
            "--config.init_from=/model"]
