# Sourced by the launchers. with_config_default KEY=VALUE ARGS... sets the array ARGS to ARGS
# with --config.KEY=VALUE placed right after the --config file: config overrides must follow
# --config (absl), and a later --config.KEY given by the user then wins over this default.
with_config_default() {
  local default="--config.$1" seen=0
  shift
  ARGS=()
  while (($#)); do
    ARGS+=("$1")
    if ((seen == 0)); then
      if [[ "$1" == --config && $# -ge 2 ]]; then
        ARGS+=("$2" "$default"); shift; seen=1
      elif [[ "$1" == --config=* ]]; then
        ARGS+=("$default"); seen=1
      fi
    fi
    shift
  done
  ((seen)) || { echo "$0: --config <file> is required" >&2; exit 2; }
}
