#!/usr/bin/env bash
# Build the CPU image without any container registry and prove it serves.
#
#   make image-check            (or scripts/image/image_check.sh)
#
#   1. container engine: Debian's docker.io (+ debootstrap) when missing; a
#      daemon is started when none answers (systemd when it runs, else dockerd
#      in the background, logging to build/image/dockerd.log).
#   2. base image: a minimal Debian bookworm with its python3.11, made by
#      debootstrap and imported as $BASE_TAG; kept as a tarball under
#      build/image/ so that later runs skip debootstrap.
#   3. the CPU image from deploy/docker/Dockerfile, torch from the CPU wheel
#      in deploy/docker/wheels/ (pip download, host pip configuration), every
#      other package pinned by deploy/docker/constraints.txt.
#   4. Redis and the four services started from the image as the cpu-lite
#      overlay runs them (command, env, user 10001, read-only root, /tmp as a
#      tmpfs, memory limits), on one network where each answers to its
#      Service's cluster DNS name; waits for their health checks, then a
#      simulated device speaks to the gateway: its `stt` is printed, and the
#      check fails without one.
#   5. image size and build time; the containers and network are removed on
#      exit, whatever happens.
#
# Settings (environment): IMAGE_CHECK_TAG (speechfront:cpu-check),
# BASE_TAG (speechfront-base:bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian;
# a snapshot.debian.org URL pins the base), IMAGE_CHECK_NO_CACHE=1 (cold build),
# IMAGE_CHECK_CA (CA bundle handed to the build as a secret; default: the
# host's pip `cert`, else /etc/ssl/certs/ca-certificates.crt).
set -euo pipefail

cd "$(dirname "$0")/../.."
CACHE=build/image
IMAGE=${IMAGE_CHECK_TAG:-speechfront:cpu-check}
BASE_TAG=${BASE_TAG:-speechfront-base:bookworm}
REDIS_IMAGE=${BASE_TAG%%:*}-redis:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PREFIX=sf-image-check
NETWORK=$PREFIX
OVERLAY=deploy/k8s/overlays/cpu-lite
WHEELS=deploy/docker/wheels
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/docker/Dockerfile)
SERVICES=(vad asr speaker gateway)
VENV_BIN=.venv/bin
SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo

log() { printf '\n== %s\n' "$*"; }
die() { printf 'image-check: %s\n' "$*" >&2; exit 1; }

mkdir -p "$CACHE"
[ -x "$VENV_BIN/speechfront" ] || die "no $VENV_BIN/speechfront (the simulator): run make setup first"
command -v kubectl >/dev/null || die "kubectl missing (renders the overlay): run make sysdeps"
command -v espeak-ng >/dev/null || die "espeak-ng missing (the simulator's voice): run make sysdeps"

# ------------------------------------------------------------ 1. the engine
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    $SUDO timeout 300 apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${missing[@]}"
fi

# A client that builds with BuildKit (the Dockerfile mounts secrets and a
# wheel folder): one with the buildx plugin, or Debian's own 20.10 client,
# which still has BuildKit built in (DOCKER_BUILDKIT=1). A newer client without
# buildx would fall back to the legacy builder.
DOCKER=
for candidate in docker /usr/bin/docker; do
    command -v "$candidate" >/dev/null || continue
    if "$candidate" buildx version >/dev/null 2>&1; then
        DOCKER=$candidate
        break
    fi
    major=$("$candidate" --version | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then
        DOCKER=$candidate
        break
    fi
done
[ -n "$DOCKER" ] || die "no docker client with BuildKit: install docker-buildx"
export DOCKER_BUILDKIT=1
dk() { timeout "${DK_TIMEOUT:-120}" "$DOCKER" "$@"; }

if ! dk info >/dev/null 2>&1; then
    if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
        log "starting docker (systemd)"
        $SUDO systemctl start docker
    else
        # No init system to own it: dockerd in the background, left running
        # for the next run (its build cache lives in /var/lib/docker).
        # --iptables=false: the daemon leaves the host's firewall alone. The
        # builds run on the host's network (--network host) and the check's
        # containers need no way out, so no NAT rules are needed.
        log "starting dockerd (log: $CACHE/dockerd.log)"
        # shellcheck disable=SC2086 # DOCKERD_ARGS: several words on purpose
        $SUDO setsid dockerd --iptables=false ${DOCKERD_ARGS:-} \
            >"$CACHE/dockerd.log" 2>&1 </dev/null &
    fi
    for _ in $(seq 60); do
        dk info >/dev/null 2>&1 && break
        sleep 1
    done
    dk info >/dev/null 2>&1 || { tail -20 "$CACHE/dockerd.log" 2>/dev/null; die "no docker daemon after 60 s"; }
fi
echo "engine: $(dk version --format '{{.Server.Version}}'), storage driver $(dk info --format '{{.Driver}}'), client $DOCKER"

# ------------------------------------------------------- 2. the base image
BASE_TAR=$CACHE/base-bookworm.tar
if dk image inspect "$BASE_TAG" >/dev/null 2>&1; then
    echo "base: $BASE_TAG (present)"
else
    if [ ! -s "$BASE_TAR" ]; then
        log "debootstrap bookworm from $MIRROR"
        rootfs=$CACHE/rootfs
        $SUDO rm -rf "$rootfs"
        # python3-distutils provides python3.11-distutils (python3.11-venv
        # needs it); debootstrap does not resolve virtual packages itself.
        $SUDO timeout 1200 debootstrap --variant=minbase \
            --include=python3.11,python3.11-venv,python3-distutils,libopus0,libgomp1,ca-certificates \
            bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
        # Security and point-release updates, as a registry's bookworm image has them.
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
            "$MIRROR" "$MIRROR" | $SUDO tee "$rootfs/etc/apt/sources.list" >/dev/null
        $SUDO cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
        $SUDO timeout 600 chroot "$rootfs" sh -c \
            'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
            >>"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log"; die "updating the base failed"; }
        # What a container never needs: package lists and downloaded debs,
        # manuals, translations, documentation (copyright notices stay).
        $SUDO sh -c "rm -rf '$rootfs'/var/lib/apt/lists/* '$rootfs'/var/cache/apt/* \
            '$rootfs'/usr/share/man/* '$rootfs'/usr/share/info/* '$rootfs'/usr/share/locale/* \
            '$rootfs'/var/log/* '$rootfs'/etc/resolv.conf '$rootfs'/debootstrap \
            && find '$rootfs'/usr/share/doc -type f ! -name copyright -delete"
        $SUDO tar -C "$rootfs" --numeric-owner -cf "$BASE_TAR.tmp" .
        mv "$BASE_TAR.tmp" "$BASE_TAR"
        $SUDO rm -rf "$rootfs"
    fi
    log "importing $BASE_TAR as $BASE_TAG"
    dk import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_TAG" >/dev/null
fi

# ----------------------------------------------------------- 3. the image
shopt -s nullglob
wheels=("$WHEELS"/torch-"$TORCH_VERSION"+cpu-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    log "fetching the CPU torch $TORCH_VERSION wheel"
    # The host's pip configuration first (a find-links folder or mirror that
    # has it), then PyTorch's CPU index.
    timeout 900 "$VENV_BIN/pip" download --no-deps --only-binary :all: -d "$WHEELS" \
        "torch==$TORCH_VERSION+cpu" \
        || timeout 900 "$VENV_BIN/pip" download --no-deps --only-binary :all: -d "$WHEELS" \
            --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"
    wheels=("$WHEELS"/torch-"$TORCH_VERSION"+cpu-*.whl)
    [ ${#wheels[@]} -gt 0 ] || die "no CPU torch wheel in $WHEELS"
fi
shopt -u nullglob
echo "torch: ${wheels[0]}"

ca=${IMAGE_CHECK_CA:-$("$VENV_BIN/pip" config get global.cert 2>/dev/null || true)}
[ -n "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
build=(build --network host -f deploy/docker/Dockerfile -t "$IMAGE"
    --build-arg "BASE_IMAGE=$BASE_TAG" --build-arg TORCH_SOURCE=wheels)
[ -f "$ca" ] && build+=(--secret "id=ca,src=$ca")
[ "${IMAGE_CHECK_NO_CACHE:-0}" = 1 ] && build+=(--no-cache)

log "building $IMAGE (log: $CACHE/build.log)"
previous=$(dk image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
started=$(date +%s)
DK_TIMEOUT=3600 dk "${build[@]}" --progress=plain . >"$CACHE/build.log" 2>&1 \
    || { tail -40 "$CACHE/build.log"; die "image build failed (log: $CACHE/build.log)"; }
build_s=$(($(date +%s) - started))
# The image this build replaced (untagged now) would keep its 2 GB.
if [ -n "$previous" ] && [ "$previous" != "$(dk image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    dk rmi "$previous" >/dev/null 2>&1 || true
fi
size=$(dk image inspect -f '{{.Size}}' "$IMAGE")
cached=$(grep -c '^#[0-9]* CACHED' "$CACHE/build.log" || true)

# Redis for the check, from the same base: Debian's redis-server.
if ! dk image inspect "$REDIS_IMAGE" >/dev/null 2>&1; then
    log "building $REDIS_IMAGE"
    printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*\n' \
        "$BASE_TAG" | DK_TIMEOUT=900 dk build --network host -t "$REDIS_IMAGE" - >"$CACHE/redis-build.log" 2>&1 \
        || { tail -20 "$CACHE/redis-build.log"; die "redis image build failed"; }
fi

# ------------------------------------------------------ 4. the services
containers=()
cleanup() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        for c in "${containers[@]}"; do
            printf '\n---- %s (last lines)\n' "$c"
            dk logs --tail 30 "$c" 2>&1 || true
        done
    fi
    if [ ${#containers[@]} -gt 0 ]; then
        dk rm -f "${containers[@]}" >/dev/null 2>&1 || true
    fi
    dk network rm "$NETWORK" >/dev/null 2>&1 || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Whatever an interrupted run left behind.
for c in redis "${SERVICES[@]}"; do dk rm -f "$PREFIX-$c" >/dev/null 2>&1 || true; done
dk network rm "$NETWORK" >/dev/null 2>&1 || true
dk network create "$NETWORK" >/dev/null

rendered=$CACHE/cpu-lite.yaml
timeout 60 kubectl kustomize "$OVERLAY" >"$rendered"
redis_password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
backend_password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
# The operator's gateway-secrets: the device token secret. The device gets a
# token issued with it, as a provisioned device has.
auth_secret=$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
device_id=02:00:00:00:00:01
client_id=$(cat /proc/sys/kernel/random/uuid)

start() { # workload image [extra helper args...]
    local workload=$1 image=$2 args
    shift 2
    mapfile -t args < <("$VENV_BIN/python" scripts/image/manifest_run_args.py \
        --workload "$workload" --image "$image" --pod-name "$PREFIX-$workload" \
        --secret "redis-auth/password=$redis_password" \
        --secret "redis-backend-auth/password=$backend_password" \
        --secret "gateway-secrets/SF_GATEWAY_AUTH_SECRET=$auth_secret" "$@" <"$rendered")
    [ ${#args[@]} -gt 0 ] || die "$workload: no run arguments from the overlay"
    containers+=("$PREFIX-$workload")
    dk run -d --name "$PREFIX-$workload" --network "$NETWORK" \
        --network-alias "$workload.speechfront.svc.cluster.local" --network-alias "$workload" \
        "${args[@]}" >/dev/null
}

# wait_for NAME SECONDS COMMAND...: run COMMAND inside the container until it
# succeeds; fail early when the container stops.
wait_for() {
    local name=$1 seconds=$2 deadline
    shift 2
    deadline=$(($(date +%s) + seconds))
    while ! DK_TIMEOUT=15 dk exec "$PREFIX-$name" "$@" >/dev/null 2>&1; do
        [ "$(dk inspect -f '{{.State.Running}}' "$PREFIX-$name")" = true ] \
            || die "$name stopped: $(dk inspect -f '{{.State.ExitCode}} {{.State.Error}}' "$PREFIX-$name")"
        [ "$(date +%s)" -lt "$deadline" ] || die "$name not healthy after ${seconds} s"
        sleep 2
    done
    echo "$name: healthy after $(($(date +%s) - deadline + seconds)) s"
}

log "starting redis and the services from $IMAGE"
start redis "$REDIS_IMAGE" --entrypoint redis-server
for s in "${SERVICES[@]}"; do start "$s" "$IMAGE"; done

wait_for redis 60 redis-cli ping
# The probes of the manifests: grpc.health.v1 (SERVING once the model is
# loaded and warm) and the gateway's /readyz. Startup budgets as theirs (300 s).
probe_grpc='import sys; from services.probes import probe_grpc; sys.exit(0 if probe_grpc(int(sys.argv[1]), 3) else 1)'
wait_for vad 300 python -c "$probe_grpc" 50051
wait_for asr 300 python -c "$probe_grpc" 50052
wait_for speaker 300 python -c "$probe_grpc" 50053
probe_http='import sys; from services.probes import probe_http; sys.exit(0 if probe_http(sys.argv[1], 3) else 1)'
wait_for gateway 60 python -c "$probe_http" http://127.0.0.1:8000/readyz

gateway_ip=$(dk inspect -f "{{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" "$PREFIX-gateway")
log "a simulated device speaks to ws://$gateway_ip:8000/xiaozhi/v1/"
sim_out=$CACHE/simulate.log
token=$("$VENV_BIN/speechfront" issue-token --secret "$auth_secret" \
    --device-id "$device_id" --client-id "$client_id")
timeout 150 "$VENV_BIN/speechfront" simulate --url "ws://$gateway_ip:8000/xiaozhi/v1/" \
    --token "$token" --device-id "$device_id" --client-id "$client_id" \
    --text "turn on the kitchen lights" --timeout 120 \
    >"$sim_out" 2>&1 || { cat "$sim_out"; die "the simulated device failed"; }
cat "$sim_out"
grep -q '"type": "stt"' "$sim_out" || die "no stt from the gateway"

# -------------------------------------------------------------- 5. report
log "result"
grep '"type": "stt"' "$sim_out" | sed 's/^/stt:   /'
printf 'image: %s, %s MB (docker image inspect .Size %s bytes)\n' "$IMAGE" "$((size / 1000000))" "$size"
no_cache=
[ "${IMAGE_CHECK_NO_CACHE:-0}" = 1 ] && no_cache=', --no-cache'
printf 'build: %s s (%s of its steps from the build cache%s)\n' "$build_s" "$cached" "$no_cache"
echo "image-check: OK"
