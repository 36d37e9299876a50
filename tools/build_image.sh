#!/usr/bin/env bash
# Builds the gpt_jax server image with podman or docker; optionally checks that it answers. `--help` says how.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/build_image.sh [--local-base] [--gpu] [--tag=NAME] [--base=IMAGE] [--engine=podman|docker]
                            [--mirror=URL] [--check=MODEL_DIR] [--port=N]

Builds the gpt_jax OpenAI-compatible server image from Dockerfile (CPU) or, with --gpu, Dockerfile.gpu, with
podman (when installed) or docker. The build context holds only setup.cfg, pyproject.toml, README.md and gpt_jax/.

  --local-base      first make a Debian bookworm base image with Python 3.11 and pip (debootstrap --variant=minbase
                    + import; about 3 minutes, reused while it exists) and build FROM it rather than
                    python:3.11-slim: for machines that cannot pull from an image registry. Needs root and
                    debootstrap. This machine's CA certificates (/usr/local/share/ca-certificates/*.crt) go into the
                    base, and PIP_CERT points pip at them, so pip works behind an intercepting HTTPS proxy.
                    Remove the base (podman rmi gpt-jax-base:bookworm) to make it afresh.
  --base=IMAGE      build FROM this image (default python:3.11-slim; gpt-jax-base:bookworm with --local-base)
  --tag=NAME        the image's name (default gpt-jax; gpt-jax-gpu with --gpu)
  --engine=E        podman or docker (default podman when installed, else docker)
  --mirror=URL      the Debian mirror for --local-base (default: this machine's apt source for Debian, else
                    http://deb.debian.org/debian)
  --check=MODEL_DIR after building, run the image with MODEL_DIR (a gpt_jax workdir or an HF directory) mounted at
                    /model and the port published on 127.0.0.1, wait for /health, POST one /v1/completions and
                    expect a 200 with a text, then stop the container (SIGTERM) and expect exit status 0
  --port=N          the host port for --check (default 8000)
  -h, --help        this text

With podman, a containers.conf that raises the open-file and process limits (nofile 20000, nproc 32768) and,
where runc is installed, makes runc the runtime (crun refuses hosts with hybrid cgroups) is used unless
CONTAINERS_CONF is already set. Run images on such a host the same way:
  CONTAINERS_CONF=conf podman run --rm -p 127.0.0.1:8000:8000 -v "$PWD/runs/tiny:/model:ro" gpt-jax

Exit status: 0 built (and checked); 2 a usage error; 3 no container engine can run here (none installed, not root
for --local-base, no container starts, or under 5 GB of free disk for the engine), said in one line; 1 anything else
(the build or the check failed).
EOF
}

die() { echo "error: $*" >&2; exit 1; }
cannot() { echo "cannot build images here: $*" >&2; exit 3; }
usage_error() { echo "error: $*" >&2; echo "(tools/build_image.sh --help for usage)" >&2; exit 2; }
say() { echo "[build_image] $*" >&2; }

local_base=0 gpu=0 tag="" base="" engine="" mirror="" check_dir="" port=8000
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --local-base) local_base=1 ;;
    --gpu) gpu=1 ;;
    --tag=*) tag="${arg#*=}" ;;
    --base=*) base="${arg#*=}" ;;
    --engine=*) engine="${arg#*=}" ;;
    --mirror=*) mirror="${arg#*=}" ;;
    --check=*) check_dir="${arg#*=}" ;;
    --port=*) port="${arg#*=}" ;;
    *) usage_error "unknown argument '$arg'" ;;
  esac
done
[[ "$port" =~ ^[0-9]+$ ]] || usage_error "--port='$port' is not a number"
if [[ -n "$check_dir" ]]; then
  [[ -f "$check_dir/config.json" ]] || usage_error "--check=$check_dir holds no config.json (not a model directory)"
  check_dir="$(cd "$check_dir" && pwd)"
  command -v python3 >/dev/null || die "--check needs python3 on this machine (for its HTTP requests)"
fi
[[ -z "$tag" ]] && { ((gpu)) && tag=gpt-jax-gpu || tag=gpt-jax; }
dockerfile=Dockerfile
((gpu)) && dockerfile=Dockerfile.gpu
root="$(cd "$(dirname "$0")/.." && pwd)"
[[ -f "$root/$dockerfile" && -d "$root/gpt_jax" ]] || die "$root/$dockerfile or $root/gpt_jax is missing"

work="$(mktemp -d "${TMPDIR:-/tmp}/gpt_jax_image.XXXXXX")"
container=""
cleanup() {
  if [[ -n "$container" ]]; then "$engine" rm -f "$container" >/dev/null 2>&1 || true; fi
  # the base's root file system belongs to root; rm as the same user that made it
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

# --- the engine ---------------------------------------------------------------------------------------------------
if [[ -z "$engine" ]]; then
  if command -v podman >/dev/null; then engine=podman; elif command -v docker >/dev/null; then engine=docker; fi
fi
case "$engine" in
  podman|docker) ;;
  "") cannot "neither podman nor docker is installed" ;;
  *) usage_error "--engine=$engine is not podman or docker" ;;
esac
command -v "$engine" >/dev/null || cannot "$engine is not installed"
if [[ "$engine" == podman && -z "${CONTAINERS_CONF:-}" ]]; then
  {
    echo '[containers]'
    echo 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]'
    if command -v runc >/dev/null; then printf '[engine]\nruntime = "runc"\n'; fi
  } >"$work/containers.conf"
  export CONTAINERS_CONF="$work/containers.conf"
fi
"$engine" info >/dev/null 2>&1 || cannot "'$engine info' fails (no container engine runs here)"

image_exists() {
  if [[ "$engine" == podman ]]; then podman image exists "$1"; else docker image inspect "$1" >/dev/null 2>&1; fi
}

# --- disk space ---------------------------------------------------------------------------------------------------
# Where the engine keeps images and, for podman, where it stages each layer while committing it: building the CPU
# image with podman, base included, took up to 3.5 GB there at once (the image itself is 1.05 GB). Too little free
# space is a condition of this machine, said in one line, like a missing engine.
need_gb=5
free_gb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 {printf "%.1f", $4 / 1048576}'; }
if [[ "$engine" == podman ]]; then
  read -r -a storage_dirs <<<"$(podman info --format '{{.Store.GraphRoot}} {{.Store.ImageCopyTmpDir}}')"
else
  storage_dirs=("$(docker info --format '{{.DockerRootDir}}')")
fi
for dir in "${storage_dirs[@]}"; do
  [[ -d "$dir" ]] || continue
  free="$(free_gb "$dir")"
  awk -v f="$free" -v n="$need_gb" 'BEGIN {exit !(f < n)}' &&
    cannot "only $free GB free at $dir; building the image needs about $need_gb GB there"
done

# --- the base -----------------------------------------------------------------------------------------------------
debian_mirror() {
  # the first Debian (not security) URI of this machine's apt sources, one-line or deb822 format
  local uri
  uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -oE '(https?|file)://[^[:space:]]+' | grep -E '/debian/?$' | head -n 1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

make_local_base() {
  local name="$1" rootfs="$work/rootfs" started=$SECONDS
  [[ "$(id -u)" == 0 ]] || cannot "--local-base needs root (debootstrap, chroot)"
  command -v debootstrap >/dev/null || cannot "--local-base needs debootstrap (apt-get install debootstrap)"
  [[ -n "$mirror" ]] || mirror="$(debian_mirror)"
  say "making the base $name: debootstrap bookworm from $mirror (minutes) ..."
  if ! debootstrap --variant=minbase --include=python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
      >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above)"
  fi
  # this machine's CAs (an intercepting HTTPS proxy's among them) into the base's bundle, for pip in the build
  shopt -s nullglob
  local certs=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
  if ((${#certs[@]})); then
    cp "${certs[@]}" "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >"$work/ca.log" 2>&1 ||
      { cat "$work/ca.log" >&2; die "update-ca-certificates failed in the base"; }
  fi
  # `python` and `pip` are a venv's (Debian's own python3 refuses system-wide pip installs, PEP 668)
  chroot "$rootfs" python3 -m venv /opt/venv || die "python3 -m venv failed in the base"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  tar -C "$rootfs" -c . | "$engine" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' - "$name" >"$work/import.log" 2>&1 ||
    { cat "$work/import.log" >&2; die "$engine import failed"; }
  rm -rf "$rootfs"
  say "made the base $name in $((SECONDS - started))s"
}

if ((local_base)); then
  base="${base:-gpt-jax-base:bookworm}"
  if image_exists "$base"; then say "using the existing base $base"; else make_local_base "$base"; fi
fi
base="${base:-python:3.11-slim}"
# one container from the base: whether containers start here at all (and, with docker, the pull of the base)
if ! "$engine" run --rm "$base" python -c 'import pip' >"$work/probe.log" 2>&1; then
  tail -n 5 "$work/probe.log" >&2
  ((local_base)) && cannot "no container starts from $base (log above)"
  cannot "no container starts from $base (log above); without an image registry try --local-base"
fi

# --- the image ----------------------------------------------------------------------------------------------------
context="$work/context"
mkdir -p "$context"
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' -cf - "$dockerfile" setup.cfg pyproject.toml README.md gpt_jax |
  tar -C "$context" -xf -
build_args=(--build-arg "BASE_IMAGE=$base" -t "$tag" -f "$context/$dockerfile")
[[ "$engine" == podman ]] && build_args+=(--format docker)  # HEALTHCHECK and STOPSIGNAL are docker-format fields
say "building $tag from $dockerfile on $base with $engine ..."
started=$SECONDS
if ! "$engine" build "${build_args[@]}" "$context" 2>&1 | tee "$work/build.log"; then
  grep -qi 'no space left on device' "$work/build.log" &&
    cannot "the disk filled up during the build ($(free_gb "${storage_dirs[0]}") GB free now at ${storage_dirs[0]})"
  die "$engine build failed"
fi
say "built $tag in $((SECONDS - started))s"

# --- the check ----------------------------------------------------------------------------------------------------
[[ -n "$check_dir" ]] || exit 0
container="gpt-jax-check-$$"
say "starting $tag with $check_dir at /model on 127.0.0.1:$port ..."
started=$SECONDS
# no health timers (podman's need systemd, which not every host runs): the check runs HEALTHCHECK once by hand
run_args=(-d --name "$container" -p "127.0.0.1:$port:8000" -v "$check_dir:/model:ro")
if [[ "$engine" == podman ]]; then run_args+=(--health-cmd=none); else run_args+=(--no-healthcheck); fi
# (podman 4.3 still logs an error about systemd health timers here: kept out of sight unless something fails)
if ! "$engine" run "${run_args[@]}" "$tag" >/dev/null 2>"$work/run.log"; then
  cat "$work/run.log" >&2
  die "$engine run failed"
fi
fail() {
  echo "--- container log (last 40 lines)" >&2
  "$engine" logs "$container" 2>&1 | tail -n 40 >&2 || true
  die "$*"
}
http() {  # http GET|POST PATH [JSON]: prints the body on a 200, fails otherwise
  python3 - "$port" "$@" <<'PY'
import sys, urllib.error, urllib.request
port, method, path = sys.argv[1:4]
data = sys.argv[4].encode() if len(sys.argv) > 4 else None
request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=120) as response:
        body = response.read().decode()
        if response.status != 200:
            sys.exit(f"{method} {path}: status {response.status}: {body[:500]}")
        print(body)
except urllib.error.HTTPError as e:
    sys.exit(f"{method} {path}: status {e.code}: {e.read().decode(errors='replace')[:500]}")
except OSError as e:
    sys.exit(f"{method} {path}: {e}")
PY
}
health=""
until health="$(http GET /health 2>/dev/null)"; do
  [[ "$("$engine" inspect -f '{{.State.Running}}' "$container" 2>/dev/null)" == true ]] ||
    fail "the container stopped before /health answered"
  ((SECONDS - started < 600)) || fail "/health did not answer within 600 s"
  sleep 2
done
model="$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["model"])' "$health")"
say "/health answered after $((SECONDS - started))s (model '$model')"
healthcheck="$("$engine" image inspect --format '{{json .Config.Healthcheck}}' "$tag")"
mapfile -d '' health_argv < <(python3 -c 'import json, sys
test = (json.loads(sys.argv[1]) or {}).get("Test") or ["NONE"]
argv = ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:] if test[0] == "CMD" else []
sys.stdout.write("".join(a + "\0" for a in argv))' "$healthcheck")
((${#health_argv[@]})) || fail "the image has no HEALTHCHECK"
"$engine" exec "$container" "${health_argv[@]}" || fail "the image's HEALTHCHECK fails while /health answers"
request="$(python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "prompt": "ROMEO:",
  "max_tokens": 16, "temperature": 0}))' "$model")"
response="$(http POST /v1/completions "$request")" || fail "POST /v1/completions did not return 200"
text="$(python3 -c 'import json, sys; text = json.loads(sys.argv[1])["choices"][0]["text"]
assert isinstance(text, str), text; print(repr(text))' "$response")" ||
  fail "the completion has no text: $response"
say "first completion after $((SECONDS - started))s: $text"
if ! "$engine" stop -t 60 "$container" >/dev/null 2>"$work/stop.log"; then
  cat "$work/stop.log" >&2
  fail "$engine stop failed"
fi
status="$("$engine" inspect -f '{{.State.ExitCode}}' "$container")"
[[ "$status" == 0 ]] || fail "the server exited with status $status after SIGTERM (expected 0)"
say "stopped with SIGTERM: exit status 0; the image answers"
