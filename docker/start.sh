#!/usr/bin/env bash
# The one start-up path shared by both images and CI (CI has no Docker engine: it runs this directly).
#
#   docker/start.sh install            pip install this checkout with extras $SAQ_EXTRAS (default: serve)
#   docker/start.sh serve ARTIFACT     find or build the engine for this machine (cached), gate it, serve
#   docker/start.sh check ARTIFACT     the same start, on a free loopback port; wait for /readyz, send one
#                                      request, check the PNG, stop the server gracefully (SIGTERM)
#
# Environment (all optional):
#   SAQ_BACKEND       onnxruntime (default) | tensorrt
#   SAQ_ENGINE_CACHE  engine cache folder (a volume); engines are keyed by device + runtime version +
#                     artifact hash. Unset: <artifact>/engine (or engine-tensorrt).
#   SAQ_TRT_PROFILE   TensorRT build profile TOML (shapes, batch); part of the cache key
#   SAQ_HOST, SAQ_PORT              bind address (default 127.0.0.1:8000; the images set 0.0.0.0)
#   SAQ_API_KEY_FILE                bearer token file (recommended whenever SAQ_HOST is not loopback)
#   SAQ_SERVE_ARGS                  extra `saq-deploy serve` options, e.g. "--max-batch 16 --strict"
#   SAQ_NO_VALIDATE=1               do not run the parity gate after a build (the server then stays
#                                   not-ready unless SAQ_SERVE_ARGS has --allow-ungated)
#   PYTHON                          interpreter (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BACKEND="${SAQ_BACKEND:-onnxruntime}"

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" >&2; exit 2; }

do_install() {
  local extras="${SAQ_EXTRAS:-serve}"
  "$PYTHON" -m pip install --no-cache-dir -c "$ROOT/constraints.txt" "$ROOT[$extras]"
}

prepare() {  # prints the engine folder
  local artifact="$1"
  local args=("$artifact" --backend "$BACKEND")
  if [[ -n "${SAQ_ENGINE_CACHE:-}" ]]; then args+=(--cache "$SAQ_ENGINE_CACHE"); fi
  if [[ -n "${SAQ_TRT_PROFILE:-}" ]]; then args+=(--profile "$SAQ_TRT_PROFILE"); fi
  if [[ "${SAQ_NO_VALIDATE:-0}" == "1" ]]; then args+=(--no-validate); fi
  "$PYTHON" -m saq_deploy.serve.prepare "${args[@]}" | tail -n 1
}

serve_args() {  # artifact engine host port
  local out=("$1" --backend "$BACKEND" --engine "$2" --host "$3" --port "$4")
  if [[ -n "${SAQ_API_KEY_FILE:-}" ]]; then out+=(--api-key-file "$SAQ_API_KEY_FILE"); fi
  # shellcheck disable=SC2206  # word splitting of the extra options is intended
  if [[ -n "${SAQ_SERVE_ARGS:-}" ]]; then out+=(${SAQ_SERVE_ARGS}); fi
  printf '%s\0' "${out[@]}"
}

do_serve() {
  local artifact="$1" engine
  engine="$(prepare "$artifact")"
  local args=()
  while IFS= read -r -d '' a; do args+=("$a"); done < <(serve_args "$artifact" "$engine" \
    "${SAQ_HOST:-127.0.0.1}" "${SAQ_PORT:-8000}")
  exec "$PYTHON" -m saq_deploy.cli.app serve "${args[@]}"
}

do_check() {
  local artifact="$1" engine port pid rc
  engine="$(prepare "$artifact")"
  port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  local args=()
  while IFS= read -r -d '' a; do args+=("$a"); done < <(serve_args "$artifact" "$engine" 127.0.0.1 "$port")
  "$PYTHON" -m saq_deploy.cli.app serve "${args[@]}" --log-level warning &
  pid=$!
  trap 'kill "$pid" 2>/dev/null || true' EXIT
  local probe=("http://127.0.0.1:$port" --wait "${SAQ_CHECK_WAIT:-180}")
  if [[ -n "${SAQ_API_KEY_FILE:-}" ]]; then probe+=(--api-key-file "$SAQ_API_KEY_FILE"); fi
  rc=0
  "$PYTHON" -m saq_deploy.serve.probe "${probe[@]}" || rc=$?
  kill -TERM "$pid" 2>/dev/null || true
  local src=0
  wait "$pid" || src=$?
  trap - EXIT
  if [[ $rc -ne 0 ]]; then echo "check: FAILED (probe)" >&2; return "$rc"; fi
  # uvicorn re-raises the signal after its graceful shutdown: 143 (128 + SIGTERM) is a clean stop
  if [[ $src -ne 0 && $src -ne 143 ]]; then
    echo "check: FAILED (server exited with $src after SIGTERM)" >&2; return 1
  fi
  echo "check: ok (engine $engine)"
}

[[ $# -ge 1 ]] || usage
cmd="$1"; shift
case "$cmd" in
  install) do_install ;;
  serve) [[ $# -eq 1 ]] || usage; do_serve "$1" ;;
  check) [[ $# -eq 1 ]] || usage; do_check "$1" ;;
  *) usage ;;
esac
