#!/bin/sh
# entrypoint.sh - starts sieve in the container image, with the container's defaults
# layered under everything the user gives.
#
# sieve applies, lowest first: built-in defaults < each --config file in order < SIEVE_*
# environment variables < flags. This script writes the container's defaults to a base
# file (listen on 0.0.0.0:8080; the model: the only *.gguf file in the models folder when
# there is exactly one) and passes it first, then the user's file (SIEVE_CONFIG, or
# /etc/sieve/sieve.json when it exists), then the container's arguments. So a mounted
# file, SIEVE_* variables and `docker run IMAGE --flag value` all override the defaults.
#
#   docker run IMAGE [--flag value ...]   run sieve with these flags
#   docker run IMAGE sieve --help         the same, naming the program
#   docker run IMAGE sh                   any other command runs as given
#
# Read here and not passed on: SIEVE_MODELS_DIR (the models folder, default /models).
# The base file goes to $TMPDIR (default /tmp), which must be writable: on Kubernetes
# with a read-only root file system, mount an emptyDir there.
set -eu

models_dir="${SIEVE_MODELS_DIR:-/models}"
unset SIEVE_MODELS_DIR

case "${1:-}" in
    "" | -*) ;;
    sieve) shift ;;
    *) exec "$@" ;;
esac

# A JSON string holding $1.
json_string() {
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}

# Whether the arguments set the model themselves.
has_model_flag() {
    for arg in "$@"; do
        case "$arg" in
            --model | --model=*) return 0 ;;
        esac
    done
    return 1
}

user_config=""
if [ -n "${SIEVE_CONFIG:-}" ]; then
    if [ ! -r "$SIEVE_CONFIG" ]; then
        echo "sieve-entrypoint: SIEVE_CONFIG=$SIEVE_CONFIG is not a readable file" >&2
        exit 2
    fi
    user_config="$SIEVE_CONFIG"
elif [ -r /etc/sieve/sieve.json ]; then
    user_config=/etc/sieve/sieve.json
fi

model="$models_dir/model.gguf"
count=0
for f in "$models_dir"/*.gguf; do
    [ -e "$f" ] || continue
    count=$((count + 1))
    found="$f"
done
if [ "$count" -eq 1 ]; then
    model="$found"
elif [ -z "${SIEVE_MODEL:-}" ] && [ -z "$user_config" ] && ! has_model_flag "$@"; then
    echo "sieve-entrypoint: $count .gguf files in $models_dir; choose one with" \
        "SIEVE_MODEL, --model or \"model\" in a configuration file (trying $model)" >&2
fi

base="$(mktemp "${TMPDIR:-/tmp}/sieve-base.XXXXXX")" || {
    echo "sieve-entrypoint: cannot write the base configuration in ${TMPDIR:-/tmp}" >&2
    exit 2
}
cat >"$base" <<EOF
{
  "_comment": "Container defaults written by sieve-entrypoint; the user's configuration file, SIEVE_* variables and flags override them.",
  "host": "0.0.0.0",
  "port": 8080,
  "model": $(json_string "$model")
}
EOF

if [ -n "$user_config" ]; then
    set -- --config "$user_config" "$@"
fi
set -- --config "$base" "$@"
exec sieve "$@"
